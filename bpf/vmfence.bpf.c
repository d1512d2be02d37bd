// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * vmfence TC datapath. Two programs per VM TAP:
 *   vmfence_from_vm  TC ingress (VM -> host): anti-spoofing, isolation, egress policy
 *   vmfence_to_vm    TC egress  (host -> VM): replies, same-group peers, ingress policy
 * Every drop is counted per VM and reason and reported through the ring buffer.
 * Pass returns TC_ACT_UNSPEC ("no objection": later tcx/cls programs still run).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "vmfence_abi.h"
#include "parse.bpf.h"
#include "maps.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* `vmfence explain` loads a second instance with dry_run set and replays a
 * synthetic packet through it: same maps, no side effects (no counters,
 * events, flows or quarantine); the verdict's reason lands in last_reason. */
const volatile __u8 dry_run = 0;
__u8 last_reason = 0;
/* BTF anchor: the ring buffer record's type in the object's BTF, so
 * tests/bpf/layout_test.cpp can check its layout like the map types'. */
struct vmfence_event vmfence_event_btf_anchor __attribute__((unused));

static __always_inline struct vmfence_config *vmfence_cfg(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&vmfence_config_v1, &zero);
}

static __always_inline int counts_as_violation(__u8 reason)
{
	return reason != VMFENCE_REASON_QUARANTINED && reason != VMFENCE_REASON_NO_POLICY &&
	       reason != VMFENCE_REASON_UNKNOWN_IFINDEX;
}

/* Count, track the on_violation window, quarantine, and report one drop. */
static __noinline int drop(struct __sk_buff *skb, const struct vmfence_vm *vm,
			   const struct pkt *p, __u8 reason, __u8 dir)
{
	__u32 slot = vm ? vm->slot : 0;
	struct vmfence_counters *c = bpf_map_lookup_elem(&vmfence_counters_v1, &slot);
	struct vmfence_state *st = bpf_map_lookup_elem(&vmfence_state_v1, &slot);
	struct vmfence_config *cfg = vmfence_cfg();
	struct vmfence_event *e;
	__u64 now = bpf_ktime_get_ns();
	__u8 flags = 0;

	if (dry_run) {
		last_reason = reason;
		return TC_ACT_SHOT;
	}
	if (!c || !st || !cfg || !p)
		return TC_ACT_SHOT;
	if (reason < VMFENCE_REASON_COUNT)
		c->drops[reason]++;

	if (vm && dir == VMFENCE_DIR_FROM_VM && counts_as_violation(reason)) {
		__u64 window = (__u64)vm->window_ms * 1000000ull;
		__u32 n;

		if (now - st->violation_window_ns > window) {
			st->violation_window_ns = now;
			st->violations = 0;
		}
		n = __sync_fetch_and_add(&st->violations, 1) + 1;
		if (n == vm->threshold) {
			flags |= VMFENCE_EVENT_F_TRIGGER;
			if (vm->flags & VMFENCE_VM_F_QUARANTINE) {
				st->quarantined = 1;
				flags |= VMFENCE_EVENT_F_QUARANTINED;
			}
		}
	}

	/* Budget events per VM, but never suppress the one that triggers the action. */
	if (!(flags & VMFENCE_EVENT_F_TRIGGER)) {
		__u64 win = cfg->budget_window_ns ? cfg->budget_window_ns
						  : VMFENCE_DEFAULT_BUDGET_WINDOW_NS;
		if (now - st->budget_window_ns > win) {
			st->budget_window_ns = now;
			st->budget_used = 0;
		}
		if (st->budget_used >= cfg->event_budget) {
			c->events_suppressed++;
			return TC_ACT_SHOT;
		}
		__sync_fetch_and_add(&st->budget_used, 1);
	}

	e = bpf_ringbuf_reserve(&vmfence_events_v1, sizeof(*e), 0);
	if (!e) {
		c->events_lost++;
		return TC_ACT_SHOT;
	}
	e->timestamp_ns = now;
	e->vm_id = vm ? vm->vm_id : 0;
	e->ifindex = skb->ifindex;
	e->policy_id = vm ? vm->policy_id : 0;
	e->reason = reason;
	e->direction = dir;
	e->mode = vm ? vm->mode : 0;
	e->family = p->family;
	__builtin_memcpy(e->saddr, p->saddr.b, 16);
	__builtin_memcpy(e->daddr, p->daddr.b, 16);
	e->sport = bpf_ntohs(p->sport);
	e->dport = bpf_ntohs(p->dport);
	e->proto = p->proto;
	e->flags = flags;
	e->pad[0] = e->pad[1] = 0;
	__builtin_memcpy(e->smac, p->smac, 6);
	e->ethertype = p->ethertype;
	bpf_ringbuf_submit(e, 0);
	return TC_ACT_SHOT;
}

/* --- ownership: which VM an address belongs to ------------------------------ */

static __always_inline int inline_v4_match(const struct vmfence_vm *vm, const union addr16 *a)
{
	__u32 want, mask;

	if (!vm->v4_plen || !is_v4_mapped(a))
		return 0;
	__builtin_memcpy(&want, vm->v4_addr, 4);
	mask = vm->v4_plen >= 32 ? 0xffffffff : bpf_htonl(~(0xffffffffu >> vm->v4_plen));
	return ((a->w[3] ^ want) & mask) == 0;
}

static __always_inline int inline_v6_match(const struct vmfence_vm *vm, const union addr16 *a)
{
	union addr16 want;
	__u32 plen = vm->v6_plen;

	if (!plen || is_v4_mapped(a))
		return 0;
	__builtin_memcpy(want.b, vm->v6_addr, 16);
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u32 bits = plen > (__u32)i * 32 ? plen - i * 32 : 0;
		__u32 mask = bits >= 32 ? 0xffffffff : bits == 0 ? 0 : bpf_htonl(~(0xffffffffu >> bits));
		if ((a->w[i] ^ want.w[i]) & mask)
			return 0;
	}
	return 1;
}

/* Owner of an address: exact host addresses first, then (if any VM owns a
 * prefix) the LPM trie. NULL when no VM owns it. */
static __always_inline struct vmfence_owner *owner_of(const union addr16 *a)
{
	struct vmfence_owner *o = bpf_map_lookup_elem(&vmfence_owners_v1, a->b);
	struct vmfence_config *cfg;

	if (o)
		return o;
	cfg = vmfence_cfg();
	if (cfg && (cfg->flags & VMFENCE_CFG_F_OWNER_NETS)) {
		struct vmfence_addr_key k = { .prefixlen = 128 };
		__builtin_memcpy(k.addr, a->b, 16);
		return bpf_map_lookup_elem(&vmfence_owner_nets_v1, &k);
	}
	return NULL;
}

static __always_inline int vm_owns(const struct vmfence_vm *vm, const union addr16 *a)
{
	struct vmfence_owner *o;

	if (inline_v4_match(vm, a) || inline_v6_match(vm, a))
		return 1;
	if (!(vm->flags & VMFENCE_VM_F_MORE_ADDRS))
		return 0;
	o = owner_of(a);
	return o && o->vm_id == vm->vm_id;
}

static __always_inline int is_gateway(const struct vmfence_vm *vm, const union addr16 *a)
{
	struct vmfence_gateway_key k = { .vm_id = vm->vm_id };
	__builtin_memcpy(k.addr, a->b, 16);
	return bpf_map_lookup_elem(&vmfence_gateways_v1, &k) != NULL;
}

/* ARP/ND target check: the gateway, the VM itself, or a VM of its group.
 * Returns 0 or a drop reason. */
static __always_inline __u8 resolve_target_reason(const struct vmfence_vm *vm, const union addr16 *t)
{
	struct vmfence_owner *o;

	if (vm_owns(vm, t) || is_gateway(vm, t))
		return 0;
	o = owner_of(t);
	if (o)
		return o->group_id == vm->group_id ? 0 : VMFENCE_REASON_CROSS_GROUP;
	return VMFENCE_REASON_ARP_DENIED;
}

/* --- policy ------------------------------------------------------------------ */

static __always_inline struct vmfence_policy_value *policy_lookup(void *map, __u32 policy_id,
								 const union addr16 *peer)
{
	struct vmfence_policy_key k = { .prefixlen = 32 + 128, .policy_id = policy_id };

	__builtin_memcpy(k.addr, peer->b, 16);
	return bpf_map_lookup_elem(map, &k);
}

/* Do the port rules of a policy entry allow proto/port? 0 or the drop reason. */
static __always_inline __u8 rules_check(const struct vmfence_policy_value *v, __u8 proto, __u16 port_be,
					__u8 deny_reason)
{
	__u16 port = bpf_ntohs(port_be);

	if (!v)
		return deny_reason;
	for (int i = 0; i < VMFENCE_MAX_PORT_RULES; i++) {
		const struct vmfence_port_rule *r = &v->rules[i];

		if (i >= v->count)
			break;
		if (r->proto != VMFENCE_PROTO_ANY && r->proto != proto)
			continue;
		if (port < r->port_lo || port > r->port_hi)
			continue;
		return 0;
	}
	return (v->flags & VMFENCE_POLICY_F_IMDS) ? VMFENCE_REASON_IMDS_DENIED : deny_reason;
}

/* Does the VM's egress (ingress) policy allow proto/port to (from) peer?
 * Returns 0 (allowed) or the drop reason. */
static __always_inline __u8 policy_check(void *map, __u32 policy_id, const union addr16 *peer,
					 __u8 proto, __u16 port_be, __u8 deny_reason)
{
	return rules_check(policy_lookup(map, policy_id, peer), proto, port_be, deny_reason);
}

/* Isolation: 0 when no VM owns addr, 1 when a VM of the same group does,
 * -1 when a VM of another group does. */
static __always_inline int group_of_owner(const struct vmfence_vm *vm, const union addr16 *addr)
{
	struct vmfence_owner *o = owner_of(addr);

	if (!o)
		return 0;
	return o->group_id == vm->group_id ? 1 : -1;
}

static __always_inline void flow_key_from_vm(struct vmfence_flow_key *k, const struct vmfence_vm *vm,
					     const struct pkt *p)
{
	__builtin_memcpy(k->vm_addr, p->saddr.b, 16);
	__builtin_memcpy(k->peer_addr, p->daddr.b, 16);
	k->vm_port = p->sport;
	k->peer_port = p->dport;
	k->vm_id = vm->vm_id;
	k->proto = p->proto;
	k->pad[0] = k->pad[1] = k->pad[2] = 0;
}

static __always_inline void flow_key_to_vm(struct vmfence_flow_key *k, const struct vmfence_vm *vm,
					   const struct pkt *p)
{
	__builtin_memcpy(k->vm_addr, p->daddr.b, 16);
	__builtin_memcpy(k->peer_addr, p->saddr.b, 16);
	k->vm_port = p->dport;
	k->peer_port = p->sport;
	k->vm_id = vm->vm_id;
	k->proto = p->proto;
	k->pad[0] = k->pad[1] = k->pad[2] = 0;
}

/* Is this a packet of a flow the policy allowed? A verdict cached under an
 * older policy generation is re-checked against the current rules for the
 * side that opened the flow, so removing a rule cuts the flows it allowed. */
static __always_inline int flow_allowed(const struct vmfence_vm *vm, struct vmfence_flow_key *k,
					int peer_opened_only)
{
	struct vmfence_flow *f = bpf_map_lookup_elem(&vmfence_flows_v1, k);
	union addr16 peer;
	__u8 r;

	if (!f)
		return 0;
	if (peer_opened_only && f->opened_by != VMFENCE_FLOW_OPENED_BY_PEER)
		return 0;
	if (f->policy_id == vm->policy_id)
		return 1;
	__builtin_memcpy(peer.b, k->peer_addr, 16);
	if (f->opened_by == VMFENCE_FLOW_OPENED_BY_VM)
		r = policy_check(&vmfence_egress_v1, vm->policy_id, &peer, k->proto, k->peer_port,
				 VMFENCE_REASON_EGRESS_DENIED);
	else
		r = policy_check(&vmfence_ingress_v1, vm->policy_id, &peer, k->proto, k->vm_port,
				 VMFENCE_REASON_INGRESS_DENIED);
	if (r) {
		if (!dry_run)
			bpf_map_delete_elem(&vmfence_flows_v1, k);
		return 0;
	}
	if (!dry_run)
		f->policy_id = vm->policy_id;
	return 1;
}

static __always_inline void flow_record(const struct vmfence_vm *vm, struct vmfence_flow_key *k,
					__u8 opened_by)
{
	struct vmfence_flow *f = bpf_map_lookup_elem(&vmfence_flows_v1, k);
	struct vmfence_flow v = { .policy_id = vm->policy_id, .opened_by = opened_by };

	if (dry_run || (f && f->policy_id == vm->policy_id))
		return;
	if (f)
		v.opened_by = f->opened_by;
	bpf_map_update_elem(&vmfence_flows_v1, k, &v, BPF_ANY);
}

static __always_inline void frag_key(struct vmfence_frag_key *k, const struct vmfence_vm *vm,
				     const struct pkt *p)
{
	__builtin_memcpy(k->saddr, p->saddr.b, 16);
	__builtin_memcpy(k->daddr, p->daddr.b, 16);
	k->id = p->frag_id;
	k->vm_id = vm->vm_id;
	k->proto = p->proto;
	k->pad[0] = k->pad[1] = k->pad[2] = 0;
}

/* Non-first fragments carry no ports: they pass only if the first fragment
 * of the same datagram was allowed under the current policy. */
static __always_inline int later_fragment_allowed(const struct vmfence_vm *vm, const struct pkt *p)
{
	struct vmfence_frag_key k;
	__u32 *gen;

	frag_key(&k, vm, p);
	gen = bpf_map_lookup_elem(&vmfence_frags_v1, &k);
	return gen && *gen == vm->policy_id;
}

static __always_inline void first_fragment_allowed(const struct vmfence_vm *vm, const struct pkt *p)
{
	struct vmfence_frag_key k;
	__u32 gen = vm->policy_id;

	if (dry_run)
		return;
	frag_key(&k, vm, p);
	bpf_map_update_elem(&vmfence_frags_v1, &k, &gen, BPF_ANY);
}

/* Should this packet get the full check in sampled mode? bpf_get_prandom_u32
 * is the kernel's per-CPU PRNG, not observable from the guest. */
static __always_inline int sample(const struct vmfence_vm *vm)
{
	return vm->sample_threshold == 0xffffffffu || bpf_get_prandom_u32() < vm->sample_threshold;
}

/* The start of both hooks: find the VM, count the packet, parse it, and
 * decide the drops that do not depend on its contents (no VM, spec removed,
 * quarantined; parsed first so their reports name the packet). Returns the
 * VM, or NULL with *verdict set; *parse_reason is parse()'s result. */
static __always_inline struct vmfence_vm *hook_start(struct __sk_buff *skb, struct pkt *p, __u8 dir,
						     int *verdict, __u8 *parse_reason)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 ifindex = skb->ifindex;
	struct vmfence_counters *c;
	struct vmfence_state *st;
	struct vmfence_vm *vm;
	__u32 slot;

	vm = bpf_map_lookup_elem(&vmfence_vms_v1, &ifindex);
	*parse_reason = parse(skb, data, data_end, p);
	if (!vm) {
		*verdict = drop(skb, NULL, p, VMFENCE_REASON_UNKNOWN_IFINDEX, dir);
		return NULL;
	}
	slot = vm->slot;
	c = dry_run ? NULL : bpf_map_lookup_elem(&vmfence_counters_v1, &slot);
	if (c) {
		if (dir == VMFENCE_DIR_FROM_VM) {
			c->from_vm_packets++;
			c->from_vm_bytes += skb->len;
		} else {
			c->to_vm_packets++;
			c->to_vm_bytes += skb->len;
		}
	}
	if (vm->flags & VMFENCE_VM_F_NO_POLICY) {
		*verdict = drop(skb, vm, p, VMFENCE_REASON_NO_POLICY, dir);
		return NULL;
	}
	st = bpf_map_lookup_elem(&vmfence_state_v1, &slot);
	if (st && st->quarantined) {
		*verdict = drop(skb, vm, p, VMFENCE_REASON_QUARANTINED, dir);
		return NULL;
	}
	return vm;
}

/* ICMP errors (unreachable, time exceeded, packet too big) about a flow the
 * policy allowed belong to it. From the VM, the embedded header is the peer's
 * packet to the VM (a closed port answering); to the VM, the VM's own. */
static __always_inline int icmp_error_for_flow(struct __sk_buff *skb, const struct vmfence_vm *vm,
					       const struct pkt *p, int from_vm)
{
	struct pkt inner = {};
	struct vmfence_flow_key k;

	if (parse_icmp_inner(skb, p, &inner))
		return 0;
	if (from_vm) {
		if (!vm_owns(vm, &inner.daddr))
			return 0;
		flow_key_to_vm(&k, vm, &inner);
	} else {
		if (!vm_owns(vm, &inner.saddr))
			return 0;
		flow_key_from_vm(&k, vm, &inner);
	}
	return flow_allowed(vm, &k, 0);
}

/* --- VM -> host ------------------------------------------------------------- */

static __always_inline int from_vm_arp(struct __sk_buff *skb, const struct vmfence_vm *vm,
				       struct pkt *p, void *data, void *data_end)
{
	struct arp_eth *arp = data + sizeof(struct ethhdr);
	union addr16 spa, tpa;
	__u8 r;

	if ((void *)(arp + 1) > data_end)
		return drop(skb, vm, p, VMFENCE_REASON_MALFORMED, VMFENCE_DIR_FROM_VM);
	if (arp->htype != bpf_htons(1) || arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != 6 ||
	    arp->plen != 4)
		return drop(skb, vm, p, VMFENCE_REASON_MALFORMED, VMFENCE_DIR_FROM_VM);
	set_v4_mapped(&spa, arp_ip(arp->spa));
	set_v4_mapped(&tpa, arp_ip(arp->tpa));
	p->family = 4;
	p->saddr = spa;
	p->daddr = tpa;
	if (!mac_eq(arp->sha, vm->mac))
		return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ARP, VMFENCE_DIR_FROM_VM);
	if (arp->op == bpf_htons(1)) {
		/* Request: sender 0.0.0.0 is an address probe (RFC 5227). */
		if (spa.w[3] != 0 && !vm_owns(vm, &spa))
			return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ARP, VMFENCE_DIR_FROM_VM);
		r = resolve_target_reason(vm, &tpa);
		if (r)
			return drop(skb, vm, p, r, VMFENCE_DIR_FROM_VM);
		return TC_ACT_UNSPEC;
	}
	if (arp->op == bpf_htons(2)) {
		if (!vm_owns(vm, &spa))
			return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ARP, VMFENCE_DIR_FROM_VM);
		return TC_ACT_UNSPEC;
	}
	return drop(skb, vm, p, VMFENCE_REASON_MALFORMED, VMFENCE_DIR_FROM_VM);
}

/* ND options: every source/target link-layer address option must be the VM's MAC. */
static __always_inline int nd_options_ok(struct __sk_buff *skb, const struct vmfence_vm *vm, __u32 off)
{
	struct {
		__u8 type;
		__u8 len;
		__u8 mac[6];
	} opt;

	for (int i = 0; i < 8; i++) {
		if (bpf_skb_load_bytes(skb, off, &opt, sizeof(opt)))
			return 1; /* end of packet */
		if (opt.len == 0)
			return 0;
		if ((opt.type == 1 || opt.type == 2) && !mac_eq(opt.mac, vm->mac))
			return 0;
		off += opt.len * 8;
	}
	return 1;
}

#define NOT_ND 1000 /* not a TC verdict: the packet is not ND/MLD */

/* ICMPv6 neighbour discovery and MLD from the VM. Returns NOT_ND when the
 * packet is not ND/MLD (the caller goes on with policy), else a verdict. */
static __always_inline int from_vm_nd(struct __sk_buff *skb, const struct vmfence_vm *vm, struct pkt *p,
				      int src_owned)
{
	int src_ok = src_owned || is_link_local(&p->saddr) || is_unspecified(&p->saddr);
	union addr16 target;
	__u8 r;

	switch (p->icmp_type) {
	case 130: case 131: case 132: case 143: /* MLD */
	case 133:                               /* router solicitation */
		if (!src_ok)
			return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_IP, VMFENCE_DIR_FROM_VM);
		return TC_ACT_UNSPEC;
	case 134: /* router advertisement: a VM is never a router */
	case 137: /* redirect */
		return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ND, VMFENCE_DIR_FROM_VM);
	case 135: /* neighbour solicitation */
	case 136: /* neighbour advertisement */
		break;
	default:
		return NOT_ND;
	}
	if (!src_ok)
		return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_IP, VMFENCE_DIR_FROM_VM);
	if (bpf_skb_load_bytes(skb, p->l4_off + 8, target.b, 16))
		return drop(skb, vm, p, VMFENCE_REASON_MALFORMED, VMFENCE_DIR_FROM_VM);
	if (!nd_options_ok(skb, vm, p->l4_off + 24))
		return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ND, VMFENCE_DIR_FROM_VM);
	if (p->icmp_type == 136) {
		/* Advertise only itself. */
		if (!vm_owns(vm, &target) && !is_link_local(&target))
			return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ND, VMFENCE_DIR_FROM_VM);
		return TC_ACT_UNSPEC;
	}
	if (is_link_local(&target))
		return TC_ACT_UNSPEC;
	r = resolve_target_reason(vm, &target);
	if (r)
		return drop(skb, vm, p, r, VMFENCE_DIR_FROM_VM);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int vmfence_from_vm(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct vmfence_policy_value *v;
	struct vmfence_flow_key fk;
	struct vmfence_vm *vm;
	struct pkt p = {};
	int src_owned, ret, verdict, checked, g;
	__u8 r;

	vm = hook_start(skb, &p, VMFENCE_DIR_FROM_VM, &verdict, &r);
	if (!vm)
		return verdict;

	if (p.ethertype && !mac_eq(p.smac, vm->mac))
		return drop(skb, vm, &p, VMFENCE_REASON_SPOOFED_MAC, VMFENCE_DIR_FROM_VM);
	if (r)
		return drop(skb, vm, &p, r, VMFENCE_DIR_FROM_VM);
	if (p.ethertype == ETH_P_ARP)
		return from_vm_arp(skb, vm, &p, data, data_end);

	src_owned = vm_owns(vm, &p.saddr);
	if (p.proto == IPPROTO_ICMPV6 && p.frag == FRAG_NONE) {
		ret = from_vm_nd(skb, vm, &p, src_owned);
		if (ret != NOT_ND)
			return ret;
	}
	if (!src_owned)
		return drop(skb, vm, &p, VMFENCE_REASON_SPOOFED_IP, VMFENCE_DIR_FROM_VM);
	/* IGMP membership reports stay on the link (224.0.0.0/24): like MLD. */
	if (is_link_local_igmp(&p))
		return TC_ACT_UNSPEC;

	/* Isolation holds in every mode: VM to VM only within a group. Where
	 * the policy is checked, its lookup says whether the destination is
	 * in VM address space at all (VMFENCE_POLICY_F_VM_NET), so traffic to
	 * the outside skips the ownership lookup. */
	checked = vm->mode == VMFENCE_MODE_FILTERED || vm->mode == VMFENCE_MODE_CONNTRACK ||
		  (vm->mode == VMFENCE_MODE_SAMPLED && sample(vm));
	if (!checked || p.frag == FRAG_LATER) {
		g = group_of_owner(vm, &p.daddr);
		if (g < 0)
			return drop(skb, vm, &p, VMFENCE_REASON_CROSS_GROUP, VMFENCE_DIR_FROM_VM);
		if (g > 0 || !checked) {
			if (!g && vm->mode == VMFENCE_MODE_SAMPLED && p.frag != FRAG_LATER) {
				/* Unchecked, but remembered so replies find their flow. */
				flow_key_from_vm(&fk, vm, &p);
				flow_record(vm, &fk, VMFENCE_FLOW_OPENED_BY_VM);
			}
			return TC_ACT_UNSPEC;
		}
		if (later_fragment_allowed(vm, &p))
			return TC_ACT_UNSPEC;
		return drop(skb, vm, &p, VMFENCE_REASON_FRAGMENT, VMFENCE_DIR_FROM_VM);
	}

	flow_key_from_vm(&fk, vm, &p);
	if (vm->mode == VMFENCE_MODE_CONNTRACK && flow_allowed(vm, &fk, 0))
		goto allowed;
	v = policy_lookup(&vmfence_egress_v1, vm->policy_id, &p.daddr);
	if (!v || (v->flags & VMFENCE_POLICY_F_VM_NET)) {
		g = group_of_owner(vm, &p.daddr);
		if (g < 0)
			return drop(skb, vm, &p, VMFENCE_REASON_CROSS_GROUP, VMFENCE_DIR_FROM_VM);
		if (g > 0)
			return TC_ACT_UNSPEC;
	}
	r = rules_check(v, p.proto, p.dport, VMFENCE_REASON_EGRESS_DENIED);
	if (r) {
		/* A reply in a flow a peer opened under an ingress rule. Only
		 * flows a peer opened: a flow the VM opened is what the egress
		 * check just judged (and in sampled mode it may have been
		 * recorded unchecked). */
		if (vm->mode != VMFENCE_MODE_CONNTRACK && flow_allowed(vm, &fk, 1))
			goto allowed;
		/* Sampled: the opener may have gone unchecked (no flow), so a
		 * reply is judged by the ingress rules it answers. */
		if (vm->mode == VMFENCE_MODE_SAMPLED &&
		    !policy_check(&vmfence_ingress_v1, vm->policy_id, &p.daddr, p.proto, p.sport,
				  VMFENCE_REASON_INGRESS_DENIED))
			goto allowed;
		if (is_icmp_error(&p) && icmp_error_for_flow(skb, vm, &p, 1))
			return TC_ACT_UNSPEC;
		return drop(skb, vm, &p, r, VMFENCE_DIR_FROM_VM);
	}
	/* TCP records its flow on the SYN only: later segments need no write. */
	if (p.proto != IPPROTO_TCP || (p.tcp_flags & TCP_FLAG_SYN) ||
	    vm->mode == VMFENCE_MODE_CONNTRACK)
		flow_record(vm, &fk, VMFENCE_FLOW_OPENED_BY_VM);
allowed:
	if (p.frag == FRAG_FIRST)
		first_fragment_allowed(vm, &p);
	return TC_ACT_UNSPEC;
}

/* --- host -> VM ------------------------------------------------------------- */

SEC("tc")
int vmfence_to_vm(struct __sk_buff *skb)
{
	struct vmfence_owner *o;
	struct vmfence_flow_key fk;
	struct vmfence_vm *vm;
	struct pkt p = {};
	int verdict;
	__u8 r;

	vm = hook_start(skb, &p, VMFENCE_DIR_TO_VM, &verdict, &r);
	if (!vm)
		return verdict;

	if (r)
		return drop(skb, vm, &p, r, VMFENCE_DIR_TO_VM);
	if (p.ethertype == ETH_P_ARP)
		return TC_ACT_UNSPEC; /* resolution toward the VM; the sender's own hook polices lies */
	if (p.proto == IPPROTO_ICMPV6 && p.frag == FRAG_NONE && is_nd_or_mld(p.icmp_type))
		return TC_ACT_UNSPEC;
	if (is_link_local_igmp(&p))
		return TC_ACT_UNSPEC;
	if (!is_multicast(&p.daddr) && !vm_owns(vm, &p.daddr))
		return drop(skb, vm, &p, VMFENCE_REASON_NOT_FOR_VM, VMFENCE_DIR_TO_VM);

	o = owner_of(&p.saddr);
	if (o) {
		if (o->group_id != vm->group_id)
			return drop(skb, vm, &p, VMFENCE_REASON_CROSS_GROUP, VMFENCE_DIR_TO_VM);
		return TC_ACT_UNSPEC;
	}
	if (vm->mode == VMFENCE_MODE_DIRECT)
		return TC_ACT_UNSPEC;
	if (vm->mode == VMFENCE_MODE_SAMPLED && !sample(vm))
		return TC_ACT_UNSPEC;

	if (p.frag == FRAG_LATER) {
		if (later_fragment_allowed(vm, &p))
			return TC_ACT_UNSPEC;
		return drop(skb, vm, &p, VMFENCE_REASON_FRAGMENT, VMFENCE_DIR_TO_VM);
	}
	flow_key_to_vm(&fk, vm, &p);
	if (flow_allowed(vm, &fk, 0))
		goto allowed;
	if (is_icmp_error(&p) && icmp_error_for_flow(skb, vm, &p, 0))
		return TC_ACT_UNSPEC;
	r = policy_check(&vmfence_ingress_v1, vm->policy_id, &p.saddr, p.proto, p.dport,
			 VMFENCE_REASON_INGRESS_DENIED);
	if (r == VMFENCE_REASON_IMDS_DENIED)
		r = VMFENCE_REASON_INGRESS_DENIED;
	if (r)
		return drop(skb, vm, &p, r, VMFENCE_DIR_TO_VM);
	if (p.proto != IPPROTO_TCP || (p.tcp_flags & TCP_FLAG_SYN))
		flow_record(vm, &fk, VMFENCE_FLOW_OPENED_BY_PEER);
allowed:
	if (p.frag == FRAG_FIRST)
		first_fragment_allowed(vm, &p);
	return TC_ACT_UNSPEC;
}
