#include "maps/pinned_maps.h"

#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <linux/magic.h>
#include <netinet/in.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <unordered_map>

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
// Every map of the ABI list (include/vmfence_abi.h): pin name, member.
#define VMFENCE_NAMED_MAP(ID, name) {VMFENCE_MAP_NAME(ID, name), &MapSet::name},
    VMFENCE_MAPS(VMFENCE_NAMED_MAP)
#undef VMFENCE_NAMED_MAP
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
    for (int r = 0; r < VMFENCE_REASON_SLOTS; ++r) {
      out.drops[r] += c.drops[r];
      out.to_vm_drops[r] += c.to_vm_drops[r];
    }
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

std::vector<std::pair<uint32_t, uint32_t>> inner_map_ids(int outer_fd) {
  std::vector<std::pair<uint32_t, uint32_t>> out;
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(outer_fd, &info, &len) != 0) return out;
  // One batch skips the empty entries: a few syscalls instead of one per
  // index (32,768 for the policy maps).
  std::vector<uint32_t> keys(info.max_entries), ids(info.max_entries);
  uint32_t token = 0, n = info.max_entries;
  int err = bpf_map_lookup_batch(outer_fd, nullptr, &token, keys.data(), ids.data(), &n, nullptr);
  if (err == 0 || errno == ENOENT) {
    for (uint32_t i = 0; i < n; ++i) out.emplace_back(keys[i], ids[i]);
    if (err != 0 || n == info.max_entries) return out;
  }
  out.clear();  // no batch lookup for arrays of maps here: one by one
  for (uint32_t i = 0; i < info.max_entries; ++i) {
    uint32_t id = 0;
    if (bpf_map_lookup_elem(outer_fd, &i, &id) == 0) out.emplace_back(i, id);
  }
  return out;
}

namespace {
PolicyRules rules_of(int trie) {
  PolicyRules out;
  for (const auto& k : keys_of<vmfence_addr_key>(trie)) {
    vmfence_policy_value v{};
    if (bpf_map_lookup_elem(trie, &k, &v) == 0) out.emplace_back(k, v);
  }
  return out;
}
}  // namespace

PolicyRules read_policy(const MapSet& maps, bool egress, uint32_t slot, uint32_t policy_id) {
  Fd t = inner_map((egress ? maps.egress : maps.ingress).get(), vmfence_policy_index(slot, policy_id));
  return t.valid() ? rules_of(t.get()) : PolicyRules{};
}

PolicyRules read_policy(const std::string& path) {
  Fd t(bpf_obj_get(path.c_str()));
  return t.valid() ? rules_of(t.get()) : PolicyRules{};
}

size_t count_flows(const MapSet& maps) {
  size_t n = 0;
  for (const auto& [slot, id] : inner_map_ids(maps.flows.get())) {
    Fd t(bpf_map_get_fd_by_id(id));
    if (t.valid()) n += count_entries(t.get(), sizeof(vmfence_flow_key));
  }
  return n;
}

namespace {

uint32_t max_entries_of(int fd) {
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  return bpf_obj_get_info_by_fd(fd, &info, &len) == 0 ? info.max_entries : 0;
}

// Every entry of a VM's flow table, read in batches (a sweep of a full table
// costs a few syscalls, not two per flow); entry by entry where the kernel
// has no batch operation for the map.
std::vector<std::pair<vmfence_flow_key, vmfence_flow>> flows_of(int fd) {
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

// The BTF ids of a policy trie's key and value in the datapath object's BTF
// (found through a map of the object that carries it: libbpf creates arrays
// of maps without BTF), so bpftool prints a VM's rules by field.
struct TrieBtf {
  Fd btf;
  uint32_t key_type = 0, value_type = 0;
};

TrieBtf trie_btf(int map_with_btf) {
  TrieBtf out;
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(map_with_btf, &info, &len) != 0 || !info.btf_id) return out;
  struct btf* btf = btf__load_from_kernel_by_id(info.btf_id);
  if (!btf) return out;
  int key = btf__find_by_name_kind(btf, "vmfence_addr_key", BTF_KIND_STRUCT);
  int value = btf__find_by_name_kind(btf, "vmfence_policy_value", BTF_KIND_STRUCT);
  btf__free(btf);
  if (key <= 0 || value <= 0) return out;
  out.btf.reset(bpf_btf_get_fd_by_id(info.btf_id));
  if (out.btf.valid()) out.key_type = static_cast<uint32_t>(key), out.value_type = static_cast<uint32_t>(value);
  return out;
}

// Atomic replace of a pin: pin under a temporary name, rename over the old
// (bpffs refuses '.' in names, so the suffix is "_tmp").
Status repin(int fd, const std::string& path) {
  std::string tmp = path + "_tmp";
  ::unlink(tmp.c_str());
  if (bpf_obj_pin(fd, tmp.c_str()) != 0) return Status::error(errno, "pin " + tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    return Status::error(e, "pin " + path);
  }
  return {};
}

}  // namespace

std::string policy_pin_name(const std::string& vm) {
  std::string out = vm;
  std::replace(out.begin(), out.end(), '.', ':');
  return out;
}

namespace {

bool is_policy(MapId map) { return map == MapId::egress || map == MapId::ingress; }

class PinnedBackend : public MapBackend {
 public:
  PinnedBackend(MapSet& maps, std::string policy_dir) : maps_(maps), policy_dir_(std::move(policy_dir)) {}

  Status update(MapId map, const Bytes& key, const Bytes& value) override {
    if (is_policy(map)) {
      PolicyKey k = policy_key(key);
      int t = staged_trie(map, k.index);
      if (t < 0) return Status::error(errno, std::string("create a policy trie in ") + map_id_name(map));
      if (bpf_map_update_elem(t, &k.prefix, value.data(), BPF_ANY) != 0)
        return Status::error(errno, std::string("update ") + map_id_name(map));
      return {};
    }
    if (map == MapId::state && key.size() == sizeof(uint32_t))
      sweep_memo_.erase(*reinterpret_cast<const uint32_t*>(key.data()));  // its flows_added restarts
    // Rate limits under the value's spin lock: the datapath never reads a
    // half-written set of parameters.
    uint64_t flags = map == MapId::limits ? BPF_F_LOCK : BPF_ANY;
    if (bpf_map_update_elem(fd(map), key.data(), value.data(), flags) != 0)
      return Status::error(errno, std::string("update ") + map_id_name(map));
    return {};
  }
  Status erase(MapId map, const Bytes& key) override {
    if (is_policy(map)) {
      // Only a staged trie is ever written (an undo); tries in force are not.
      PolicyKey k = policy_key(key);
      auto p = pending_.find({fd(map), k.index});
      int t = p != pending_.end() ? p->second.get() : -1;
      if (t >= 0 && bpf_map_delete_elem(t, &k.prefix) != 0 && errno != ENOENT)
        return Status::error(errno, std::string("delete from ") + map_id_name(map));
      return {};
    }
    if (bpf_map_delete_elem(fd(map), key.data()) != 0 && errno != ENOENT)
      return Status::error(errno, std::string("delete from ") + map_id_name(map));
    return {};
  }
  bool lookup(MapId map, const Bytes& key, Bytes& value) override {
    if (is_policy(map)) {
      PolicyKey k = policy_key(key);
      Fd held;
      int t = current(fd(map), k.index, held);
      value.assign(sizeof(vmfence_policy_value), 0);
      return t >= 0 && bpf_map_lookup_elem(t, &k.prefix, value.data()) == 0;
    }
    value.assign(info(map).value_size, 0);
    return bpf_map_lookup_elem(fd(map), key.data(), value.data()) == 0;
  }
  std::vector<Bytes> keys(MapId map) override {
    if (is_policy(map)) {
      std::vector<Bytes> out;
      for (const auto& [index, id] : inner_map_ids(fd(map))) {
        Fd t(bpf_map_get_fd_by_id(id));
        if (!t.valid()) continue;
        for (const auto& prefix : keys_of<vmfence_addr_key>(t.get())) out.push_back(to_bytes(PolicyKey{index, prefix}));
      }
      return out;
    }
    size_t ks = info(map).key_size;
    std::vector<Bytes> out;
    Bytes key(ks), next(ks);
    void* prev = nullptr;
    while (bpf_map_get_next_key(fd(map), prev, next.data()) == 0) {
      out.push_back(next);
      key = next;
      prev = key.data();
    }
    return out;
  }
  Status ensure_tables(uint32_t slot, uint32_t flow_limit) override {
    Fd held;
    int flows = current(maps_.flows.get(), slot, held);
    if (flows < 0 || max_entries_of(flows) != flow_limit) {
      // No preallocation: a VM pays for the flows it has, not its limit.
      LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = BPF_F_NO_PREALLOC);
      Fd table(bpf_map_create(BPF_MAP_TYPE_HASH, "vmfence_vm_flow", sizeof(vmfence_flow_key), sizeof(vmfence_flow),
                              flow_limit, &opts));
      if (!table.valid()) return Status::error(errno, "create the VM's flow table");
      sweep_memo_.erase(slot);
      if (flows >= 0) {
        // A changed limit: carry the live flows over (as many as fit).
        for (const auto& [k, f] : flows_of(flows))
          if (bpf_map_update_elem(table.get(), &k, &f, BPF_NOEXIST) != 0 && errno == E2BIG) break;
      } else if (vmfence_state st{}; bpf_map_lookup_elem(maps_.state.get(), &slot, &st) == 0) {
        sweep_memo_[slot] = {st.flows_added, {0, flow_limit}};  // empty: the sweep need not look
      }
      pending_[{maps_.flows.get(), slot}] = std::move(table);  // installed at flush()
    }
    if (auto s = make_room(); !s) return s;
    Fd held_frags;
    if (current(maps_.frags.get(), slot, held_frags) < 0) {
      Fd table(bpf_map_create(BPF_MAP_TYPE_LRU_HASH, "vmfence_vm_frag", sizeof(vmfence_frag_key), sizeof(uint32_t),
                              VMFENCE_FRAGS_PER_VM, nullptr));
      if (!table.valid()) return Status::error(errno, "create the VM's fragment table");
      pending_[{maps_.frags.get(), slot}] = std::move(table);
    }
    return make_room();
  }
  void drop_tables(uint32_t slot) override {
    sweep_memo_.erase(slot);
    pending_.erase({maps_.flows.get(), slot});
    pending_.erase({maps_.frags.get(), slot});
    // ENOENT (no table) is the common case; nothing else can fail here.
    (void)bpf_map_delete_elem(maps_.flows.get(), &slot);
    (void)bpf_map_delete_elem(maps_.frags.get(), &slot);
  }
  Status reset_slot(uint32_t slot) override {
    drop_tables(slot);
    vmfence_state st{};
    sweep_memo_.erase(slot);
    if (bpf_map_update_elem(maps_.state.get(), &slot, &st, BPF_ANY) != 0) return Status::error(errno, "reset state");
    int ncpu = libbpf_num_possible_cpus();
    std::vector<vmfence_counters> zero(static_cast<size_t>(ncpu > 0 ? ncpu : 1));
    if (bpf_map_update_elem(maps_.counters.get(), &slot, zero.data(), BPF_ANY) != 0)
      return Status::error(errno, "reset counters");
    return {};
  }
  // Visits only the tables that may hold flows: those that had some at the
  // last visit, got new ones since (the datapath counts them in the slot's
  // state), or were never visited. A visit walks all of a table's buckets
  // (256 KB at 16,384 flows, cold in the cache): at 10,000 VMs visiting
  // every table took seconds, so one sweep stops after kSweepBudget and the
  // next goes on from there.
  size_t sweep_flows(const std::vector<uint32_t>& slots, const vmfence_config& cfg,
                     std::map<uint32_t, TableUse>* left) override {
    constexpr auto kSweepBudget = std::chrono::milliseconds(50);
    auto started = std::chrono::steady_clock::now();
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);  // bpf_ktime_get_ns's clock
    uint64_t now = static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
    std::vector<vmfence_state> states = all_states();  // read before the tables: a later add is seen next time
    // Round robin from where the last sweep stopped.
    size_t first = std::lower_bound(slots.begin(), slots.end(), sweep_cursor_) - slots.begin();
    bool out_of_time = false;
    size_t swept = 0;
    for (size_t i = 0; i < slots.size(); ++i) {
      uint32_t slot = slots[(first + i) % slots.size()];
      uint32_t added = slot < states.size() ? states[slot].flows_added : 0;
      auto memo = sweep_memo_.find(slot);
      bool idle = memo != sweep_memo_.end() && slot < states.size() && memo->second.flows_added == added &&
                  memo->second.use.entries == 0;
      if (!idle && !out_of_time && std::chrono::steady_clock::now() - started > kSweepBudget) {
        out_of_time = true;
        sweep_cursor_ = slot;
      }
      if (idle || out_of_time) {
        if (left && memo != sweep_memo_.end()) (*left)[slot] = memo->second.use;
        continue;
      }
      Fd table = inner_map(maps_.flows.get(), slot);
      if (!table.valid()) {
        if (errno == ENOENT) sweep_memo_[slot] = {added, {}};  // not bound yet: none until ensure_tables()
        continue;
      }
      TableUse use{0, max_entries_of(table.get())};
      auto flows = flows_of(table.get());
      for (const auto& [k, f] : flows) {
        uint64_t timeout = uint64_t{vmfence_flow_timeout_s(k.proto, f.flags, cfg.tcp_timeout_s, cfg.udp_timeout_s,
                                                           cfg.icmp_timeout_s)} *
                           1000000000ull;
        if (now > f.last_seen_ns && now - f.last_seen_ns > timeout && bpf_map_delete_elem(table.get(), &k) == 0)
          ++swept;
        else
          ++use.entries;
      }
      sweep_memo_[slot] = {added, use};
      if (left) (*left)[slot] = use;
    }
    if (!out_of_time) sweep_cursor_ = 0;
    return swept;
  }
  Status write_config(const vmfence_config& cfg) override {
    uint32_t zero = 0;
    if (bpf_map_update_elem(maps_.config.get(), &zero, &cfg, BPF_ANY) != 0) return Status::error(errno, "write config");
    return {};
  }
  void reset_policy(uint32_t index) override {
    // Fresh empty tries (installed at flush even when the generation has no
    // rule: nothing an earlier generation left at this index stays in force).
    for (MapId m : {MapId::egress, MapId::ingress}) pending_[{fd(m), index}] = new_trie(m);
    (void)make_room();  // on failure the next flush() retries and reports
  }
  void drop_policy(uint32_t index) override {
    // A marker: flush() frees the trie in force there, if any.
    for (MapId m : {MapId::egress, MapId::ingress}) pending_[{fd(m), index}] = Fd();
  }
  Status name_policy(uint32_t index, const std::string& vm) override {
    if (policy_dir_.empty()) return {};
    std::error_code ec;
    std::filesystem::create_directories(policy_dir_, ec);
    for (MapId m : {MapId::egress, MapId::ingress}) {
      Fd held;
      int t = current(fd(m), index, held);
      if (t < 0) return Status::error(ENOENT, std::string("no policy trie in force in ") + map_id_name(m));
      if (auto s = repin(t, pin_path(vm, m)); !s) return s;
    }
    return {};
  }
  void unname_policy(const std::string& vm) override {
    if (policy_dir_.empty()) return;
    for (MapId m : {MapId::egress, MapId::ingress}) ::unlink(pin_path(vm, m).c_str());
  }
  void prune_policies(const std::set<uint32_t>& live, const std::set<std::string>& live_names) override {
    for (MapId m : {MapId::egress, MapId::ingress})
      for (const auto& [index, id] : inner_map_ids(fd(m)))
        if (!live.count(index) && id != tombstone_id_ && !pending_.count({fd(m), index}))
          pending_[{fd(m), index}] = Fd();  // freed at the next flush()
    if (policy_dir_.empty()) return;
    std::set<std::string> live_pins;
    for (const auto& n : live_names) live_pins.insert(policy_pin_name(n));
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(policy_dir_, ec)) {
      std::string n = e.path().filename();
      auto us = n.rfind('_');
      std::string vm = us == std::string::npos ? n : n.substr(0, us);
      std::string dir = us == std::string::npos ? "" : n.substr(us + 1);
      if (!live_pins.count(vm) || (dir != "egress" && dir != "ingress")) ::unlink(e.path().c_str());
    }
  }
  Status flush() override {
    // Installing an inner map waits for an RCU grace period (~10 ms here
    // unless rcu_expedited): one batch per outer map, not one per VM.
    std::map<int, std::pair<std::vector<uint32_t>, std::vector<int>>> batches;
    for (const auto& [k, f] : pending_) {
      int v = f.get();
      if (v < 0) {
        // A freed trie: the shared empty one takes its place (an array of
        // maps cannot delete in a batch), which frees it.
        Fd cur = inner_map(k.first, k.second);
        if (!cur.valid() || map_id(cur.get()) == tombstone_id_) continue;
        v = tombstone();
        if (v < 0) continue;  // stays allocated; never in force
      }
      batches[k.first].first.push_back(k.second);
      batches[k.first].second.push_back(v);
    }
    for (auto& [outer, b] : batches) {
      auto n = static_cast<uint32_t>(b.first.size());
      if (bpf_map_update_batch(outer, b.first.data(), b.second.data(), &n, nullptr) == 0) continue;
      for (size_t i = 0; i < b.first.size(); ++i)  // kernels without batch updates of arrays of maps
        if (bpf_map_update_elem(outer, &b.first[i], &b.second[i], BPF_ANY) != 0)
          return Status::error(errno, "install per-VM maps");
    }
    pending_.clear();
    return {};
  }

 private:
  static PolicyKey policy_key(const Bytes& key) {
    PolicyKey k{};
    std::memcpy(&k, key.data(), std::min(key.size(), sizeof(k)));
    return k;
  }
  std::string pin_path(const std::string& vm, MapId m) const {
    return policy_dir_ + "/" + policy_pin_name(vm) + (m == MapId::egress ? "_egress" : "_ingress");
  }
  // Staged maps hold an fd each: install them early (still unreachable: no
  // VM entry points at them yet) before a reload of thousands of VMs runs
  // out of descriptors. One grace period per batch.
  static constexpr size_t kMaxPending = 512;
  Status make_room() { return pending_.size() < kMaxPending ? Status{} : flush(); }
  static uint32_t map_id(int fd) {
    bpf_map_info info{};
    uint32_t len = sizeof(info);
    return bpf_obj_get_info_by_fd(fd, &info, &len) == 0 ? info.id : 0;
  }
  // The inner map at index of outer: a staged one, else the one in force
  // (held keeps it open); -1 when none (or marked freed).
  int current(int outer, uint32_t index, Fd& held) {
    if (auto p = pending_.find({outer, index}); p != pending_.end()) return p->second.get();
    held = inner_map(outer, index);
    return held.valid() ? held.get() : -1;
  }
  // The staged trie of a new generation at index (created when absent).
  int staged_trie(MapId map, uint32_t index) {
    Fd& t = pending_[{fd(map), index}];
    if (!t.valid()) t = new_trie(map);
    return t.get();
  }
  Fd new_trie(MapId map) {
    if (!btf_loaded_) btf_ = trie_btf(maps_.owner_nets.get()), btf_loaded_ = true;
    LIBBPF_OPTS(bpf_map_create_opts, opts, .btf_fd = static_cast<__u32>(btf_.btf.valid() ? btf_.btf.get() : 0),
                .btf_key_type_id = btf_.key_type, .btf_value_type_id = btf_.value_type, .map_flags = BPF_F_NO_PREALLOC);
    return Fd(bpf_map_create(BPF_MAP_TYPE_LPM_TRIE, map == MapId::egress ? "vmfence_vm_egr" : "vmfence_vm_ingr",
                             sizeof(vmfence_addr_key), sizeof(vmfence_policy_value), VMFENCE_MAX_POLICY_PREFIXES,
                             &opts));
  }
  // The one empty trie that replaces freed ones (never written to).
  int tombstone() {
    if (!tombstone_.valid()) {
      tombstone_ = new_trie(MapId::egress);
      if (tombstone_.valid()) tombstone_id_ = map_id(tombstone_.get());
    }
    return tombstone_.get();
  }

  int fd(MapId map) const {
    switch (map) {
      case MapId::vms:
        return maps_.vms.get();
      case MapId::owners:
        return maps_.owners.get();
      case MapId::owner_nets:
        return maps_.owner_nets.get();
      case MapId::egress:
        return maps_.egress.get();
      case MapId::ingress:
        return maps_.ingress.get();
      case MapId::gateways:
        return maps_.gateways.get();
      case MapId::state:
        return maps_.state.get();
      case MapId::limits:
        return maps_.limits.get();
    }
    return -1;
  }
  const bpf_map_info& info(MapId map) {
    auto& i = infos_[static_cast<size_t>(map)];
    if (!i.key_size) {
      uint32_t len = sizeof(i);
      if (bpf_obj_get_info_by_fd(fd(map), &i, &len) != 0) i = {};
    }
    return i;
  }
  MapSet& maps_;
  std::string policy_dir_;
  bpf_map_info infos_[8]{};
  TrieBtf btf_;
  bool btf_loaded_ = false;
  // Inner maps staged per (outer fd, index), installed by flush(): a new
  // table or trie, or an invalid Fd marking a trie to free.
  std::map<std::pair<int, uint32_t>, Fd> pending_;
  Fd tombstone_;
  uint32_t tombstone_id_ = 0;
  // What the flow sweep saw per slot at its last visit.
  struct SweepMemo {
    uint32_t flows_added;
    TableUse use;
  };
  std::unordered_map<uint32_t, SweepMemo> sweep_memo_;
  uint32_t sweep_cursor_ = 0;  // where the next sweep starts (slots are visited in order)
  // Every slot's state (one batch read of the array; empty on failure: then
  // every table is visited).
  std::vector<vmfence_state> all_states() {
    uint32_t n = max_entries_of(maps_.state.get());
    std::vector<uint32_t> keys(n);
    std::vector<vmfence_state> out(n);
    uint32_t count = n, token = 0;
    int err = bpf_map_lookup_batch(maps_.state.get(), nullptr, &token, keys.data(), out.data(), &count, nullptr);
    if ((err != 0 && errno != ENOENT) || count != n) return {};
    return out;
  }
};

}  // namespace

std::unique_ptr<MapBackend> pinned_backend(MapSet& maps, std::string policy_dir) {
  return std::make_unique<PinnedBackend>(maps, std::move(policy_dir));
}

}  // namespace vmfence
