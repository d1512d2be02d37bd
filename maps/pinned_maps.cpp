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

class PinnedBackend : public MapBackend {
 public:
  explicit PinnedBackend(MapSet& maps) : maps_(maps) {}

  Status update(MapId map, const Bytes& key, const Bytes& value) override {
    if (bpf_map_update_elem(fd(map), key.data(), value.data(), BPF_ANY) != 0)
      return Status::error(errno, std::string("update ") + map_id_name(map));
    return {};
  }
  Status erase(MapId map, const Bytes& key) override {
    if (bpf_map_delete_elem(fd(map), key.data()) != 0 && errno != ENOENT)
      return Status::error(errno, std::string("delete from ") + map_id_name(map));
    return {};
  }
  bool lookup(MapId map, const Bytes& key, Bytes& value) override {
    value.assign(info(map).value_size, 0);
    return bpf_map_lookup_elem(fd(map), key.data(), value.data()) == 0;
  }
  std::vector<Bytes> keys(MapId map) override {
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
    Fd flows = inner_map(maps_.flows.get(), slot);
    if (!flows.valid() || max_entries_of(flows.get()) != flow_limit) {
      // No preallocation: a VM pays for the flows it has, not its limit.
      LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = BPF_F_NO_PREALLOC);
      Fd table(bpf_map_create(BPF_MAP_TYPE_HASH, "vmfence_vm_flow", sizeof(vmfence_flow_key), sizeof(vmfence_flow),
                              flow_limit, &opts));
      if (!table.valid()) return Status::error(errno, "create the VM's flow table");
      if (flows.valid()) {
        // A changed limit: carry the live flows over (as many as fit).
        for (const auto& [k, f] : flows_of(flows.get()))
          if (bpf_map_update_elem(table.get(), &k, &f, BPF_NOEXIST) != 0 && errno == E2BIG) break;
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
  void drop_tables(uint32_t slot) override {
    // ENOENT (no table) is the common case; nothing else can fail here.
    (void)bpf_map_delete_elem(maps_.flows.get(), &slot);
    (void)bpf_map_delete_elem(maps_.frags.get(), &slot);
  }
  Status reset_slot(uint32_t slot) override {
    drop_tables(slot);
    vmfence_state st{};
    if (bpf_map_update_elem(maps_.state.get(), &slot, &st, BPF_ANY) != 0) return Status::error(errno, "reset state");
    int ncpu = libbpf_num_possible_cpus();
    std::vector<vmfence_counters> zero(static_cast<size_t>(ncpu > 0 ? ncpu : 1));
    if (bpf_map_update_elem(maps_.counters.get(), &slot, zero.data(), BPF_ANY) != 0)
      return Status::error(errno, "reset counters");
    return {};
  }
  size_t sweep_flows(const std::vector<uint32_t>& slots, const vmfence_config& cfg,
                     std::map<uint32_t, TableUse>* left) override {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);  // bpf_ktime_get_ns's clock
    uint64_t now = static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
    size_t swept = 0;
    for (uint32_t slot : slots) {
      Fd table = inner_map(maps_.flows.get(), slot);
      if (!table.valid()) continue;
      auto flows = flows_of(table.get());
      size_t before = swept;
      for (const auto& [k, f] : flows) {
        uint64_t timeout = uint64_t{vmfence_flow_timeout_s(k.proto, f.flags, cfg.tcp_timeout_s, cfg.udp_timeout_s,
                                                           cfg.icmp_timeout_s)} *
                           1000000000ull;
        if (now > f.last_seen_ns && now - f.last_seen_ns > timeout && bpf_map_delete_elem(table.get(), &k) == 0)
          ++swept;
      }
      if (left) (*left)[slot] = {flows.size() - (swept - before), max_entries_of(table.get())};
    }
    return swept;
  }
  Status write_config(const vmfence_config& cfg) override {
    uint32_t zero = 0;
    if (bpf_map_update_elem(maps_.config.get(), &zero, &cfg, BPF_ANY) != 0) return Status::error(errno, "write config");
    return {};
  }

 private:
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
  bpf_map_info infos_[8]{};
};

}  // namespace

std::unique_ptr<MapBackend> pinned_backend(MapSet& maps) { return std::make_unique<PinnedBackend>(maps); }

}  // namespace vmfence
