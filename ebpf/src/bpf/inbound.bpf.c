// SPDX-License-Identifier: Apache-2.0
/* Inbound capture: a tc ingress classifier on the pod's interface that hands
 * TCP for the pod's own addresses to the agent's transparent listener on
 * INBOUND_PLAINTEXT_PORT with bpf_sk_assign. The packet keeps its
 * destination, so the accepted socket's local address is the original
 * destination. HBONE (15008) and packets of existing connections (the
 * agent's own ones included) go on to the stack untouched. */
#include "common.h"
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>

char LICENSE[] SEC("license") = "Apache-2.0";

/* Addresses of attached pods; the value is the pod's netns cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct amb_addr);
	__type(value, __u64);
} amb_pod_addrs SEC(".maps");

DEFINE_STATS

#define IP_OFFSET_MASK 0x1fff

/* Not ours: let later programs and the stack decide (TCX_NEXT / continue
 * to the next tc filter), so we compose with other tc programs. */
#define PASS TC_ACT_UNSPEC

static __always_inline int steer(struct __sk_buff *skb, struct bpf_sock_tuple *t,
				 __u32 tuple_len, __be16 *dport, int syn_only)
{
	struct bpf_sock *sk;
	long err;

	/* Established first: packets of a connection the stack already owns
	 * (accepted captured ones, the agent's own outgoing ones, handshakes in
	 * progress) follow the normal path. A listener found here is just an
	 * application socket and does not count; a SYN hitting a TIME_WAIT
	 * entry starts a new connection, which must be captured too. */
	sk = bpf_skc_lookup_tcp(skb, t, tuple_len, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		__u32 state = sk->state;

		bpf_sk_release(sk);
		if (state != BPF_TCP_LISTEN && !(state == BPF_TCP_TIME_WAIT && syn_only)) {
			count(STAT_IN_ESTABLISHED);
			return PASS;
		}
	}

	*dport = bpf_htons(INBOUND_PLAINTEXT_PORT);
	sk = bpf_skc_lookup_tcp(skb, t, tuple_len, BPF_F_CURRENT_NETNS, 0);
	if (!sk) {
		/* The agent is not serving this pod (yet): fail open, as if not
		 * attached. The attachment lives only as long as the agent. */
		count(STAT_IN_NO_LISTENER);
		return PASS;
	}
	if (sk->state != BPF_TCP_LISTEN) {
		/* A real connection to the capture port itself. */
		bpf_sk_release(sk);
		count(STAT_IN_ESTABLISHED);
		return PASS;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		/* Capture was due but the listener refused it (e.g. SO_REUSEPORT):
		 * fail closed rather than bypass the agent. */
		count(STAT_IN_ASSIGN_FAILED);
		return TC_ACT_SHOT;
	}
	count(STAT_IN_ASSIGNED);
	return TC_ACT_OK;
}

static __always_inline int is_pod_addr(__u32 family, const __u32 *addr)
{
	struct amb_addr key = { .family = family };

	key.addr[0] = addr[0];
	if (family == AF_INET6) {
		key.addr[1] = addr[1];
		key.addr[2] = addr[2];
		key.addr[3] = addr[3];
	}
	return bpf_map_lookup_elem(&amb_pod_addrs, &key) != 0;
}

SEC("classifier")
int amb_inbound(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_sock_tuple t = {};
	struct tcphdr *tcp;

	if ((void *)(eth + 1) > end)
		return PASS;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP_ ||
		    (ip->frag_off & bpf_htons(IP_OFFSET_MASK))) {
			count(STAT_IN_NOT_TCP);
			return PASS;
		}
		tcp = (void *)ip + ip->ihl * 4;
		if (ip->ihl < 5 || (void *)(tcp + 1) > end) {
			count(STAT_IN_NOT_TCP);
			return PASS;
		}
		if (!is_pod_addr(AF_INET, &ip->daddr)) {
			count(STAT_IN_NOT_POD);
			return PASS;
		}
		if (tcp->dest == bpf_htons(HBONE_PORT)) {
			count(STAT_IN_HBONE);
			return PASS;
		}
		if (ip->saddr == bpf_htonl(KUBELET_PROBE_V4)) {
			count(STAT_IN_PROBE);
			return PASS;
		}
		t.ipv4.saddr = ip->saddr;
		t.ipv4.daddr = ip->daddr;
		t.ipv4.sport = tcp->source;
		t.ipv4.dport = tcp->dest;
		return steer(skb, &t, sizeof(t.ipv4), &t.ipv4.dport, tcp->syn && !tcp->ack);
	}

	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		/* Extension headers are not walked: such packets pass. */
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP_) {
			count(STAT_IN_NOT_TCP);
			return PASS;
		}
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > end) {
			count(STAT_IN_NOT_TCP);
			return PASS;
		}
		if (!is_pod_addr(AF_INET6, ip6->daddr.in6_u.u6_addr32)) {
			count(STAT_IN_NOT_POD);
			return PASS;
		}
		if (tcp->dest == bpf_htons(HBONE_PORT)) {
			count(STAT_IN_HBONE);
			return PASS;
		}
		if (ip6->saddr.in6_u.u6_addr32[0] == bpf_htonl(KUBELET_PROBE_V6_0) &&
		    ip6->saddr.in6_u.u6_addr32[1] == bpf_htonl(KUBELET_PROBE_V6_1) &&
		    ip6->saddr.in6_u.u6_addr32[2] == bpf_htonl(KUBELET_PROBE_V6_2) &&
		    ip6->saddr.in6_u.u6_addr32[3] == bpf_htonl(KUBELET_PROBE_V6_3)) {
			count(STAT_IN_PROBE);
			return PASS;
		}
		__builtin_memcpy(t.ipv6.saddr, ip6->saddr.in6_u.u6_addr32, 16);
		__builtin_memcpy(t.ipv6.daddr, ip6->daddr.in6_u.u6_addr32, 16);
		t.ipv6.sport = tcp->source;
		t.ipv6.dport = tcp->dest;
		return steer(skb, &t, sizeof(t.ipv6), &t.ipv6.dport, tcp->syn && !tcp->ack);
	}

	count(STAT_IN_NOT_TCP);
	return PASS;
}
