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
 * DNS, when the pod's entry has a DNS port: a TCP connect or UDP
 * connect/sendmsg to port 53 of a non-loopback address goes to the agent's
 * DNS proxy on the pod's loopback instead (as istio-cni's REDIRECT rules
 * do); recvmsg and getpeername then show the asked-for server as the
 * peer, so resolvers that check where an answer came from accept it.
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

/* The DNS server a redirected socket asked for (its last one, for an
 * unconnected UDP socket that asks several: they all answer from the
 * same proxy). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct amb_orig_dst);
} amb_sk_dns SEC(".maps");

DEFINE_STATS

static __always_inline int is_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

/* The pod whose netns the socket is in, if it is to be captured at all
 * (TCP or UDP, not the agent's mark, registered netns). */
static __always_inline struct amb_pod *pod_of(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u64 netns;

	if (!sk)
		return 0;
	if (!(ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP_) &&
	    !(ctx->type == SOCK_DGRAM && ctx->protocol == IPPROTO_UDP_))
		return 0;
	if (sk->mark == AGENT_MARK) {
		if (ctx->protocol == IPPROTO_TCP_)
			count(STAT_OUT_SKIPPED);
		return 0;
	}
	netns = bpf_get_netns_cookie(ctx);
	return bpf_map_lookup_elem(&amb_pods, &netns);
}

/* The DNS server asked for; a socket without one gets none (no memory):
 * then its query goes where it was sent, which works, where an answer
 * from an unexpected address would be dropped by the resolver. */
static __always_inline struct amb_orig_dst *dns_remember(struct bpf_sock_addr *ctx)
{
	return bpf_sk_storage_get(&amb_sk_dns, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
}

/* A query to port 53 of a non-loopback IPv4 address: to the proxy on
 * 127.0.0.1. Returns 1 when redirected. */
static __always_inline int dns4(struct bpf_sock_addr *ctx, struct amb_pod *pod)
{
	struct amb_orig_dst *v;
	__u32 ip = ctx->user_ip4;

	if (!pod->dns_port || ctx->user_port != bpf_htons(DNS_PORT))
		return 0;
	if (ip == 0 || (bpf_ntohl(ip) >> 24) == 127)
		return 0;
	v = dns_remember(ctx);
	if (!v)
		return 0;
	v->family = AF_INET;
	v->addr[0] = ip;
	v->addr[1] = 0;
	v->addr[2] = 0;
	v->addr[3] = 0;
	v->port = ctx->user_port;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons((__u16)pod->dns_port);
	count(STAT_DNS_REDIRECTED);
	return 1;
}

/* The same for IPv6: to ::1, or to ::ffff:127.0.0.1 for a v4-mapped
 * server (a dual-stack socket asking an IPv4 server). */
static __always_inline int dns6(struct bpf_sock_addr *ctx, struct amb_pod *pod)
{
	struct amb_orig_dst *v;
	__u32 a[4];
	int mapped;

	if (!pod->dns_port || ctx->user_port != bpf_htons(DNS_PORT))
		return 0;
	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
	mapped = is_v4_mapped(a);
	if (mapped) {
		if (a[3] == 0 || (bpf_ntohl(a[3]) >> 24) == 127)
			return 0;
	} else if ((a[0] | a[1] | a[2]) == 0 && (a[3] == 0 || a[3] == bpf_htonl(1))) {
		return 0;
	}
	v = dns_remember(ctx);
	if (!v)
		return 0;
	v->family = AF_INET6;
	__builtin_memcpy(v->addr, a, sizeof(a));
	v->port = ctx->user_port;
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = mapped ? bpf_htonl(0x0000ffff) : 0;
	ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
	ctx->user_port = bpf_htons((__u16)pod->dns_port);
	count(STAT_DNS_REDIRECTED);
	return 1;
}

/* The DNS proxy's port in this socket's netns, if it is a registered pod
 * with DNS capture and the peer address shown is that port. */
static __always_inline int from_dns_proxy(struct bpf_sock_addr *ctx)
{
	struct amb_pod *pod;
	__u64 netns;

	if (!ctx->sk)
		return 0;
	netns = bpf_get_netns_cookie(ctx);
	pod = bpf_map_lookup_elem(&amb_pods, &netns);
	return pod && pod->dns_port && ctx->user_port == bpf_htons((__u16)pod->dns_port);
}

/* An answer from the proxy (or the peer of a redirected socket) shown as
 * coming from the server the socket asked. */
static __always_inline void dns_restore4(struct bpf_sock_addr *ctx)
{
	struct amb_orig_dst *v;

	if (ctx->user_ip4 != bpf_htonl(0x7f000001) || !from_dns_proxy(ctx))
		return;
	v = bpf_sk_storage_get(&amb_sk_dns, ctx->sk, 0, 0);
	if (!v || v->family != AF_INET)
		return;
	ctx->user_ip4 = v->addr[0];
	ctx->user_port = v->port;
	count(STAT_DNS_RESTORED);
}

static __always_inline void dns_restore6(struct bpf_sock_addr *ctx)
{
	struct amb_orig_dst *v;
	__u32 a[4];

	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
	if (a[0] != 0 || a[1] != 0)
		return;
	if (!(a[2] == 0 && a[3] == bpf_htonl(1)) &&
	    !(a[2] == bpf_htonl(0x0000ffff) && a[3] == bpf_htonl(0x7f000001)))
		return;
	if (!from_dns_proxy(ctx))
		return;
	v = bpf_sk_storage_get(&amb_sk_dns, ctx->sk, 0, 0);
	if (!v)
		return;
	if (v->family == AF_INET6) {
		ctx->user_ip6[0] = v->addr[0];
		ctx->user_ip6[1] = v->addr[1];
		ctx->user_ip6[2] = v->addr[2];
		ctx->user_ip6[3] = v->addr[3];
	} else if (a[2] != 0) {
		/* A dual-stack socket's v4-mapped query went through the IPv4
		 * hook (sendmsg4), which remembered an IPv4 server. */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = v->addr[0];
	} else {
		return;
	}
	ctx->user_port = v->port;
	count(STAT_DNS_RESTORED);
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

	if (!pod || dns4(ctx, pod) || ctx->protocol != IPPROTO_TCP_)
		return 1;
	if (!(pod->flags & POD_HAS_V4))
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

	if (!pod || dns6(ctx, pod) || ctx->protocol != IPPROTO_TCP_)
		return 1;
	if (!(pod->flags & POD_HAS_V6))
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

SEC("cgroup/sendmsg4")
int amb_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct amb_pod *pod = pod_of(ctx);

	if (pod && ctx->protocol == IPPROTO_UDP_)
		dns4(ctx, pod);
	return 1;
}

SEC("cgroup/sendmsg6")
int amb_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct amb_pod *pod = pod_of(ctx);

	if (pod && ctx->protocol == IPPROTO_UDP_)
		dns6(ctx, pod);
	return 1;
}

SEC("cgroup/recvmsg4")
int amb_recvmsg4(struct bpf_sock_addr *ctx)
{
	dns_restore4(ctx);
	return 1;
}

SEC("cgroup/recvmsg6")
int amb_recvmsg6(struct bpf_sock_addr *ctx)
{
	dns_restore6(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int amb_getpeername4(struct bpf_sock_addr *ctx)
{
	dns_restore4(ctx);
	return 1;
}

SEC("cgroup/getpeername6")
int amb_getpeername6(struct bpf_sock_addr *ctx)
{
	dns_restore6(ctx);
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
