// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Measurement only (bench/xdp): the same minimal anti-spoof (+ optional
 * one-entry egress allowlist) check, once as an XDP program and once as a tc
 * (tcx) program, so the two hooks can be compared on a TAP. Not vmfence's
 * datapath: see bpf/vmfence.bpf.c for the real from_vm program. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader before load. */
const volatile __u32 policy_on = 0; /* 1: also drop if dst/port not allowed */

struct src_val {
	__u8 mac[6];
	__u16 pad;
	__u32 ifindex;
};

/* source IPv4 -> owner MAC and TAP (one entry: the VM). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, struct src_val);
} srcs SEC(".maps");

struct lpm_key {
	__u32 prefixlen;
	__u32 addr;
};

/* allowed destination prefix -> allowed UDP/TCP port (0 = any). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u32);
} allow SEC(".maps");

/* 0 pass, 1 drop (spoofed), 2 drop (policy), 3 pass (not IPv4) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} cnt SEC(".maps");

static __always_inline void bump(__u32 i)
{
	__u64 *c = bpf_map_lookup_elem(&cnt, &i);
	if (c)
		(*c)++;
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

/* 0 pass, 1 drop spoofed, 2 drop policy, 3 pass non-IPv4 */
static __always_inline int judge(void *data, void *data_end, __u32 ifindex)
{
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct udphdr *l4;
	struct src_val *sv;
	struct lpm_key k;
	__u32 *port, saddr;

	if ((void *)(eth + 1) > data_end)
		return 1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return 3;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->ihl != 5)
		return 1;
	saddr = ip->saddr;
	sv = bpf_map_lookup_elem(&srcs, &saddr);
	if (!sv || sv->ifindex != ifindex || !mac_eq(sv->mac, eth->h_source))
		return 1;
	if (!policy_on)
		return 0;
	k.prefixlen = 32;
	k.addr = ip->daddr;
	port = bpf_map_lookup_elem(&allow, &k);
	if (!port)
		return 2;
	if (*port) {
		if (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP)
			return 2;
		l4 = (void *)(ip + 1);
		if ((void *)(l4 + 1) > data_end || bpf_ntohs(l4->dest) != *port)
			return 2;
	}
	return 0;
}

SEC("xdp")
int bench_xdp(struct xdp_md *ctx)
{
	int r = judge((void *)(long)ctx->data, (void *)(long)ctx->data_end, ctx->ingress_ifindex);

	bump(r);
	return (r == 1 || r == 2) ? XDP_DROP : XDP_PASS;
}

SEC("tc")
int bench_tc(struct __sk_buff *skb)
{
	int r = judge((void *)(long)skb->data, (void *)(long)skb->data_end, skb->ifindex);

	bump(r);
	return (r == 1 || r == 2) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
