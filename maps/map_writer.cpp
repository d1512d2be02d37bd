#include "maps/map_writer.h"

#include <algorithm>
#include <cstring>

#include "maps/pinned_maps.h"

namespace vmfence {

const char* map_id_name(MapId id) {
  switch (id) {
    case MapId::vms:
      return VMFENCE_MAP_VMS;
    case MapId::owners:
      return VMFENCE_MAP_OWNERS;
    case MapId::owner_nets:
      return VMFENCE_MAP_OWNER_NETS;
    case MapId::egress:
      return VMFENCE_MAP_EGRESS;
    case MapId::ingress:
      return VMFENCE_MAP_INGRESS;
    case MapId::gateways:
      return VMFENCE_MAP_GATEWAYS;
    case MapId::state:
      return VMFENCE_MAP_STATE;
    case MapId::limits:
      return VMFENCE_MAP_LIMITS;
  }
  return "?";
}

namespace {

template <typename T>
T from_bytes(const Bytes& b) {
  T x{};
  std::memcpy(&x, b.data(), std::min(b.size(), sizeof(T)));
  return x;
}

uint32_t policy_index(const InstalledVm& vm) { return vmfence_policy_index(vm.slot, vm.policy_id); }

Bytes policy_key(const PolicyEntry& e, uint32_t index) { return to_bytes(PolicyKey{index, e.key}); }

template <typename T>
bool contains_bytes(const std::vector<T>& list, const T& x) {
  return std::any_of(list.begin(), list.end(), [&](const T& y) { return std::memcmp(&x, &y, sizeof(T)) == 0; });
}

vmfence_owner owner_of(const VmPlan& plan) { return {plan.vm.vm_id, plan.vm.group_id, 0}; }

constexpr MapId kCounted[] = {MapId::vms,    MapId::owners,  MapId::owner_nets,
                              MapId::egress, MapId::ingress, MapId::gateways};

}  // namespace

MapWriter::MapWriter(MapSet& maps, const std::string& pin_dir)
    : backend_(pinned_backend(maps, pin_dir.empty() ? "" : pin_dir + "/policy")) {}
MapWriter::MapWriter(std::unique_ptr<MapBackend> backend) : backend_(std::move(backend)) {}
MapWriter::~MapWriter() = default;

void MapWriter::recount() {
  // Policy entries are counted as written (the tries in force): walking
  // every trie of every slot costs ~65,000 syscalls.
  for (MapId m : kCounted)
    if (m != MapId::egress && m != MapId::ingress) counts_[m] = backend_->keys(m).size();
}

size_t MapWriter::entries(MapId map) const {
  auto it = counts_.find(map);
  return it == counts_.end() ? 0 : it->second;
}

std::optional<uint32_t> MapWriter::adopted_ifindex(uint32_t vm_id) const {
  auto it = adopted_.find(vm_id);
  if (it == adopted_.end()) return std::nullopt;
  return it->second.ifindex;
}

Status MapWriter::adopt() {
  used_slots_.insert(0);  // slot 0: packets on interfaces without a VM
  for (const Bytes& k : backend_->keys(MapId::vms)) {
    Bytes v;
    if (!backend_->lookup(MapId::vms, k, v)) continue;
    auto ifindex = from_bytes<uint32_t>(k);
    auto vm = from_bytes<vmfence_vm>(v);
    if (vm.flags & VMFENCE_VM_F_NO_POLICY) continue;  // blocked: re-derived from the specs
    adopted_[vm.vm_id] = {vm.slot, ifindex, vm.policy_id};
    used_slots_.insert(vm.slot);
    // Generations only grow: a flow cached under an old one is re-checked.
    next_policy_id_ = std::max(next_policy_id_, vm.policy_id + 1);
  }
  // Remote VMs' entries stay until the fleet's first sync says otherwise.
  auto adopt_remote = [&](MapId m, std::map<Bytes, vmfence_owner>& out) {
    for (const Bytes& k : backend_->keys(m)) {
      Bytes v;
      if (!backend_->lookup(m, k, v)) continue;
      auto o = from_bytes<vmfence_owner>(v);
      if (o.flags & VMFENCE_OWNER_F_REMOTE) out[k] = o;
    }
  };
  adopt_remote(MapId::owners, remote_.hosts);
  adopt_remote(MapId::owner_nets, remote_.nets);
  recount();
  return {};
}

Status MapWriter::set_remote(const RemoteOwners& next) {
  std::set<Bytes> local_hosts, local_nets;
  for (const auto& [name, vm] : vms_) {
    for (const auto& a : vm.plan.host_addresses) local_hosts.insert(to_bytes(a));
    for (const auto& a : vm.plan.net_addresses) local_nets.insert(to_bytes(a));
  }
  Status first;
  auto apply = [&](MapId m, const std::map<Bytes, vmfence_owner>& want, std::map<Bytes, vmfence_owner>& have,
                   const std::set<Bytes>& local) {
    // Gone first: a full owner_nets must not refuse a newcomer for lack of
    // room the leavers still take.
    for (auto it = have.begin(); it != have.end();) {
      auto w = want.find(it->first);
      if (w != want.end() && !local.count(it->first)) {
        ++it;
        continue;
      }
      Bytes v;
      if (backend_->lookup(m, it->first, v) && (from_bytes<vmfence_owner>(v).flags & VMFENCE_OWNER_F_REMOTE))
        erase_counted(m, it->first);
      it = have.erase(it);
    }
    for (const auto& [k, o] : want) {
      if (local.count(k)) continue;
      vmfence_owner flagged = o;
      flagged.flags |= VMFENCE_OWNER_F_REMOTE;
      auto h = have.find(k);
      if (h != have.end() && std::memcmp(&h->second, &flagged, sizeof flagged) == 0) continue;
      Bytes v;
      bool existed = backend_->lookup(m, k, v);
      if (auto s = backend_->update(m, k, to_bytes(flagged)); !s) {
        if (first.ok()) first = Status::error(s.err, std::string("write remote VM address to ") + map_id_name(m));
        continue;
      }
      if (!existed) ++counts_[m];
      have[k] = flagged;
    }
  };
  apply(MapId::owners, next.hosts, remote_.hosts, local_hosts);
  apply(MapId::owner_nets, next.nets, remote_.nets, local_nets);
  return first;
}

uint32_t MapWriter::alloc_slot(uint32_t vm_id, bool& fresh) {
  fresh = false;
  if (auto it = adopted_.find(vm_id); it != adopted_.end()) return it->second.slot;
  // Lowest free slot at or after the hint: linear overall, not per VM.
  for (uint32_t tries = 0; tries < VMFENCE_MAX_VMS; ++tries) {
    uint32_t s = next_free_slot_;
    next_free_slot_ = next_free_slot_ + 1 >= VMFENCE_MAX_VMS ? 1 : next_free_slot_ + 1;
    if (!used_slots_.count(s)) {
      if (!backend_->reset_slot(s)) continue;
      used_slots_.insert(s);
      fresh = true;
      return s;
    }
  }
  return 0;
}

void MapWriter::free_slot(uint32_t slot) {
  if (slot == 0) return;
  used_slots_.erase(slot);
  // The next VM in this slot starts with empty tables.
  backend_->drop_tables(slot);
  for (auto it = adopted_.begin(); it != adopted_.end();)
    it = it->second.slot == slot ? adopted_.erase(it) : std::next(it);
}

// Quarantine, the violation window and the event budget belong to the
// interface instance they were earned on: a new one starts clear.
void MapWriter::reset_instance(uint32_t slot) {
  vmfence_state st{};
  (void)backend_->update(MapId::state, to_bytes(slot), to_bytes(st));
}

void MapWriter::drop_generation(const InstalledVm& vm) {
  for (auto [m, n] :
       {std::pair{MapId::egress, vm.plan.egress.size()}, std::pair{MapId::ingress, vm.plan.ingress.size()}})
    counts_[m] -= std::min(counts_[m], n);
  backend_->drop_policy(policy_index(vm));
}

void MapWriter::erase_counted(MapId map, const Bytes& key) {
  Bytes v;
  if (!backend_->lookup(map, key, v)) return;
  if (backend_->erase(map, key) && counts_[map] > 0) --counts_[map];
}

Status MapWriter::put(VmChange& c, MapId map, const Bytes& key, const Bytes& value, bool record_previous) {
  VmChange::Undo u{map, key, std::nullopt};
  if (record_previous) {
    Bytes prev;
    if (backend_->lookup(map, key, prev)) u.previous = std::move(prev);
  }
  if (auto s = backend_->update(map, key, value); !s) return s;
  if (!u.previous) ++counts_[map];
  c.undo.push_back(std::move(u));
  return {};
}

Status MapWriter::stage(const VmPlan& plan, uint32_t ifindex, VmChange& c) {
  c = VmChange{};
  auto it = vms_.find(plan.name);
  if (it != vms_.end()) c.old = it->second;
  c.next.plan = plan;
  c.next.ifindex = ifindex;
  auto b = blocked_.find(ifindex);
  auto bv = blocked_vm_.find(ifindex);
  if (c.old) {
    c.next.slot = c.old->slot;
  } else if (ifindex && b != blocked_.end() && b->second && bv != blocked_vm_.end() && bv->second == plan.vm.vm_id) {
    // Its spec was removed and is back while its interface stayed: the same
    // instance, with its slot (counters, quarantine) as it was.
    c.next.slot = b->second;
    c.same_instance = true;
  } else {
    bool fresh = false;
    c.next.slot = alloc_slot(plan.vm.vm_id, fresh);
    c.new_slot = fresh;  // an adopted slot is not ours to free on abort
  }
  if (c.next.slot == 0) return Status::error(ENOSPC, "no free VM slot (max " + std::to_string(VMFENCE_MAX_VMS) + ")");
  // Another VM's slot on this very interface (a renamed VM, or one removed
  // and replaced): the instance's state carries over to the new slot.
  if (!c.old && !c.same_instance && ifindex) {
    if (b != blocked_.end() && b->second && b->second != c.next.slot) c.predecessor = b->second;
    for (const auto& [name, vm] : vms_)
      if (vm.ifindex == ifindex && vm.slot != c.next.slot) c.predecessor = vm.slot;
  }
  // A changed limit of a running VM swaps its flow table at release (a
  // refused change must not touch it); a VM with an interface needs its
  // tables now. One without gets them when it is bound: 16,384 flows cost
  // 256 KB of kernel memory and 1.3 ms to create, for a VM that is not
  // running (10,000 specs of stopped VMs took 2.5 GB and 13 s).
  // (A VM that was unbound may have none: it gets them now, new size.)
  if (c.old && c.old->ifindex && c.old->plan.flow_limit != plan.flow_limit) {
    c.resize_tables = ifindex != 0;
  } else if (ifindex) {
    if (auto s = backend_->ensure_tables(c.next.slot, plan.flow_limit); !s) {
      abort(c);
      return s;
    }
  }
  // The new generation goes to the slot's idle trie: the other parity than
  // the generation the kernel uses now (this run's, or the previous run's).
  std::optional<uint32_t> live;
  if (c.old && c.old->slot == c.next.slot) live = c.old->policy_id;
  if (auto a = adopted_.find(plan.vm.vm_id); !live && a != adopted_.end() && a->second.slot == c.next.slot)
    live = a->second.policy_id;
  c.next.policy_id = next_policy_id_++;
  if (live && (*live & 1) == (c.next.policy_id & 1)) c.next.policy_id = next_policy_id_++;
  uint32_t index = policy_index(c.next);
  backend_->reset_policy(index);  // never what an earlier generation left there

  auto fail = [&](const Status& s, const char* what) {
    abort(c);
    int e = s.err;
    return Status::error(e, std::string(e == E2BIG || e == ENOSPC ? "map full: " : "") + what);
  };
  // 1. The new generation, invisible until the VM entry points at it.
  for (const auto& e : plan.egress)
    if (auto s = put(c, MapId::egress, policy_key(e, index), to_bytes(e.value), false); !s)
      return fail(s, "write egress policy entry");
  for (const auto& e : plan.ingress)
    if (auto s = put(c, MapId::ingress, policy_key(e, index), to_bytes(e.value), false); !s)
      return fail(s, "write ingress policy entry");
  // 2. Addresses (overwriting a previous owner in one update) and gateways.
  Bytes owner = to_bytes(owner_of(plan));
  // A local VM's address overwrites a remote entry (admission gave it the
  // address): the remote set forgets it, so set_remote() writes it again if
  // it is ever the remote VM's once more.
  for (const auto& a : plan.host_addresses) {
    if (auto s = put(c, MapId::owners, to_bytes(a), owner, true); !s) return fail(s, "write address owner");
    remote_.hosts.erase(to_bytes(a));
  }
  for (const auto& a : plan.net_addresses) {
    if (auto s = put(c, MapId::owner_nets, to_bytes(a), owner, true); !s) return fail(s, "write address prefix owner");
    remote_.nets.erase(to_bytes(a));
  }
  uint8_t one = 1;
  for (const auto& g : plan.gateways)
    if (auto s = put(c, MapId::gateways, to_bytes(g), to_bytes(one), true); !s) return fail(s, "write gateway");
  return {};
}

Status MapWriter::commit(VmChange& c) {
  // The staged tries and tables in force before the VM entry points at them.
  if (auto s = backend_->flush(); !s) {
    abort(c);
    return Status::error(s.err, "install per-VM maps: " + s.message);
  }
  // Rate limits, with the VM entry they apply to; written only when they
  // change, since a write also restarts the VM's buckets.
  const vmfence_limit& limit = c.next.plan.limit;
  if (!c.old || c.old->slot != c.next.slot || std::memcmp(&c.old->plan.limit, &limit, sizeof(limit)) != 0) {
    if (auto s = backend_->update(MapId::limits, to_bytes(c.next.slot), to_bytes(limit)); !s) {
      abort(c);
      return Status::error(s.err, "write rate limits");
    }
  }
  uint32_t ifindex = c.next.ifindex;
  if (ifindex) {
    vmfence_vm vm = c.next.plan.vm;
    vm.slot = c.next.slot;
    vm.policy_id = c.next.policy_id;
    if (auto s = put(c, MapId::vms, to_bytes(ifindex), to_bytes(vm), true); !s) {
      abort(c);
      return Status::error(s.err, "write VM entry");
    }
  }
  c.committed = true;
  vms_[c.next.plan.name] = c.next;
  return {};
}

void MapWriter::release(VmChange& c) {
  uint32_t ifindex = c.next.ifindex;
  uint32_t vm_id = c.next.plan.vm.vm_id;
  if (c.resize_tables) {
    Status s = backend_->ensure_tables(c.next.slot, c.next.plan.flow_limit);
    if (s) s = backend_->flush();
    if (!s) c.warnings.push_back("flow table keeps its old size: " + s.message);
  }
  // Before the predecessor's slot is freed: its instance state is this VM's.
  bool inherited = false;
  if (c.predecessor) {
    Bytes st;
    if (backend_->lookup(MapId::state, to_bytes(*c.predecessor), st))
      inherited = static_cast<bool>(backend_->update(MapId::state, to_bytes(c.next.slot), st));
  }
  // The interface this VM now has: a blocked entry there is replaced.
  if (auto b = blocked_.find(ifindex); ifindex && b != blocked_.end()) {
    if (b->second != c.next.slot) free_slot(b->second);
    blocked_.erase(b);
    blocked_vm_.erase(ifindex);
  }
  // A new interface instance (re-created TAP, or first sight after a restart
  // of a TAP the previous run did not know): clear quarantine and windows.
  std::optional<uint32_t> before = c.old ? std::optional(c.old->ifindex) : adopted_ifindex(vm_id);
  if (c.same_instance) before = ifindex;
  if (ifindex && (!before || *before != ifindex) && !inherited) reset_instance(c.next.slot);
  adopted_.erase(vm_id);
  if (c.old && c.old->plan.name != c.next.plan.name) backend_->unname_policy(c.old->plan.name);
  if (!c.old || c.old->policy_id != c.next.policy_id)
    if (auto s = backend_->name_policy(policy_index(c.next), c.next.plan.name); !s)
      c.warnings.push_back("policy tries not pinned: " + s.message);
  if (!c.old) return;
  const InstalledVm& old = *c.old;
  // Its old interface, unless another VM took it in the same reload.
  if (old.ifindex && old.ifindex != ifindex) {
    Bytes cur;
    if (backend_->lookup(MapId::vms, to_bytes(old.ifindex), cur) && from_bytes<vmfence_vm>(cur).vm_id == vm_id &&
        from_bytes<vmfence_vm>(cur).slot == old.slot)
      erase_counted(MapId::vms, to_bytes(old.ifindex));
  }
  if (old.policy_id == c.next.policy_id) return;  // a rebind: same generation
  drop_generation(old);
  // Give up addresses only while they are still ours.
  Bytes mine = to_bytes(owner_of(old.plan));
  auto give_up = [&](MapId m, const Bytes& key) {
    Bytes cur;
    if (backend_->lookup(m, key, cur) && cur == mine) erase_counted(m, key);
  };
  for (const auto& a : old.plan.host_addresses)
    if (!contains_bytes(c.next.plan.host_addresses, a)) give_up(MapId::owners, to_bytes(a));
  for (const auto& a : old.plan.net_addresses)
    if (!contains_bytes(c.next.plan.net_addresses, a)) give_up(MapId::owner_nets, to_bytes(a));
  for (const auto& g : old.plan.gateways)
    if (!contains_bytes(c.next.plan.gateways, g)) erase_counted(MapId::gateways, to_bytes(g));
}

void MapWriter::abort(VmChange& c) {
  for (auto u = c.undo.rbegin(); u != c.undo.rend(); ++u) {
    if (u->previous) {
      (void)backend_->update(u->map, u->key, *u->previous);
    } else {
      (void)backend_->erase(u->map, u->key);
      if (counts_[u->map] > 0) --counts_[u->map];
    }
  }
  c.undo.clear();
  // The staged generation's tries (empty now); never the live one: the
  // other parity, or another slot.
  if (c.next.policy_id) backend_->drop_policy(policy_index(c.next));
  if (c.committed) {
    if (c.old)
      vms_[c.old->plan.name] = *c.old;
    else
      vms_.erase(c.next.plan.name);
    c.committed = false;
  }
  if (c.new_slot && c.next.slot) free_slot(c.next.slot);
  c.new_slot = false;
}

Status MapWriter::install(const VmPlan& plan, uint32_t ifindex) {
  VmChange c;
  if (auto s = stage(plan, ifindex, c); !s) return s;
  if (auto s = commit(c); !s) return s;
  release(c);
  return {};
}

Status MapWriter::bind(const std::string& name, uint32_t ifindex) {
  auto it = vms_.find(name);
  if (it == vms_.end()) return Status::error(ENOENT, "bind unknown VM " + name);
  // Only the vms entry changes: the generation and addresses stay.
  VmChange c;
  c.old = it->second;
  c.next = it->second;
  c.next.ifindex = ifindex;
  // Its flow tables, in force (commit flushes) before its entry.
  if (ifindex)
    if (auto s = backend_->ensure_tables(c.next.slot, c.next.plan.flow_limit); !s) return s;
  if (auto s = commit(c); !s) return s;
  release(c);
  return {};
}

Status MapWriter::unbind(const std::string& name) {
  auto it = vms_.find(name);
  if (it == vms_.end() || !it->second.ifindex) return {};
  erase_counted(MapId::vms, to_bytes(it->second.ifindex));
  it->second.ifindex = 0;
  return {};
}

Status MapWriter::remove(const std::string& name) {
  auto it = vms_.find(name);
  if (it == vms_.end()) return {};
  InstalledVm old = it->second;
  if (old.ifindex) {
    // The interface stays: drop everything on it (fail closed).
    vmfence_vm vm = old.plan.vm;
    vm.slot = old.slot;
    vm.policy_id = 0;
    vm.flags |= VMFENCE_VM_F_NO_POLICY;
    VmChange c;
    if (auto s = put(c, MapId::vms, to_bytes(old.ifindex), to_bytes(vm), true); !s) {
      // No entry at all drops everything too (unknown_ifindex): never leave
      // the old generation enforcing a removed VM.
      erase_counted(MapId::vms, to_bytes(old.ifindex));
      Bytes left;
      if (backend_->lookup(MapId::vms, to_bytes(old.ifindex), left))
        return Status::error(s.err, "block removed VM " + name);
    }
    blocked_[old.ifindex] = old.slot;
    blocked_vm_[old.ifindex] = old.plan.vm.vm_id;
  }
  drop_generation(old);
  backend_->unname_policy(name);
  Bytes mine = to_bytes(owner_of(old.plan));
  auto give_up = [&](MapId m, const Bytes& key) {
    Bytes cur;
    if (backend_->lookup(m, key, cur) && cur == mine) erase_counted(m, key);
  };
  for (const auto& a : old.plan.host_addresses) give_up(MapId::owners, to_bytes(a));
  for (const auto& a : old.plan.net_addresses) give_up(MapId::owner_nets, to_bytes(a));
  for (const auto& g : old.plan.gateways) erase_counted(MapId::gateways, to_bytes(g));
  if (!old.ifindex) free_slot(old.slot);
  vms_.erase(it);
  return {};
}

Status MapWriter::block(uint32_t ifindex, uint32_t vm_id) {
  if (!ifindex) return {};
  for (const auto& [name, vm] : vms_)
    if (vm.ifindex == ifindex) return Status::error(EBUSY, "interface is enforced for vm " + name);
  vmfence_vm vm{};
  vm.vm_id = vm_id;
  vm.group_id = vm_id;
  vm.flags = VMFENCE_VM_F_NO_POLICY;
  auto b = blocked_.find(ifindex);
  vm.slot = b != blocked_.end() ? b->second : 0;
  // A previous run's VM on this interface: its slot (counters, quarantine)
  // stays with the interface.
  for (auto a = adopted_.begin(); !vm.slot && a != adopted_.end(); ++a)
    if (a->second.ifindex == ifindex) {
      vm.slot = a->second.slot;
      blocked_vm_[ifindex] = a->first;
      adopted_.erase(a);
      break;
    }
  VmChange c;
  if (auto s = put(c, MapId::vms, to_bytes(ifindex), to_bytes(vm), true); !s)
    return Status::error(s.err, "block interface " + std::to_string(ifindex));
  blocked_[ifindex] = vm.slot;
  return {};
}

void MapWriter::forget_blocked(uint32_t ifindex) {
  auto b = blocked_.find(ifindex);
  if (b == blocked_.end()) return;
  erase_counted(MapId::vms, to_bytes(ifindex));
  free_slot(b->second);
  blocked_.erase(b);
  blocked_vm_.erase(ifindex);
}

Status MapWriter::collect_garbage() {
  std::set<uint32_t> live_policies, live_ifindexes;
  std::set<std::string> live_names;
  for (const auto& [ifindex, slot] : blocked_) live_ifindexes.insert(ifindex);
  std::set<Bytes> live_hosts, live_nets, live_gws;
  for (const auto& [name, vm] : vms_) {
    live_policies.insert(policy_index(vm));
    live_names.insert(name);
    if (vm.ifindex) live_ifindexes.insert(vm.ifindex);
    for (const auto& a : vm.plan.host_addresses) live_hosts.insert(to_bytes(a));
    for (const auto& a : vm.plan.net_addresses) live_nets.insert(to_bytes(a));
    for (const auto& g : vm.plan.gateways) live_gws.insert(to_bytes(g));
  }
  for (const auto& [k, o] : remote_.hosts) live_hosts.insert(k);
  for (const auto& [k, o] : remote_.nets) live_nets.insert(k);
  backend_->prune_policies(live_policies, live_names);
  auto prune = [&](MapId m, const std::set<Bytes>& live) {
    for (const Bytes& k : backend_->keys(m))
      if (!live.count(k)) (void)backend_->erase(m, k);
  };
  prune(MapId::owners, live_hosts);
  prune(MapId::owner_nets, live_nets);
  prune(MapId::gateways, live_gws);
  for (const Bytes& k : backend_->keys(MapId::vms))
    if (!live_ifindexes.count(from_bytes<uint32_t>(k))) (void)backend_->erase(MapId::vms, k);
  std::set<uint32_t> live_slots;
  for (const auto& [name, vm] : vms_) live_slots.insert(vm.slot);
  for (const auto& [ifindex, slot] : blocked_) live_slots.insert(slot);
  for (uint32_t slot = 1; slot < VMFENCE_MAX_VMS; ++slot)
    if (!live_slots.count(slot)) backend_->drop_tables(slot);
  // Slots of a previous run that no VM claimed are free again.
  for (auto it = adopted_.begin(); it != adopted_.end();) {
    if (!live_slots.count(it->second.slot)) used_slots_.erase(it->second.slot);
    it = adopted_.erase(it);
  }
  (void)backend_->flush();  // the freed tries
  recount();
  return {};
}

Status MapWriter::write_config(const vmfence_config& cfg) { return backend_->write_config(cfg); }

size_t MapWriter::sweep_flows(const vmfence_config& cfg, std::map<uint32_t, MapBackend::TableUse>* left) {
  std::set<uint32_t> slots;
  for (const auto& [name, vm] : vms_) slots.insert(vm.slot);
  for (const auto& [ifindex, slot] : blocked_)
    if (slot) slots.insert(slot);
  return backend_->sweep_flows(std::vector<uint32_t>(slots.begin(), slots.end()), cfg, left);
}

}  // namespace vmfence
