/* Types and constants shared by the capture programs and mirrored in
 * `src/maps.rs` (same layout, same values): change both together. */
#ifndef AMBIENT_COMMON_H
#define AMBIENT_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define IPPROTO_TCP_ 6 /* linux/in.h is avoided: it pulls libc headers */
#define IPPROTO_UDP_ 17
#define DNS_PORT 53

#define AGENT_MARK 0x539
#define OUTBOUND_PORT 15001
#define INBOUND_PLAINTEXT_PORT 15006
#define HBONE_PORT 15008
/* Where istio-cni's node rules SNAT kubelet probes to (its default
 * HOST_PROBE_SNAT_ADDRESS 169.254.7.127 and HOST_PROBE_V6_SNAT_ADDRESS
 * fd16:9254:7127:1337:ffff:ffff:ffff:ffff): such probes reach the
 * application directly, as istio-cni's in-pod rules let them. */
#define KUBELET_PROBE_V4 0xa9fe077fU
#define KUBELET_PROBE_V6_0 0xfd169254U
#define KUBELET_PROBE_V6_1 0x71271337U
#define KUBELET_PROBE_V6_2 0xffffffffU
#define KUBELET_PROBE_V6_3 0xffffffffU

/* An address of either family, network byte order; IPv4 uses addr[0]. */
struct amb_addr {
	__u32 family;
	__u32 addr[4];
};

/* Per pod network namespace (keyed by netns cookie): where outbound
 * connections are sent, so the agent sees the pod IP as their source, and
 * the port of the agent's DNS proxy on the pod's loopback (0: DNS is not
 * captured). */
#define POD_HAS_V4 1
#define POD_HAS_V6 2
struct amb_pod {
	__u32 flags;
	__u32 ip4;
	__u32 ip6[4];
	__u32 dns_port; /* host byte order */
};

/* The client end of a captured outbound connection: what the agent's
 * accepted socket sees as its peer. */
struct amb_flow_key {
	__u64 netns;
	__u32 family;
	__u32 addr[4];
	__u32 port; /* host byte order */
};

/* The destination the application asked for. */
struct amb_orig_dst {
	__u32 family;
	__u32 addr[4];
	__u32 port; /* network byte order, as in sockaddr */
};

/* Counter slots of the `amb_stats` per-CPU array. */
enum amb_stat {
	STAT_IN_NOT_TCP = 0,
	STAT_IN_NOT_POD = 1,
	STAT_IN_HBONE = 2,
	STAT_IN_ESTABLISHED = 3,
	STAT_IN_ASSIGNED = 4,
	STAT_IN_NO_LISTENER = 5,
	STAT_IN_ASSIGN_FAILED = 6,
	STAT_OUT_REDIRECTED = 7,
	STAT_OUT_SKIPPED = 8,
	STAT_OUT_RECORDED = 9,
	STAT_OUT_ANSWERED = 10,
	STAT_OUT_UNKNOWN = 11,
	STAT_IN_PROBE = 12,
	STAT_DNS_REDIRECTED = 13,
	STAT_DNS_RESTORED = 14,
	STAT_MAX = 16,
};

#define DEFINE_STATS                                                      \
	struct {                                                          \
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);                  \
		__uint(max_entries, STAT_MAX);                            \
		__type(key, __u32);                                       \
		__type(value, __u64);                                     \
	} amb_stats SEC(".maps");                                         \
	static __always_inline void count(__u32 slot)                     \
	{                                                                 \
		__u64 *c = bpf_map_lookup_elem(&amb_stats, &slot);        \
		if (c)                                                    \
			*c += 1;                                          \
	}

#endif
