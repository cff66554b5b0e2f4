// SPDX-License-Identifier: Apache-2.0
/* Outbound capture for the processes of a pod's cgroup:
 *  - cgroup/connect4|6 sends a TCP connect() to the pod's own address on
 *    OUTBOUND_PORT (so the agent sees the pod IP as the source, as with nft
 *    REDIRECT) and remembers the asked-for destination in the socket's
 *    local storage;
 *  - sockops, once the connection is established and the client port is
 *    known, files that destination under the client's (netns, ip, port);
 *  - cgroup/getsockopt, attached to the agent's own cgroup (accepted sockets
 *    belong to the cgroup of their listener, i.e. the agent's), answers
 *    SO_ORIGINAL_DST on the agent's accepted socket from that table.
 * Sockets marked AGENT_MARK, loopback and the pod's own addresses are left
 * alone; netns without an `amb_pods` entry are never touched. */
#include "common.h"

char LICENSE[] SEC("license") = "Apache-2.0";

#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* also IP6T_SO_ORIGINAL_DST */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct amb_pod);
} amb_pods SEC(".maps");

/* Freed with the socket, so an aborted connect leaves nothing behind. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct amb_orig_dst);
} amb_sk_dst SEC(".maps");

/* Entries are not deleted when the client closes: the agent may accept a
 * connection after its client already went away (conntrack keeps its entry
 * too). A reused client port overwrites; LRU bounds the rest, and the agent
 * flushes a pod's entries when it detaches. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct amb_flow_key);
	__type(value, struct amb_orig_dst);
} amb_flows SEC(".maps");

DEFINE_STATS

static __always_inline int is_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

/* The pod whose netns the connecting socket is in, if it is to be captured
 * at all (TCP, not the agent's mark, registered netns). */
static __always_inline struct amb_pod *pod_of(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u64 netns;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP_ || !sk)
		return 0;
	if (sk->mark == AGENT_MARK) {
		count(STAT_OUT_SKIPPED);
		return 0;
	}
	netns = bpf_get_netns_cookie(ctx);
	return bpf_map_lookup_elem(&amb_pods, &netns);
}

static __always_inline int remember(struct bpf_sock_addr *ctx, struct amb_orig_dst *dst)
{
	struct amb_orig_dst *v;

	v = bpf_sk_storage_get(&amb_sk_dst, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!v) {
		/* Out of memory: better uncaptured than unanswerable. */
		count(STAT_OUT_SKIPPED);
		return 0;
	}
	*v = *dst;
	count(STAT_OUT_REDIRECTED);
	return 1;
}

SEC("cgroup/connect4")
int amb_connect4(struct bpf_sock_addr *ctx)
{
	struct amb_pod *pod = pod_of(ctx);
	struct amb_orig_dst dst;
	__u32 ip;

	if (!pod || !(pod->flags & POD_HAS_V4))
		return 1;
	ip = ctx->user_ip4;
	if (ip == 0 || (bpf_ntohl(ip) >> 24) == 127 || ip == pod->ip4) {
		count(STAT_OUT_SKIPPED);
		return 1;
	}
	/* Field by field: an initializer would be copied from .rodata. */
	__builtin_memset(&dst, 0, sizeof(dst));
	dst.family = AF_INET;
	dst.addr[0] = ip;
	dst.port = ctx->user_port;
	if (remember(ctx, &dst)) {
		ctx->user_ip4 = pod->ip4;
		ctx->user_port = bpf_htons(OUTBOUND_PORT);
	}
	return 1;
}

SEC("cgroup/connect6")
int amb_connect6(struct bpf_sock_addr *ctx)
{
	struct amb_pod *pod = pod_of(ctx);
	struct amb_orig_dst dst;
	__u32 a[4];

	if (!pod || !(pod->flags & POD_HAS_V6))
		return 1;
	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
	/* Unspecified and loopback stay local. A v4-mapped destination (a
	 * dual-stack socket) is left alone too: it would need a mapped pod
	 * address as rewrite target. */
	if ((a[0] | a[1] | a[2]) == 0 && (a[3] == 0 || a[3] == bpf_htonl(1))) {
		count(STAT_OUT_SKIPPED);
		return 1;
	}
	if (is_v4_mapped(a) || (a[0] == pod->ip6[0] && a[1] == pod->ip6[1] &&
				a[2] == pod->ip6[2] && a[3] == pod->ip6[3])) {
		count(STAT_OUT_SKIPPED);
		return 1;
	}
	dst.family = AF_INET6;
	__builtin_memcpy(dst.addr, a, sizeof(a));
	dst.port = ctx->user_port;
	if (remember(ctx, &dst)) {
		ctx->user_ip6[0] = pod->ip6[0];
		ctx->user_ip6[1] = pod->ip6[1];
		ctx->user_ip6[2] = pod->ip6[2];
		ctx->user_ip6[3] = pod->ip6[3];
		ctx->user_port = bpf_htons(OUTBOUND_PORT);
	}
	return 1;
}

SEC("sockops")
int amb_sockops(struct bpf_sock_ops *skops)
{
	struct amb_flow_key key = {};
	struct amb_orig_dst *dst;
	struct bpf_sock *sk;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	sk = skops->sk;
	if (!sk)
		return 1;
	dst = bpf_sk_storage_get(&amb_sk_dst, sk, 0, 0);
	if (!dst)
		return 1;
	key.netns = bpf_get_netns_cookie(skops);
	key.family = skops->family;
	key.port = skops->local_port;
	if (key.family == AF_INET) {
		key.addr[0] = skops->local_ip4;
	} else {
		key.addr[0] = skops->local_ip6[0];
		key.addr[1] = skops->local_ip6[1];
		key.addr[2] = skops->local_ip6[2];
		key.addr[3] = skops->local_ip6[3];
	}
	bpf_map_update_elem(&amb_flows, &key, dst, BPF_ANY);
	count(STAT_OUT_RECORDED);
	return 1;
}

SEC("cgroup/getsockopt")
int amb_getsockopt(struct bpf_sockopt *ctx)
{
	struct amb_flow_key key = {};
	struct amb_orig_dst *dst;
	struct bpf_sock *sk;
	int v6;

	if (ctx->optname != SO_ORIGINAL_DST)
		return 1;
	if (ctx->level == SOL_IP)
		v6 = 0;
	else if (ctx->level == SOL_IPV6)
		v6 = 1;
	else
		return 1;
	/*
	 * No early return when the kernel answered: conntrack, if loaded in
	 * the pod (the return-path rules load it), knows only the address
	 * connect4 rewrote to. A flow recorded below is authoritative.
	 */
	sk = ctx->sk;
	if (!sk || sk->src_port != OUTBOUND_PORT)
		return 1;

	key.netns = bpf_get_netns_cookie(ctx);
	key.port = bpf_ntohs(sk->dst_port);
	if (sk->family == AF_INET) {
		key.family = AF_INET;
		key.addr[0] = sk->dst_ip4;
	} else if (sk->family == AF_INET6) {
		__u32 a[4];

		a[0] = sk->dst_ip6[0];
		a[1] = sk->dst_ip6[1];
		a[2] = sk->dst_ip6[2];
		a[3] = sk->dst_ip6[3];
		if (is_v4_mapped(a)) {
			/* A dual-stack listener accepted an IPv4 client. */
			key.family = AF_INET;
			key.addr[0] = a[3];
		} else {
			key.family = AF_INET6;
			__builtin_memcpy(key.addr, a, sizeof(a));
		}
	} else {
		return 1;
	}
	dst = bpf_map_lookup_elem(&amb_flows, &key);
	if (!dst) {
		count(STAT_OUT_UNKNOWN);
		return 1;
	}

	if (!v6 && dst->family == AF_INET) {
		/* struct sockaddr_in */
		__u8 *p = ctx->optval;

		if (p + 16 > (__u8 *)ctx->optval_end)
			return 1;
		__builtin_memset(p, 0, 16);
		*(__u16 *)p = AF_INET;
		*(__u16 *)(p + 2) = (__u16)dst->port;
		*(__u32 *)(p + 4) = dst->addr[0];
		ctx->optlen = 16;
	} else if (v6 && dst->family == AF_INET6) {
		/* struct sockaddr_in6 */
		__u8 *p = ctx->optval;

		if (p + 28 > (__u8 *)ctx->optval_end)
			return 1;
		__builtin_memset(p, 0, 28);
		*(__u16 *)p = AF_INET6;
		*(__u16 *)(p + 2) = (__u16)dst->port;
		__builtin_memcpy(p + 8, dst->addr, 16);
		ctx->optlen = 28;
	} else {
		/* Asked in the other family: let the caller try the next one. */
		return 1;
	}
	ctx->retval = 0;
	count(STAT_OUT_ANSWERED);
	return 1;
}
