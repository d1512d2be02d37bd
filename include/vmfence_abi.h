/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * vmfence_abi.h - every struct, constant and map name shared by the BPF
 * datapath (bpf/) and the C++ agent (agent/, maps/). Valid C (clang -target
 * bpf) and C++.
 *
 * Rules: fixed-width types only, explicit padding, no includes except the
 * type header, byte order stated per field. When a pinned map's key or value
 * layout changes, bump that map's VMFENCE_MAP_*_VERSION: map names carry it
 * as a suffix so an agent never adopts a pinned map of another layout.
 *
 * The two lists (VMFENCE_MAPS, VMFENCE_REASONS) are X-macros: pass a macro
 * taking a row's columns and it is expanded once per row.
 */
#ifndef VMFENCE_ABI_H
#define VMFENCE_ABI_H

#ifdef __bpf__
/* BPF side: vmlinux.h already defines __u8..__u64. */
#else
#include <linux/bpf.h> /* struct bpf_spin_lock */
#include <linux/types.h>
#endif

/* Not a map suffix any more (each map has its own version, below). */
#define VMFENCE_ABI_VERSION 1

#define VMFENCE_STR_(x) #x
#define VMFENCE_STR(x)  VMFENCE_STR_(x)

/* Pin directory. */
#define VMFENCE_PIN_DIR        "/sys/fs/bpf/vmfence"

/*
 * Layout version of each pinned map: the _vN suffix of its name. Bump it when
 * the map's type, flags, key, value or inner map changes (a struct below, or
 * VMFENCE_REASON_SLOTS for the counters): the agent then creates a new map
 * under the new name and removes the old pin instead of adopting it. The
 * BPF identifier changes with it, so the compiler points at every use
 * (bpf/vmfence.bpf.c, the skeleton fields in agent/datapath/loader.cpp);
 * scripts and docs name maps in full (README's map table, tests/e2e/,
 * bench/): grep for the old name.
 */
#define VMFENCE_MAP_VMS_VERSION        1
#define VMFENCE_MAP_OWNERS_VERSION     2
#define VMFENCE_MAP_OWNER_NETS_VERSION 2
#define VMFENCE_MAP_EGRESS_VERSION     2
#define VMFENCE_MAP_INGRESS_VERSION    2
#define VMFENCE_MAP_GATEWAYS_VERSION   1
#define VMFENCE_MAP_FLOWS_VERSION      2
#define VMFENCE_MAP_FRAGS_VERSION      2
#define VMFENCE_MAP_COUNTERS_VERSION   3
#define VMFENCE_MAP_STATE_VERSION      1
#define VMFENCE_MAP_CONFIG_VERSION     3
#define VMFENCE_MAP_EVENTS_VERSION     1
#define VMFENCE_MAP_LIMITS_VERSION     1

/*
 * Every pinned map, one row each: X(ID, name). Its name, as BPF identifier
 * (bpf/maps.bpf.h, the skeleton) and as pin file, is
 * vmfence_<name>_v<VMFENCE_MAP_<ID>_VERSION>: VMFENCE_MAP_ID(ID, name).
 * C++ uses the string, VMFENCE_MAP_<ID>. A new map needs a row, a version,
 * a VMFENCE_MAP_<ID> below, its definition in bpf/maps.bpf.h, a member of
 * MapSet (maps/pinned_maps.*) and a row in tests/bpf/layout_test.cpp.
 */
#define VMFENCE_MAPS(X)                                                                         \
	X(VMS,        vms)        /* ifindex -> vm          */                                  \
	X(OWNERS,     owners)     /* host addr -> owning vm */                                  \
	X(OWNER_NETS, owner_nets) /* addr LPM -> owning vm  */                                  \
	X(EGRESS,     egress)     /* policy -> VM's dst LPM */                                  \
	X(INGRESS,    ingress)    /* policy -> VM's src LPM */                                  \
	X(GATEWAYS,   gateways)   /* (vm, addr) -> 1        */                                  \
	X(FLOWS,      flows)      /* slot -> VM flow table  */                                  \
	X(FRAGS,      frags)      /* slot -> VM frag table  */                                  \
	X(COUNTERS,   counters)   /* per-CPU, per vm        */                                  \
	X(STATE,      state)      /* per vm runtime state   */                                  \
	X(CONFIG,     config)     /* global knobs, 1 entry  */                                  \
	X(EVENTS,     events)     /* violation ring buffer  */                                  \
	X(LIMITS,     limits)     /* per vm rate limits     */

/* The identifier vmfence_<name>_v<N> (the version macro expanded first). */
#define VMFENCE_MAP_ID(ID, name) \
	VMFENCE_MAP_ID_(vmfence_##name##_v, VMFENCE_MAP_##ID##_VERSION)
#define VMFENCE_MAP_ID_(prefix, version)  VMFENCE_MAP_ID__(prefix, version)
#define VMFENCE_MAP_ID__(prefix, version) prefix##version
/* The same as a string literal, e.g. "vmfence_vms_v1". */
#define VMFENCE_MAP_NAME(ID, name) \
	VMFENCE_STR(VMFENCE_MAP_ID_(vmfence_##name##_v, VMFENCE_MAP_##ID##_VERSION))

/* Pin names (string literals; tests/bpf/layout_test.cpp checks each against
 * its VMFENCE_MAPS row). */
#define VMFENCE_MAP_VMS        VMFENCE_MAP_NAME(VMS, vms)
#define VMFENCE_MAP_OWNERS     VMFENCE_MAP_NAME(OWNERS, owners)
#define VMFENCE_MAP_OWNER_NETS VMFENCE_MAP_NAME(OWNER_NETS, owner_nets)
#define VMFENCE_MAP_EGRESS     VMFENCE_MAP_NAME(EGRESS, egress)
#define VMFENCE_MAP_INGRESS    VMFENCE_MAP_NAME(INGRESS, ingress)
#define VMFENCE_MAP_GATEWAYS   VMFENCE_MAP_NAME(GATEWAYS, gateways)
#define VMFENCE_MAP_FLOWS      VMFENCE_MAP_NAME(FLOWS, flows)
#define VMFENCE_MAP_FRAGS      VMFENCE_MAP_NAME(FRAGS, frags)
#define VMFENCE_MAP_COUNTERS   VMFENCE_MAP_NAME(COUNTERS, counters)
#define VMFENCE_MAP_STATE      VMFENCE_MAP_NAME(STATE, state)
#define VMFENCE_MAP_CONFIG     VMFENCE_MAP_NAME(CONFIG, config)
#define VMFENCE_MAP_EVENTS     VMFENCE_MAP_NAME(EVENTS, events)
#define VMFENCE_MAP_LIMITS     VMFENCE_MAP_NAME(LIMITS, limits)
#define VMFENCE_LINK_DIR       VMFENCE_PIN_DIR "/links"

/* Map sizes (documented in README "Bounded state"). */
#define VMFENCE_MAX_VMS             16384
#define VMFENCE_MAX_OWNERS          65536 /* VM host addresses (/32, /128) */
#define VMFENCE_MAX_OWNER_NETS      4096  /* VM addresses that are prefixes */
#define VMFENCE_MAX_POLICY_PREFIXES 65536 /* per VM and direction */
/* Two policy tries per VM and direction (the live generation and the one a
 * change fills): VMFENCE_MAP_EGRESS / _INGRESS hold this many. */
#define VMFENCE_MAX_POLICIES        (2 * VMFENCE_MAX_VMS)
#define VMFENCE_MAX_GATEWAYS        65536
/* Flow and fragment state is per VM (one inner map per slot), so one VM's
 * flood never evicts another VM's flows. */
#define VMFENCE_DEFAULT_FLOWS       16384  /* limits.flows when absent */
#define VMFENCE_MAX_FLOWS_PER_VM    1048576
#define VMFENCE_FRAGS_PER_VM        256
#define VMFENCE_EVENTS_BYTES        (1u << 20)
/* Port rules that apply to one destination prefix (after the compiler has
 * merged in the rules of every covering, less specific prefix). */
#define VMFENCE_MAX_PORT_RULES      16

/* VM modes (field `mode`). */
enum vmfence_mode {
	VMFENCE_MODE_FILTERED  = 0, /* every packet gets the full check        */
	VMFENCE_MODE_CONNTRACK = 1, /* first packet of a flow, then cached     */
	VMFENCE_MODE_SAMPLED   = 2, /* 1 in 1/sample_rate packets checked      */
	VMFENCE_MODE_DIRECT    = 3, /* anti-spoofing and isolation only        */
};

/* Kind of a drop reason (last column of VMFENCE_REASONS). */
#define VMFENCE_DROP_VIOLATION 0 /* event; from the VM: toward on_violation   */
#define VMFENCE_DROP_REPORTED  1 /* event; never held against the VM          */
#define VMFENCE_DROP_QUIET     2 /* counted only: no event, never a violation */

/*
 * Why a packet was dropped, one row each: X(value, NAME, "name", kind).
 *   value  enum vmfence_reason VMFENCE_REASON_<NAME>: the index of
 *          vmfence_counters.drops[] and vmfence_event.reason. Distinct from
 *          TC_ACT_*. Append only: never renumber, never reuse a value.
 *   name   the reason in logs, journald (VMFENCE_REASON), `vmfence status`
 *          and the e2e tests (maps/reasons.cpp: reason_name()).
 *   kind   VMFENCE_DROP_<kind>: VIOLATION, REPORTED (an event, never held
 *          against the VM) or QUIET (README "What happens to a packet": a
 *          guest's own noise and limits, and what an outsider or a lost
 *          packet can cause; counted only). Only drops of packets from the
 *          VM count toward on_violation.
 * Rows are in value order without gaps (checked in maps/reasons.cpp).
 *
 * Adding a drop reason is a layout change: the counters keep one slot per
 * reason (VMFENCE_REASON_SLOTS), and datapaths, agents and scripts of other
 * versions read reasons by number or by name. To add one:
 *  - append a row with the next value (VMFENCE_REASON_COUNT follows);
 *  - when VMFENCE_REASON_COUNT would exceed VMFENCE_REASON_SLOTS, raise
 *    VMFENCE_REASON_SLOTS (struct vmfence_counters grows) and bump
 *    VMFENCE_MAP_COUNTERS_VERSION; README's map table says "room for N";
 *  - a QUIET or REPORTED reason: bpf/vmfence.bpf.c (is_quiet(),
 *    counts_as_violation()) must agree with its kind; a QUIET one goes in
 *    the quiet lists of tests/e2e/lib.sh (counters_match_log) and
 *    tests/e2e/noise_lib.sh (NON_VIOLATION; TO_VM_ONLY if only the to-VM
 *    hook gives it);
 *  - README: the "Drop reasons" list and the quiet ones named after it;
 *  - tests/fuzz/model.cpp: the reference model must give the new reason
 *    where the datapath does (fuzz_differential compares them by name);
 *  - tests/bpf/datapath_test.cpp: a case that produces it.
 */
#define VMFENCE_REASONS(X)                                                                      \
	X(0,  NONE,            "none",            REPORTED)  /* not a drop                     */ \
	X(1,  UNKNOWN_IFINDEX, "unknown_ifindex", REPORTED)  /* no VM bound to this interface  */ \
	X(2,  MALFORMED,       "malformed",       VIOLATION) /* truncated or invalid headers   */ \
	X(3,  BAD_ETHERTYPE,   "bad_ethertype",   VIOLATION) /* VLAN tags, unknown L3          */ \
	X(4,  SPOOFED_MAC,     "spoofed_mac",     VIOLATION)                                    \
	X(5,  SPOOFED_IP,      "spoofed_ip",      VIOLATION)                                    \
	X(6,  SPOOFED_ARP,     "spoofed_arp",     VIOLATION)                                    \
	X(7,  SPOOFED_ND,      "spoofed_nd",      VIOLATION) /* NA/NS lies, rogue RA/redirect  */ \
	X(8,  ARP_DENIED,      "arp_denied",      VIOLATION) /* ARP/NS for a foreign target    */ \
	X(9,  CROSS_GROUP,     "cross_group",     VIOLATION) /* VM to VM across groups         */ \
	X(10, EGRESS_DENIED,   "egress_denied",   VIOLATION) /* not allowlisted                */ \
	X(11, INGRESS_DENIED,  "ingress_denied",  VIOLATION) /* unsolicited inbound            */ \
	X(12, FRAGMENT,        "fragment",        QUIET)     /* fragment of no allowed packet  */ \
	X(13, IMDS_DENIED,     "imds_denied",     VIOLATION) /* IMDS without imds: true        */ \
	X(14, QUARANTINED,     "quarantined",     REPORTED)  /* VM quarantined after violation */ \
	X(15, NO_POLICY,       "no_policy",       REPORTED)  /* spec removed, iface remains    */ \
	X(16, NOT_FOR_VM,      "not_for_vm",      VIOLATION) /* to-VM packet for another addr  */ \
	X(17, FLOW_LIMIT,      "flow_limit",      QUIET)     /* VM's flow table full           */ \
	X(18, LINK_LOCAL,      "link_local",      QUIET)     /* link-local noise not carried   */ \
	X(19, UNASSIGNED_SRC,  "unassigned_src",  QUIET)     /* self-made IPv6 addr in its /64 */ \
	X(20, STALE_REPLY,     "stale_reply",     QUIET)     /* reply-shaped, no flow held     */ \
	X(21, RATE_LIMITED,    "rate_limited",    QUIET)     /* over the VM's limits (rate)    */

#define VMFENCE_REASON_ENUM_(value, NAME, name, kind) VMFENCE_REASON_##NAME = value,
#define VMFENCE_REASON_ONE_(value, NAME, name, kind)  + 1
enum vmfence_reason {
	VMFENCE_REASONS(VMFENCE_REASON_ENUM_)
	VMFENCE_REASON_COUNT = 0 VMFENCE_REASONS(VMFENCE_REASON_ONE_),
};
#undef VMFENCE_REASON_ENUM_
#undef VMFENCE_REASON_ONE_
/* Room in the counters for reasons still to come without a layout change. */
#define VMFENCE_REASON_SLOTS 24

/* VMFENCE_DROP_* of a reason; a value outside the list is a violation. */
static inline int vmfence_reason_kind(__u32 reason)
{
	switch (reason) {
#define VMFENCE_REASON_CASE_(value, NAME, name, kind) \
	case value:                                   \
		return VMFENCE_DROP_##kind;
	VMFENCE_REASONS(VMFENCE_REASON_CASE_)
#undef VMFENCE_REASON_CASE_
	}
	return VMFENCE_DROP_VIOLATION;
}

/* Hook that saw the packet. */
enum vmfence_direction {
	VMFENCE_DIR_FROM_VM = 0, /* TC ingress on the TAP */
	VMFENCE_DIR_TO_VM   = 1, /* TC egress on the TAP  */
};

/* vmfence_vm.flags */
#define VMFENCE_VM_F_QUARANTINE   0x1 /* terminate action: quarantine on violation */
#define VMFENCE_VM_F_NO_POLICY    0x2 /* spec removed: drop everything             */
#define VMFENCE_VM_F_MORE_ADDRS   0x4 /* addresses beyond the inline v4/v6 ones    */
#define VMFENCE_VM_F_RATE_LIMITED 0x8 /* has rate limits (VMFENCE_MAP_LIMITS)      */

/* skb->mark bit the from_vm program sets on every packet it passes: the packet
 * entered the host through the TAP of the VM owning its source address. The
 * to_vm program trusts a VM source address only with it. A guest cannot set
 * it; nothing else of the mark is touched. */
#define VMFENCE_MARK_FROM_VM 0x10000000u

/* Addresses are 16 bytes; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d) so one
 * LPM trie serves both families. Network byte order. */
#define VMFENCE_V4_PREFIX_BITS 96

/* VMFENCE_MAP_VMS: key __u32 ifindex (host order). Written only by the agent,
 * one whole-value update per change (RCU): a packet sees the old or the new
 * policy, never a mix. The VM's first IPv4 and IPv6 address are inline so the
 * anti-spoofing check needs no lookup; VMFENCE_VM_F_MORE_ADDRS sends the
 * datapath to the owner maps for the rest. */
struct vmfence_vm {
	__u32 vm_id;            /* FNV-1a of the VM name                   */
	__u32 group_id;         /* FNV-1a of the group name                */
	__u32 policy_id;        /* generation; its parity picks the trie   */
	__u32 slot;             /* index into counters / state arrays      */
	__u32 sample_threshold; /* sampled: check when prandom < this       */
	__u32 window_ms;        /* on_violation.window_ms                  */
	__u16 threshold;        /* on_violation.threshold                  */
	__u8  mac[6];           /* the VM's MAC                             */
	__u8  mode;             /* enum vmfence_mode                        */
	__u8  flags;            /* VMFENCE_VM_F_*                           */
	__u8  v4_plen;          /* prefix of v4_addr; 0 = none inline      */
	__u8  v6_plen;          /* prefix of v6_addr; 0 = none inline      */
	__u8  v4_addr[4];       /* network order */
	__u8  v6_addr[16];      /* network order */
};

/* The EUI-64 link-local address of a MAC (fe80::, U/L bit flipped, ff:fe in
 * the middle). The compiler registers every VM's as its own; the datapath
 * names a vouched frame's sender VM by it. */
static inline void vmfence_eui64_link_local(const __u8 mac[6], __u8 out[16])
{
	for (int i = 0; i < 16; i++)
		out[i] = 0;
	out[0] = 0xfe;
	out[1] = 0x80;
	out[8] = mac[0] ^ 0x02;
	out[9] = mac[1];
	out[10] = mac[2];
	out[11] = 0xff;
	out[12] = 0xfe;
	out[13] = mac[3];
	out[14] = mac[4];
	out[15] = mac[5];
}

/* VMFENCE_MAP_OWNERS key: a VM's full-length address. */
struct vmfence_addr {
	__u8  addr[16];         /* network order, IPv4-mapped */
};

/* VMFENCE_MAP_OWNER_NETS key: a VM's address that is a prefix (e.g. a routed
 * /28). prefixlen counts bits of the mapped address (IPv4 /28 = 124). */
struct vmfence_addr_key {
	__u32 prefixlen;
	__u8  addr[16];         /* network order, IPv4-mapped */
};

/* vmfence_owner.flags */
#define VMFENCE_OWNER_F_REMOTE 0x1 /* a VM of another host (fleet): trusted as a
				    * source only from a fleet interface */

/* Remote VMs' vm_id: FNV-1a of "host/name", so it never names a local VM by
 * accident; the flag, not the id, is what the datapath trusts. */
struct vmfence_owner {
	__u32 vm_id;
	__u32 group_id;
	__u32 flags;            /* VMFENCE_OWNER_F_* */
};

/* VMFENCE_MAP_CONFIG value (array, key 0). */
#define VMFENCE_CFG_F_OWNER_NETS 0x1 /* VMFENCE_MAP_OWNER_NETS is not empty */
/* host.json "fleet": remote VMs are in the owner maps, so a destination's
 * owner is looked up for every packet (the egress tries' VMFENCE_POLICY_F_VM_NET
 * marks only local VM address space). */
#define VMFENCE_CFG_F_FLEET      0x2
#define VMFENCE_MAX_FLEET_IFACES 8   /* fleet.interfaces */
struct vmfence_config {
	__u32 flags;            /* VMFENCE_CFG_F_*                        */
	__u32 event_budget;     /* events per VM per budget window        */
	__u64 budget_window_ns; /* 0 = VMFENCE_DEFAULT_BUDGET_WINDOW_NS   */
	__u32 tcp_timeout_s;    /* flow_timeouts; 0 = the default below   */
	__u32 udp_timeout_s;
	__u32 icmp_timeout_s;   /* ICMP and every other protocol          */
	__u32 fleet_ifaces;     /* used entries of fleet_ifindex[]        */
	/* fleet.interfaces present now: the only ones a packet claiming a
	 * remote VM's address may arrive on (skb->ingress_ifindex). */
	__u32 fleet_ifindex[VMFENCE_MAX_FLEET_IFACES];
};
/* vmfence_flow.flags */
#define VMFENCE_FLOW_F_CLOSING    0x1 /* TCP FIN/RST seen: short linger     */
#define VMFENCE_FLOW_F_UNCHECKED  0x2 /* recorded by an unsampled packet    */
#define VMFENCE_FLOW_F_UNANSWERED 0x4 /* a peer opened it, the VM never sent */
#define VMFENCE_DEFAULT_TCP_TIMEOUT_S  7440
#define VMFENCE_DEFAULT_UDP_TIMEOUT_S  180
#define VMFENCE_DEFAULT_ICMP_TIMEOUT_S 30
#define VMFENCE_TCP_CLOSING_TIMEOUT_S  120 /* after a FIN or a peer's RST */
#define VMFENCE_UNANSWERED_TIMEOUT_S   30  /* peer-opened, no packet from the VM yet */

/* Idle seconds before a flow is forgotten: one rule for the datapath and the
 * agent's sweep. t_* are the configured flow_timeouts (0 = default). */
static inline __u32 vmfence_flow_timeout_s(__u8 proto, __u8 flow_flags, __u32 t_tcp, __u32 t_udp, __u32 t_icmp)
{
	__u32 s;

	if (proto == 6)
		s = t_tcp ? t_tcp : VMFENCE_DEFAULT_TCP_TIMEOUT_S;
	else if (proto == 17)
		s = t_udp ? t_udp : VMFENCE_DEFAULT_UDP_TIMEOUT_S;
	else
		s = t_icmp ? t_icmp : VMFENCE_DEFAULT_ICMP_TIMEOUT_S;
	if ((flow_flags & VMFENCE_FLOW_F_CLOSING) && s > VMFENCE_TCP_CLOSING_TIMEOUT_S)
		s = VMFENCE_TCP_CLOSING_TIMEOUT_S;
	if ((flow_flags & VMFENCE_FLOW_F_UNANSWERED) && s > VMFENCE_UNANSWERED_TIMEOUT_S)
		s = VMFENCE_UNANSWERED_TIMEOUT_S;
	return s;
}

/* VMFENCE_MAP_EGRESS / _INGRESS: arrays of per-VM LPM tries (key struct
 * vmfence_addr_key: peer prefix, IPv4-mapped; value struct
 * vmfence_policy_value), so one VM's lookup never walks another VM's
 * prefixes. A VM's generations alternate between its two entries (the parity
 * of policy_id): a change fills the idle trie and the switch stays the one
 * update of the VM's vms entry. Longest prefix wins; the value already holds
 * the rules of every covering prefix, so the longest match alone decides. */
static inline __u32 vmfence_policy_index(__u32 slot, __u32 policy_id)
{
	return 2 * slot + (policy_id & 1);
}

#define VMFENCE_PROTO_ANY 0

struct vmfence_port_rule {
	__u16 port_lo;          /* host order, inclusive */
	__u16 port_hi;          /* host order, inclusive */
	__u8  proto;            /* IPPROTO_* or VMFENCE_PROTO_ANY */
	__u8  pad[3];
};

/* vmfence_policy_value.flags */
#define VMFENCE_POLICY_F_IMDS   0x1 /* prefix is the IMDS address: deny reason IMDS */
#define VMFENCE_POLICY_F_VM_NET 0x2 /* prefix inside VM address space: the owner
				     * decides (group), not the rules. Outside it
				     * the datapath skips the ownership lookup. */

struct vmfence_policy_value {
	__u16 count;            /* used entries of rules[] */
	__u8  flags;            /* VMFENCE_POLICY_F_*      */
	__u8  pad;
	struct vmfence_port_rule rules[VMFENCE_MAX_PORT_RULES];
};

/* VMFENCE_MAP_GATEWAYS key. */
struct vmfence_gateway_key {
	__u32 vm_id;
	__u8  addr[16];         /* network order, IPv4-mapped */
};

/* VMFENCE_MAP_FLOWS: array of maps indexed by the VM's slot; each inner map
 * is a hash of limits.flows entries holding the flows the policy allowed,
 * keyed as seen from the VM whichever side opened them, so both hooks look up
 * the same key. */
struct vmfence_flow_key {
	__u8  vm_addr[16];      /* network order, IPv4-mapped     */
	__u8  peer_addr[16];    /* network order, IPv4-mapped     */
	__u16 vm_port;          /* network order; ICMP echo id    */
	__u16 peer_port;        /* network order; 0 for ICMP      */
	__u32 vm_id;
	__u8  proto;
	__u8  pad[3];
};

#define VMFENCE_FLOW_OPENED_BY_VM   0
#define VMFENCE_FLOW_OPENED_BY_PEER 1
struct vmfence_flow {
	__u64 last_seen_ns;     /* bpf_ktime_get_ns, refreshed at most 1/s    */
	__u32 policy_id;        /* generation the verdict was computed under */
	__u8  opened_by;        /* VMFENCE_FLOW_OPENED_BY_*                   */
	__u8  flags;            /* VMFENCE_FLOW_F_*                           */
	__u8  pad[2];
};

/* VMFENCE_MAP_FRAGS: array of maps indexed by slot; each inner map is an LRU
 * of VMFENCE_FRAGS_PER_VM first fragments the policy allowed. */
struct vmfence_frag_key {
	__u8  saddr[16];
	__u8  daddr[16];
	__u32 id;               /* IPv4 id or IPv6 fragment id, network order */
	__u32 vm_id;
	__u8  proto;
	__u8  pad[3];
};

/* VMFENCE_MAP_COUNTERS: per-CPU array indexed by vmfence_vm.slot (slot 0 =
 * packets on an interface with no VM). */
struct vmfence_counters {
	__u64 from_vm_packets;
	__u64 from_vm_bytes;
	__u64 to_vm_packets;
	__u64 to_vm_bytes;
	__u64 events_suppressed; /* over the per-VM event budget */
	__u64 events_lost;       /* ring buffer full             */
	__u64 drops[VMFENCE_REASON_SLOTS];       /* both hooks together */
	/* The to-VM hook's share of drops[] (from the VM: the difference), so
	 * metrics give drops per direction without another field to sum. */
	__u64 to_vm_drops[VMFENCE_REASON_SLOTS];
};

/* VMFENCE_MAP_STATE: array indexed by slot; written by the datapath, zeroed by
 * the agent when a slot gets a new VM. */
struct vmfence_state {
	__u64 budget_window_ns;    /* start of the event budget window       */
	__u64 violation_window_ns; /* start of the on_violation window       */
	__u32 budget_used;         /* events sent in this budget window      */
	__u32 violations;          /* violations in this on_violation window */
	__u32 quarantined;         /* 1: all traffic dropped (terminate)     */
	__u32 flows_added;         /* new flow-table entries (wraps): the
	                            * agent's sweep skips tables that got none
	                            * and were empty at its last visit */
};

/* VMFENCE_MAP_LIMITS: array indexed by slot. The agent writes a VM's limits
 * with the VM (all zero: none; a write also restarts its buckets); the
 * datapath keeps the buckets. Each bucket is a GCRA "virtual time": a packet
 * conforms when the time, raised to at least now and advanced by the
 * packet's cost, is at most the bucket's burst ahead of now. To the VM,
 * bytes are paced instead (EDT): ingress_next_ns is when the next byte may
 * leave, stamped on the packet for the TAP's fq qdisc, and a packet further
 * ahead than ingress_burst_ns (the drop horizon) is dropped. */
struct vmfence_limit {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 egress_byte_ns_q16;  /* ns per L3 byte << 16; 0 = no egress_mbit */
	__u64 egress_pkt_ns;       /* ns per packet; 0 = no egress_pps          */
	__u64 ingress_byte_ns_q16; /* ingress_mbit; 0 = none                    */
	__u64 ingress_pkt_ns;      /* ingress_pps; 0 = none                     */
	__u64 egress_burst_ns;     /* byte bucket depth as time at the rate     */
	__u64 ingress_burst_ns;    /* EDT drop horizon                          */
	__u64 egress_pkt_burst_ns; /* packet buckets' depth, per direction      */
	__u64 ingress_pkt_burst_ns;
	/* The datapath's: */
	__u64 egress_bytes_at;
	__u64 egress_pkts_at;
	__u64 ingress_pkts_at;
	__u64 ingress_next_ns;
};

#define VMFENCE_EVENT_F_TRIGGER 0x1 /* reached on_violation.threshold: act */
#define VMFENCE_EVENT_F_QUARANTINED 0x2 /* the datapath quarantined the VM */

/* Ring buffer record, one per reported drop. */
struct vmfence_event {
	__u64 timestamp_ns;     /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u32 vm_id;
	__u32 ifindex;
	__u32 policy_id;
	__u8  reason;           /* enum vmfence_reason    */
	__u8  direction;        /* enum vmfence_direction */
	__u8  mode;             /* enum vmfence_mode      */
	__u8  family;           /* 4, 6, or 0 (ARP/L2)    */
	__u8  saddr[16];        /* network order, IPv4-mapped */
	__u8  daddr[16];
	__u16 sport;            /* host order */
	__u16 dport;            /* host order */
	__u8  proto;
	__u8  flags;            /* VMFENCE_EVENT_F_* */
	__u8  pad[2];
	__u8  smac[6];
	__u16 ethertype;        /* host order */
};

/* Defaults for vmfence_config: events per VM per window. */
#define VMFENCE_DEFAULT_EVENT_BUDGET    64
#define VMFENCE_DEFAULT_BUDGET_WINDOW_NS 1000000000ull

#endif /* VMFENCE_ABI_H */
