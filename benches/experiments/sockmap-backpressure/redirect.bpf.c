// SPDX-License-Identifier: Apache-2.0
/* Experiment, not part of the agent: the sockmap redirect a mesh would use
 * for a pod <-> agent hop, reduced to one loopback port. Both ends of every
 * TCP connection on TEST_PORT enter a SOCKHASH when established; each
 * sendmsg() is moved straight into the peer socket's receive side
 * (BPF_F_INGRESS) instead of going through TCP. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define TEST_PORT 7777

/* One end of a connection, as that end sees it; the peer's key swaps the
 * two addresses and the two ports. */
struct end {
	__u32 local_ip, remote_ip, local_port, remote_port; /* ports in host order */
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 64);
	__type(key, struct end);
	__type(value, __u32);
} bp_socks SEC(".maps");

SEC("sockops")
int bp_sockops(struct bpf_sock_ops *ops)
{
	struct end e = {};

	if (ops->family != 2 /* AF_INET */)
		return 1;
	if (ops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	e.local_ip = ops->local_ip4;
	e.remote_ip = ops->remote_ip4;
	e.local_port = ops->local_port;
	e.remote_port = bpf_ntohl(ops->remote_port);
	if (e.local_port != TEST_PORT && e.remote_port != TEST_PORT)
		return 1;
	bpf_sock_hash_update(ops, &bp_socks, &e, BPF_NOEXIST);
	return 1;
}

SEC("sk_msg")
int bp_redirect(struct sk_msg_md *msg)
{
	struct end peer = {};

	peer.local_ip = msg->remote_ip4;
	peer.remote_ip = msg->local_ip4;
	peer.local_port = bpf_ntohl(msg->remote_port);
	peer.remote_port = msg->local_port;
	/* No peer in the map: SK_PASS all the same, the bytes go by TCP. */
	bpf_msg_redirect_hash(msg, &bp_socks, &peer, BPF_F_INGRESS);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
