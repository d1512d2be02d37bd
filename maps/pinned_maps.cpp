#include "maps/pinned_maps.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <linux/magic.h>
#include <netinet/in.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>

namespace vmfence {

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) reset(std::exchange(o.fd_, -1));
  return *this;
}
Fd::~Fd() { reset(); }
void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

std::string pin_dir() {
  const char* e = std::getenv("VMFENCE_PIN_DIR");
  return e && *e ? e : VMFENCE_PIN_DIR;
}

std::string run_dir() {
  const char* e = std::getenv("VMFENCE_RUN_DIR");
  return e && *e ? e : "/run/vmfence";
}

Status ensure_bpffs(const std::string& dir) {
  struct statfs st {};
  if (statfs("/sys/fs/bpf", &st) != 0 || st.f_type != BPF_FS_MAGIC) {
    ::mkdir("/sys/fs/bpf", 0700);
    if (mount("bpf", "/sys/fs/bpf", "bpf", 0, "mode=0700") != 0)
      return Status::error(errno, "mount bpffs at /sys/fs/bpf");
  }
  std::error_code ec;
  std::filesystem::create_directories(dir + "/links", ec);
  if (ec) return Status::error(ec.value(), "create " + dir);
  return {};
}

namespace {
struct Named {
  const char* name;
  Fd MapSet::*member;
};
constexpr Named kMaps[] = {
    {VMFENCE_MAP_VMS, &MapSet::vms},
    {VMFENCE_MAP_OWNERS, &MapSet::owners},
    {VMFENCE_MAP_OWNER_NETS, &MapSet::owner_nets},
    {VMFENCE_MAP_EGRESS, &MapSet::egress},
    {VMFENCE_MAP_INGRESS, &MapSet::ingress},
    {VMFENCE_MAP_GATEWAYS, &MapSet::gateways},
    {VMFENCE_MAP_FLOWS, &MapSet::flows},
    {VMFENCE_MAP_FRAGS, &MapSet::frags},
    {VMFENCE_MAP_COUNTERS, &MapSet::counters},
    {VMFENCE_MAP_STATE, &MapSet::state},
    {VMFENCE_MAP_CONFIG, &MapSet::config},
    {VMFENCE_MAP_EVENTS, &MapSet::events},
};
}  // namespace

Status MapSet::open_pinned(const std::string& dir, MapSet& out) {
  for (const auto& m : kMaps) {
    std::string path = dir + "/" + m.name;
    int fd = bpf_obj_get(path.c_str());
    if (fd < 0) return Status::error(errno, "open pinned map " + path);
    (out.*m.member).reset(fd);
  }
  return {};
}

void MapSet::for_each(const std::function<void(const char*, int)>& fn) const {
  for (const auto& m : kMaps) fn(m.name, (this->*m.member).get());
}

Status read_counters(const MapSet& maps, uint32_t slot, vmfence_counters& out) {
  int ncpu = libbpf_num_possible_cpus();
  if (ncpu <= 0) return Status::error(ncpu, "count CPUs");
  std::vector<vmfence_counters> per(static_cast<size_t>(ncpu));
  if (bpf_map_lookup_elem(maps.counters.get(), &slot, per.data()) != 0) return Status::error(errno, "read counters");
  out = {};
  for (const auto& c : per) {
    out.from_vm_packets += c.from_vm_packets;
    out.from_vm_bytes += c.from_vm_bytes;
    out.to_vm_packets += c.to_vm_packets;
    out.to_vm_bytes += c.to_vm_bytes;
    out.events_suppressed += c.events_suppressed;
    out.events_lost += c.events_lost;
    for (int r = 0; r < VMFENCE_REASON_SLOTS; ++r) out.drops[r] += c.drops[r];
  }
  return {};
}

Status read_state(const MapSet& maps, uint32_t slot, vmfence_state& out) {
  if (bpf_map_lookup_elem(maps.state.get(), &slot, &out) != 0) return Status::error(errno, "read state");
  return {};
}

std::vector<std::pair<uint32_t, vmfence_vm>> read_vms(const MapSet& maps) {
  std::vector<std::pair<uint32_t, vmfence_vm>> out;
  uint32_t key = 0, next = 0;
  uint32_t* prev = nullptr;
  while (bpf_map_get_next_key(maps.vms.get(), prev, &next) == 0) {
    vmfence_vm vm{};
    if (bpf_map_lookup_elem(maps.vms.get(), &next, &vm) == 0) out.emplace_back(next, vm);
    key = next;
    prev = &key;
  }
  return out;
}

size_t count_entries(int fd, size_t key_size) {
  std::vector<uint8_t> key(key_size), next(key_size);
  size_t n = 0;
  void* prev = nullptr;
  while (bpf_map_get_next_key(fd, prev, next.data()) == 0) {
    ++n;
    key = next;
    prev = key.data();
  }
  return n;
}

TableFill flow_table_fill(const MapSet& maps, uint32_t slot) {
  TableFill f;
  Fd t = inner_map(maps.flows.get(), slot);
  if (!t.valid()) return f;
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(t.get(), &info, &len) == 0) f.max_entries = info.max_entries;
  f.entries = count_entries(t.get(), sizeof(vmfence_flow_key));
  return f;
}

// Keys of a map, for garbage collection.
template <typename K>
static std::vector<K> keys_of(int fd) {
  std::vector<K> out;
  K key{}, next{};
  K* prev = nullptr;
  while (bpf_map_get_next_key(fd, prev, &next) == 0) {
    out.push_back(next);
    key = next;
    prev = &key;
  }
  return out;
}

Fd inner_map(int outer_fd, uint32_t slot) {
  uint32_t id = 0;
  if (bpf_map_lookup_elem(outer_fd, &slot, &id) != 0) return Fd();
  int fd = bpf_map_get_fd_by_id(id);
  return Fd(fd);
}

size_t count_flows(const MapSet& maps) {
  size_t n = 0;
  for (uint32_t slot = 0; slot < VMFENCE_MAX_VMS; ++slot) {
    Fd t = inner_map(maps.flows.get(), slot);
    if (t.valid()) n += count_entries(t.get(), sizeof(vmfence_flow_key));
  }
  return n;
}

Status MapWriter::adopt() {
  used_slots_.insert(0);  // slot 0: packets on interfaces without a VM
  for (const auto& [ifindex, vm] : read_vms(maps_)) {
    adopted_slots_[vm.vm_id] = vm.slot;
    used_slots_.insert(vm.slot);
    next_policy_id_ = std::max(next_policy_id_, vm.policy_id + 1);
  }
  for (int fd : {maps_.egress.get(), maps_.ingress.get()})
    for (const auto& k : keys_of<vmfence_policy_key>(fd)) next_policy_id_ = std::max(next_policy_id_, k.policy_id + 1);
  return {};
}

uint32_t MapWriter::alloc_slot(uint32_t vm_id) {
  auto it = adopted_slots_.find(vm_id);
  if (it != adopted_slots_.end()) return it->second;
  // Lowest free slot at or after the hint: linear overall, not per VM.
  for (uint32_t tries = 0; tries < VMFENCE_MAX_VMS; ++tries) {
    uint32_t s = next_free_slot_;
    next_free_slot_ = next_free_slot_ + 1 >= VMFENCE_MAX_VMS ? 1 : next_free_slot_ + 1;
    if (!used_slots_.count(s)) {
      used_slots_.insert(s);
      zero_slot(s);
      return s;
    }
  }
  return 0;
}

void MapWriter::free_slot(uint32_t slot) {
  used_slots_.erase(slot);
  // The next VM in this slot starts with empty tables.
  bpf_map_delete_elem(maps_.flows.get(), &slot);
  bpf_map_delete_elem(maps_.frags.get(), &slot);
}

static uint32_t max_entries_of(int fd) {
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  return bpf_obj_get_info_by_fd(fd, &info, &len) == 0 ? info.max_entries : 0;
}

Status MapWriter::ensure_tables(uint32_t slot, uint32_t flow_limit) {
  Fd flows = inner_map(maps_.flows.get(), slot);
  if (!flows.valid() || max_entries_of(flows.get()) != flow_limit) {
    // No preallocation: a VM pays for the flows it has, not its limit.
    LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = BPF_F_NO_PREALLOC);
    Fd table(bpf_map_create(BPF_MAP_TYPE_HASH, "vmfence_vm_flow", sizeof(vmfence_flow_key), sizeof(vmfence_flow),
                            flow_limit, &opts));
    if (!table.valid()) return Status::error(errno, "create the VM's flow table");
    if (flows.valid()) {
      // A changed limit: carry the live flows over (as many as fit).
      for (const auto& k : keys_of<vmfence_flow_key>(flows.get())) {
        vmfence_flow f{};
        if (bpf_map_lookup_elem(flows.get(), &k, &f) == 0 &&
            bpf_map_update_elem(table.get(), &k, &f, BPF_NOEXIST) != 0 && errno == E2BIG)
          break;
      }
    }
    int fd = table.get();
    if (bpf_map_update_elem(maps_.flows.get(), &slot, &fd, BPF_ANY) != 0)
      return Status::error(errno, "install the VM's flow table");
  }
  if (!inner_map(maps_.frags.get(), slot).valid()) {
    Fd table(bpf_map_create(BPF_MAP_TYPE_LRU_HASH, "vmfence_vm_frag", sizeof(vmfence_frag_key), sizeof(uint32_t),
                            VMFENCE_FRAGS_PER_VM, nullptr));
    if (!table.valid()) return Status::error(errno, "create the VM's fragment table");
    int fd = table.get();
    if (bpf_map_update_elem(maps_.frags.get(), &slot, &fd, BPF_ANY) != 0)
      return Status::error(errno, "install the VM's fragment table");
  }
  return {};
}

// Every entry of a VM's flow table, read in batches (a sweep of a full table
// costs a few syscalls, not two per flow); entry by entry where the kernel
// has no batch operation for the map.
static std::vector<std::pair<vmfence_flow_key, vmfence_flow>> flows_of(int fd) {
  std::vector<std::pair<vmfence_flow_key, vmfence_flow>> out;
  constexpr uint32_t kBatch = 1024;
  std::vector<vmfence_flow_key> keys(kBatch);
  std::vector<vmfence_flow> values(kBatch);
  vmfence_flow_key token{};  // opaque position (at least a key's size)
  void* in = nullptr;
  for (;;) {
    uint32_t n = kBatch;
    int err = bpf_map_lookup_batch(fd, in, &token, keys.data(), values.data(), &n, nullptr);
    int e = errno;
    if (err != 0 && e != ENOENT) break;  // no batch support: one by one
    for (uint32_t i = 0; i < n; ++i) out.emplace_back(keys[i], values[i]);
    if (err != 0) return out;  // ENOENT: that was the last batch
    in = &token;
  }
  out.clear();
  for (const auto& k : keys_of<vmfence_flow_key>(fd)) {
    vmfence_flow f{};
    if (bpf_map_lookup_elem(fd, &k, &f) == 0) out.emplace_back(k, f);
  }
  return out;
}

size_t MapWriter::sweep_flows(const vmfence_config& cfg) {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);  // bpf_ktime_get_ns's clock
  uint64_t now = static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
  size_t swept = 0;
  std::set<uint32_t> slots;
  for (const auto& [name, vm] : vms_) slots.insert(vm.slot);
  for (const auto& [ifindex, slot] : orphaned_) slots.insert(slot);
  for (uint32_t slot : slots) {
    Fd table = inner_map(maps_.flows.get(), slot);
    if (!table.valid()) continue;
    for (const auto& [k, f] : flows_of(table.get())) {
      uint64_t timeout =
          uint64_t{vmfence_flow_timeout_s(k.proto, f.flags, cfg.tcp_timeout_s, cfg.udp_timeout_s, cfg.icmp_timeout_s)} *
          1000000000ull;
      if (now > f.last_seen_ns && now - f.last_seen_ns > timeout && bpf_map_delete_elem(table.get(), &k) == 0) ++swept;
    }
  }
  return swept;
}

Status MapWriter::zero_slot(uint32_t slot) {
  bpf_map_delete_elem(maps_.flows.get(), &slot);
  bpf_map_delete_elem(maps_.frags.get(), &slot);
  vmfence_state st{};
  if (bpf_map_update_elem(maps_.state.get(), &slot, &st, BPF_ANY) != 0) return Status::error(errno, "reset state");
  int ncpu = libbpf_num_possible_cpus();
  std::vector<vmfence_counters> zero(static_cast<size_t>(ncpu > 0 ? ncpu : 1));
  if (bpf_map_update_elem(maps_.counters.get(), &slot, zero.data(), BPF_ANY) != 0)
    return Status::error(errno, "reset counters");
  return {};
}

// A new interface for a VM is a new VM instance (the manager restarted it
// after a termination): it starts out of quarantine.
void MapWriter::clear_quarantine(uint32_t slot) {
  vmfence_state st{};
  if (bpf_map_lookup_elem(maps_.state.get(), &slot, &st) == 0 && st.quarantined) {
    st.quarantined = 0;
    st.violations = 0;
    bpf_map_update_elem(maps_.state.get(), &slot, &st, BPF_ANY);
  }
}

Status MapWriter::write_policy(int fd, const std::vector<PolicyEntry>& entries, uint32_t policy_id) {
  for (size_t i = 0; i < entries.size(); ++i) {
    vmfence_policy_key k = entries[i].key;
    k.policy_id = policy_id;
    if (bpf_map_update_elem(fd, &k, &entries[i].value, BPF_ANY) != 0) {
      int e = errno;
      delete_policy(fd, std::vector<PolicyEntry>(entries.begin(), entries.begin() + i), policy_id);
      return Status::error(e, e == E2BIG || e == ENOSPC ? "policy map full" : "write policy entry");
    }
  }
  return {};
}

void MapWriter::delete_policy(int fd, const std::vector<PolicyEntry>& entries, uint32_t policy_id) {
  for (const auto& e : entries) {
    vmfence_policy_key k = e.key;
    k.policy_id = policy_id;
    bpf_map_delete_elem(fd, &k);
  }
}

Status MapWriter::install(const VmPlan& plan, uint32_t ifindex) {
  auto it = vms_.find(plan.name);
  InstalledVm next;
  next.plan = plan;
  next.ifindex = ifindex;
  next.slot = it != vms_.end() ? it->second.slot : alloc_slot(plan.vm.vm_id);
  if (next.slot == 0) return Status::error(ENOSPC, "no free VM slot (max " + std::to_string(VMFENCE_MAX_VMS) + ")");
  if (auto s = ensure_tables(next.slot, plan.flow_limit); !s) {
    if (it == vms_.end()) free_slot(next.slot);
    return s;
  }
  next.policy_id = next_policy_id_++;

  // 1. The new generation, invisible until the VM entry points at it.
  if (auto s = write_policy(maps_.egress.get(), plan.egress, next.policy_id); !s) return s;
  if (auto s = write_policy(maps_.ingress.get(), plan.ingress, next.policy_id); !s) {
    delete_policy(maps_.egress.get(), plan.egress, next.policy_id);
    return s;
  }
  // 2. Addresses and gateways of the new plan.
  vmfence_owner owner{plan.vm.vm_id, plan.vm.group_id};
  uint8_t one = 1;
  for (const auto& a : plan.host_addresses)
    if (bpf_map_update_elem(maps_.owners.get(), &a, &owner, BPF_ANY) != 0)
      return Status::error(errno, "write address owner");
  for (const auto& a : plan.net_addresses)
    if (bpf_map_update_elem(maps_.owner_nets.get(), &a, &owner, BPF_ANY) != 0)
      return Status::error(errno, "write address prefix owner");
  for (const auto& g : plan.gateways)
    if (bpf_map_update_elem(maps_.gateways.get(), &g, &one, BPF_ANY) != 0) return Status::error(errno, "write gateway");
  // 3. The switch: one update of the VM entry.
  vmfence_vm vm = plan.vm;
  vm.slot = next.slot;
  vm.policy_id = next.policy_id;
  if (ifindex) {
    if (bpf_map_update_elem(maps_.vms.get(), &ifindex, &vm, BPF_ANY) != 0)
      return Status::error(errno, "write VM entry");
    if (auto o = orphaned_.find(ifindex); o != orphaned_.end()) {
      if (o->second != next.slot) free_slot(o->second);
      orphaned_.erase(o);
    }
  }
  // 4. Free what only the old generation used.
  if (it != vms_.end()) {
    const InstalledVm& old = it->second;
    if (old.ifindex && old.ifindex != ifindex) bpf_map_delete_elem(maps_.vms.get(), &old.ifindex);
    if (ifindex && old.ifindex != ifindex) clear_quarantine(next.slot);
    delete_policy(maps_.egress.get(), old.plan.egress, old.policy_id);
    delete_policy(maps_.ingress.get(), old.plan.ingress, old.policy_id);
    auto gone = [](const auto& list, const auto& x) {
      return std::none_of(list.begin(), list.end(), [&](const auto& y) { return std::memcmp(&x, &y, sizeof(x)) == 0; });
    };
    for (const auto& a : old.plan.host_addresses)
      if (gone(plan.host_addresses, a)) bpf_map_delete_elem(maps_.owners.get(), &a);
    for (const auto& a : old.plan.net_addresses)
      if (gone(plan.net_addresses, a)) bpf_map_delete_elem(maps_.owner_nets.get(), &a);
    for (const auto& g : old.plan.gateways)
      if (gone(plan.gateways, g)) bpf_map_delete_elem(maps_.gateways.get(), &g);
  }
  vms_[plan.name] = std::move(next);
  return {};
}

Status MapWriter::bind(const std::string& name, uint32_t ifindex) {
  auto it = vms_.find(name);
  if (it == vms_.end()) return Status::error(ENOENT, "bind unknown VM " + name);
  vmfence_vm vm = it->second.plan.vm;
  vm.slot = it->second.slot;
  vm.policy_id = it->second.policy_id;
  if (bpf_map_update_elem(maps_.vms.get(), &ifindex, &vm, BPF_ANY) != 0)
    return Status::error(errno, "write VM entry for " + name);
  if (it->second.ifindex && it->second.ifindex != ifindex) bpf_map_delete_elem(maps_.vms.get(), &it->second.ifindex);
  if (it->second.ifindex != ifindex) clear_quarantine(it->second.slot);
  it->second.ifindex = ifindex;
  if (auto o = orphaned_.find(ifindex); o != orphaned_.end()) {
    if (o->second != it->second.slot) free_slot(o->second);
    orphaned_.erase(o);
  }
  return {};
}

Status MapWriter::unbind(const std::string& name) {
  auto it = vms_.find(name);
  if (it == vms_.end() || !it->second.ifindex) return {};
  bpf_map_delete_elem(maps_.vms.get(), &it->second.ifindex);
  it->second.ifindex = 0;
  return {};
}

Status MapWriter::remove(const std::string& name) {
  auto it = vms_.find(name);
  if (it == vms_.end()) return {};
  const InstalledVm& old = it->second;
  if (old.ifindex) {
    // The interface stays: drop everything on it (fail closed).
    vmfence_vm vm = old.plan.vm;
    vm.slot = old.slot;
    vm.policy_id = 0;
    vm.flags |= VMFENCE_VM_F_NO_POLICY;
    if (bpf_map_update_elem(maps_.vms.get(), &old.ifindex, &vm, BPF_ANY) != 0)
      return Status::error(errno, "block removed VM " + name);
    orphaned_[old.ifindex] = old.slot;
  }
  delete_policy(maps_.egress.get(), old.plan.egress, old.policy_id);
  delete_policy(maps_.ingress.get(), old.plan.ingress, old.policy_id);
  for (const auto& a : old.plan.host_addresses) bpf_map_delete_elem(maps_.owners.get(), &a);
  for (const auto& a : old.plan.net_addresses) bpf_map_delete_elem(maps_.owner_nets.get(), &a);
  for (const auto& g : old.plan.gateways) bpf_map_delete_elem(maps_.gateways.get(), &g);
  if (!old.ifindex) free_slot(old.slot);
  vms_.erase(it);
  return {};
}

void MapWriter::forget_orphan(uint32_t ifindex) {
  auto o = orphaned_.find(ifindex);
  if (o == orphaned_.end()) return;
  bpf_map_delete_elem(maps_.vms.get(), &ifindex);
  free_slot(o->second);
  orphaned_.erase(o);
}

Status MapWriter::collect_garbage() {
  std::set<uint32_t> live_policies, live_ifindexes;
  for (const auto& [ifindex, slot] : orphaned_) live_ifindexes.insert(ifindex);
  std::set<std::vector<uint8_t>> live_hosts, live_nets, live_gws;
  auto bytes = [](const auto& x) {
    auto p = reinterpret_cast<const uint8_t*>(&x);
    return std::vector<uint8_t>(p, p + sizeof(x));
  };
  for (const auto& [name, vm] : vms_) {
    live_policies.insert(vm.policy_id);
    if (vm.ifindex) live_ifindexes.insert(vm.ifindex);
    for (const auto& a : vm.plan.host_addresses) live_hosts.insert(bytes(a));
    for (const auto& a : vm.plan.net_addresses) live_nets.insert(bytes(a));
    for (const auto& g : vm.plan.gateways) live_gws.insert(bytes(g));
  }
  for (int fd : {maps_.egress.get(), maps_.ingress.get()})
    for (const auto& k : keys_of<vmfence_policy_key>(fd))
      if (!live_policies.count(k.policy_id)) bpf_map_delete_elem(fd, &k);
  for (const auto& k : keys_of<vmfence_addr>(maps_.owners.get()))
    if (!live_hosts.count(bytes(k))) bpf_map_delete_elem(maps_.owners.get(), &k);
  for (const auto& k : keys_of<vmfence_addr_key>(maps_.owner_nets.get()))
    if (!live_nets.count(bytes(k))) bpf_map_delete_elem(maps_.owner_nets.get(), &k);
  for (const auto& k : keys_of<vmfence_gateway_key>(maps_.gateways.get()))
    if (!live_gws.count(bytes(k))) bpf_map_delete_elem(maps_.gateways.get(), &k);
  for (const auto& k : keys_of<uint32_t>(maps_.vms.get()))
    if (!live_ifindexes.count(k)) bpf_map_delete_elem(maps_.vms.get(), &k);
  std::set<uint32_t> live_slots;
  for (const auto& [name, vm] : vms_) live_slots.insert(vm.slot);
  for (const auto& [ifindex, slot] : orphaned_) live_slots.insert(slot);
  for (uint32_t slot = 1; slot < VMFENCE_MAX_VMS; ++slot)
    if (!live_slots.count(slot)) {
      bpf_map_delete_elem(maps_.flows.get(), &slot);
      bpf_map_delete_elem(maps_.frags.get(), &slot);
    }
  return {};
}

Status MapWriter::write_config(const vmfence_config& cfg) {
  uint32_t zero = 0;
  if (bpf_map_update_elem(maps_.config.get(), &zero, &cfg, BPF_ANY) != 0) return Status::error(errno, "write config");
  return {};
}

}  // namespace vmfence
