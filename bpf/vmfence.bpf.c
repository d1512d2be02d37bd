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
/* Likewise for the per-VM tables' types, which the maps only reach through
 * their inner-map templates (libbpf needs their sizes). */
struct vmfence_flow_key vmfence_flow_key_btf_anchor __attribute__((unused));
struct vmfence_flow vmfence_flow_btf_anchor __attribute__((unused));
struct vmfence_frag_key vmfence_frag_key_btf_anchor __attribute__((unused));
/* The policy tries' key and value: the agent also creates each VM's trie
 * with them, so bpftool prints its rules by field. */
struct vmfence_addr_key vmfence_addr_key_btf_anchor __attribute__((unused));
struct vmfence_policy_value vmfence_policy_value_btf_anchor __attribute__((unused));

static __always_inline struct vmfence_config *vmfence_cfg(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&vmfence_config_v3, &zero);
}

/* host.json "fleet" configured: remote VMs are in the owner maps. */
static __always_inline int fleet_on(void)
{
	struct vmfence_config *cfg = vmfence_cfg();

	return cfg && (cfg->flags & VMFENCE_CFG_F_FLEET);
}

/* Did the packet enter the host on one of fleet.interfaces (the underlay
 * toward the other hosts)? The only place a remote VM's address may come
 * from. */
static __always_inline int from_fleet_interface(struct __sk_buff *skb)
{
	struct vmfence_config *cfg = vmfence_cfg();
	__u32 in = skb->ingress_ifindex;

	if (!cfg || !in)
		return 0;
#pragma unroll
	for (int i = 0; i < VMFENCE_MAX_FLEET_IFACES; i++)
		if (i < cfg->fleet_ifaces && cfg->fleet_ifindex[i] == in)
			return 1;
	return 0;
}

/* A guest's own noise, its resource limits, and drops an outsider or a lost
 * packet can cause (a later fragment whose first one is gone, the answer to
 * a stray packet): counted, never held against the VM, no event. */
static __always_inline int is_quiet(__u8 reason)
{
	return reason == VMFENCE_REASON_FLOW_LIMIT || reason == VMFENCE_REASON_LINK_LOCAL ||
	       reason == VMFENCE_REASON_UNASSIGNED_SRC || reason == VMFENCE_REASON_STALE_REPLY ||
	       reason == VMFENCE_REASON_FRAGMENT || reason == VMFENCE_REASON_RATE_LIMITED;
}

static __always_inline int counts_as_violation(__u8 reason)
{
	return reason != VMFENCE_REASON_QUARANTINED && reason != VMFENCE_REASON_NO_POLICY &&
	       reason != VMFENCE_REASON_UNKNOWN_IFINDEX && !is_quiet(reason);
}

/* Count, track the on_violation window, quarantine, and report one drop
 * (both hooks: the TC programs and the XDP pre-filter). */
static __noinline int report_drop(__u32 ifindex, const struct vmfence_vm *vm, const struct pkt *p,
				  __u8 reason, __u8 dir)
{
	__u32 slot = vm ? vm->slot : 0;
	struct vmfence_counters *c = bpf_map_lookup_elem(&vmfence_counters_v3, &slot);
	struct vmfence_state *st = bpf_map_lookup_elem(&vmfence_state_v1, &slot);
	struct vmfence_config *cfg = vmfence_cfg();
	struct vmfence_event *e;
	__u64 now = bpf_ktime_get_ns();
	__u8 flags = 0;

	if (dry_run) {
		last_reason = reason;
		return 0;
	}
	if (!c || !st || !cfg || !p)
		return 0;
	if (reason < VMFENCE_REASON_SLOTS) {
		c->drops[reason]++;
		if (dir == VMFENCE_DIR_TO_VM)
			c->to_vm_drops[reason]++;
	}
	if (is_quiet(reason))
		return 0;

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
			return 0;
		}
		__sync_fetch_and_add(&st->budget_used, 1);
	}

	e = bpf_ringbuf_reserve(&vmfence_events_v1, sizeof(*e), 0);
	if (!e) {
		c->events_lost++;
		return 0;
	}
	e->timestamp_ns = now;
	e->vm_id = vm ? vm->vm_id : 0;
	e->ifindex = ifindex;
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
	return 0;
}

static __always_inline int drop(struct __sk_buff *skb, const struct vmfence_vm *vm, const struct pkt *p,
				__u8 reason, __u8 dir)
{
	report_drop(skb->ifindex, vm, p, reason, dir);
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
	struct vmfence_owner *o = bpf_map_lookup_elem(&vmfence_owners_v2, a->b);
	struct vmfence_config *cfg;

	if (o)
		return o;
	cfg = vmfence_cfg();
	if (cfg && (cfg->flags & VMFENCE_CFG_F_OWNER_NETS)) {
		struct vmfence_addr_key k = { .prefixlen = 128 };
		__builtin_memcpy(k.addr, a->b, 16);
		return bpf_map_lookup_elem(&vmfence_owner_nets_v2, &k);
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
	return o && o->vm_id == vm->vm_id && !(o->flags & VMFENCE_OWNER_F_REMOTE);
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
	/* An on-link neighbour that is nobody's: a guest with a /24 asks for
	 * it when any packet from there reaches it. Cannot carry data beyond
	 * the link: dropped, not a violation. */
	return VMFENCE_REASON_LINK_LOCAL;
}

/* --- policy ------------------------------------------------------------------ */

/* The longest prefix of the VM's own trie (egress or ingress) covering peer. */
static __always_inline struct vmfence_policy_value *policy_lookup(void *map, const struct vmfence_vm *vm,
								 const union addr16 *peer)
{
	__u32 index = vmfence_policy_index(vm->slot, vm->policy_id);
	struct vmfence_addr_key k = { .prefixlen = 128 };
	void *trie = bpf_map_lookup_elem(map, &index);

	if (!trie)
		return NULL;
	__builtin_memcpy(k.addr, peer->b, 16);
	return bpf_map_lookup_elem(trie, &k);
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
static __always_inline __u8 policy_check(void *map, const struct vmfence_vm *vm, const union addr16 *peer,
					 __u8 proto, __u16 port_be, __u8 deny_reason)
{
	return rules_check(policy_lookup(map, vm, peer), proto, port_be, deny_reason);
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

/* --- per-VM flow and fragment state ----------------------------------------- */

static __always_inline void *flow_table(const struct vmfence_vm *vm)
{
	__u32 slot = vm->slot;
	return bpf_map_lookup_elem(&vmfence_flows_v2, &slot);
}

static __always_inline __u64 flow_timeout_ns(const struct vmfence_flow *f, __u8 proto)
{
	struct vmfence_config *cfg = vmfence_cfg();

	if (!cfg)
		return (__u64)vmfence_flow_timeout_s(proto, f->flags, 0, 0, 0) * 1000000000ull;
	return (__u64)vmfence_flow_timeout_s(proto, f->flags, cfg->tcp_timeout_s, cfg->udp_timeout_s,
					     cfg->icmp_timeout_s) * 1000000000ull;
}

/* The live entry of a flow, or NULL (absent or idle past its timeout: the
 * agent's sweep removes those, the datapath already ignores them). */
static __always_inline struct vmfence_flow *flow_find(void *table, struct vmfence_flow_key *k, __u64 now)
{
	struct vmfence_flow *f;

	if (!table)
		return NULL;
	f = bpf_map_lookup_elem(table, k);
	if (!f || now - f->last_seen_ns > flow_timeout_ns(f, k->proto))
		return NULL;
	return f;
}

/* A packet of a live flow: refresh its timestamp (at most once a second, so
 * the fast path rarely writes). The VM's packet answers a peer-opened flow;
 * the VM's RST ends the flow, a FIN or the peer's RST (which anyone on the
 * path can forge, sequence numbers unchecked) only starts a short linger. */
static __always_inline void flow_touch(void *table, struct vmfence_flow_key *k, struct vmfence_flow *f,
				       __u64 now, __u8 tcp_flags, int from_vm)
{
	__u8 flags = f->flags;

	if (dry_run)
		return;
	if (k->proto == IPPROTO_TCP && (tcp_flags & TCP_FLAG_RST) && from_vm) {
		bpf_map_delete_elem(table, k);
		return;
	}
	if (k->proto == IPPROTO_TCP && (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		flags |= VMFENCE_FLOW_F_CLOSING;
	if (from_vm)
		flags &= ~VMFENCE_FLOW_F_UNANSWERED;
	if (flags != f->flags)
		f->flags = flags;
	if (now - f->last_seen_ns > 1000000000ull)
		f->last_seen_ns = now;
}

/* Is this a packet of a flow the policy allowed? A verdict cached under an
 * older policy generation is re-checked against the current rules for the
 * side that opened the flow, so removing a rule cuts the flows it allowed.
 * checked_only: refuse flows an unsampled packet recorded (a checked packet
 * must not ride on them). */
static __always_inline int flow_allowed(const struct vmfence_vm *vm, struct vmfence_flow_key *k,
					int peer_opened_only, __u8 tcp_flags, int from_vm, int checked_only)
{
	void *table = flow_table(vm);
	__u64 now = bpf_ktime_get_ns();
	struct vmfence_flow *f = flow_find(table, k, now);
	union addr16 peer;
	__u8 r;

	if (!f)
		return 0;
	if (peer_opened_only && f->opened_by != VMFENCE_FLOW_OPENED_BY_PEER)
		return 0;
	if (checked_only && (f->flags & VMFENCE_FLOW_F_UNCHECKED))
		return 0;
	if (f->policy_id != vm->policy_id) {
		__builtin_memcpy(peer.b, k->peer_addr, 16);
		if (f->opened_by == VMFENCE_FLOW_OPENED_BY_VM)
			r = policy_check(&vmfence_egress_v2, vm, &peer, k->proto, k->peer_port,
					 VMFENCE_REASON_EGRESS_DENIED);
		else
			r = policy_check(&vmfence_ingress_v2, vm, &peer, k->proto, k->vm_port,
					 VMFENCE_REASON_INGRESS_DENIED);
		if (r) {
			if (!dry_run)
				bpf_map_delete_elem(table, k);
			return 0;
		}
		if (!dry_run)
			f->policy_id = vm->policy_id;
	}
	flow_touch(table, k, f, now, tcp_flags, from_vm);
	return 1;
}

/* Remember a flow the policy allowed (or, checked = 0, that an unsampled
 * packet opened). 0, or -1 when the VM's table is full (the caller drops the
 * packet: flow_limit). An existing entry is renewed in place and never needs
 * room. */
static __always_inline int flow_record(const struct vmfence_vm *vm, struct vmfence_flow_key *k,
				       __u8 opened_by, __u8 tcp_flags, int checked)
{
	void *table = flow_table(vm);
	__u64 now = bpf_ktime_get_ns();
	int from_vm = opened_by == VMFENCE_FLOW_OPENED_BY_VM;
	struct vmfence_flow *f;
	struct vmfence_flow v = { .last_seen_ns = now, .policy_id = vm->policy_id, .opened_by = opened_by };

	if (dry_run)
		return 0;
	if (!table)
		return -1;
	f = bpf_map_lookup_elem(table, k);
	if (f) {
		if (now - f->last_seen_ns <= flow_timeout_ns(f, k->proto)) {
			if (f->policy_id == vm->policy_id) {
				if (checked && (f->flags & VMFENCE_FLOW_F_UNCHECKED))
					f->flags &= ~VMFENCE_FLOW_F_UNCHECKED;
				flow_touch(table, k, f, now, tcp_flags, from_vm);
				return 0;
			}
			v.opened_by = f->opened_by;
		}
		/* Expired or older generation: rewrite the entry in place. */
	}
	if (tcp_flags & TCP_FLAG_RST)
		return 0; /* nothing to remember */
	if (tcp_flags & TCP_FLAG_FIN)
		v.flags |= VMFENCE_FLOW_F_CLOSING;
	if (!checked)
		v.flags |= VMFENCE_FLOW_F_UNCHECKED;
	/* Until the VM answers, a peer's flow holds its room only briefly: an
	 * outsider's SYNs cannot fill the table for hours. */
	if (v.opened_by == VMFENCE_FLOW_OPENED_BY_PEER && !from_vm)
		v.flags |= VMFENCE_FLOW_F_UNANSWERED;
	if (bpf_map_update_elem(table, k, &v, BPF_ANY))
		return f ? 0 : -1;
	/* Counted also when rewriting an expired entry: the agent's sweep may
	 * have deleted it meanwhile, and this write created it again. */
	{
		__u32 slot = vm->slot;
		struct vmfence_state *st = bpf_map_lookup_elem(&vmfence_state_v1, &slot);

		if (st)
			__sync_fetch_and_add(&st->flows_added, 1);
	}
	return 0;
}

static __always_inline void frag_key(struct vmfence_frag_key *k, const struct vmfence_vm *vm,
				     const struct pkt *p)
{
	__builtin_memcpy(k->saddr, p->saddr.b, 16);
	__builtin_memcpy(k->daddr, p->daddr.b, 16);
	k->id = p->frag_id;
	k->vm_id = vm->vm_id;
	k->proto = p->frag_proto;
	k->pad[0] = k->pad[1] = k->pad[2] = 0;
}

/* Non-first fragments carry no ports: they pass only if the first fragment
 * of the same datagram was allowed under the current policy. */
static __always_inline int later_fragment_allowed(const struct vmfence_vm *vm, const struct pkt *p)
{
	__u32 slot = vm->slot;
	void *table = bpf_map_lookup_elem(&vmfence_frags_v2, &slot);
	struct vmfence_frag_key k;
	__u32 *gen;

	if (!table)
		return 0;
	frag_key(&k, vm, p);
	gen = bpf_map_lookup_elem(table, &k);
	return gen && *gen == vm->policy_id;
}

/* Called for every first fragment that passes, checked or not, so that its
 * later fragments are never counted against the VM. */
static __always_inline void first_fragment_passed(const struct vmfence_vm *vm, const struct pkt *p)
{
	__u32 slot = vm->slot;
	void *table;
	struct vmfence_frag_key k;
	__u32 gen = vm->policy_id;

	if (dry_run || p->frag != FRAG_FIRST)
		return;
	table = bpf_map_lookup_elem(&vmfence_frags_v2, &slot);
	if (!table)
		return;
	frag_key(&k, vm, p);
	bpf_map_update_elem(table, &k, &gen, BPF_ANY);
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
	c = dry_run ? NULL : bpf_map_lookup_elem(&vmfence_counters_v3, &slot);
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

/* ICMP errors (unreachable, time exceeded, packet too big) belong to the flow
 * they quote, within the RFC 1812/4443 size limits. From the VM, the quoted
 * header is the peer's packet to the VM (a closed port answering) and the
 * error goes back to that peer; to the VM, it is the VM's own packet. */
static __always_inline int icmp_error_for_flow(struct __sk_buff *skb, const struct vmfence_vm *vm,
					       const struct pkt *p, int from_vm)
{
	struct pkt inner = {};
	struct vmfence_flow_key k;
	__u32 max = p->family == 4 ? 576 : 1280;

	if (p->l3_end - ETH_HLEN > max)
		return 0;
	if (parse_icmp_inner(skb, p, &inner))
		return 0;
	if (from_vm) {
		/* Outer addresses are the quoted ones reversed. */
		if (!addr_eq(&inner.saddr, &p->daddr) || !addr_eq(&inner.daddr, &p->saddr))
			return 0;
		flow_key_to_vm(&k, vm, &inner);
	} else {
		if (!addr_eq(&inner.saddr, &p->daddr) || !vm_owns(vm, &inner.saddr))
			return 0;
		flow_key_from_vm(&k, vm, &inner);
	}
	/* From a sampled VM: not on a flow an unsampled packet recorded. */
	return flow_allowed(vm, &k, 0, 0, from_vm, from_vm && vm->mode == VMFENCE_MODE_SAMPLED);
}

/* --- link-local control traffic ----------------------------------------------- */

#define NOT_CONTROL 1000 /* not a TC verdict: judge the packet like any other */

/* The EUI-64 or stable-privacy link-local a VM may use: not one another VM
 * owns (spec addresses, EUI-64 of its MAC) and not one of its gateways. */
static __always_inline int ll_usable(const struct vmfence_vm *vm, const union addr16 *a)
{
	struct vmfence_owner *o = owner_of(a);

	if (o)
		return o->vm_id == vm->vm_id && !(o->flags & VMFENCE_OWNER_F_REMOTE);
	return !is_gateway(vm, a);
}

/* An address the guest made up in the /64 of its (first) IPv6 address
 * (SLAAC privacy, stable-privacy): no VM's, not a gateway. */
static __always_inline int is_unassigned_in_own_64(const struct vmfence_vm *vm, const union addr16 *a)
{
	union addr16 mine;

	if (!vm->v6_plen || is_v4_mapped(a))
		return 0;
	__builtin_memcpy(mine.b, vm->v6_addr, 16);
	return a->q[0] == mine.q[0] && !owner_of(a) && !is_gateway(vm, a);
}

/* An IPv4 zeroconf address (169.254/16, RFC 3927) no VM owns. */
static __always_inline int is_unowned_zeroconf(const union addr16 *a)
{
	return (bpf_ntohl(a->w[3]) >> 16) == 0xa9fe && !owner_of(a);
}

/* Why a packet from an address the VM does not own is dropped: a guest's
 * own noise (not a violation) or spoofing. */
static __always_inline __u8 unowned_source_reason(const struct vmfence_vm *vm, const struct pkt *p)
{
	const union addr16 *s = &p->saddr;

	if (p->family == 4) {
		__u32 v = bpf_ntohl(s->w[3]);
		/* DHCP/BOOTP and zeroconf (169.254/16) before an address. */
		if ((v == 0 && is_multicast(&p->daddr)) || is_unowned_zeroconf(s))
			return VMFENCE_REASON_LINK_LOCAL;
		return VMFENCE_REASON_SPOOFED_IP;
	}
	if (is_unspecified(s))
		return is_multicast(&p->daddr) ? VMFENCE_REASON_LINK_LOCAL : VMFENCE_REASON_SPOOFED_IP;
	if (is_link_local(s))
		return ll_usable(vm, s) ? VMFENCE_REASON_LINK_LOCAL : VMFENCE_REASON_SPOOFED_IP;
	if (is_unassigned_in_own_64(vm, s))
		return VMFENCE_REASON_UNASSIGNED_SRC;
	return VMFENCE_REASON_SPOOFED_IP;
}

/* Every ND option walked to its end; each link-layer address option must be
 * the VM's MAC (from_vm) — bpf_loop, since the option count is the sender's. */
struct nd_walk {
	struct __sk_buff *skb;
	__u32 off;
	__u32 end;
	__u8 mac[6];
	__u8 check_mac;
	__u8 result;   /* 0 ok, else a drop reason */
	__u8 has_lla;  /* a source/target link-layer option was seen */
	__u8 done;
};

static long nd_walk_step(__u64 i, void *ctx)
{
	struct nd_walk *w = ctx;
	__u8 opt[8];

	if (w->off == w->end) {
		w->done = 1;
		return 1;
	}
	if (w->off + 8 > w->end || bpf_skb_load_bytes(w->skb, w->off, opt, 8)) {
		w->result = VMFENCE_REASON_MALFORMED;
		return 1;
	}
	if (opt[1] == 0) { /* a zero-length option cannot be walked past */
		w->result = VMFENCE_REASON_MALFORMED;
		return 1;
	}
	if (opt[0] == 1 || opt[0] == 2) {
		w->has_lla = 1;
		if (w->check_mac && (opt[1] != 1 || !mac_eq(&opt[2], w->mac))) {
			w->result = VMFENCE_REASON_SPOOFED_ND;
			return 1;
		}
	}
	w->off += (__u32)opt[1] * 8;
	return 0;
}

/* 0, or the reason the option list of an ND message at [off, end) fails. */
static __always_inline __u8 nd_options_reason(struct __sk_buff *skb, const struct vmfence_vm *vm, __u32 off,
					      __u32 end, int check_mac, int *has_lla)
{
	struct nd_walk w = { .skb = skb, .off = off, .end = end, .check_mac = check_mac };

	__builtin_memcpy(w.mac, vm->mac, 6);
	bpf_loop(64, nd_walk_step, &w, 0);
	if (!w.result && !w.done)
		w.result = VMFENCE_REASON_MALFORMED;
	*has_lla = w.has_lla;
	return w.result;
}

static __always_inline int is_solicited_node_of(const union addr16 *d, const union addr16 *t)
{
	return d->w[0] == bpf_htonl(0xff020000) && d->w[1] == 0 && d->w[2] == bpf_htonl(1) &&
	       d->b[12] == 0xff && d->b[13] == t->b[13] && d->b[14] == t->b[14] && d->b[15] == t->b[15];
}

static __always_inline int is_ff02(const union addr16 *d, __u32 last)
{
	return d->w[0] == bpf_htonl(0xff020000) && d->w[1] == 0 && d->w[2] == 0 &&
	       d->w[3] == bpf_htonl(last);
}

static __always_inline int is_solicited_node(const union addr16 *d)
{
	return d->w[0] == bpf_htonl(0xff020000) && d->w[1] == 0 && d->w[2] == bpf_htonl(1) &&
	       d->b[12] == 0xff;
}

/* Length of the ICMPv6/IGMP message (from the L4 header to the datagram's end). */
static __always_inline __u32 l4_len(const struct pkt *p)
{
	return p->l3_end > p->l4_off ? p->l3_end - p->l4_off : 0;
}

/* A VM's ND target or NA destination that it may resolve/answer: its own,
 * a gateway, a link-local no VM of another group owns, or a VM of its group.
 * 0 or a drop reason. */
static __always_inline __u8 neighbour_reason(const struct vmfence_vm *vm, const union addr16 *t)
{
	struct vmfence_owner *o;

	if (is_link_local(t)) {
		o = owner_of(t);
		return o && o->group_id != vm->group_id ? VMFENCE_REASON_CROSS_GROUP : 0;
	}
	return resolve_target_reason(vm, t);
}

/* ICMPv6 ND/MLD from the VM. NOT_CONTROL when the packet is not link-local
 * control traffic within its bounds (the caller judges it as any packet). */
static __always_inline int from_vm_icmp6_control(struct __sk_buff *skb, const struct vmfence_vm *vm,
						 struct pkt *p, int src_owned)
{
	int src_ok = src_owned || is_unspecified(&p->saddr) ||
		     (is_link_local(&p->saddr) && ll_usable(vm, &p->saddr));
	__u32 len = l4_len(p);
	union addr16 target;
	int has_lla;
	__u8 r;

	switch (p->icmp_type) {
	case 134: /* router advertisement: a VM is never a router */
	case 137: /* redirect */
		return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ND, VMFENCE_DIR_FROM_VM);
	case 130: /* MLD query: a VM is not a multicast router */
		if (!src_ok)
			return drop(skb, vm, p, unowned_source_reason(vm, p), VMFENCE_DIR_FROM_VM);
		return drop(skb, vm, p, VMFENCE_REASON_LINK_LOCAL, VMFENCE_DIR_FROM_VM);
	case 131: /* MLDv1 report: to the group itself */
		if (p->hop_limit != 1 || len != 24 || !is_multicast(&p->daddr))
			return NOT_CONTROL;
		if (bpf_skb_load_bytes(skb, p->l4_off + 8, target.b, 16) || !addr_eq(&target, &p->daddr))
			return NOT_CONTROL;
		break;
	case 132: /* MLDv1 done */
		if (p->hop_limit != 1 || len != 24 || !is_ff02(&p->daddr, 2))
			return NOT_CONTROL;
		break;
	case 143: /* MLDv2 report */
		if (p->hop_limit != 1 || len < 8 || len > 8 + 20 * 32 || !is_ff02(&p->daddr, 0x16))
			return NOT_CONTROL;
		break;
	case 133: /* router solicitation */
		if (p->hop_limit != 255 || p->icmp_code || len < 8 || len > 40 || !is_ff02(&p->daddr, 2))
			return NOT_CONTROL;
		if (!src_ok)
			return drop(skb, vm, p, unowned_source_reason(vm, p), VMFENCE_DIR_FROM_VM);
		r = nd_options_reason(skb, vm, p->l4_off + 8, p->l3_end, 1, &has_lla);
		if (!r && has_lla && is_unspecified(&p->saddr))
			r = VMFENCE_REASON_SPOOFED_ND; /* RFC 4861 6.1.1 */
		if (r)
			return drop(skb, vm, p, r, VMFENCE_DIR_FROM_VM);
		return TC_ACT_UNSPEC;
	case 135: /* neighbour solicitation */
	case 136: /* neighbour advertisement */
		if (p->hop_limit != 255 || p->icmp_code || len < 24 || len > 64)
			return NOT_CONTROL;
		if (bpf_skb_load_bytes(skb, p->l4_off + 8, target.b, 16))
			return NOT_CONTROL;
		if (p->icmp_type == 135) {
			if (!is_solicited_node_of(&p->daddr, &target) && !addr_eq(&p->daddr, &target))
				return NOT_CONTROL;
		} else if (!is_ff02(&p->daddr, 1) && !is_link_local(&p->daddr) &&
			   neighbour_reason(vm, &p->daddr)) {
			return NOT_CONTROL;
		}
		if (!src_ok)
			return drop(skb, vm, p, unowned_source_reason(vm, p), VMFENCE_DIR_FROM_VM);
		if (p->icmp_type == 136 && is_unspecified(&p->saddr)) /* RFC 4861 7.2.4 */
			return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ND, VMFENCE_DIR_FROM_VM);
		r = nd_options_reason(skb, vm, p->l4_off + 24, p->l3_end, 1, &has_lla);
		if (!r && has_lla && is_unspecified(&p->saddr))
			r = VMFENCE_REASON_SPOOFED_ND;
		if (r)
			return drop(skb, vm, p, r, VMFENCE_DIR_FROM_VM);
		if (p->icmp_type == 136) {
			/* Advertise only an address it may use. */
			if (vm_owns(vm, &target) || (is_link_local(&target) && ll_usable(vm, &target)))
				return TC_ACT_UNSPEC;
			if (is_unassigned_in_own_64(vm, &target))
				return drop(skb, vm, p, VMFENCE_REASON_UNASSIGNED_SRC, VMFENCE_DIR_FROM_VM);
			return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ND, VMFENCE_DIR_FROM_VM);
		}
		if (is_unspecified(&p->saddr)) {
			/* Duplicate address detection: asking, not claiming. */
			if (vm_owns(vm, &target) || (is_link_local(&target) && ll_usable(vm, &target)))
				return TC_ACT_UNSPEC;
			if (owner_of(&target) || is_gateway(vm, &target))
				return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ND, VMFENCE_DIR_FROM_VM);
			return drop(skb, vm, p, VMFENCE_REASON_UNASSIGNED_SRC, VMFENCE_DIR_FROM_VM);
		}
		r = neighbour_reason(vm, &target);
		if (r)
			return drop(skb, vm, p, r, VMFENCE_DIR_FROM_VM);
		return TC_ACT_UNSPEC;
	default:
		return NOT_CONTROL;
	}
	/* MLD reports within their bounds. */
	if (!src_ok)
		return drop(skb, vm, p, unowned_source_reason(vm, p), VMFENCE_DIR_FROM_VM);
	return TC_ACT_UNSPEC;
}

/* IGMP from the VM: membership reports and leaves to their fixed groups. */
static __always_inline int from_vm_igmp(struct __sk_buff *skb, const struct vmfence_vm *vm, struct pkt *p,
					int src_owned)
{
	__u32 len = l4_len(p);
	__u32 dst = bpf_ntohl(p->daddr.w[3]);
	__u8 hdr[8];
	__u32 group;

	if (len < 8 || bpf_skb_load_bytes(skb, p->l4_off, hdr, 8))
		return NOT_CONTROL;
	if (hdr[0] == 0x11) { /* query: a VM is not a multicast router */
		if (!src_owned)
			return drop(skb, vm, p, unowned_source_reason(vm, p), VMFENCE_DIR_FROM_VM);
		return drop(skb, vm, p, VMFENCE_REASON_LINK_LOCAL, VMFENCE_DIR_FROM_VM);
	}
	if (p->hop_limit != 1 || len > 8 + 8 * 32 || !is_multicast(&p->daddr))
		return NOT_CONTROL;
	__builtin_memcpy(&group, &hdr[4], 4);
	switch (hdr[0]) {
	case 0x12: /* v1 report */
	case 0x16: /* v2 report: to the group itself */
		if (len != 8 || group != p->daddr.w[3])
			return NOT_CONTROL;
		break;
	case 0x17: /* v2 leave */
		if (len != 8 || dst != 0xe0000002)
			return NOT_CONTROL;
		break;
	case 0x22: /* v3 report */
		if (dst != 0xe0000016)
			return NOT_CONTROL;
		break;
	default:
		return NOT_CONTROL;
	}
	if (!src_owned && p->saddr.w[3] != 0)
		return drop(skb, vm, p, unowned_source_reason(vm, p), VMFENCE_DIR_FROM_VM);
	return TC_ACT_UNSPEC;
}

/* --- VM -> host ------------------------------------------------------------- */

/* IEEE 802.3/LLC frames (a length, not an ethertype) and the bridge group
 * addresses 01:80:c2:00:00:0x (STP, LLDP, LACP, 802.1X). */
static __always_inline int is_ieee_link_local(struct __sk_buff *skb, const struct pkt *p)
{
	__u8 dmac[6];

	if (p->ethertype == 0x8100 || p->ethertype == 0x88a8 || p->ethertype == 0x9100)
		return 0; /* tagged: bad_ethertype whatever it carries */
	if (p->ethertype && p->ethertype < 0x600)
		return 1;
	if (bpf_skb_load_bytes(skb, 0, dmac, 6))
		return 0;
	return dmac[0] == 0x01 && dmac[1] == 0x80 && dmac[2] == 0xc2 && dmac[3] == 0 && dmac[4] == 0 &&
	       (dmac[5] & 0xf0) == 0;
}

#define ARP_MAX_FRAME 60

/* An Ethernet/IPv4 ARP request or reply of at most 60 bytes; its sender and
 * target addresses become the packet's (for the checks and reports). */
static __always_inline int load_arp(struct __sk_buff *skb, struct arp_eth *arp, struct pkt *p, union addr16 *spa,
				    union addr16 *tpa)
{
	if (skb->len > ARP_MAX_FRAME || bpf_skb_load_bytes(skb, ETH_HLEN, arp, sizeof(*arp)))
		return -1;
	if (arp->htype != bpf_htons(1) || arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != 6 ||
	    arp->plen != 4 || (arp->op != bpf_htons(1) && arp->op != bpf_htons(2)))
		return -1;
	set_v4_mapped(spa, arp_ip(arp->spa));
	set_v4_mapped(tpa, arp_ip(arp->tpa));
	p->family = 4;
	p->saddr = *spa;
	p->daddr = *tpa;
	return 0;
}

static __always_inline int from_vm_arp(struct __sk_buff *skb, const struct vmfence_vm *vm, struct pkt *p)
{
	struct arp_eth arp;
	union addr16 spa, tpa;
	__u8 r;

	if (load_arp(skb, &arp, p, &spa, &tpa))
		return drop(skb, vm, p, VMFENCE_REASON_MALFORMED, VMFENCE_DIR_FROM_VM);
	if (!mac_eq(arp.sha, vm->mac))
		return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ARP, VMFENCE_DIR_FROM_VM);
	if (!vm_owns(vm, &spa)) {
		if (arp.op == bpf_htons(1) && spa.w[3] == 0) {
			/* A probe (RFC 5227): fine for its own address. */
			if (vm_owns(vm, &tpa))
				return TC_ACT_UNSPEC;
			return drop(skb, vm, p, VMFENCE_REASON_LINK_LOCAL, VMFENCE_DIR_FROM_VM);
		}
		if (is_unowned_zeroconf(&spa))
			return drop(skb, vm, p, VMFENCE_REASON_LINK_LOCAL, VMFENCE_DIR_FROM_VM);
		return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_ARP, VMFENCE_DIR_FROM_VM);
	}
	r = resolve_target_reason(vm, &tpa);
	if (r)
		return drop(skb, vm, p, r, VMFENCE_DIR_FROM_VM);
	return TC_ACT_UNSPEC;
}

/* --- rate limits (limits in a VM's spec) ----------------------------------- */

/* GCRA: a packet conforms when its bucket's time is at most `burst` ahead of
 * now (whatever the packet's own cost, so a packet larger than the burst
 * still passes an idle bucket); the time then moves on by its cost. */
static __always_inline int bucket_full(__u64 at, __u64 now, __u64 burst)
{
	return at > now && at - now > burst;
}

static __always_inline __u64 bucket_after(__u64 at, __u64 now, __u64 cost)
{
	return (at > now ? at : now) + cost;
}

/* Over the VM's limits in this direction? From the VM, bytes and packets are
 * policed; to the VM, packets are policed and bytes paced (EDT: the packet
 * is stamped with its departure time for the TAP's pacing qdisc, and dropped
 * only beyond the horizon). A bucket moves only for a packet that passes.
 * A GSO packet counts as its segments, each with its own headers: the guest
 * chooses gso_size, and a TAP leaves gso_segs 0. */
static __always_inline int over_limit(struct __sk_buff *skb, const struct vmfence_vm *vm, const struct pkt *p,
				      __u8 dir)
{
	__u32 slot = vm->slot;
	struct vmfence_limit *l = bpf_map_lookup_elem(&vmfence_limits_v1, &slot);
	__u64 now, segs = 1, bytes, hdr, t = 0;
	int over = 0, pace = 0;

	if (!l || dry_run)
		return 0;
	now = bpf_ktime_get_ns();
	bytes = skb->len > ETH_HLEN ? skb->len - ETH_HLEN : 0; /* IP (L3) bytes */
	if (skb->gso_size) {
		/* Headers up to the L4 payload, repeated in every segment. */
		hdr = p->l4_off > ETH_HLEN ? p->l4_off - ETH_HLEN : 0;
		hdr += p->proto == IPPROTO_TCP ? 20 : 8;
		if (hdr < 1500 && bytes > hdr) {
			segs = (bytes - hdr + skb->gso_size - 1) / skb->gso_size;
			if (segs < 1)
				segs = 1;
			bytes += (segs - 1) * hdr;
		}
	}
	bpf_spin_lock(&l->lock);
	if (dir == VMFENCE_DIR_FROM_VM) {
		if ((l->egress_byte_ns_q16 && bucket_full(l->egress_bytes_at, now, l->egress_burst_ns)) ||
		    (l->egress_pkt_ns && bucket_full(l->egress_pkts_at, now, l->egress_pkt_burst_ns))) {
			over = 1;
		} else {
			l->egress_bytes_at = bucket_after(l->egress_bytes_at, now, (bytes * l->egress_byte_ns_q16) >> 16);
			l->egress_pkts_at = bucket_after(l->egress_pkts_at, now, segs * l->egress_pkt_ns);
		}
	} else {
		t = l->ingress_next_ns > now ? l->ingress_next_ns : now;
		pace = l->ingress_byte_ns_q16 != 0;
		if ((l->ingress_pkt_ns && bucket_full(l->ingress_pkts_at, now, l->ingress_pkt_burst_ns)) ||
		    (pace && t - now > l->ingress_burst_ns)) {
			over = 1;
		} else {
			l->ingress_pkts_at = bucket_after(l->ingress_pkts_at, now, segs * l->ingress_pkt_ns);
			if (pace)
				l->ingress_next_ns = t + ((bytes * l->ingress_byte_ns_q16) >> 16);
		}
	}
	bpf_spin_unlock(&l->lock);
	if (!over && pace)
		skb->tstamp = t;
	return over;
}

/* Vouch for a packet the from_vm checks passed: it entered through the TAP of
 * the VM that owns its source address (see VMFENCE_MARK_FROM_VM). */
static __always_inline int pass_from_vm(struct __sk_buff *skb)
{
	skb->mark |= VMFENCE_MARK_FROM_VM;
	return TC_ACT_UNSPEC;
}

/* Multicast or broadcast at L3 or L2 (a subnet broadcast such as a NetBIOS
 * query goes to ff:ff:ff:ff:ff:ff; vmfence does not know the VM's subnet). */
static __always_inline int is_broadcast_or_multicast(struct __sk_buff *skb, const struct pkt *p)
{
	__u8 d[6];

	if (is_multicast(&p->daddr))
		return 1;
	/* A subnet broadcast: all-ones host bits (last octet 255) to the
	 * Ethernet broadcast address. Not any unicast IP in a broadcast frame. */
	if (p->family != 4 || (bpf_ntohl(p->daddr.w[3]) & 0xff) != 0xff || bpf_skb_load_bytes(skb, 0, d, 6))
		return 0;
	return (d[0] & d[1] & d[2] & d[3] & d[4] & d[5]) == 0xff;
}

/* The verdict on a packet from the VM (*vmp: its VM, once known); the
 * program below adds the VM's rate limits to what this passes. */
static __always_inline int from_vm_judge(struct __sk_buff *skb, struct pkt *p, struct vmfence_vm **vmp)
{
	struct vmfence_policy_value *v;
	struct vmfence_flow_key fk;
	struct vmfence_vm *vm;
	int src_owned, ret, verdict, checked, g;
	__u8 r;

	vm = hook_start(skb, p, VMFENCE_DIR_FROM_VM, &verdict, &r);
	if (!vm)
		return verdict;
	*vmp = vm;

	if (p->ethertype && !mac_eq(p->smac, vm->mac))
		return drop(skb, vm, p, VMFENCE_REASON_SPOOFED_MAC, VMFENCE_DIR_FROM_VM);
	/* The kernel moved a VLAN tag into the skb before TC saw the frame. */
	if (skb->vlan_present)
		return drop(skb, vm, p, VMFENCE_REASON_BAD_ETHERTYPE, VMFENCE_DIR_FROM_VM);
	if (r == VMFENCE_REASON_BAD_ETHERTYPE && is_ieee_link_local(skb, p))
		return drop(skb, vm, p, VMFENCE_REASON_LINK_LOCAL, VMFENCE_DIR_FROM_VM);
	if (r)
		return drop(skb, vm, p, r, VMFENCE_DIR_FROM_VM);
	if (p->ethertype == ETH_P_ARP) {
		ret = from_vm_arp(skb, vm, p);
		return ret == TC_ACT_UNSPEC ? pass_from_vm(skb) : ret;
	}

	src_owned = vm_owns(vm, &p->saddr);
	if (p->frag == FRAG_NONE && !skb->gso_size) {
		ret = NOT_CONTROL;
		if (p->proto == IPPROTO_ICMPV6 && p->family == 6)
			ret = from_vm_icmp6_control(skb, vm, p, src_owned);
		else if (p->proto == 2 && p->family == 4)
			ret = from_vm_igmp(skb, vm, p, src_owned);
		if (ret != NOT_CONTROL)
			return ret == TC_ACT_UNSPEC ? pass_from_vm(skb) : ret;
	}
	if (!src_owned)
		return drop(skb, vm, p, unowned_source_reason(vm, p), VMFENCE_DIR_FROM_VM);
	/* Link-local IP traffic other than ND/MLD is not carried. */
	if (p->family == 6 && (is_link_local(&p->saddr) || is_link_local(&p->daddr)))
		return drop(skb, vm, p, VMFENCE_REASON_LINK_LOCAL, VMFENCE_DIR_FROM_VM);

	/* Isolation holds in every mode: VM to VM only within a group. Where
	 * the policy is checked, its lookup says whether the destination is
	 * in VM address space at all (VMFENCE_POLICY_F_VM_NET), so traffic to
	 * the outside skips the ownership lookup. */
	checked = vm->mode == VMFENCE_MODE_FILTERED || vm->mode == VMFENCE_MODE_CONNTRACK ||
		  (vm->mode == VMFENCE_MODE_SAMPLED && sample(vm));
	if (!checked || p->frag == FRAG_LATER) {
		g = group_of_owner(vm, &p->daddr);
		if (g < 0)
			return drop(skb, vm, p, VMFENCE_REASON_CROSS_GROUP, VMFENCE_DIR_FROM_VM);
		if (p->frag == FRAG_LATER) {
			/* Same group, unchecked modes, or the first fragment passed. */
			if (g > 0 || !checked || later_fragment_allowed(vm, p))
				return pass_from_vm(skb);
			return drop(skb, vm, p, VMFENCE_REASON_FRAGMENT, VMFENCE_DIR_FROM_VM);
		}
		if (!g && vm->mode == VMFENCE_MODE_SAMPLED) {
			/* Unchecked, but remembered so replies find their flow. */
			flow_key_from_vm(&fk, vm, p);
			if (flow_record(vm, &fk, VMFENCE_FLOW_OPENED_BY_VM, p->tcp_flags, 0))
				return drop(skb, vm, p, VMFENCE_REASON_FLOW_LIMIT, VMFENCE_DIR_FROM_VM);
		}
		first_fragment_passed(vm, p);
		return pass_from_vm(skb);
	}

	/* The flow key only where a flow is looked up or recorded: not for the
	 * common packet the policy allows without a write. */
	if (vm->mode == VMFENCE_MODE_CONNTRACK) {
		flow_key_from_vm(&fk, vm, p);
		if (flow_allowed(vm, &fk, 0, p->tcp_flags, 1, 0))
			goto allowed;
	}
	v = policy_lookup(&vmfence_egress_v2, vm, &p->daddr);
	/* The tries mark local VM address space only: with a fleet, a remote
	 * VM may own any destination, so its owner is always asked. */
	if (!v || (v->flags & VMFENCE_POLICY_F_VM_NET) || fleet_on()) {
		g = group_of_owner(vm, &p->daddr);
		if (g < 0)
			return drop(skb, vm, p, VMFENCE_REASON_CROSS_GROUP, VMFENCE_DIR_FROM_VM);
		if (g > 0) {
			first_fragment_passed(vm, p);
			return pass_from_vm(skb);
		}
	}
	r = rules_check(v, p->proto, p->dport, VMFENCE_REASON_EGRESS_DENIED);
	if (r && vm->mode != VMFENCE_MODE_CONNTRACK)
		flow_key_from_vm(&fk, vm, p);
	if (r) {
		/* A reply in a flow a peer opened under an ingress rule. Only
		 * flows a peer opened: a flow the VM opened is what the egress
		 * check just judged (and in sampled mode it may have been
		 * recorded unchecked). */
		if (vm->mode != VMFENCE_MODE_CONNTRACK && flow_allowed(vm, &fk, 1, p->tcp_flags, 1, 0))
			goto allowed;
		if (is_icmp_error(p) && icmp_error_for_flow(skb, vm, p, 1))
			return pass_from_vm(skb);
		/* Shaped like a reply (an RST, or from a port its ingress rules
		 * open) to a flow the table does not hold: expired, or the answer
		 * to a stray packet. Dropped, but not the VM's violation. */
		if ((p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_RST)) ||
		    !policy_check(&vmfence_ingress_v2, vm, &p->daddr, p->proto, p->sport,
				  VMFENCE_REASON_INGRESS_DENIED))
			r = VMFENCE_REASON_STALE_REPLY;
		/* Multicast and broadcast no rule allows (mDNS, LLMNR, SSDP,
		 * DHCPv6, NetBIOS): the guest's link-local noise. */
		else if (r == VMFENCE_REASON_EGRESS_DENIED && is_broadcast_or_multicast(skb, p))
			r = VMFENCE_REASON_LINK_LOCAL;
		return drop(skb, vm, p, r, VMFENCE_DIR_FROM_VM);
	}
	/* TCP records its flow on the SYN (and ends it on FIN/RST); later
	 * segments need no write. */
	if (p->proto != IPPROTO_TCP || (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)) ||
	    vm->mode == VMFENCE_MODE_CONNTRACK) {
		if (vm->mode != VMFENCE_MODE_CONNTRACK)
			flow_key_from_vm(&fk, vm, p);
		if (flow_record(vm, &fk, VMFENCE_FLOW_OPENED_BY_VM, p->tcp_flags, 1))
			return drop(skb, vm, p, VMFENCE_REASON_FLOW_LIMIT, VMFENCE_DIR_FROM_VM);
	}
allowed:
	first_fragment_passed(vm, p);
	return pass_from_vm(skb);
}

SEC("tc")
int vmfence_from_vm(struct __sk_buff *skb)
{
	struct vmfence_vm *vm = NULL;
	struct pkt p = {};
	int ret = from_vm_judge(skb, &p, &vm);

	if (ret == TC_ACT_UNSPEC && vm && (vm->flags & VMFENCE_VM_F_RATE_LIMITED) &&
	    over_limit(skb, vm, &p, VMFENCE_DIR_FROM_VM))
		return drop(skb, vm, &p, VMFENCE_REASON_RATE_LIMITED, VMFENCE_DIR_FROM_VM);
	return ret;
}

/* --- host -> VM ------------------------------------------------------------- */

/* A packet claiming a VM's address toward a VM: a local VM's must have
 * entered through that VM's TAP (the mark), a remote VM's (fleet) through a
 * fleet interface; it must not claim the target itself, and must come from
 * the target's group. 0 (no VM's address, or trusted same group: *same set)
 * or a drop reason. */
static __always_inline __u8 vm_source_reason(struct __sk_buff *skb, const struct vmfence_vm *vm,
					     const union addr16 *src, int *same)
{
	struct vmfence_owner *o = owner_of(src);
	__u8 dmac[6];

	*same = 0;
	if (!o)
		return 0;
	/* A packet off the wire never carries the mark: one that arrives on a
	 * fleet interface with it was a local guest's, decapsulated on this
	 * host (a tunnel endpoint a VM can reach), whatever it claims. */
	if (o->flags & VMFENCE_OWNER_F_REMOTE) {
		if (!from_fleet_interface(skb) || (skb->mark & VMFENCE_MARK_FROM_VM))
			return VMFENCE_REASON_SPOOFED_IP;
	} else if (o->vm_id == vm->vm_id || !(skb->mark & VMFENCE_MARK_FROM_VM) || from_fleet_interface(skb)) {
		return VMFENCE_REASON_SPOOFED_IP;
	}
	if (o->group_id != vm->group_id) {
		/* Another tenant's broadcast, multicast or flooded unicast on a
		 * shared bridge reaches every port: dropped, but it is the
		 * bridge at work, not an attempt on this VM (not reported). */
		if (bpf_skb_load_bytes(skb, 0, dmac, 6) || !mac_eq(dmac, vm->mac))
			return VMFENCE_REASON_LINK_LOCAL;
		return VMFENCE_REASON_CROSS_GROUP;
	}
	*same = 1;
	return 0;
}

static __always_inline int to_vm_arp(struct __sk_buff *skb, const struct vmfence_vm *vm, struct pkt *p)
{
	struct arp_eth arp;
	union addr16 spa, tpa;
	int same;
	__u8 r;

	if (load_arp(skb, &arp, p, &spa, &tpa))
		return drop(skb, vm, p, VMFENCE_REASON_MALFORMED, VMFENCE_DIR_TO_VM);
	r = vm_source_reason(skb, vm, &spa, &same);
	if (r)
		return drop(skb, vm, p, r == VMFENCE_REASON_SPOOFED_IP ? VMFENCE_REASON_SPOOFED_ARP : r,
			    VMFENCE_DIR_TO_VM);
	/* Only ARP that concerns this VM: its addresses or its gateway. */
	if (vm_owns(vm, &tpa) || is_gateway(vm, &spa) || is_gateway(vm, &tpa))
		return TC_ACT_UNSPEC;
	return drop(skb, vm, p, VMFENCE_REASON_ARP_DENIED, VMFENCE_DIR_TO_VM);
}

/* ND/MLD/IGMP toward the VM within bounds. NOT_CONTROL otherwise. */
static __always_inline int to_vm_control(struct __sk_buff *skb, const struct vmfence_vm *vm, struct pkt *p)
{
	__u32 len = l4_len(p);
	const union addr16 *d = &p->daddr;
	int dst_ok;

	if (p->family == 4) {
		__u8 type;

		if (p->proto != 2)
			return NOT_CONTROL;
		if (bpf_skb_load_bytes(skb, p->l4_off, &type, 1))
			return NOT_CONTROL;
		if (type != 0x11)
			return drop(skb, vm, p, VMFENCE_REASON_LINK_LOCAL, VMFENCE_DIR_TO_VM);
		if (p->hop_limit != 1 || len < 8 || len > 12 + 4 * 32 || !is_multicast(d))
			return NOT_CONTROL;
		return TC_ACT_UNSPEC;
	}
	if (p->proto != IPPROTO_ICMPV6)
		return NOT_CONTROL;
	dst_ok = vm_owns(vm, d) || is_link_local(d) || is_ff02(d, 1) || is_solicited_node(d);
	switch (p->icmp_type) {
	case 131: case 132: case 143: /* other hosts' MLD reports */
	case 133:                     /* router solicitations */
		return drop(skb, vm, p, VMFENCE_REASON_LINK_LOCAL, VMFENCE_DIR_TO_VM);
	case 130: /* MLD query */
		if (p->hop_limit != 1 || len < 24 || len > 28 + 16 * 32 || !dst_ok)
			return NOT_CONTROL;
		return TC_ACT_UNSPEC;
	case 135: case 136: /* NS, NA */
		if (p->hop_limit != 255 || p->icmp_code || len < 24 || len > 64 || !dst_ok)
			return NOT_CONTROL;
		return TC_ACT_UNSPEC;
	case 134: /* RA: prefixes, MTU, RDNSS */
		if (p->hop_limit != 255 || p->icmp_code || len < 16 || len > 512 || !dst_ok)
			return NOT_CONTROL;
		return TC_ACT_UNSPEC;
	case 137: /* redirect (quotes a packet) */
		if (p->hop_limit != 255 || p->icmp_code || len < 40 || len > 1280 - 40 || !dst_ok)
			return NOT_CONTROL;
		return TC_ACT_UNSPEC;
	}
	return NOT_CONTROL;
}

/* A vouched frame's Ethernet source is its sender VM's MAC (its from_vm
 * checked it): the EUI-64 link-local of that MAC, which the compiler
 * registers as the VM's own, names the VM and so its group. */
static __always_inline int sender_mac_in_group(const struct vmfence_vm *vm, const struct pkt *p)
{
	union addr16 ll;
	struct vmfence_owner *o;

	vmfence_eui64_link_local(p->smac, ll.b);
	o = owner_of(&ll);
	return o && o->group_id == vm->group_id;
}

/* The verdict on a packet to the VM, likewise. */
static __always_inline int to_vm_judge(struct __sk_buff *skb, struct pkt *p, struct vmfence_vm **vmp)
{
	struct vmfence_flow_key fk;
	struct vmfence_vm *vm;
	int verdict, same, ret;
	__u8 r;

	vm = hook_start(skb, p, VMFENCE_DIR_TO_VM, &verdict, &r);
	if (!vm)
		return verdict;
	*vmp = vm;

	if (skb->vlan_present)
		return drop(skb, vm, p, VMFENCE_REASON_BAD_ETHERTYPE, VMFENCE_DIR_TO_VM);
	if (r)
		return drop(skb, vm, p, r, VMFENCE_DIR_TO_VM);
	if (p->ethertype == ETH_P_ARP)
		return to_vm_arp(skb, vm, p);

	r = vm_source_reason(skb, vm, &p->saddr, &same);
	if (r)
		return drop(skb, vm, p, r, VMFENCE_DIR_TO_VM);
	if (p->frag == FRAG_NONE) {
		ret = to_vm_control(skb, vm, p);
		/* Another VM's ND/MLD from a link-local no VM of this group owns
		 * (stable-privacy, or claiming the router's): on a shared bridge
		 * that is a tenant poisoning neighbour caches or answering DAD. */
		if (ret == TC_ACT_UNSPEC && (skb->mark & VMFENCE_MARK_FROM_VM) && !same &&
		    !sender_mac_in_group(vm, p))
			return drop(skb, vm, p, VMFENCE_REASON_LINK_LOCAL, VMFENCE_DIR_TO_VM);
		if (ret != NOT_CONTROL)
			return ret;
	}
	if (p->family == 6 && (is_link_local(&p->saddr) || is_link_local(&p->daddr)))
		return drop(skb, vm, p, VMFENCE_REASON_LINK_LOCAL, VMFENCE_DIR_TO_VM);
	if (!is_multicast(&p->daddr) && !vm_owns(vm, &p->daddr))
		return drop(skb, vm, p, VMFENCE_REASON_NOT_FOR_VM, VMFENCE_DIR_TO_VM);
	if (same || vm->mode == VMFENCE_MODE_DIRECT) {
		first_fragment_passed(vm, p);
		return TC_ACT_UNSPEC;
	}
	/* Sampling applies to the VM's own packets: what reaches it is always
	 * checked, so an outsider's packet can never make the VM's answer look
	 * like a violation. */
	if (p->frag == FRAG_LATER) {
		if (later_fragment_allowed(vm, p))
			return TC_ACT_UNSPEC;
		return drop(skb, vm, p, VMFENCE_REASON_FRAGMENT, VMFENCE_DIR_TO_VM);
	}
	flow_key_to_vm(&fk, vm, p);
	if (flow_allowed(vm, &fk, 0, p->tcp_flags, 0, 0))
		goto allowed;
	if (is_icmp_error(p) && icmp_error_for_flow(skb, vm, p, 0))
		return TC_ACT_UNSPEC;
	r = policy_check(&vmfence_ingress_v2, vm, &p->saddr, p->proto, p->dport,
			 VMFENCE_REASON_INGRESS_DENIED);
	if (r == VMFENCE_REASON_IMDS_DENIED)
		r = VMFENCE_REASON_INGRESS_DENIED;
	if (r)
		return drop(skb, vm, p, r, VMFENCE_DIR_TO_VM);
	/* Every segment the ingress rules let in is remembered (not only SYNs):
	 * the VM's answer to it (an RST to a stray ACK) is then a reply, not a
	 * violation an outsider could provoke. */
	if (flow_record(vm, &fk, VMFENCE_FLOW_OPENED_BY_PEER, p->tcp_flags, 1))
		return drop(skb, vm, p, VMFENCE_REASON_FLOW_LIMIT, VMFENCE_DIR_TO_VM);
allowed:
	first_fragment_passed(vm, p);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int vmfence_to_vm(struct __sk_buff *skb)
{
	struct vmfence_vm *vm = NULL;
	struct pkt p = {};
	int ret = to_vm_judge(skb, &p, &vm);

	if (ret == TC_ACT_UNSPEC && vm && (vm->flags & VMFENCE_VM_F_RATE_LIMITED) &&
	    over_limit(skb, vm, &p, VMFENCE_DIR_TO_VM))
		return drop(skb, vm, &p, VMFENCE_REASON_RATE_LIMITED, VMFENCE_DIR_TO_VM);
	return ret;
}

/* --- XDP pre-filter (host.json "xdp_prefilter") ------------------------------ */

/* The IP header of a frame the pre-filter may judge: IPv4 without options or
 * IPv6 without extension headers, carrying TCP, UDP or ICMP (IPv4), with a
 * length that matches the frame. Fills p; 0 when the frame is anything else
 * (ARP, ND/MLD, IGMP, VLAN, fragments of IPv6, malformed), which tcx judges. */
static __always_inline int xdp_judgeable(void *data, void *data_end, struct pkt *p)
{
	__u32 len = data_end - data, l3_end;
	__u8 *l4;

	if (p->ethertype == ETH_P_IP) {
		struct iphdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl != 5)
			return 0;
		if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_ICMP)
			return 0;
		l3_end = ETH_HLEN + bpf_ntohs(ip->tot_len);
		if (l3_end < ETH_HLEN + sizeof(*ip))
			return 0;
		set_v4_mapped(&p->saddr, ip->saddr);
		set_v4_mapped(&p->daddr, ip->daddr);
		p->family = 4;
		p->proto = ip->protocol;
		l4 = (void *)(ip + 1);
		if (ip->frag_off & bpf_htons(0x1fff))
			l4 = NULL; /* a later fragment: no L4 header */
	} else if (p->ethertype == ETH_P_IPV6) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return 0;
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return 0;
		l3_end = ETH_HLEN + sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		__builtin_memcpy(p->saddr.b, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr.b, &ip6->daddr, 16);
		p->family = 6;
		p->proto = ip6->nexthdr;
		l4 = (void *)(ip6 + 1);
	} else {
		return 0;
	}
	/* What frame_length_reason() lets through at tcx, nothing more. */
	if (l3_end > len || (len > l3_end && len > 60))
		return 0;
	if (l4 && p->proto != IPPROTO_ICMP && (void *)(l4 + 4) <= data_end) {
		__builtin_memcpy(&p->sport, l4, 2);
		__builtin_memcpy(&p->dport, l4 + 2, 2);
	}
	return 1;
}

/* Frames a VM sends, on its TAP, before tcx (and, for a VMM that writes like
 * QEMU, before the kernel builds an skb: BENCHMARKS.md, "XDP pre-filter").
 * Drops early only what vmfence_from_vm drops for the same reason whatever
 * else the frame holds: a VM without policy, a quarantined VM, a foreign
 * source MAC, and an IP packet (the shapes xdp_judgeable() accepts) from a
 * source the VM does not own that tcx would call spoofed. Everything else
 * passes to tcx, which judges every packet in full: the pre-filter can drop
 * sooner, never let through. Counts and reports its drops like tcx does;
 * frames it passes are counted at tcx. */
SEC("xdp")
int vmfence_xdp_from_vm(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 ifindex = ctx->ingress_ifindex;
	struct ethhdr *eth = data;
	struct vmfence_counters *c;
	struct vmfence_state *st;
	struct vmfence_vm *vm;
	struct pkt p = {};
	__u32 slot;
	__u8 reason = 0;
	int judged;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	vm = bpf_map_lookup_elem(&vmfence_vms_v1, &ifindex);
	if (!vm)
		return XDP_PASS; /* tcx drops and reports it */
	slot = vm->slot;
	__builtin_memcpy(p.smac, eth->h_source, 6);
	p.ethertype = bpf_ntohs(eth->h_proto);
	judged = xdp_judgeable(data, data_end, &p);
	st = bpf_map_lookup_elem(&vmfence_state_v1, &slot);
	if (vm->flags & VMFENCE_VM_F_NO_POLICY)
		reason = VMFENCE_REASON_NO_POLICY;
	else if (st && st->quarantined)
		reason = VMFENCE_REASON_QUARANTINED;
	else if (p.ethertype && !mac_eq(p.smac, vm->mac)) /* as tcx: not for ethertype 0 */
		reason = VMFENCE_REASON_SPOOFED_MAC;
	else if (judged && !vm_owns(vm, &p.saddr) && unowned_source_reason(vm, &p) == VMFENCE_REASON_SPOOFED_IP)
		reason = VMFENCE_REASON_SPOOFED_IP;
	if (!reason)
		return XDP_PASS;
	if (dry_run)
		return XDP_DROP;
	c = bpf_map_lookup_elem(&vmfence_counters_v3, &slot);
	if (c) {
		c->from_vm_packets++;
		c->from_vm_bytes += data_end - data;
	}
	report_drop(ifindex, vm, &p, reason, VMFENCE_DIR_FROM_VM);
	return XDP_DROP;
}
