// Harness of the BPF program tests (and the benchmark): a private network
// namespace with TAP interfaces, a datapath loaded fresh under a unique pin
// dir, VMs seeded through the agent's own parser, compiler and MapWriter, and
// BPF_PROG_TEST_RUN on the two TC programs.
//
// Needs root and the kernel (BPF, bpffs, a netns of its own). Without them the
// tests skip, except in CI (tests/common/ci.h) where they fail: CI never skips
// silently.
#pragma once

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "agent/datapath/loader.h"
#include "agent/spec/spec.h"
#include "maps/compiler.h"
#include "maps/pinned_maps.h"
#include "tests/bpf/packet.h"
#include "tests/common/ci.h"
#include "vmfence_abi.h"

namespace vmfence::test {

constexpr int kPass = -1;  // TC_ACT_UNSPEC
constexpr int kDrop = 2;   // TC_ACT_SHOT

// The suite's one CI gate (CI set to anything but "", "0" or "false").
using ::vmfence::testing::in_ci;

// The process's private network namespace (entered once, on first use) and
// the TAPs made in it. TAPs give VMs distinct, existing ifindexes, which
// BPF_PROG_TEST_RUN requires (ENODEV otherwise).
class TestNet {
 public:
  static TestNet& get() {
    static TestNet net;
    return net;
  }
  // Empty when the kernel tier can run; else why not.
  const std::string& unavailable() const { return why_; }

  // ifindex of a TAP named `name`, created on first use; 0 on failure.
  uint32_t tap(const std::string& name) {
    if (!why_.empty()) return 0;
    if (unsigned idx = if_nametoindex(name.c_str())) return idx;
    std::string cmd = "ip tuntap add dev " + name + " mode tap >/dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0) return 0;
    return if_nametoindex(name.c_str());
  }

 private:
  TestNet() {
    if (geteuid() != 0) {
      why_ = "needs root: BPF_PROG_TEST_RUN, bpffs pins and a private netns";
      return;
    }
    // Only this process sees the TAPs; they vanish with it.
    if (unshare(CLONE_NEWNET) != 0) {
      why_ = std::string("unshare(CLONE_NEWNET): ") + std::strerror(errno);
      return;
    }
  }
  std::string why_;
};

// GTEST_SKIP / FAIL when the kernel tier cannot run here.
#define VMFENCE_REQUIRE_KERNEL()                                                           \
  do {                                                                                     \
    const std::string& why_ = ::vmfence::test::TestNet::get().unavailable();               \
    if (!why_.empty()) {                                                                   \
      if (::vmfence::test::in_ci()) FAIL() << "kernel tier cannot run under CI: " << why_; \
      GTEST_SKIP() << why_;                                                                \
    }                                                                                      \
  } while (0)

struct RunResult {
  int err = 0;            // errno of BPF_PROG_TEST_RUN, 0 = ran
  int retval = 0;         // the program's return (of the last repetition)
  uint32_t duration = 0;  // ns per repetition, as the kernel measured it
};

// Run a TC program on one frame as if it came through `ifindex`.
// `mark`: skb->mark as the hook would see it (VMFENCE_MARK_FROM_VM on a
// packet another VM's from_vm passed). `ingress_ifindex`: the interface a
// forwarded packet entered the host on (skb->skb_iif).
inline RunResult test_run(int prog_fd, uint32_t ifindex, const std::vector<uint8_t>& frame, int repeat = 1,
                          uint32_t mark = 0, uint32_t ingress_ifindex = 0) {
  __sk_buff ctx{};
  ctx.ifindex = ifindex;
  ctx.mark = mark;
  ctx.ingress_ifindex = ingress_ifindex;
  bpf_test_run_opts o{};
  o.sz = sizeof(o);
  o.data_in = frame.data();
  o.data_size_in = static_cast<uint32_t>(frame.size());
  o.ctx_in = &ctx;
  o.ctx_size_in = sizeof(ctx);
  o.repeat = repeat;
  RunResult r;
  if (bpf_prog_test_run_opts(prog_fd, &o) != 0) {
    r.err = errno;
    return r;
  }
  r.retval = static_cast<int>(o.retval);
  r.duration = o.duration;
  return r;
}

constexpr int kXdpDrop = 1;  // XDP_DROP
constexpr int kXdpPass = 2;  // XDP_PASS

// Run the XDP pre-filter on one frame as if the VM sent it through `ifindex`.
inline RunResult test_run_xdp(int prog_fd, uint32_t ifindex, const std::vector<uint8_t>& frame) {
  xdp_md ctx{};
  ctx.data_end = static_cast<uint32_t>(frame.size());
  ctx.ingress_ifindex = ifindex;
  bpf_test_run_opts o{};
  o.sz = sizeof(o);
  o.data_in = frame.data();
  o.data_size_in = static_cast<uint32_t>(frame.size());
  o.ctx_in = &ctx;
  o.ctx_size_in = sizeof(ctx);
  o.repeat = 1;
  RunResult r;
  if (bpf_prog_test_run_opts(prog_fd, &o) != 0) {
    r.err = errno;
    return r;
  }
  r.retval = static_cast<int>(o.retval);
  return r;
}

// Parse text with the agent's parser; a parse error is a test bug.
inline HostSpec host_spec(const std::string& json) {
  std::vector<SpecError> errors;
  HostSpec h = parse_host("host.json", json, errors);
  if (!errors.empty()) throw std::invalid_argument("host.json: " + errors.front().str());
  return h;
}

inline VmSpec vm_spec(const std::string& json, const HostSpec& host) {
  std::vector<SpecError> errors;
  // How to terminate is host.json's; the fixtures' hosts say nothing, so
  // a VM asking for terminate gets a harmless command.
  ViolationPolicy defaults = host.on_violation;
  if (defaults.command.empty() && defaults.systemd_unit.empty() && defaults.qmp_socket.empty())
    defaults.command = {"true"};
  auto vm = parse_vm("vms.d/test.json", json, defaults, errors);
  if (!vm || !errors.empty())
    throw std::invalid_argument("VM spec: " + (errors.empty() ? std::string("?") : errors.front().str()) + "\n" + json);
  return *vm;
}

// One loaded datapath with its pinned maps under a directory of its own,
// seeded with a host and VMs as the daemon would. Removes its pins on exit.
class World {
 public:
  ~World() {
    if (rb_) ring_buffer__free(rb_);
    tap_fds_.clear();
    if (dp_)
      for (const auto& [ifindex, vm] : read_vms(dp_->maps())) Datapath::detach(dir_, ifindex);
    writer_.reset();
    dp_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // host_json / vm_jsons: spec text (the agent's parser). Each VM is bound to
  // a TAP named after its "interface" (created in the private netns).
  static std::unique_ptr<World> create(const std::string& host_json, const std::vector<std::string>& vm_jsons,
                                       std::string& error) {
    static int serial = 0;
    std::unique_ptr<World> w(new World());
    w->dir_ = "/sys/fs/bpf/vmfence-bpftest-" + std::to_string(getpid()) + "-" + std::to_string(serial++);
    try {
      w->host_ = host_spec(host_json);
      std::vector<VmSpec> vms;
      for (const auto& j : vm_jsons) vms.push_back(vm_spec(j, w->host_));
      std::vector<SpecError> errors;
      validate_vms(vms, errors);
      if (!errors.empty()) throw std::invalid_argument("VMs: " + errors.front().str());
      for (auto& vm : vms) w->specs_[vm.name] = vm;
    } catch (const std::exception& e) {
      error = e.what();
      return nullptr;
    }
    if (auto s = Datapath::load(w->dir_, w->dp_); !s) {
      error = s.message;
      return nullptr;
    }
    w->writer_ = std::make_unique<MapWriter>(w->dp_->maps(), w->dp_->dir());
    w->writer_->adopt();
    vmfence_config cfg{};
    cfg.event_budget = VMFENCE_DEFAULT_EVENT_BUDGET;
    cfg.budget_window_ns = VMFENCE_DEFAULT_BUDGET_WINDOW_NS;
    std::vector<std::string> names;
    for (const auto& [name, vm] : w->specs_) names.push_back(name);
    for (const auto& name : names) {
      if (auto s = w->install_spec(w->specs_[name]); !s) {
        error = name + ": " + s.message;
        return nullptr;
      }
      if (!w->writer_->installed().at(name).plan.net_addresses.empty()) cfg.flags |= VMFENCE_CFG_F_OWNER_NETS;
    }
    if (auto s = w->writer_->write_config(cfg); !s) {
      error = s.message;
      return nullptr;
    }
    w->rb_ = ring_buffer__new(w->dp_->maps().events.get(), &World::on_event, w.get(), nullptr);
    if (!w->rb_) {
      error = std::string("ring_buffer__new: ") + std::strerror(errno);
      return nullptr;
    }
    return w;
  }

  // Re-install a VM from new spec text (a policy change: new generation).
  Status reinstall(const std::string& vm_json) {
    VmSpec vm;
    try {
      vm = vm_spec(vm_json, host_);
    } catch (const std::exception& e) {
      return Status::error(EINVAL, e.what());
    }
    specs_[vm.name] = vm;
    return install_spec(vm);
  }

  Datapath& dp() { return *dp_; }
  MapSet& maps() { return dp_->maps(); }
  MapWriter& writer() { return *writer_; }
  const InstalledVm& vm(const std::string& name) const { return writer_->installed().at(name); }
  bool has_vm(const std::string& name) const { return writer_->installed().count(name) != 0; }
  const VmSpec& spec(const std::string& name) const { return specs_.at(name); }
  const std::string& dir() const { return dir_; }

  // With the pre-filter, a frame from a VM meets XDP first and tcx only if
  // XDP passed it, one repetition at a time, as on a prefiltered TAP.
  RunResult run(bool from_vm, uint32_t ifindex, const Frame& f, int repeat = 1, uint32_t mark = 0) {
    if (!from_vm || !prefilter_)
      return test_run(from_vm ? dp_->from_vm_prog_fd() : dp_->to_vm_prog_fd(), ifindex, f.bytes, repeat, mark);
    RunResult r;
    for (int i = 0; i < repeat; ++i) {
      r = test_run_xdp(dp_->xdp_prog_fd(), ifindex, f.bytes);
      if (r.err) return r;
      if (r.retval == kXdpDrop) {
        r.retval = kDrop;
        ++xdp_drops_;
        continue;
      }
      if (r.retval != kXdpPass) return r;
      r = test_run(dp_->from_vm_prog_fd(), ifindex, f.bytes, 1, mark);
      if (r.err) return r;
    }
    return r;
  }
  // Run frames from VMs through the XDP pre-filter before tcx (run(), and
  // send_via_tap() attaches it to the TAP).
  void set_prefilter(bool on) { prefilter_ = on; }
  uint64_t xdp_drops() const { return xdp_drops_; }

  vmfence_counters counters(uint32_t slot) const {
    vmfence_counters c{};
    read_counters(dp_->maps(), slot, c);
    return c;
  }
  vmfence_state state(uint32_t slot) const {
    vmfence_state s{};
    read_state(dp_->maps(), slot, s);
    return s;
  }
  // Send a frame through the real hook, as a guest would: the programs
  // attached (tcx) to the TAP, the frame written to the TAP's queue. For
  // frames BPF_PROG_TEST_RUN refuses: it wants a whole IPv4 (34 bytes) or
  // IPv6 (54 bytes) header behind those ethertypes; a guest's TAP does not.
  // The verdict shows only in the counters.
  Status send_via_tap(const std::string& iface, const Frame& f) {
    uint32_t ifindex = TestNet::get().tap(iface);
    if (!ifindex) return Status::error(ENODEV, "TAP " + iface);
    auto it = tap_fds_.find(iface);
    if (it == tap_fds_.end()) {
      // No IPv6 on the TAP: the host would send its own RS/MLD/DAD through it.
      std::ofstream("/proc/sys/net/ipv6/conf/" + iface + "/disable_ipv6") << "1\n";
      Fd fd(::open("/dev/net/tun", O_RDWR | O_CLOEXEC));
      if (!fd.valid()) return Status::error(errno, "open /dev/net/tun");
      ifreq ifr{};
      std::strncpy(ifr.ifr_name, iface.c_str(), IFNAMSIZ - 1);
      ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
      if (::ioctl(fd.get(), TUNSETIFF, &ifr) != 0) return Status::error(errno, "TUNSETIFF " + iface);
      if (std::system(("ip link set dev " + iface + " up").c_str()) != 0)
        return Status::error(EIO, "ip link set dev " + iface + " up");
      if (auto s = dp_->attach(ifindex); !s) return s;
      if (prefilter_)
        if (auto s = dp_->attach_xdp(ifindex); !s) return s;
      it = tap_fds_.emplace(iface, std::move(fd)).first;
    }
    if (::write(it->second.get(), f.bytes.data(), f.bytes.size()) != static_cast<ssize_t>(f.bytes.size()))
      return Status::error(errno, "write to TAP " + iface);
    return {};
  }

  // The VMFENCE_MAP_VMS entry of an interface, if any.
  std::optional<vmfence_vm> vm_entry(uint32_t ifindex) const {
    vmfence_vm v{};
    if (bpf_map_lookup_elem(dp_->maps().vms.get(), &ifindex, &v) != 0) return std::nullopt;
    return v;
  }
  size_t flow_count() const { return count_flows(dp_->maps()); }

  // Violation events submitted since the last call.
  std::vector<vmfence_event> take_events() {
    events_.clear();
    ring_buffer__consume(rb_);
    return std::move(events_);
  }

 private:
  World() = default;

  Status install_spec(const VmSpec& vm) {
    uint32_t ifindex = TestNet::get().tap(vm.interface);
    if (!ifindex) return Status::error(ENODEV, "create TAP " + vm.interface);
    std::vector<SpecError> errors;
    std::vector<VmSpec> all;
    for (const auto& [name, spec] : specs_) all.push_back(spec);
    VmPlan plan = compile_vm(vm, host_, vm_address_space(all), errors);
    if (!errors.empty()) return Status::error(EINVAL, errors.front().str());
    return writer_->install(plan, ifindex);
  }

  static int on_event(void* ctx, void* data, size_t size) {
    auto* self = static_cast<World*>(ctx);
    vmfence_event e{};
    std::memcpy(&e, data, std::min(size, sizeof(e)));
    self->events_.push_back(e);
    return 0;
  }

  std::string dir_;
  HostSpec host_;
  std::map<std::string, VmSpec> specs_;
  std::unique_ptr<Datapath> dp_;
  std::unique_ptr<MapWriter> writer_;
  ring_buffer* rb_ = nullptr;
  std::vector<vmfence_event> events_;
  std::map<std::string, Fd> tap_fds_;
  bool prefilter_ = false;
  uint64_t xdp_drops_ = 0;
};

}  // namespace vmfence::test
