#include "agent/daemon/daemon.h"

#include <bpf/bpf.h>
#include <fcntl.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <netlink/msg.h>
#include <netlink/netlink.h>
#include <netlink/socket.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "agent/actions/actions.h"
#include "agent/events/events.h"
#include "agent/events/journal.h"
#include "agent/datapath/loader.h"
#include "agent/nft/nft.h"
#include "agent/spec/spec.h"
#include "agent/daemon/state_file.h"
#include "maps/compiler.h"
#include "maps/pinned_maps.h"

namespace vmfence {

namespace {

// Element-wise byte equality of two vectors of map keys / values.
template <typename T>
bool same_bytes(const std::vector<T>& x, const std::vector<T>& y) {
  return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(T)) == 0);
}

bool same_addresses(const VmPlan& a, const VmPlan& b) {
  return same_bytes(a.host_addresses, b.host_addresses) && same_bytes(a.net_addresses, b.net_addresses);
}

bool same_plan(const VmPlan& a, const VmPlan& b) {
  return a.interface == b.interface && std::memcmp(&a.vm, &b.vm, sizeof(a.vm)) == 0 && same_bytes(a.egress, b.egress) &&
         same_bytes(a.ingress, b.ingress) && same_bytes(a.gateways, b.gateways) && same_addresses(a, b);
}

// The datapath's global knobs for a set of VMs.
vmfence_config datapath_config(const HostSpec& host, const std::vector<VmSpec>& vms) {
  vmfence_config cfg{};
  cfg.event_budget = VMFENCE_DEFAULT_EVENT_BUDGET;
  cfg.budget_window_ns = VMFENCE_DEFAULT_BUDGET_WINDOW_NS;
  cfg.tcp_timeout_s = host.flow_timeouts.tcp_s;
  cfg.udp_timeout_s = host.flow_timeouts.udp_s;
  cfg.icmp_timeout_s = host.flow_timeouts.icmp_s;
  for (const auto& vm : vms)
    for (const auto& a : vm.addresses)
      if (a.mapped_prefix_len() < 128) cfg.flags |= VMFENCE_CFG_F_OWNER_NETS;
  return cfg;
}

class Daemon {
 public:
  explicit Daemon(std::string config_dir)
      : config_dir_(std::move(config_dir)),
        actions_(&journal_),
        events_(journal_, actions_, [this](uint32_t id) { return vm_by_id(id); }) {}
  ~Daemon();
  int run();

 private:
  bool start();
  void reload(const char* why);
  void apply_vm(const VmSpec& vm, const VmPlan& plan);
  void on_link_event();
  void link_changed(int type, uint32_t ifindex, const std::string& name);
  void apply_nft();
  void publish_state();
  void report_lost_events();
  void check_fill_levels();
  const VmSpec* vm_by_id(uint32_t id) const;
  static int on_link_msg(nl_msg* msg, void* arg);

  std::string config_dir_;
  Spec spec_;                           // the VMs in force (last good of each)
  std::map<uint32_t, size_t> by_id_;    // vm_id -> index in spec_.vms
  std::map<uint32_t, VmSpec> removed_;  // specs removed while their interface remained
  Journal journal_;
  ActionRunner actions_;
  EventConsumer events_;
  std::unique_ptr<Datapath> dp_;
  std::unique_ptr<MapWriter> writer_;
  nft::Monitor nft_monitor_;
  nl_sock* link_sock_ = nullptr;
  Fd epoll_, signal_fd_, inotify_, timer_, lock_;
  bool reload_pending_ = false;
  std::chrono::steady_clock::time_point reload_at_{};
  bool running_ = true;
  bool nft_applied_ = false;
  uint64_t nft_fingerprint_ = 0;
  std::map<uint32_t, std::pair<uint64_t, uint64_t>> reported_;  // vm_id -> suppressed, lost
};

Daemon::~Daemon() {
  if (link_sock_) nl_socket_free(link_sock_);
}

const VmSpec* Daemon::vm_by_id(uint32_t id) const {
  if (auto it = by_id_.find(id); it != by_id_.end()) return &spec_.vms[it->second];
  if (auto it = removed_.find(id); it != removed_.end()) return &it->second;
  return nullptr;
}

void Daemon::apply_vm(const VmSpec& vm, const VmPlan& plan) {
  uint32_t ifindex = if_nametoindex(vm.interface.c_str());
  if (auto s = writer_->install(plan, ifindex); !s) {
    spdlog::error("{}: install policy of vm {}: {}", vm.file, vm.name, s.message);
    // Fail closed: the programs still go on the interface; with no VM entry
    // (or its previous one) they drop what the policy cannot vouch for.
    if (ifindex) dp_->attach(ifindex);
    return;
  }
  if (ifindex) {
    if (auto s = dp_->attach(ifindex); !s)
      spdlog::error("vm {}: attach to {}: {}", vm.name, vm.interface, s.message);
    else
      spdlog::info("vm {} enforced on {} (ifindex {}, mode {})", vm.name, vm.interface, ifindex, mode_name(vm.mode));
  } else {
    spdlog::info("vm {}: interface {} not present yet; attaching when it appears", vm.name, vm.interface);
  }
}

void Daemon::apply_nft() {
  nft::Ruleset rs = nft::build_ruleset(spec_);
  uint64_t fp = rs.fingerprint();
  if (nft_applied_ && fp == nft_fingerprint_) return;  // unchanged; the monitor guards against edits
  if (auto r = nft::apply(rs); !r) {
    spdlog::error("nftables: {} (the previous ruleset stays in force)", r.message);
    return;
  }
  nft_applied_ = true;
  nft_fingerprint_ = fp;
}

void Daemon::publish_state() {
  std::vector<StateVm> vms;
  for (const auto& vm : spec_.vms) {
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
    }
    vms.push_back(s);
  }
  if (auto st = write_state_file(run_dir(), config_dir_, vms); !st) spdlog::warn("{}", st.message);
}

bool Daemon::start() {
  SpecLoad load = load_spec(config_dir_);
  Plan plan = compile(load.spec);
  if (!load.ok() || !plan.ok()) {
    for (const auto& e : load.errors) fprintf(stderr, "%s\n", e.str().c_str());
    for (const auto& e : plan.errors) fprintf(stderr, "%s\n", e.str().c_str());
    spdlog::error("{}: invalid configuration, nothing changed", config_dir_);
    return false;
  }
  // One agent per pin dir: a second one would fight over the same maps.
  std::error_code ec;
  std::filesystem::create_directories(run_dir(), ec);
  std::string lock_path = run_dir() + "/agent.lock";
  lock_.reset(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!lock_.valid() || flock(lock_.get(), LOCK_EX | LOCK_NB) != 0) {
    spdlog::error("another vmfence agent holds {} (pin dir {}); not starting", lock_path, pin_dir());
    return false;
  }
  spec_ = std::move(load.spec);
  for (size_t i = 0; i < spec_.vms.size(); ++i) by_id_[name_id(spec_.vms[i].name)] = i;

  route_libbpf_log();
  if (auto s = Datapath::load(pin_dir(), dp_); !s) {
    spdlog::error("{}", s.message);
    return false;
  }
  writer_ = std::make_unique<MapWriter>(dp_->maps());
  writer_->adopt();
  writer_->write_config(datapath_config(spec_.host, spec_.vms));
  for (size_t i = 0; i < spec_.vms.size(); ++i) apply_vm(spec_.vms[i], plan.vms[i]);
  writer_->collect_garbage();
  Datapath::remove_stale_pins(dp_->dir());
  apply_nft();
  publish_state();
  spdlog::info("enforcing {} VMs from {} (maps pinned under {})", spec_.vms.size(), config_dir_, pin_dir());
  return true;
}

int Daemon::on_link_msg(nl_msg* msg, void* arg) {
  auto* self = static_cast<Daemon*>(arg);
  nlmsghdr* h = nlmsg_hdr(msg);
  if (h->nlmsg_type != RTM_NEWLINK && h->nlmsg_type != RTM_DELLINK) return NL_OK;
  auto* ifi = static_cast<ifinfomsg*>(nlmsg_data(h));
  nlattr* tb[IFLA_MAX + 1];
  if (nlmsg_parse(h, sizeof(*ifi), tb, IFLA_MAX, nullptr) < 0 || !tb[IFLA_IFNAME]) return NL_OK;
  self->link_changed(h->nlmsg_type, static_cast<uint32_t>(ifi->ifi_index), nla_get_string(tb[IFLA_IFNAME]));
  return NL_OK;
}

void Daemon::link_changed(int type, uint32_t ifindex, const std::string& name) {
  for (const auto& vm : spec_.vms) {
    if (vm.interface != name) continue;
    auto it = writer_->installed().find(vm.name);
    if (it == writer_->installed().end()) return;
    if (type == RTM_DELLINK) {
      if (it->second.ifindex == ifindex) {
        writer_->unbind(vm.name);
        Datapath::detach(dp_->dir(), ifindex);
        actions_.rearm(vm.name);
        spdlog::info("vm {}: interface {} gone", vm.name, name);
        publish_state();
      }
      return;
    }
    if (it->second.ifindex == ifindex) return;  // already enforced
    auto t0 = std::chrono::steady_clock::now();
    if (auto s = writer_->bind(vm.name, ifindex); !s) {
      spdlog::error("vm {}: {} (interface attached anyway: it drops everything)", vm.name, s.message);
      dp_->attach(ifindex);
      return;
    }
    if (auto s = dp_->attach(ifindex); !s) {
      spdlog::error("vm {}: attach to {}: {}", vm.name, name, s.message);
      return;
    }
    actions_.rearm(vm.name);
    auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
    spdlog::info("vm {} enforced on {} (ifindex {}) {} us after the link event", vm.name, name, ifindex, us);
    publish_state();
    return;
  }
  if (type == RTM_DELLINK && writer_->is_orphaned(ifindex)) {
    writer_->forget_orphan(ifindex);
    std::erase_if(removed_, [&](const auto& kv) { return kv.second.interface == name; });
    Datapath::detach(dp_->dir(), ifindex);
  }
}

void Daemon::on_link_event() { nl_recvmsgs_default(link_sock_); }

void Daemon::reload(const char* why) {
  SpecLoad load = load_spec(config_dir_);
  std::set<std::string> bad_files;
  for (const auto& e : load.errors) {
    fprintf(stderr, "%s\n", e.str().c_str());
    bad_files.insert(e.file);
  }
  if (bad_files.count(load.spec.host.file) || bad_files.count(config_dir_ + "/host.json")) {
    spdlog::error("reload ({}): host.json invalid, everything keeps its last good policy", why);
    return;
  }
  // The VMs in force after this reload: every valid file, and the last good
  // policy of VMs whose file is invalid now.
  std::vector<const VmSpec*> fresh, kept_old;
  std::set<std::string> seen;
  for (const auto& vm : load.spec.vms)
    if (!bad_files.count(vm.file)) {
      fresh.push_back(&vm);
      seen.insert(vm.name);
    }
  for (const auto& old : spec_.vms)
    if (!seen.count(old.name) && bad_files.count(old.file)) kept_old.push_back(&old);
  std::vector<VmSpec> in_force;
  for (const auto* vm : fresh) in_force.push_back(*vm);
  for (const auto* vm : kept_old) in_force.push_back(*vm);
  std::vector<Cidr> nets = vm_address_space(in_force);

  // Before any install: a VM that owns a prefix needs the datapath to consult
  // the prefix trie from its first packet on.
  writer_->write_config(datapath_config(load.spec.host, in_force));

  Spec next;
  next.host = load.spec.host;
  int changed = 0, removed = 0, kept = 0;
  seen.clear();
  // Two passes: VMs whose addresses stay first (their policies learn any new
  // VM address space), then new or re-addressed VMs: no VM's policy is ever
  // older than an address that became a VM's.
  std::vector<std::pair<const VmSpec*, VmPlan>> moved;
  auto install = [&](const VmSpec* vm, const VmPlan& plan) {
    apply_vm(*vm, plan);
    actions_.rearm(vm->name);
    ++changed;
  };
  for (const auto* vm : fresh) {
    std::vector<SpecError> errs;
    VmPlan plan = compile_vm(*vm, load.spec.host, nets, errs);
    if (!errs.empty()) {
      for (const auto& e : errs) fprintf(stderr, "%s\n", e.str().c_str());
      bad_files.insert(vm->file);
      continue;
    }
    seen.insert(vm->name);
    removed_.erase(name_id(vm->name));
    next.vms.push_back(*vm);
    auto it = writer_->installed().find(vm->name);
    if (it != writer_->installed().end() && same_plan(it->second.plan, plan)) continue;
    if (it == writer_->installed().end() || !same_addresses(it->second.plan, plan))
      moved.emplace_back(vm, std::move(plan));
    else
      install(vm, plan);
  }
  // VMs no longer in a valid file: keep those whose file is invalid (their
  // policy, recompiled if the VM address space moved), remove the rest.
  for (const auto& old : spec_.vms) {
    if (seen.count(old.name)) continue;
    if (bad_files.count(old.file)) {
      std::vector<SpecError> errs;
      VmPlan plan = compile_vm(old, spec_.host, nets, errs);
      auto it = writer_->installed().find(old.name);
      if (errs.empty() && it != writer_->installed().end() && !same_plan(it->second.plan, plan)) apply_vm(old, plan);
      next.vms.push_back(old);
      ++kept;
      continue;
    }
    writer_->remove(old.name);
    removed_[name_id(old.name)] = old;  // its interface still reports drops under its name
    ++removed;
    spdlog::warn("vm {}: spec removed; its interface (if present) now drops everything", old.name);
  }
  for (const auto& [vm, plan] : moved) install(vm, plan);
  std::sort(next.vms.begin(), next.vms.end(), [](const VmSpec& a, const VmSpec& b) { return a.name < b.name; });
  spec_ = std::move(next);
  by_id_.clear();
  for (size_t i = 0; i < spec_.vms.size(); ++i) by_id_[name_id(spec_.vms[i].name)] = i;
  apply_nft();
  publish_state();
  spdlog::info("reload ({}): {} VMs changed, {} removed, {} kept at their last good policy", why, changed, removed,
               kept);
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

// Bounded state: say so before a map runs out. The policy and VM maps refuse
// new entries when full (the change fails, the VM keeps what it had); a VM's
// full flow table refuses its new flows (flow_limit): warn at 90%.
void Daemon::check_fill_levels() {
  for (const auto& [name, vm] : writer_->installed()) {
    TableFill f = flow_table_fill(dp_->maps(), vm.slot);
    if (f.max_entries && f.entries * 10 >= static_cast<size_t>(f.max_entries) * 9) {
      std::string msg = fmt::format(
          "vm {}: flow table {:.0f}% full ({} of {} flows, limits.flows); new flows are "
          "dropped as flow_limit",
          name, 100.0 * f.entries / f.max_entries, f.entries, f.max_entries);
      spdlog::warn("{}", msg);
      journal_.notice(4, msg, name);
    }
  }
  dp_->maps().for_each([&](const char* name, int fd) {
    bpf_map_info info{};
    uint32_t len = sizeof(info);
    if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) return;
    if (info.type == BPF_MAP_TYPE_RINGBUF || info.type == BPF_MAP_TYPE_ARRAY ||
        info.type == BPF_MAP_TYPE_PERCPU_ARRAY || info.type == BPF_MAP_TYPE_ARRAY_OF_MAPS || info.max_entries == 0)
      return;
    size_t n = count_entries(fd, info.key_size);
    if (n * 10 >= static_cast<size_t>(info.max_entries) * 9) {
      std::string msg = fmt::format("map {} is {:.0f}% full ({} of {} entries)", name, 100.0 * n / info.max_entries, n,
                                    info.max_entries);
      spdlog::warn("{}", msg);
      journal_.notice(4, msg, "");
    }
  });
}

int Daemon::run() {
  if (!start()) return 1;

  epoll_.reset(epoll_create1(EPOLL_CLOEXEC));
  auto watch = [&](int fd, uint64_t tag) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = tag;
    epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev);
  };
  enum : uint64_t { kSignal, kEvents, kLinks, kInotify, kNft, kTimer };

  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGHUP);
  sigprocmask(SIG_BLOCK, &mask, nullptr);
  signal_fd_.reset(signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
  watch(signal_fd_.get(), kSignal);

  if (auto s = events_.open(dp_->maps().events.get()); !s)
    spdlog::error("{}", s.message);
  else
    watch(events_.fd(), kEvents);

  link_sock_ = nl_socket_alloc();
  nl_socket_disable_seq_check(link_sock_);
  nl_socket_modify_cb(link_sock_, NL_CB_VALID, NL_CB_CUSTOM, &Daemon::on_link_msg, this);
  if (nl_connect(link_sock_, NETLINK_ROUTE) == 0 && nl_socket_add_membership(link_sock_, RTNLGRP_LINK) == 0) {
    nl_socket_set_nonblocking(link_sock_);
    watch(nl_socket_get_fd(link_sock_), kLinks);
  } else {
    spdlog::error("link monitor: cannot subscribe to RTNLGRP_LINK; new interfaces are not attached");
  }
  // Interfaces that appeared between start() and the subscription.
  for (const auto& vm : spec_.vms)
    if (uint32_t idx = if_nametoindex(vm.interface.c_str())) link_changed(RTM_NEWLINK, idx, vm.interface);

  inotify_.reset(inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
  std::filesystem::create_directories(config_dir_ + "/vms.d");
  inotify_add_watch(inotify_.get(), (config_dir_ + "/vms.d").c_str(),
                    IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE);
  inotify_add_watch(inotify_.get(), config_dir_.c_str(), IN_CLOSE_WRITE | IN_MOVED_TO);
  watch(inotify_.get(), kInotify);

  if (auto r = nft_monitor_.open(); r)
    watch(nft_monitor_.fd(), kNft);
  else
    spdlog::warn("nftables monitor: {}; relying on the periodic check", r.message);

  timer_.reset(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  itimerspec its{{0, 100 * 1000 * 1000}, {0, 100 * 1000 * 1000}};
  timerfd_settime(timer_.get(), 0, &its, nullptr);
  watch(timer_.get(), kTimer);

  sd_notify(0, "READY=1");
  auto last_check = std::chrono::steady_clock::now();
  auto last_report = last_check;
  auto last_sweep = last_check;
  while (running_) {
    epoll_event evs[16];
    int timeout = -1;
    if (reload_pending_) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(reload_at_ - std::chrono::steady_clock::now());
      timeout = std::max<int>(0, static_cast<int>(left.count()));
    }
    int n = epoll_wait(epoll_.get(), evs, 16, timeout);
    if (reload_pending_ && std::chrono::steady_clock::now() >= reload_at_) {
      reload_pending_ = false;
      reload("spec files changed");
    }
    for (int i = 0; i < n; ++i) {
      switch (evs[i].data.u64) {
        case kSignal: {
          signalfd_siginfo si{};
          while (read(signal_fd_.get(), &si, sizeof(si)) == sizeof(si)) {
            if (si.ssi_signo == SIGHUP) {
              sd_notify(0, "RELOADING=1");
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
        case kLinks:
          on_link_event();
          break;
        case kInotify: {
          char buf[4096];
          while (read(inotify_.get(), buf, sizeof(buf)) > 0) {
          }
          // Writers replace several files at once: settle briefly first.
          reload_pending_ = true;
          reload_at_ = std::chrono::steady_clock::now() + std::chrono::milliseconds(5);
          break;
        }
        case kNft:
          nft_monitor_.handle_readable(spec_);  // logs what it found and repaired
          break;
        case kTimer: {
          uint64_t ticks;
          (void)!read(timer_.get(), &ticks, sizeof(ticks));
          actions_.poll();
          auto now = std::chrono::steady_clock::now();
          if (now - last_report > std::chrono::seconds(1)) {
            last_report = now;
            report_lost_events();
          }
          // Idle flows are already ignored by the datapath; this frees
          // their room in the VM's table.
          if (now - last_sweep > std::chrono::seconds(5)) {
            last_sweep = now;
            writer_->sweep_flows(datapath_config(spec_.host, spec_.vms));
          }
          // The monitor sees edits as they happen; this only covers lost
          // notifications (a dump of the whole table: not every tick).
          if (now - last_check > std::chrono::seconds(30)) {
            last_check = now;
            check_fill_levels();
            if (!nft::table_intact()) {
              spdlog::warn("nftables: table inet vmfence missing or changed; restoring");
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
