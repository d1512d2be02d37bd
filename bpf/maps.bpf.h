/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Every map of the datapath, one comment each. Their names come from
 * VMFENCE_MAPS in vmfence_abi.h: VMFENCE_MAP_ID(VMS, vms) is vmfence_vms_v<N>,
 * N = VMFENCE_MAP_VMS_VERSION (tests/bpf/layout_test.cpp checks every map
 * against the list and the list against the object); libbpf pins them by name
 * under the pin root the agent sets, and re-uses a compatible pinned map on
 * restart. */
#ifndef VMFENCE_MAPS_BPF_H
#define VMFENCE_MAPS_BPF_H

/* ifindex -> VM (policy generation, mode, inline addresses). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VMFENCE_MAX_VMS);
	__type(key, __u32);
	__type(value, struct vmfence_vm);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} VMFENCE_MAP_ID(VMS, vms) SEC(".maps");

/* VM host address -> owner: anti-spoofing beyond the inline addresses, isolation. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VMFENCE_MAX_OWNERS);
	__type(key, struct vmfence_addr);
	__type(value, struct vmfence_owner);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} VMFENCE_MAP_ID(OWNERS, owners) SEC(".maps");

/* VM address prefixes (rare: routed blocks) -> owner. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, VMFENCE_MAX_OWNER_NETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vmfence_addr_key);
	__type(value, struct vmfence_owner);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} VMFENCE_MAP_ID(OWNER_NETS, owner_nets) SEC(".maps");

/* Per-VM policy tries: VMFENCE_POLICY_INDEX(slot, policy_id) -> an LPM trie
 * of peer prefixes -> the port rules of that direction. The agent creates
 * each inner trie (with this template's key and value BTF) and pins it as
 * policy/<vm>_egress, policy/<vm>_ingress. */
struct vmfence_policy_trie {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, VMFENCE_MAX_POLICY_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vmfence_addr_key);
	__type(value, struct vmfence_policy_value);
};

/* The VM's egress rules: destination prefix -> port rules it may open. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, VMFENCE_MAX_POLICIES);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct vmfence_policy_trie);
} VMFENCE_MAP_ID(EGRESS, egress) SEC(".maps");

/* The VM's ingress rules: source prefix -> port rules peers may open. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, VMFENCE_MAX_POLICIES);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct vmfence_policy_trie);
} VMFENCE_MAP_ID(INGRESS, ingress) SEC(".maps");

/* (vm, address) the VM may resolve with ARP/ND. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VMFENCE_MAX_GATEWAYS);
	__type(key, struct vmfence_gateway_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} VMFENCE_MAP_ID(GATEWAYS, gateways) SEC(".maps");

/* Per-VM flow tables: slot -> a hash of the flows the policy allowed, as seen
 * from the VM, sized by the VM's limits.flows (the agent creates each inner
 * map; its max_entries may differ from this template's). A full table refuses
 * new flows of that VM only (flow_limit); idle entries expire by timestamp and
 * the agent sweeps them. */
struct vmfence_flow_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VMFENCE_DEFAULT_FLOWS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vmfence_flow_key);
	__type(value, struct vmfence_flow);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, VMFENCE_MAX_VMS);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct vmfence_flow_table);
} VMFENCE_MAP_ID(FLOWS, flows) SEC(".maps");

/* Per-VM first fragments allowed -> generation, so later fragments may
 * follow; an LRU within the VM only. */
struct vmfence_frag_table {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, VMFENCE_FRAGS_PER_VM);
	__type(key, struct vmfence_frag_key);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, VMFENCE_MAX_VMS);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct vmfence_frag_table);
} VMFENCE_MAP_ID(FRAGS, frags) SEC(".maps");

/* Per-CPU counters by VM slot. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VMFENCE_MAX_VMS);
	__type(key, __u32);
	__type(value, struct vmfence_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} VMFENCE_MAP_ID(COUNTERS, counters) SEC(".maps");

/* Rate limits and their buckets by VM slot (spin-locked: multi-queue TAPs). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VMFENCE_MAX_VMS);
	__type(key, __u32);
	__type(value, struct vmfence_limit);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} VMFENCE_MAP_ID(LIMITS, limits) SEC(".maps");

/* Runtime state by VM slot: quarantine, violation window, event budget. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VMFENCE_MAX_VMS);
	__type(key, __u32);
	__type(value, struct vmfence_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} VMFENCE_MAP_ID(STATE, state) SEC(".maps");

/* Global knobs written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vmfence_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} VMFENCE_MAP_ID(CONFIG, config) SEC(".maps");

/* Violation events to the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, VMFENCE_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} VMFENCE_MAP_ID(EVENTS, events) SEC(".maps");

#endif
