// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Benchmark references: an empty TC program, and the minimal program that
 * parses the frame and does only the lookups the policy needs (one hash on
 * ifindex, one LPM on the destination: the VM's own prefixes, in one trie). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "vmfence_abi.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VMFENCE_MAX_VMS);
	__type(key, __u32);
	__type(value, struct vmfence_vm);
} ref_vms SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, VMFENCE_MAX_POLICY_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vmfence_addr_key);
	__type(value, struct vmfence_policy_value);
} ref_egress SEC(".maps");

SEC("tc")
int ref_empty(struct __sk_buff *skb)
{
	return -1;
}

SEC("tc")
int ref_minimal(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct vmfence_addr_key k = { .prefixlen = 128 };
	__u32 ifindex = skb->ifindex;
	struct vmfence_vm *vm;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(0x0800))
		return 2;
	vm = bpf_map_lookup_elem(&ref_vms, &ifindex);
	if (!vm)
		return 2;
	k.addr[10] = 0xff;
	k.addr[11] = 0xff;
	__builtin_memcpy(&k.addr[12], &ip->daddr, 4);
	return bpf_map_lookup_elem(&ref_egress, &k) ? -1 : 2;
}
