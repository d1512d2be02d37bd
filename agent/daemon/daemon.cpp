#include "agent/daemon/daemon.h"

#include <bpf/bpf.h>
#include <fcntl.h>
#include <linux/rtnetlink.h>
#include <malloc.h>
#include <net/if.h>
#include <netlink/msg.h>
#include <netlink/netlink.h>
#include <netlink/socket.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string_view>
#include <thread>

#include "agent/actions/actions.h"
#include "agent/daemon/reconciler.h"
#include "agent/daemon/state_file.h"
#include "agent/datapath/link_monitor.h"
#include "agent/datapath/loader.h"
#include "agent/datapath/qdisc.h"
#include "agent/events/events.h"
#include "agent/events/journal.h"
#include "agent/events/monitor_server.h"
#include "agent/fleet/fleet.h"
#include "agent/metrics/metrics.h"
#include "agent/nft/nft.h"
#include "agent/spec/spec.h"
#include "maps/compiler.h"
#include "maps/pinned_maps.h"

namespace vmfence {

namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kFleetTag = 100;  // epoll tag of the fleet's wake fd (run() has the others)

int64_t realtime_ns() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);  // comparable with file mtimes
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

// if_nametoindex() without its socket per call (a reconcile asks for every
// VM's interface: at 10,000 VMs the sockets alone took ~40 ms).
uint32_t ifindex_of(const std::string& name) {
  static const Fd sock(socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (name.empty() || name.size() >= IFNAMSIZ) return 0;
  if (!sock.valid()) return if_nametoindex(name.c_str());
  ifreq req{};
  std::memcpy(req.ifr_name, name.data(), name.size());
  return ioctl(sock.get(), SIOCGIFINDEX, &req) == 0 ? static_cast<uint32_t>(req.ifr_ifindex) : 0;
}

// An interface whose programs could not be attached: retried with backoff.
struct AttachRetry {
  std::string owner;  // VM name or refused file
  std::chrono::milliseconds backoff{100};
  Clock::time_point next{};
  std::string error;
};

// The fields of a VM the nftables table is built from (nft/ruleset.cpp).
struct NftInputs {
  std::string name;
  std::vector<Cidr> addresses;
  std::vector<Rule> ingress;
  bool imds = false;
  bool operator==(const NftInputs&) const = default;
};

class Daemon {
 public:
  explicit Daemon(std::string config_dir)
      : config_dir_(std::move(config_dir)),
        actions_(&journal_),
        events_(
            journal_,
            [this](const VmSpec& vm, const Violation& v, uint64_t packet_ns) { on_trigger(vm, v, packet_ns); },
            [this](uint32_t id) { return vm_by_id(id); }) {}
  int run();

 private:
  bool start();
  bool watch(int fd, uint64_t tag);
  void reload(const char* why);
  bool reload_one_file(const std::string& name, const char* why);
  bool note_file_events();
  void apply(ReconcileResult& r);  // takes r.in_force
  void report(const std::vector<RejectedFile>& rejected);
  void attach(uint32_t ifindex, const std::string& owner);
  void retry_attaches();
  void prefilter(uint32_t ifindex);
  void shape(const VmSpec& vm, bool had_pacing);
  void sweep_pacing();
  void sync_prefilter();
  void link_changed(bool added, uint32_t ifindex, const std::string& name);
  void links_resynced(const std::vector<LinkMonitor::Link>& links);
  void apply_nft();
  void attach_missing(const std::set<std::string_view>& changed);
  void publish_state();
  void publish_metrics();
  void listen_metrics();
  void count_reload();
  void report_lost_events();
  void act_on_quarantine();
  void on_trigger(const VmSpec& vm, const Violation& v, uint64_t packet_ns);
  void check_fill_levels();
  const VmSpec* vm_by_id(uint32_t id) const;
  const VmSpec* vm_on(const std::string& ifname) const;
  const RejectedFile* rejected_on(const std::string& ifname) const;
  std::vector<VmSpec> previous_claims(const SpecFiles& files) const;
  // The fleet (host.json "fleet"): refuse local VMs an earlier claim of
  // another host's VM beats, before admission; the remote winners go to the
  // owner maps after it (sync_remote). Returns the incumbents to admit
  // against (`in_force_` unless a loser was among them: then `trimmed`).
  const std::vector<VmSpec>& fleet_admit(SpecFiles& files, const std::vector<VmSpec>& incumbents,
                                         std::vector<VmSpec>& trimmed);
  void sync_remote();
  void sync_fleet_config();
  void on_fleet_wake();
  void publish_fleet(bool force);

  std::unique_ptr<fleet::Fleet> fleet_;
  FleetSpec fleet_spec_;
  bool fleet_started_ = false;         // run() started threads: a new Fleet starts at once
  fleet::Fleet::Snapshot fleet_view_;  // the view admission and the maps follow
  MapWriter::RemoteOwners fleet_remote_;
  size_t fleet_remote_vms_ = 0;
  size_t fleet_losers_ = 0;
  std::vector<std::string> fleet_refused_;  // remote records on our own addresses (logged once)
  Clock::time_point started_at_ = Clock::now();
  Clock::time_point fleet_hold_until_{};  // a restart's pinned remote entries stay until the first sync or this
  bool fleet_view_saved_ = true;
  Clock::time_point fleet_saved_at_{};

  std::string config_dir_;
  HostSpec host_;
  std::set<uint32_t> prefilter_failed_;  // ifindexes whose XDP attach failed (logged once)
  std::vector<VmSpec> in_force_;         // sorted by name
  std::map<uint32_t, size_t> by_id_;     // vm_id -> index in in_force_
  std::vector<RejectedFile> rejected_;   // refused files (reported in the state file, `wait`)
  std::map<uint32_t, VmSpec> removed_;   // vm_id -> spec of a removed VM whose interface still drops
  std::vector<VmSpec> reserved_;         // claims of a previous run's VMs whose file is invalid now
  Journal journal_;
  ActionRunner actions_;
  EventConsumer events_;
  MonitorServer monitor_;  // `vmfence monitor` clients
  std::unique_ptr<Datapath> dp_;
  // The metrics endpoint (created in run(), once signals are blocked: its
  // threads inherit the mask). The collector holds its own map fds.
  std::shared_ptr<MetricsCollector> metrics_;
  std::unique_ptr<MetricsServer> metrics_server_;
  std::unique_ptr<MapWriter> writer_;
  std::unique_ptr<Reconciler> reconciler_;
  SpecFileCache spec_cache_;  // reloads parse only the files that changed
  std::unique_ptr<LinkMonitor> links_;
  nft::Monitor nft_monitor_;
  Fd epoll_, signal_fd_, inotify_, timer_, lock_;
  std::map<uint32_t, AttachRetry> unattached_;                  // ifindex -> retry
  std::map<uint32_t, std::pair<uint64_t, uint64_t>> reported_;  // vm_id -> suppressed, lost (in-force VMs only)
  std::map<uint32_t, MapBackend::TableUse> flow_use_;           // slot -> flows, from the last sweep
  int64_t scanned_ns_ = 0;                                      // when vms.d was last read (for `wait`)
  bool reload_pending_ = false;
  // What inotify said since the last reload: the vms.d files it named, or
  // that anything else changed (host.json, the directories, a lost event).
  int vms_wd_ = -1;
  std::set<std::string> changed_files_;
  bool full_reload_ = true;
  int64_t events_read_ns_ = 0;  // when they were read
  bool host_broken_ = false;    // the last reload found host.json invalid
  std::string metrics_error_;   // why the endpoint is not listening (logged once per cause)
  // A reload frees as much as it allocated (every VM's spec and plan): the
  // heap is trimmed once things are quiet, not on a change's critical path.
  std::optional<Clock::time_point> trim_at_;
  Clock::time_point reload_at_{};
  bool running_ = true;
  bool nft_applied_ = false;
  uint64_t nft_fingerprint_ = 0;
  // What the nftables table was last built from: a reload that changes none
  // of it (most policy changes) skips the build.
  HostSpec nft_host_;
  std::vector<NftInputs> nft_inputs_;
};

const VmSpec* Daemon::vm_by_id(uint32_t id) const {
  if (auto it = by_id_.find(id); it != by_id_.end()) return &in_force_[it->second];
  if (auto it = removed_.find(id); it != removed_.end()) return &it->second;
  return nullptr;
}

const VmSpec* Daemon::vm_on(const std::string& ifname) const {
  for (const auto& vm : in_force_)
    if (vm.interface == ifname) return &vm;
  return nullptr;
}

const RejectedFile* Daemon::rejected_on(const std::string& ifname) const {
  for (const auto& r : rejected_)
    if (!r.interface.empty() && r.interface == ifname) return &r;
  return nullptr;
}

bool Daemon::watch(int fd, uint64_t tag) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = tag;
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    spdlog::error("epoll: cannot watch fd {}: {}", fd, std::strerror(errno));
    return false;
  }
  return true;
}

// Attach both programs; a failure is retried with backoff and the interface
// is reported as not enforced until it succeeds.
void Daemon::attach(uint32_t ifindex, const std::string& owner) {
  if (!ifindex) return;
  if (auto s = dp_->attach(ifindex); !s) {
    auto& r = unattached_[ifindex];
    bool first = r.owner.empty();
    r.owner = owner;
    r.error = s.message;
    r.next = Clock::now() + r.backoff;
    r.backoff = std::min<std::chrono::milliseconds>(r.backoff * 2, std::chrono::seconds(10));
    if (first) spdlog::error("{}: attach to ifindex {}: {} (NOT enforced; retrying)", owner, ifindex, s.message);
    return;
  }
  if (unattached_.erase(ifindex)) spdlog::info("{}: attached to ifindex {} after retrying", owner, ifindex);
  if (host_.xdp_prefilter) prefilter(ifindex);
}

// The XDP pre-filter on an enforced interface. Only an early drop: tcx
// enforces without it, so a failure is logged (once) and not retried.
void Daemon::prefilter(uint32_t ifindex) {
  if (auto s = dp_->attach_xdp(ifindex); !s) {
    if (prefilter_failed_.insert(ifindex).second)
      spdlog::warn("ifindex {}: XDP pre-filter not attached ({}); tcx enforces alone", ifindex, s.message);
    return;
  }
  prefilter_failed_.erase(ifindex);
}

// The pacing qdisc on a VM's TAP follows its ingress_mbit limit (removed
// only where it was there: `had_pacing`). Without it the to-VM limit still
// holds, as a policer at the drop horizon.
void Daemon::shape(const VmSpec& vm, bool had_pacing) {
  auto inst = writer_->installed().find(vm.name);
  uint32_t ifindex = inst == writer_->installed().end() ? 0 : inst->second.ifindex;
  if (!ifindex || (!vm.rate.ingress_mbit && !had_pacing)) return;
  if (!vm.rate.ingress_mbit) {
    if (auto s = remove_pacing_qdisc(ifindex); !s) spdlog::warn("vm {}: {}", vm.name, s.message);
    return;
  }
  uint64_t rate = uint64_t{vm.rate.ingress_mbit} * 125000;  // bytes/s
  uint64_t horizon = inst->second.plan.limit.ingress_burst_ns * rate / 1000000000ull;
  std::string kind;
  if (auto s = install_pacing_qdisc(ifindex, rate, static_cast<uint32_t>(std::min<uint64_t>(horizon, 1u << 30)), &kind);
      !s)
    spdlog::warn("vm {}: {} (traffic to it is policed, not paced)", vm.name, s.message);
  else if (kind != "fq")
    spdlog::info("vm {}: this kernel has no fq qdisc; traffic to it is shaped by {} on {}", vm.name, kind,
                 vm.interface);
}

// At start: pacing qdiscs a previous run left where no VM has ingress_mbit
// any more (its limit or its spec went while no daemon ran).
void Daemon::sweep_pacing() {
  std::map<uint32_t, RootQdisc> roots;
  if (auto s = root_qdiscs(roots); !s) {
    spdlog::warn("pacing qdiscs: {}", s.message);
    return;
  }
  std::set<uint32_t> paced;
  for (const auto& vm : in_force_) {
    auto inst = writer_->installed().find(vm.name);
    if (vm.rate.ingress_mbit && inst != writer_->installed().end()) paced.insert(inst->second.ifindex);
  }
  for (const auto& [ifindex, q] : roots)
    if (q.handle == kPacingQdiscHandle && !paced.count(ifindex))
      if (auto s = remove_pacing_qdisc(ifindex); !s) spdlog::warn("{}", s.message);
}

// Every interface with our programs gets the pre-filter or loses it, as
// host.json says (at start, and when xdp_prefilter changes).
void Daemon::sync_prefilter() {
  prefilter_failed_.clear();
  if (!host_.xdp_prefilter) {
    for (uint32_t ifindex : Datapath::prefiltered_ifindexes(dp_->dir())) Datapath::detach_xdp(dp_->dir(), ifindex);
    return;
  }
  for (uint32_t ifindex : Datapath::linked_ifindexes(dp_->dir()))
    if (dp_->attached(ifindex) && !dp_->xdp_attached(ifindex)) prefilter(ifindex);
}

void Daemon::retry_attaches() {
  auto now = Clock::now();
  std::vector<std::pair<uint32_t, std::string>> due;
  for (const auto& [ifindex, r] : unattached_)
    if (now >= r.next) due.emplace_back(ifindex, r.owner);
  for (const auto& [ifindex, owner] : due) {
    char name[IF_NAMESIZE];
    if (!if_indextoname(ifindex, name)) {  // gone meanwhile
      unattached_.erase(ifindex);
      continue;
    }
    attach(ifindex, owner);
  }
  if (!due.empty()) publish_state();
}

void Daemon::report(const std::vector<RejectedFile>& rejected) {
  for (const auto& r : rejected) {
    for (const auto& e : r.errors) std::fprintf(stderr, "%s\n", e.str().c_str());
    if (r.kept_last_good)
      spdlog::error("{}: refused; vm {} keeps its last good policy", r.file, r.name);
    else if (!r.interface.empty() && !vm_on(r.interface))
      spdlog::error("{}: refused; interface {} drops everything (no_policy)", r.file, r.interface);
    else
      spdlog::error("{}: refused", r.file);
  }
}

// After a reconcile: attach what needs the programs, follow names.
void Daemon::apply(ReconcileResult& r) {
  for (const auto& name : r.removed) {
    for (const auto& vm : in_force_)
      if (vm.name == name) {
        uint32_t ifindex = ifindex_of(vm.interface);
        if (ifindex && writer_->is_blocked(ifindex)) removed_[name_id(name)] = vm;  // reports under its name
        if (ifindex && vm.rate.ingress_mbit)
          if (auto s = remove_pacing_qdisc(ifindex); !s) spdlog::warn("vm {}: {}", name, s.message);
      }
    reported_.erase(name_id(name));
    actions_.forget(name);
    if (metrics_) metrics_->forget_vm(name);
    spdlog::warn("vm {}: spec removed; its interface (if present) now drops everything", name);
  }
  std::set<std::string> had_pacing;
  std::map<std::string, std::string> paced_on;  // changed VM -> the TAP it had
  for (const auto& vm : in_force_)
    if (vm.rate.ingress_mbit && std::find(r.changed.begin(), r.changed.end(), vm.name) != r.changed.end()) {
      had_pacing.insert(vm.name);
      paced_on[vm.name] = vm.interface;
    }
  in_force_ = std::move(r.in_force);
  by_id_.clear();
  for (size_t i = 0; i < in_force_.size(); ++i) by_id_[name_id(in_force_[i].name)] = i;
  rejected_ = r.rejected;
  for (const auto& name : r.changed) {
    actions_.rearm(name);
    removed_.erase(name_id(name));
  }
  // A removed VM's name is kept only while its interface drops in no_policy.
  std::erase_if(removed_, [&](const auto& kv) { return vm_on(kv.second.interface) != nullptr; });
  attach_missing(std::set<std::string_view>(r.changed.begin(), r.changed.end()));
  // A VM that moved to another TAP leaves no pacing on the old one (first:
  // another VM may have taken that TAP in this reload).
  for (const auto& [name, tap] : paced_on) {
    const VmSpec* vm = vm_by_id(name_id(name));
    if (uint32_t ifindex = (!vm || vm->interface != tap) ? ifindex_of(tap) : 0)
      if (auto s = remove_pacing_qdisc(ifindex); !s) spdlog::warn("vm {}: {}", name, s.message);
  }
  for (const auto& name : r.changed)
    if (const VmSpec* vm = vm_by_id(name_id(name))) shape(*vm, had_pacing.count(name) != 0);
  for (uint32_t ifindex : r.blocked)
    if (!dp_->attached(ifindex)) attach(ifindex, "no_policy");
  report(r.rejected);
}

// Attach every enforced VM's interface that lacks the programs, and those
// of `changed` VMs in any case.
void Daemon::attach_missing(const std::set<std::string_view>& changed) {
  for (const auto& vm : in_force_) {
    auto inst = writer_->installed().find(vm.name);
    if (inst == writer_->installed().end()) continue;
    if (!inst->second.ifindex) {
      if (changed.count(vm.name))
        spdlog::info("vm {}: interface {} not present yet; attaching when it appears", vm.name, vm.interface);
      continue;
    }
    if (changed.count(vm.name) || !dp_->attached(inst->second.ifindex)) attach(inst->second.ifindex, "vm " + vm.name);
  }
}

void Daemon::apply_nft() {
  std::vector<NftInputs> inputs;
  inputs.reserve(in_force_.size());
  for (const auto& vm : in_force_) inputs.push_back({vm.name, vm.addresses, vm.ingress, vm.imds});
  if (nft_applied_ && host_ == nft_host_ && inputs == nft_inputs_) return;
  Spec spec;
  spec.host = host_;
  spec.vms = in_force_;
  nft::Ruleset rs = nft::build_ruleset(spec);
  uint64_t fp = rs.fingerprint();
  if (nft_applied_ && fp == nft_fingerprint_) return;  // unchanged; the monitor guards against edits
  if (auto r = nft::apply(rs); !r) {
    spdlog::error("nftables: {} (the previous ruleset stays in force)", r.message);
    return;
  }
  nft_applied_ = true;
  nft_fingerprint_ = fp;
  nft_host_ = host_;
  nft_inputs_ = std::move(inputs);
}

void Daemon::publish_state() {
  State st;
  st.config_dir = config_dir_;
  st.scanned_ns = scanned_ns_;
  for (const auto& vm : in_force_) {
    StateVm s;
    s.name = vm.name;
    s.interface = vm.interface;
    s.group = vm.group;
    s.mode = mode_name(vm.mode);
    s.vm_id = name_id(vm.name);
    auto it = writer_->installed().find(vm.name);
    if (it != writer_->installed().end()) {
      s.slot = it->second.slot;
      s.policy_id = it->second.policy_id;
      s.ifindex = it->second.ifindex;
      s.enforced = s.ifindex && !unattached_.count(s.ifindex);
    }
    st.vms.push_back(s);
  }
  for (const auto& r : rejected_) {
    StateRejected s;
    s.file = r.file;
    s.name = r.name;
    s.interface = r.interface;
    for (const auto& e : r.errors) s.errors.push_back(e.str());
    s.kept_last_good = r.kept_last_good;
    struct stat sb {};
    if (::stat(r.file.c_str(), &sb) == 0) s.mtime_ns = int64_t{sb.st_mtim.tv_sec} * 1000000000 + sb.st_mtim.tv_nsec;
    st.rejected.push_back(std::move(s));
  }
  if (auto s = write_state_file(run_dir(), st); !s) spdlog::warn("{}", s.message);
  publish_metrics();
}

// What a scrape reports besides the kernel's counters (read at scrape time).
void Daemon::publish_metrics() {
  if (!metrics_) return;  // not started yet
  std::vector<MetricsVm> vms;
  vms.reserve(in_force_.size());
  for (const auto& vm : in_force_) {
    MetricsVm m{vm.name, vm.interface, vm.group, mode_name(vm.mode), 0, action_name(vm.on_violation.action)};
    auto it = writer_->installed().find(vm.name);
    if (it != writer_->installed().end() && it->second.ifindex) m.slot = it->second.slot;
    vms.push_back(std::move(m));
  }
  metrics_->set_vms(std::move(vms));
  // The maps VMs and their addresses fill (flow tables are per VM, bounded
  // by limits.flows): entries as the writer counts them, no walk.
  const MapSet& maps = dp_->maps();
  std::vector<MapFill> fills;
  for (auto [id, fd] :
       {std::pair{MapId::vms, maps.vms.get()}, std::pair{MapId::owners, maps.owners.get()},
        std::pair{MapId::owner_nets, maps.owner_nets.get()}, std::pair{MapId::gateways, maps.gateways.get()}}) {
    bpf_map_info info{};
    uint32_t len = sizeof(info);
    if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) continue;
    fills.push_back({map_id_name(id), writer_->entries(id), info.max_entries});
  }
  metrics_->set_maps(std::move(fills));
}

// Bind the endpoint to host.json's metrics.listen when it changed (or the
// last bind failed). A failure leaves enforcement as it is.
void Daemon::listen_metrics() {
  if (!metrics_server_) return;
  const std::string& want = host_.metrics.listen;
  std::string before = metrics_server_->address();
  if (auto s = metrics_server_->listen(want); !s) {
    if (metrics_error_ != s.message) spdlog::error("{} (enforcement goes on; retrying every 30 s)", s.message);
    metrics_error_ = s.message;
    return;
  }
  metrics_error_.clear();
  if (metrics_server_->address() == before) return;
  if (want.empty())
    spdlog::info("metrics: off (metrics.listen is \"\")");
  else
    spdlog::info("metrics: serving http://{}/metrics", want);
}

// A reload is an error while anything read is not in force: host.json
// invalid, or a file refused.
void Daemon::count_reload() {
  if (metrics_) metrics_->count_reload(!host_broken_ && rejected_.empty());
}

// Some file names `name` (by its name, or by its file name when unreadable)
// and every such file is invalid.
bool only_broken_files_name(const SpecFiles& files, const std::string& name) {
  bool broken = false, valid = false;
  for (const auto& f : files.vms) {
    bool names_it = f.vm ? f.vm->name == name : f.name == name || std::filesystem::path(f.path).stem() == name;
    if (names_it) (f.vm ? valid : broken) = true;
  }
  return broken && !valid;
}

// Claims of VMs the previous run enforced (pinned maps, and the names from
// its state file) whose file is now broken: their name, interface and
// addresses as the kernel holds them.
std::vector<VmSpec> Daemon::previous_claims(const SpecFiles& files) const {
  static const uint8_t kMappedPrefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  std::vector<VmSpec> out;
  State before = read_state(run_dir());
  for (const auto& prev : before.vms) {
    if (!writer_->adopted_ifindex(prev.vm_id)) continue;
    if (!only_broken_files_name(files, prev.name)) continue;
    VmSpec vm;
    vm.name = prev.name;
    vm.group = prev.name;
    vm.interface = prev.interface;
    vm.file = "(enforced before the agent restarted; its file is invalid)";
    const MapSet& maps = dp_->maps();
    vmfence_addr a{}, next{};
    vmfence_owner o{};
    for (void* key = nullptr; bpf_map_get_next_key(maps.owners.get(), key, &next) == 0; key = &a) {
      a = next;
      if (bpf_map_lookup_elem(maps.owners.get(), &a, &o) != 0 || o.vm_id != prev.vm_id) continue;
      Cidr c;
      std::memcpy(c.addr.data(), a.addr, 16);
      bool v4 = std::memcmp(a.addr, kMappedPrefix, 12) == 0;
      c.family = v4 ? 4 : 6;
      c.prefix_len = v4 ? 32 : 128;
      bool link_local = !v4 && a.addr[0] == 0xfe && (a.addr[1] & 0xc0) == 0x80;  // its EUI-64, not a spec address
      if (!link_local) vm.addresses.push_back(c);
    }
    vmfence_addr_key k{}, nk{};
    for (void* key = nullptr; bpf_map_get_next_key(maps.owner_nets.get(), key, &nk) == 0; key = &k) {
      k = nk;
      if (bpf_map_lookup_elem(maps.owner_nets.get(), &k, &o) != 0 || o.vm_id != prev.vm_id) continue;
      Cidr c;
      std::memcpy(c.addr.data(), k.addr, 16);
      uint32_t bits = std::min<uint32_t>(k.prefixlen, 128);  // in the IPv4-mapped space
      bool v4 = bits >= 96 && std::memcmp(k.addr, kMappedPrefix, 12) == 0;
      c.family = v4 ? 4 : 6;
      c.prefix_len = static_cast<uint8_t>(v4 ? bits - 96 : bits);
      vm.addresses.push_back(c);
    }
    spdlog::warn(
        "vm {}: enforced before the restart, its file is invalid now: its interface drops everything and "
        "its claims ({} addresses, {}) stay reserved",
        vm.name, vm.addresses.size(), vm.interface);
    out.push_back(std::move(vm));
  }
  return out;
}

const std::vector<VmSpec>& Daemon::fleet_admit(SpecFiles& files, const std::vector<VmSpec>& incumbents,
                                               std::vector<VmSpec>& trimmed) {
  fleet_losers_ = 0;
  if (!fleet_) return incumbents;
  std::vector<const VmSpec*> local;
  for (const auto& f : files.vms)
    if (f.vm) local.push_back(&*f.vm);
  // This host's own addresses no remote VM may take, and the groups that
  // are a local VM's own name (isolated: a remote VM never joins one).
  std::vector<Cidr> reserved;
  std::set<std::string> isolated;
  if (host_.imds) reserved.push_back(host_.imds->address);
  for (const VmSpec* vm : local) {
    reserved.insert(reserved.end(), vm->gateway.begin(), vm->gateway.end());
    if (vm->group.empty() || vm->group == vm->name) isolated.insert(vm->name);
  }
  fleet::Resolution res = fleet::resolve(host_.fleet->host, local, fleet_view_.records, reserved);
  if (res.remote_refused != fleet_refused_) {
    for (const auto& why : res.remote_refused) spdlog::warn("fleet: {}", why);
    fleet_refused_ = res.remote_refused;
  }
  fleet_remote_ = fleet::remote_owners(res.remote, isolated);
  fleet_remote_vms_ = res.remote.size();
  fleet_losers_ = res.local_losers.size();
  if (res.local_losers.empty()) return incumbents;
  for (const auto& [name, l] : res.local_losers) spdlog::error("{}", l.error.str());
  trimmed = incumbents;
  fleet::refuse_losers(res, files, trimmed);
  return trimmed;
}

// The remote winners into the owner maps, and the fleet interfaces into
// the datapath config. After a restart, the remote entries the previous run
// pinned stay as they are until the first full sync (or the hold times
// out): an etcd that is away must not turn remote VMs into "outside".
void Daemon::sync_remote() {
  if (!fleet_) return;
  // The datapath looks at owner_nets only with the flag: set before a
  // remote prefix goes in, cleared after the last one went.
  auto config = [&](bool nets) {
    if (auto s = reconciler_->refresh_fleet_config(nets); !s) spdlog::error("datapath config: {}", s.message);
  };
  config(!writer_->remote().nets.empty() || !fleet_remote_.nets.empty());
  if (fleet_view_.synced || Clock::now() >= fleet_hold_until_) {
    if (auto s = writer_->set_remote(fleet_remote_); !s) spdlog::error("fleet: {}", s.message);
  }
  config(!writer_->remote().nets.empty());
  std::vector<fleet::Record> mine;
  mine.reserve(in_force_.size());
  for (const auto& vm : in_force_) mine.push_back(fleet::local_record(host_.fleet->host, vm));
  fleet_->publish(std::move(mine));
  fleet_view_saved_ = false;
}

// host.json's fleet came, went or changed: a new client (the old one's
// lease stays in etcd until it expires, like a SIGTERM).
void Daemon::sync_fleet_config() {
  bool same = fleet_ && host_.fleet && fleet_spec_ == *host_.fleet;
  if (same) return;
  if (!fleet_ && !host_.fleet) {
    // A previous run's remote entries (its fleet is gone from host.json).
    if (writer_ && writer_->remote().size()) {
      spdlog::info("fleet: not configured; removing {} remote VM addresses a previous run left",
                   writer_->remote().size());
      (void)writer_->set_remote({});
    }
    return;
  }
  if (fleet_) {
    spdlog::info("fleet: configuration changed; reconnecting");
    fleet_.reset();
  }
  if (!host_.fleet) {
    fleet_view_ = {};
    fleet_remote_ = {};
    fleet_remote_vms_ = 0;
    if (writer_) (void)writer_->set_remote({});
    if (metrics_) metrics_->set_fleet(std::nullopt);
    return;
  }
  fleet_spec_ = *host_.fleet;
  fleet_ = std::make_unique<fleet::Fleet>(fleet_spec_, run_dir());
  fleet_view_ = fleet_->snapshot();
  fleet_hold_until_ = Clock::now() + std::chrono::seconds(10 * fleet_spec_.lease_s);
  if (fleet_started_) {
    fleet_->start();
    watch(fleet_->wake_fd(), kFleetTag);
  }
}

void Daemon::on_fleet_wake() {
  if (!fleet_) return;
  fleet_->drain_wake();
  fleet::Fleet::Snapshot snap = fleet_->snapshot();
  bool changed = snap.generation != fleet_view_.generation || snap.synced != fleet_view_.synced;
  fleet_view_ = std::move(snap);
  publish_fleet(false);
  if (!changed) return;
  // Remote records change who wins a conflict and the owner maps: a full
  // reload (the spec files come from the cache) decides both, once for a
  // burst of changes.
  full_reload_ = true;
  if (!reload_pending_) {
    reload_pending_ = true;
    reload_at_ = Clock::now() + std::chrono::milliseconds(20);
  }
}

// `vmfence status` and the metrics: the view's age every second, the view
// itself (also what a restart starts from) when it changed, at most once a
// second.
void Daemon::publish_fleet(bool force) {
  if (!fleet_) return;
  auto st = fleet_->snapshot_status();
  double age = st.confirmed_ns ? std::max(0.0, (realtime_ns() - st.confirmed_ns) / 1e9) : -1;
  // Never in sync: as old as this agent (an alert on the age fires).
  double since_start = std::chrono::duration<double>(Clock::now() - started_at_).count();
  if (metrics_) metrics_->set_fleet(FleetMetrics{fleet_remote_vms_, age < 0 ? since_start : age});
  FleetState f;
  f.host = fleet_spec_.host;
  f.connected = st.connected;
  f.synced = st.synced;
  f.confirmed_ns = st.confirmed_ns;
  f.remote_vms = fleet_remote_vms_;
  f.conflicts = fleet_losers_;
  f.error = st.last_error;
  (void)write_fleet_status(run_dir(), f);
  auto now = Clock::now();
  if (!fleet_view_saved_ && (force || now - fleet_saved_at_ >= std::chrono::seconds(1))) {
    fleet_saved_at_ = now;
    fleet_view_saved_ = true;
    if (auto s = fleet::Fleet::save_view(run_dir(), fleet_spec_.prefix, fleet_view_); !s)
      spdlog::warn("fleet: {}", s.message);
  }
}

bool Daemon::start() {
  // One agent per pin dir: a second one would fight over the same maps.
  std::error_code ec;
  std::filesystem::create_directories(run_dir(), ec);
  std::string lock_path = run_dir() + "/agent.lock";
  lock_.reset(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!lock_.valid() || flock(lock_.get(), LOCK_EX | LOCK_NB) != 0) {
    spdlog::error("another vmfence agent holds {} (pin dir {}); not starting", lock_path, pin_dir());
    return false;
  }
  epoll_.reset(epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) {
    spdlog::error("epoll_create1: {}", std::strerror(errno));
    return false;
  }
  // Watch files and links before the first scan: a file or TAP that appears
  // while we start is then either in the scan or in a notification.
  inotify_.reset(inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
  std::filesystem::create_directories(config_dir_ + "/vms.d", ec);
  if (!inotify_.valid() ||
      (vms_wd_ = inotify_add_watch(inotify_.get(), (config_dir_ + "/vms.d").c_str(),
                                   IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE | IN_ATTRIB)) <
          0 ||
      inotify_add_watch(inotify_.get(), config_dir_.c_str(), IN_CLOSE_WRITE | IN_MOVED_TO) < 0) {
    spdlog::error("inotify on {}: {}", config_dir_, std::strerror(errno));
    return false;
  }
  links_ = std::make_unique<LinkMonitor>(
      [this](bool added, uint32_t ifindex, const std::string& name) { link_changed(added, ifindex, name); },
      [this](const std::vector<LinkMonitor::Link>& all) { links_resynced(all); });
  if (auto s = links_->open(); !s) {
    spdlog::error("link monitor: {}", s.message);
    return false;
  }

  scanned_ns_ = realtime_ns();
  SpecFiles files = read_spec_files(config_dir_, &spec_cache_);
  if (!files.host_errors.empty()) {
    for (const auto& e : files.host_errors) std::fprintf(stderr, "%s\n", e.str().c_str());
    spdlog::error("{}: host.json invalid; not starting (what a previous run installed stays in force)", config_dir_);
    return false;
  }
  host_ = files.host;

  route_libbpf_log();
  // Maps a previous run pinned may hold its leftovers; fresh ones hold
  // nothing to collect (the collection visits every slot: ~100k syscalls).
  bool fresh_maps = !std::filesystem::exists(pin_dir() + "/" VMFENCE_MAP_VMS, ec);
  // Where a start spends its time (logged once enforcing): the benchmark's
  // cold start and restart figures break down by these.
  auto ms = [t = Clock::now()]() mutable {
    auto now = Clock::now();
    double d = std::chrono::duration<double, std::milli>(now - t).count();
    t = now;
    return d;
  };
  if (auto s = Datapath::load(pin_dir(), dp_); !s) {
    spdlog::error("{}", s.message);
    return false;
  }
  double load_ms = ms();
  metrics_ = std::make_shared<MetricsCollector>(map_counter_source(dp_->maps()));
  actions_.on_result([m = metrics_](const std::string& vm, bool ok) { m->count_action(vm, "terminate", ok); });
  writer_ = std::make_unique<MapWriter>(dp_->maps(), dp_->dir());
  if (auto s = writer_->adopt(); !s) spdlog::warn("adopt previous state: {}", s.message);
  double adopt_ms = ms();
  reconciler_ = std::make_unique<Reconciler>(*writer_, ifindex_of);
  // VMs a previous run enforced win conflicts against newcomers; one whose
  // file is broken now keeps its claims (no newcomer takes its interface or
  // addresses) although it is not enforced.
  std::set<std::string> enforced;
  for (const auto& f : files.vms)
    if (f.vm && writer_->adopted_ifindex(name_id(f.vm->name))) enforced.insert(f.vm->name);
  reserved_ = previous_claims(files);
  sync_fleet_config();
  std::vector<VmSpec> none;
  fleet_admit(files, none, none);
  ReconcileResult r = reconciler_->reconcile(files, {}, enforced, reserved_);
  double reconcile_ms = ms();
  if (!fresh_maps)
    if (auto s = writer_->collect_garbage(); !s) spdlog::warn("garbage collection: {}", s.message);
  double collect_ms = ms();
  apply(r);
  sync_remote();
  spdlog::info(
      "start: programs loaded in {:.0f} ms, previous state adopted in {:.0f} ms, {} VMs written in {:.0f} ms, "
      "leftovers collected in {:.0f} ms, interfaces and nftables in {:.0f} ms",
      load_ms, adopt_ms, writer_->installed().size(), reconcile_ms, collect_ms, ms());
  Datapath::remove_stale_pins(dp_->dir());

  // Do not report ready while a known interface runs without its programs.
  auto deadline = Clock::now() + std::chrono::seconds(10);
  while (!unattached_.empty() && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    retry_attaches();
  }
  if (!unattached_.empty()) {
    for (const auto& [ifindex, a] : unattached_)
      spdlog::error("{}: cannot attach to ifindex {}: {}", a.owner, ifindex, a.error);
    spdlog::error("interfaces would run unenforced; not starting");
    return false;
  }
  sync_prefilter();
  sweep_pacing();
  apply_nft();
  publish_state();
  spdlog::info("enforcing {} VMs from {} ({} files refused; maps pinned under {})", in_force_.size(), config_dir_,
               rejected_.size(), pin_dir());
  return true;
}

void Daemon::link_changed(bool added, uint32_t ifindex, const std::string& name) {
  // An underlay interface came or went: the datapath's list of where remote
  // VMs' packets may arrive follows it.
  if (host_.fleet && std::count(host_.fleet->interfaces.begin(), host_.fleet->interfaces.end(), name))
    if (auto s = reconciler_->refresh_fleet_config(!writer_->remote().nets.empty()); !s)
      spdlog::error("datapath config: {}", s.message);
  if (const VmSpec* vm = vm_on(name)) {
    auto it = writer_->installed().find(vm->name);
    if (it == writer_->installed().end()) return;
    if (!added) {
      if (it->second.ifindex == ifindex) {
        if (auto s = writer_->unbind(vm->name); !s) spdlog::error("vm {}: {}", vm->name, s.message);
        Datapath::detach(dp_->dir(), ifindex);
        unattached_.erase(ifindex);
        actions_.rearm(vm->name);
        spdlog::info("vm {}: interface {} gone", vm->name, name);
        publish_state();
      }
      return;
    }
    if (it->second.ifindex == ifindex && dp_->attached(ifindex)) return;  // already enforced
    auto t0 = Clock::now();
    if (it->second.ifindex != ifindex) {
      if (auto s = writer_->bind(vm->name, ifindex); !s) {
        spdlog::error("vm {}: {} (interface attached anyway: it drops everything)", vm->name, s.message);
        (void)writer_->block(ifindex, name_id(vm->name));
      }
    }
    attach(ifindex, "vm " + vm->name);
    shape(*vm, false);
    actions_.rearm(vm->name);
    auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count();
    spdlog::info("vm {} enforced on {} (ifindex {}) {} us after the link event", vm->name, name, ifindex, us);
    publish_state();
    return;
  }
  if (!added) {
    if (writer_->is_blocked(ifindex)) {
      writer_->forget_blocked(ifindex);
      std::erase_if(removed_, [&](const auto& kv) { return kv.second.interface == name; });
      Datapath::detach(dp_->dir(), ifindex);
    }
    unattached_.erase(ifindex);
    return;
  }
  // An interface only a refused file names: it drops everything.
  if (const RejectedFile* r = rejected_on(name); r && !writer_->is_blocked(ifindex)) {
    if (auto s = writer_->block(ifindex, name_id(r->name.empty() ? r->file : r->name)); !s)
      spdlog::error("{}: no_policy on {}: {}", r->file, name, s.message);
    attach(ifindex, r->file + " (no_policy)");
    spdlog::warn("{}: interface {} appeared; it drops everything (the file was refused)", r->file, name);
  }
}

// The link monitor lost events: compare every link with what we know.
void Daemon::links_resynced(const std::vector<LinkMonitor::Link>& links) {
  spdlog::warn("link monitor: events lost; re-listed {} links", links.size());
  std::set<uint32_t> present;
  for (const auto& l : links) {
    present.insert(l.ifindex);
    link_changed(true, l.ifindex, l.name);
  }
  for (const auto& vm : in_force_) {
    auto it = writer_->installed().find(vm.name);
    if (it != writer_->installed().end() && it->second.ifindex && !present.count(it->second.ifindex))
      link_changed(false, it->second.ifindex, vm.interface);
  }
  std::vector<uint32_t> gone;
  for (const auto& [ifindex, slot] : writer_->blocked())
    if (!present.count(ifindex)) gone.push_back(ifindex);
  for (uint32_t ifindex : gone) link_changed(false, ifindex, "");
}

// Drain inotify: note the vms.d files named (*.json, not dot-files), or that
// something else changed (full reload). true when anything happened: temp
// files alone only move the scan time (reload() sees nothing named).
bool Daemon::note_file_events() {
  alignas(inotify_event) char buf[16384];
  bool due = false;
  ssize_t got;
  while ((got = read(inotify_.get(), buf, sizeof(buf))) > 0) {
    for (ssize_t off = 0; off < got;) {
      const auto* e = reinterpret_cast<const inotify_event*>(buf + off);
      off += static_cast<ssize_t>(sizeof(inotify_event) + e->len);
      std::string name = e->len ? std::string(e->name) : std::string();
      if (e->wd == vms_wd_ && !(e->mask & (IN_Q_OVERFLOW | IN_IGNORED | IN_ISDIR)) && !name.empty()) {
        if (!name.starts_with(".") && name.ends_with(".json")) changed_files_.insert(name);  // else a temp file
      } else {
        full_reload_ = true;  // host.json, vms.d itself, a lost event
      }
      due = true;
    }
  }
  events_read_ns_ = realtime_ns();
  return due;
}

// A reload after inotify named one file of an enforced VM whose claims stay
// the same (a policy change): read that file alone and write that VM alone
// (Reconciler::update_in_place). false: anything else; the caller reloads
// everything.
bool Daemon::reload_one_file(const std::string& name, const char* why) {
  auto t0 = Clock::now();
  const std::string path = config_dir_ + "/vms.d/" + name;
  auto cur = std::find_if(in_force_.begin(), in_force_.end(), [&](const VmSpec& v) { return v.file == path; });
  if (cur == in_force_.end()) return false;
  // What only a full reload does: retry installs that failed and interfaces
  // not attached, and notice a host.json change inotify did not report.
  if (!unattached_.empty()) return false;
  for (const auto& r : rejected_)
    if (r.file == path || r.name == cur->name || r.install_failed) return false;
  if (!spec_cache_.host_unchanged(config_dir_)) return false;
  VmFile f = spec_cache_.reread(path, host_);
  if (!f.vm) return false;  // errors: reported by the full reload
  bool changed = false;
  if (!reconciler_->update_in_place(*f.vm, *cur, host_, &changed)) return false;
  bool had_pacing = cur->rate.ingress_mbit != 0;
  *cur = std::move(*f.vm);
  if (changed) shape(*cur, had_pacing);
  scanned_ns_ = events_read_ns_;  // every change before then was in the events read
  double enforced_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  if (changed) {
    actions_.rearm(cur->name);
    removed_.erase(name_id(cur->name));
  }
  attach_missing({});  // as every reload does: programs someone removed come back
  apply_nft();         // a no-op unless its inputs changed or the last apply failed
  publish_state();
  count_reload();
  size_t kept =
      std::count_if(rejected_.begin(), rejected_.end(), [](const RejectedFile& r) { return r.kept_last_good; });
  spdlog::info(
      "reload ({}): {} VMs changed, 0 removed, {} kept at their last good policy, {} files refused (1 file "
      "parsed and its VM written in {:.1f} ms; state {:.1f} ms)",
      why, changed ? 1 : 0, kept, rejected_.size() - kept, enforced_ms,
      std::chrono::duration<double, std::milli>(Clock::now() - t0).count() - enforced_ms);
  return true;
}

void Daemon::reload(const char* why) {
  auto t = Clock::now();
  auto ms = [&t] {  // since the previous call
    auto now = Clock::now();
    double d = std::chrono::duration<double, std::milli>(now - t).count();
    t = now;
    return d;
  };
  std::set<std::string> named = std::move(changed_files_);
  changed_files_.clear();
  bool full = full_reload_;
  full_reload_ = false;
  if (!full && named.empty()) {
    // Only temp files changed: vms.d as read is still current (`wait`
    // compares the directory's mtime with this).
    scanned_ns_ = events_read_ns_;
    publish_state();
    return;
  }
  if (!full && !host_broken_ && named.size() == 1 && reload_one_file(*named.begin(), why)) return;
  scanned_ns_ = realtime_ns();
  SpecFiles files = read_spec_files(config_dir_, &spec_cache_);
  double read_ms = ms();
  host_broken_ = !files.host_errors.empty();
  if (!files.host_errors.empty()) {
    for (const auto& e : files.host_errors) std::fprintf(stderr, "%s\n", e.str().c_str());
    spdlog::error("reload ({}): host.json invalid, everything keeps its last good policy", why);
    count_reload();
    return;
  }
  bool prefiltered = host_.xdp_prefilter;
  host_ = files.host;
  listen_metrics();
  // A reserved claim lasts while only invalid files name its VM.
  std::erase_if(reserved_, [&](const VmSpec& vm) { return !only_broken_files_name(files, vm.name); });
  sync_fleet_config();
  std::vector<VmSpec> trimmed;
  const std::vector<VmSpec>& incumbents = fleet_admit(files, in_force_, trimmed);
  ReconcileResult r = reconciler_->reconcile(files, incumbents, {}, reserved_);
  double reconcile_ms = ms();
  apply(r);
  sync_remote();
  if (prefiltered != host_.xdp_prefilter) sync_prefilter();
  double apply_ms = ms();
  apply_nft();
  double nft_ms = ms();
  publish_state();
  count_reload();
  size_t kept =
      std::count_if(r.rejected.begin(), r.rejected.end(), [](const RejectedFile& f) { return f.kept_last_good; });
  spdlog::info(
      "reload ({}): {} VMs changed, {} removed, {} kept at their last good policy, {} files refused ({} files "
      "parsed in {:.1f} ms, maps written in {:.1f} ms, interfaces {:.1f} ms, nftables {:.1f} ms, state {:.1f} ms)",
      why, r.changed.size(), r.removed.size(), kept, r.rejected.size() - kept, spec_cache_.parsed_last(), read_ms,
      reconcile_ms, apply_ms, nft_ms, ms());
  trim_at_ = Clock::now() + std::chrono::seconds(2);
}

// Events the datapath did not send (over the per-VM budget, or ring buffer
// full) are counted in the kernel; say how many, once a second per VM.
void Daemon::report_lost_events() {
  for (uint32_t id : events_.take_active_vms()) {
    const VmSpec* vm = vm_by_id(id);
    if (!vm) continue;
    auto it = writer_->installed().find(vm->name);
    if (it == writer_->installed().end()) continue;
    vmfence_counters c{};
    if (!read_counters(dp_->maps(), it->second.slot, c)) continue;
    auto& seen = reported_[id];
    uint64_t suppressed = c.events_suppressed - std::min<uint64_t>(seen.first, c.events_suppressed);
    uint64_t lost = c.events_lost - std::min<uint64_t>(seen.second, c.events_lost);
    seen = {c.events_suppressed, c.events_lost};
    if (!suppressed && !lost) continue;
    std::string msg = fmt::format(
        "vm {}: {} violation events suppressed (over the budget of {}/s), {} lost (ring "
        "buffer full); drop counters stay exact (vmfence status)",
        vm->name, suppressed, VMFENCE_DEFAULT_EVENT_BUDGET, lost);
    spdlog::warn("{}", msg);
    journal_.notice(4, msg, vm->name);
  }
}

// A VM reached its threshold (its event arrived): terminate it, if that is
// its action.
void Daemon::on_trigger(const VmSpec& vm, const Violation& v, uint64_t packet_ns) {
  if (vm.on_violation.action == Action::alert) {
    if (metrics_) metrics_->count_action(vm.name, "alert", true);  // reported (log, journald): nothing else to do
    return;
  }
  if (vm.on_violation.action != Action::terminate) return;
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);  // the datapath's clock
  uint64_t now = static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
  if (actions_.terminate(vm.on_violation, v))
    spdlog::warn("terminating vm={} reason={} ({:.3f} ms after the packet)", v.vm, v.reason, (now - packet_ns) / 1e6);
}

// The quarantine flag in the kernel is the source of truth: a VM that
// reached its threshold is terminated even when its event was lost (ring
// buffer full). The runner starts one termination per incident.
void Daemon::act_on_quarantine() {
  for (const auto& vm : in_force_) {
    if (vm.on_violation.action != Action::terminate) continue;
    auto it = writer_->installed().find(vm.name);
    if (it == writer_->installed().end() || !it->second.ifindex) continue;
    vmfence_state st{};
    if (!read_state(dp_->maps(), it->second.slot, st) || !st.quarantined) continue;
    Violation v;
    v.vm = vm.name;
    v.interface = vm.interface;
    v.reason = "quarantined";
    v.direction = "from_vm";
    v.mode = mode_name(vm.mode);
    v.trigger = v.quarantined = true;
    if (actions_.terminate(vm.on_violation, v))
      spdlog::warn("terminating vm={}: quarantined in the kernel (its violation event was not received)", vm.name);
  }
}

// Bounded state: say so before a map runs out. Counts come from the writer
// (entries it wrote) and from the last flow sweep: no walk of a map here.
void Daemon::check_fill_levels() {
  for (const auto& [name, vm] : writer_->installed()) {
    auto f = flow_use_.find(vm.slot);
    if (f == flow_use_.end() || !f->second.max_entries) continue;
    if (f->second.entries * 10 >= static_cast<size_t>(f->second.max_entries) * 9) {
      std::string msg = fmt::format(
          "vm {}: flow table {:.0f}% full ({} of {} flows, limits.flows); new flows are "
          "dropped as flow_limit",
          name, 100.0 * f->second.entries / f->second.max_entries, f->second.entries, f->second.max_entries);
      spdlog::warn("{}", msg);
      journal_.notice(4, msg, name);
    }
  }
  const std::pair<MapId, int> maps[] = {{MapId::vms, dp_->maps().vms.get()},
                                        {MapId::owners, dp_->maps().owners.get()},
                                        {MapId::owner_nets, dp_->maps().owner_nets.get()},
                                        {MapId::gateways, dp_->maps().gateways.get()}};
  for (const auto& [id, fd] : maps) {
    bpf_map_info info{};
    uint32_t len = sizeof(info);
    if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0 || !info.max_entries) continue;
    size_t n = writer_->entries(id);
    if (n * 10 >= static_cast<size_t>(info.max_entries) * 9) {
      std::string msg = fmt::format("map {} is {:.0f}% full ({} of {} entries)", map_id_name(id),
                                    100.0 * n / info.max_entries, n, info.max_entries);
      spdlog::warn("{}", msg);
      journal_.notice(4, msg, "");
    }
  }
}

int Daemon::run() {
  if (!start()) return 1;
  enum : uint64_t { kSignal, kEvents, kLinks, kInotify, kNft, kTimer, kMonitor };

  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGHUP);
  if (sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) spdlog::error("sigprocmask: {}", std::strerror(errno));
  signal_fd_.reset(signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!signal_fd_.valid() || !watch(signal_fd_.get(), kSignal)) return 1;
  metrics_server_ = std::make_unique<MetricsServer>(metrics_);
  listen_metrics();
  if (!watch(inotify_.get(), kInotify) || !watch(links_->fd(), kLinks)) return 1;
  // The fleet's threads start with signals blocked (SIGTERM is the loop's).
  fleet_started_ = true;
  if (fleet_) {
    fleet_->start();
    watch(fleet_->wake_fd(), kFleetTag);
  }

  if (auto s = events_.open(dp_->maps().events.get()); !s)
    spdlog::error("{} (violations are still dropped and counted; the quarantine scan still terminates)", s.message);
  else
    watch(events_.fd(), kEvents);
  // After start(): the agent lock is ours, so a socket already there is a
  // dead daemon's.
  if (auto s = monitor_.open(monitor_socket_path()); !s)
    spdlog::warn("{}: `vmfence monitor` unavailable", s.message);
  else if (watch(monitor_.fd(), kMonitor))
    events_.set_monitor(&monitor_);

  if (auto r = nft_monitor_.open(); r)
    watch(nft_monitor_.fd(), kNft);
  else
    spdlog::warn("nftables monitor: {}; relying on the periodic check", r.message);

  timer_.reset(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  itimerspec its{{0, 100 * 1000 * 1000}, {0, 100 * 1000 * 1000}};
  if (!timer_.valid() || timerfd_settime(timer_.get(), 0, &its, nullptr) != 0 || !watch(timer_.get(), kTimer)) {
    spdlog::error("timerfd: {}", std::strerror(errno));
    return 1;
  }
  // Files written between the scan in start() and now were seen by inotify
  // (armed before the scan); reload once to be sure nothing slipped through.
  reload("start");

  if (sd_notify(0, "READY=1") < 0) spdlog::warn("sd_notify READY=1 failed");
  auto last_check = Clock::now();
  auto last_report = last_check;
  auto last_sweep = last_check;
  while (running_) {
    epoll_event evs[16];
    int timeout = -1;
    if (reload_pending_) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(reload_at_ - Clock::now());
      timeout = std::max<int>(0, static_cast<int>(left.count()));
    }
    int n = epoll_wait(epoll_.get(), evs, 16, timeout);
    if (n < 0) {
      if (errno == EINTR) continue;
      spdlog::error("epoll_wait: {}", std::strerror(errno));
      return 1;
    }
    if (reload_pending_ && Clock::now() >= reload_at_) {
      reload_pending_ = false;
      reload(fleet_ && changed_files_.empty() ? "fleet view or spec files changed" : "spec files changed");
    }
    for (int i = 0; i < n; ++i) {
      switch (evs[i].data.u64) {
        case kSignal: {
          signalfd_siginfo si{};
          while (read(signal_fd_.get(), &si, sizeof(si)) == sizeof(si)) {
            if (si.ssi_signo == SIGHUP) {
              sd_notify(0, "RELOADING=1");
              full_reload_ = true;
              spec_cache_ = SpecFileCache();  // SIGHUP re-reads every file
              reload("SIGHUP");
              sd_notify(0, "READY=1");
            } else {
              spdlog::info("signal {}: exiting; enforcement stays in the kernel", si.ssi_signo);
              running_ = false;
            }
          }
          break;
        }
        case kEvents:
          events_.consume();
          break;
        case kMonitor:
          monitor_.handle_ready();
          break;
        case kFleetTag:
          on_fleet_wake();
          break;
        case kLinks:
          if (auto s = links_->handle_readable(); !s) spdlog::error("link monitor: {}", s.message);
          break;
        case kInotify: {
          if (note_file_events()) {
            // Writers replace several files at once: settle briefly first.
            reload_pending_ = true;
            reload_at_ = Clock::now() + std::chrono::milliseconds(5);
          }
          break;
        }
        case kNft:
          nft_monitor_.handle_readable(Spec{host_, in_force_});  // logs what it found and repaired
          break;
        case kTimer: {
          uint64_t ticks;
          (void)!read(timer_.get(), &ticks, sizeof(ticks));
          actions_.poll();
          if (!unattached_.empty()) retry_attaches();
          if (links_->resync_pending()) (void)links_->resync();  // a failed re-list: again
          auto now = Clock::now();
          if (trim_at_ && now > *trim_at_ && !reload_pending_) {
            trim_at_.reset();
            malloc_trim(0);
          }
          if (now - last_report > std::chrono::seconds(1)) {
            last_report = now;
            report_lost_events();
            act_on_quarantine();
            if (fleet_ && !fleet_view_.synced) sync_remote();  // the restart hold may have run out
            publish_fleet(false);
          }
          // Idle flows are already ignored by the datapath; this frees
          // their room in the VM's table.
          if (now - last_sweep > std::chrono::seconds(5)) {
            last_sweep = now;
            flow_use_.clear();
            writer_->sweep_flows(datapath_config(host_, in_force_), &flow_use_);
          }
          // The monitor sees edits as they happen; this only covers lost
          // notifications (a dump of the whole table: not every tick).
          if (now - last_check > std::chrono::seconds(30)) {
            last_check = now;
            check_fill_levels();
            if (!metrics_error_.empty()) listen_metrics();
            if (!nft::table_intact()) {
              spdlog::warn("nftables: table inet vmfence missing or changed; restoring");
              nft_applied_ = false;
              apply_nft();
            }
          }
          break;
        }
      }
    }
  }
  return 0;
}

}  // namespace

int run_daemon(const std::string& config_dir) {
  Daemon d(config_dir);
  return d.run();
}

}  // namespace vmfence
