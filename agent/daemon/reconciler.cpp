#include "agent/daemon/reconciler.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <string_view>

namespace vmfence {

namespace {

template <typename T>
bool same_bytes(const std::vector<T>& x, const std::vector<T>& y) {
  return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(T)) == 0);
}

bool same_plan(const VmPlan& a, const VmPlan& b) {
  return a.interface == b.interface && std::memcmp(&a.vm, &b.vm, sizeof(a.vm)) == 0 && same_bytes(a.egress, b.egress) &&
         same_bytes(a.ingress, b.ingress) && same_bytes(a.gateways, b.gateways) &&
         same_bytes(a.host_addresses, b.host_addresses) && same_bytes(a.net_addresses, b.net_addresses) &&
         a.flow_limit == b.flow_limit && std::memcmp(&a.limit, &b.limit, sizeof(a.limit)) == 0;
}

bool addresses_overlap(const VmSpec& a, const VmSpec& b) {
  for (const auto& x : a.addresses)
    for (const auto& y : b.addresses)
      if (x.family == y.family && x.overlaps(y)) return true;
  return false;
}

// One VM of the new set and what became of its change.
struct Item {
  const VmSpec* vm;
  VmPlan plan;
  uint32_t ifindex = 0;
  VmChange change;
  bool staged = false, committed = false, failed = false;
  std::string why;
  bool* installed_flag = nullptr;
};

// A VM whose change failed keeps what it had: its old addresses and its old
// interface. A change that claims one of them must not go in either: undone
// (latest first), which may keep another VM at its old state, and so on.
void cascade(MapWriter& writer, std::vector<Item>& items, const std::map<std::string, const VmSpec*>& incumbent) {
  for (bool again = true; again;) {
    again = false;
    for (const auto& f : items) {
      auto old = incumbent.find(f.vm->name);
      if (!f.failed || old == incumbent.end()) continue;
      for (auto it = items.rbegin(); it != items.rend(); ++it) {
        if (!(it->staged || it->committed) || it->vm->name == f.vm->name) continue;
        bool address = addresses_overlap(*it->vm, *old->second);
        bool interface = it->vm->interface == old->second->interface;
        if (!address && !interface) continue;
        writer.abort(it->change);
        it->staged = it->committed = false;
        it->failed = true;
        it->why = std::string(address ? "an address" : "its interface") + " is still held by " + f.vm->name +
                  ", whose change failed";
        again = true;
      }
    }
  }
}

}  // namespace

Reconciler::Compiled& Reconciler::compiled(const VmSpec& vm, const HostSpec& host, const std::vector<Cidr>& nets,
                                           VmPlan* plan, bool* fresh) {
  if (host != compiled_host_ || nets != compiled_nets_) {
    compiled_.clear();
    compiled_host_ = host;
    compiled_nets_ = nets;
  }
  *fresh = false;
  auto it = compiled_.find(vm.name);
  if (it != compiled_.end() && it->second.spec == vm) return it->second;
  *fresh = true;
  Compiled c{vm, {}, false};
  *plan = compile_vm(vm, host, nets, c.errors);
  return compiled_[vm.name] = std::move(c);
}

bool Reconciler::update_in_place(const VmSpec& next, const VmSpec& current, const HostSpec& host, bool* changed) {
  *changed = false;
  // Admission checked every file against the address space of all files
  // (refused ones included): only where that is the space in force does
  // compiling against it alone give admission's verdict.
  if (!reconciled_ || host != host_in_force_ || admission_nets_ != nets_in_force_) return false;
  if (next.name != current.name || next.interface != current.interface || next.mac != current.mac ||
      next.addresses != current.addresses || next.gateway != current.gateway || next.group != current.group)
    return false;
  auto inst = writer_.installed().find(next.name);
  if (inst == writer_.installed().end()) return false;
  uint32_t ifindex = ifindex_of_(next.interface);
  if (inst->second.ifindex != ifindex) return false;

  VmPlan plan;
  bool fresh;
  Compiled& c = compiled(next, host, nets_in_force_, &plan, &fresh);
  if (!c.errors.empty()) return false;
  if (c.installed) return true;
  if (!fresh) {
    std::vector<SpecError> errs;  // none: the same compile had none
    plan = compile_vm(next, host, nets_in_force_, errs);
  }
  if (same_plan(inst->second.plan, plan)) {
    c.installed = true;
    return true;
  }
  VmChange change;
  if (!writer_.stage(plan, ifindex, change)) return false;  // stage() undid it
  if (!writer_.commit(change)) return false;                // commit() undid it
  c.installed = true;
  writer_.release(change);
  for (const auto& w : change.warnings) spdlog::warn("vm {}: {}", next.name, w);
  *changed = true;
  return true;
}

ReconcileResult Reconciler::reconcile(const SpecFiles& files, const std::vector<VmSpec>& incumbents,
                                      const std::set<std::string>& enforced, const std::vector<VmSpec>& reserved) {
  ReconcileResult r;
  if (!files.host_errors.empty()) {
    r.host_ok = false;
    r.in_force = incumbents;
    return r;
  }
  const HostSpec& host = files.host;
  std::map<std::string, const VmSpec*> incumbent;
  for (const auto& vm : incumbents) incumbent[vm.name] = &vm;

  // The compiler's limits are part of admission: a VM it cannot express is
  // refused like a conflict (an enforced VM keeps its last good policy).
  std::vector<const VmSpec*> everyone;
  for (const auto& vm : incumbents) everyone.push_back(&vm);
  for (const auto& f : files.vms)
    if (f.vm) everyone.push_back(&*f.vm);
  const std::vector<Cidr> all_nets = vm_address_space(everyone);
  auto compiles = [&](const VmSpec& vm) {
    VmPlan unused;
    bool fresh;
    return compiled(vm, host, all_nets, &unused, &fresh).errors;
  };
  Admission a = admit(files, incumbents, enforced, compiles, reserved);
  r.rejected = std::move(a.rejected);
  std::vector<VmSpec> in_force = std::move(a.in_force);

  // Flags the new VMs need go in before their entries; flags only the old
  // VMs needed go after they are gone (below).
  const std::vector<Cidr> nets = vm_address_space(in_force);
  vmfence_config before = config_for(host, in_force);
  before.flags |= datapath_config(host, incumbents).flags;
  if (auto s = writer_.write_config(before); !s)
    spdlog::error("datapath config: {}", s.message);
  else
    config_written_ = before;

  std::vector<Item> items;
  for (const auto& vm : in_force) {
    Item it{&vm, {}, ifindex_of_(vm.interface), {}, false, false, false, {}};
    VmPlan plan;
    bool fresh;
    Compiled& c = compiled(vm, host, nets, &plan, &fresh);
    if (!c.errors.empty()) {
      it.failed = true;
      it.why = c.errors.front().message;
    } else {
      auto inst = writer_.installed().find(vm.name);
      bool same_interface = inst != writer_.installed().end() && inst->second.ifindex == it.ifindex;
      if (same_interface && c.installed) continue;  // unchanged
      if (!fresh) {
        std::vector<SpecError> errs;  // none: the same compile had none
        plan = compile_vm(vm, host, nets, errs);
      }
      c.installed = same_interface && same_plan(inst->second.plan, plan);
      if (c.installed) continue;  // unchanged
      it.plan = std::move(plan);
      it.installed_flag = &c.installed;
    }
    items.push_back(std::move(it));
  }

  // 1. Stage every change.
  for (auto& it : items) {
    if (it.failed) continue;
    if (auto s = writer_.stage(it.plan, it.ifindex, it.change); !s) {
      it.failed = true;
      it.why = s.message;
    } else {
      it.staged = true;
    }
  }
  cascade(writer_, items, incumbent);
  // 2. VMs no longer in force: their interfaces drop everything; addresses
  // are freed unless a staged VM took them over.
  std::set<std::string> keep;
  for (const auto& vm : in_force) keep.insert(vm.name);
  std::vector<std::string> gone;
  for (const auto& [name, inst] : writer_.installed())
    if (!keep.count(name)) gone.push_back(name);
  for (const auto& name : gone) {
    if (auto s = writer_.remove(name); !s) spdlog::error("vm {}: remove: {}", name, s.message);
    r.removed.push_back(name);
  }
  // 3. The switches.
  for (auto& it : items) {
    if (!it.staged) continue;
    if (auto s = writer_.commit(it.change); !s) {  // commit() undid this change
      it.staged = false;
      it.failed = true;
      it.why = s.message;
      continue;
    }
    it.committed = true;
  }
  cascade(writer_, items, incumbent);
  // 4. Old generations and given-up addresses.
  for (auto& it : items)
    if (it.committed) {
      if (it.installed_flag) *it.installed_flag = true;
      writer_.release(it.change);
      for (const auto& w : it.change.warnings) spdlog::warn("vm {}: {}", it.vm->name, w);
      r.changed.push_back(it.vm->name);
    }

  // Failures: an enforced VM keeps what it had; a newcomer is refused.
  std::set<std::string> failed;
  for (const auto& it : items) {
    if (!it.failed) continue;
    failed.insert(it.vm->name);
    RejectedFile rf;
    rf.file = it.vm->file;
    rf.name = it.vm->name;
    rf.interface = it.vm->interface;
    rf.errors.push_back({it.vm->file, "", "cannot be installed: " + it.why});
    rf.install_failed = true;
    rf.kept_last_good = incumbent.count(it.vm->name) && writer_.installed().count(it.vm->name);
    r.rejected.push_back(std::move(rf));
  }
  for (auto& vm : in_force) {
    if (!failed.count(vm.name)) {
      r.in_force.push_back(std::move(vm));  // `in_force` is not used below
      continue;
    }
    auto old = incumbent.find(vm.name);
    if (old != incumbent.end() && writer_.installed().count(vm.name)) r.in_force.push_back(*old->second);
  }
  std::sort(r.rejected.begin(), r.rejected.end(),
            [](const RejectedFile& x, const RejectedFile& y) { return x.file < y.file; });

  // 5. Interfaces no valid spec may use drop everything.
  std::set<std::string> used;
  for (const auto& vm : r.in_force) used.insert(vm.interface);
  for (const auto& rf : r.rejected) {
    if (rf.interface.empty() || used.count(rf.interface)) continue;
    uint32_t ifindex = ifindex_of_(rf.interface);
    if (!ifindex) continue;  // blocked when it appears
    // Named after the file when its name is an enforced VM's (events and
    // status must not show another VM's name on this interface).
    bool taken = std::any_of(r.in_force.begin(), r.in_force.end(), [&](const VmSpec& v) { return v.name == rf.name; });
    if (auto s = writer_.block(ifindex, name_id(rf.name.empty() || taken ? rf.file : rf.name)); !s)
      spdlog::error("{}: no_policy on {}: {}", rf.file, rf.interface, s.message);
    else
      r.blocked.push_back(ifindex);
  }

  // Forget VMs that are gone (a name that comes back is compiled again).
  std::set<std::string_view> live;
  for (const auto& vm : r.in_force) live.insert(vm.name);
  std::erase_if(compiled_, [&](const auto& kv) { return !live.count(kv.first); });

  reconciled_ = true;
  host_in_force_ = host;
  nets_in_force_ = vm_address_space(r.in_force);
  admission_nets_ = all_nets;

  vmfence_config after = config_for(host, r.in_force);
  if (std::memcmp(&after, &before, sizeof after) != 0) {
    if (auto s = writer_.write_config(after); !s)
      spdlog::error("datapath config: {}", s.message);
    else
      config_written_ = after;
  }
  return r;
}

void Reconciler::add_fleet_part(const HostSpec& host, vmfence_config& cfg) const {
  cfg.fleet_ifaces = 0;
  std::memset(cfg.fleet_ifindex, 0, sizeof cfg.fleet_ifindex);
  if (host.fleet)
    for (const auto& name : host.fleet->interfaces)
      if (uint32_t i = ifindex_of_(name); i && cfg.fleet_ifaces < VMFENCE_MAX_FLEET_IFACES)
        cfg.fleet_ifindex[cfg.fleet_ifaces++] = i;
  if (remote_nets_) cfg.flags |= VMFENCE_CFG_F_OWNER_NETS;
}

vmfence_config Reconciler::config_for(const HostSpec& host, const std::vector<VmSpec>& vms) const {
  vmfence_config cfg = datapath_config(host, vms);
  add_fleet_part(host, cfg);
  return cfg;
}

Status Reconciler::refresh_fleet_config(bool remote_nets) {
  remote_nets_ = remote_nets;
  if (!reconciled_ || !config_written_) return {};
  vmfence_config cfg = *config_written_;  // the VMs' part as the last reconcile wrote it
  add_fleet_part(host_in_force_, cfg);
  if (std::memcmp(&cfg, &*config_written_, sizeof cfg) == 0) return {};
  if (auto s = writer_.write_config(cfg); !s) return s;
  config_written_ = cfg;
  return {};
}

}  // namespace vmfence
