// Attaching the datapath to an interface (Datapath::attach / detach /
// attached), on a real veth pair between two network namespaces this test
// makes and removes: tcx links and their pins, replacement in place, a
// defunct link (interface re-created with the same ifindex), the cls_bpf
// fallback (VMFENCE_ATTACH=cls_bpf), and a failed second attach that must
// leave nothing attached.
//
// The veth end "vfat0" (10.77.0.1/24) is in the namespace this thread enters;
// its peer "vfat1" (10.77.0.2/24) in another. With no VM bound to vfat0, the
// programs drop everything as unknown_ifindex: a ping over the veth fails
// while attached and works once detached, and slot 0's unknown_ifindex
// counter grows.
//
// Needs root (see harness.h).
#include <gtest/gtest.h>
#include <linux/pkt_cls.h>
#include <sys/utsname.h>

#include <array>
#include <cstdio>
#include <filesystem>

#include "tests/bpf/harness.h"

using namespace vmfence;
using namespace vmfence::test;

namespace {

constexpr uint32_t kTcxIngress = 46;
constexpr uint32_t kTcxEgress = 47;

int sh(const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()); }

std::string sh_out(const std::string& cmd) {
  std::string out;
  if (FILE* f = popen((cmd + " 2>/dev/null").c_str(), "r")) {
    std::array<char, 4096> buf;
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), f)) > 0) out.append(buf.data(), n);
    pclose(f);
  }
  return out;
}

bool kernel_has_tcx() {
  utsname u{};
  if (uname(&u) != 0) return false;
  int major = 0, minor = 0;
  if (std::sscanf(u.release, "%d.%d", &major, &minor) != 2) return false;
  return major > 6 || (major == 6 && minor >= 6);
}

// Sets or clears an environment variable for one scope.
class EnvGuard {
 public:
  EnvGuard(const char* name, const char* value) : name_(name) {
    if (const char* v = std::getenv(name)) old_ = v;
    if (value)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~EnvGuard() {
    if (old_)
      setenv(name_, old_->c_str(), 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// Two network namespaces joined by a veth; this thread is in the first one
// while the object lives, and both namespaces are deleted afterwards.
class VethNet {
 public:
  static constexpr const char* kDev = "vfat0";

  VethNet() {
    static int serial = 0;
    std::string base = "vmfat-" + std::to_string(getpid()) + "-" + std::to_string(serial++);
    a_ = base + "a";
    b_ = base + "b";
    saved_.reset(::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC));
    if (!saved_.valid()) {
      fail("open own netns");
      return;
    }
    if (sh("ip netns add " + a_) || sh("ip netns add " + b_)) {
      fail("ip netns add");
      return;
    }
    Fd ns(::open(("/run/netns/" + a_).c_str(), O_RDONLY | O_CLOEXEC));
    if (!ns.valid() || setns(ns.get(), CLONE_NEWNET) != 0) {
      fail("enter netns " + a_);
      return;
    }
    entered_ = true;
    if (!make_veth(0)) {
      fail("create veth");
      return;
    }
    if (sh("ip link set lo up") || sh("ip netns exec " + b_ + " ip link set lo up")) {
      fail("lo up");
      return;
    }
  }
  ~VethNet() {
    if (entered_ && setns(saved_.get(), CLONE_NEWNET) != 0) std::perror("setns back");
    sh("ip netns del " + a_);
    sh("ip netns del " + b_);
  }
  const std::string& error() const { return error_; }
  uint32_t ifindex() const { return if_nametoindex(kDev); }

  // (Re-)create the veth pair; index: vfat0's ifindex (0 = any).
  bool make_veth(uint32_t index) {
    std::string idx = index ? " index " + std::to_string(index) : "";
    return sh("ip link add " + std::string(kDev) + idx + " type veth peer name vfat1 netns " + b_) == 0 &&
           sh("ip addr add 10.77.0.1/24 dev vfat0") == 0 && sh("ip link set vfat0 up") == 0 &&
           sh("ip netns exec " + b_ + " ip addr add 10.77.0.2/24 dev vfat1") == 0 &&
           sh("ip netns exec " + b_ + " ip link set vfat1 up") == 0;
  }
  bool delete_veth() { return sh("ip link del vfat0") == 0; }

  // One ping over the veth (ARP included) gets an answer.
  bool ping() const { return sh("ping -c 1 -W 1 -q 10.77.0.2") == 0; }

 private:
  void fail(const std::string& what) { error_ = what + ": " + std::strerror(errno); }
  std::string a_, b_, error_;
  Fd saved_;
  bool entered_ = false;
};

// A datapath under a pin dir of its own, removed afterwards.
class PinDir {
 public:
  PinDir() {
    static int serial = 0;
    path_ = "/sys/fs/bpf/vmfence-attachtest-" + std::to_string(getpid()) + "-" + std::to_string(serial++);
  }
  ~PinDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  // Pins under links/ (ours: if<N>_{from_vm,to_vm}, and any temporaries).
  std::vector<std::string> link_pins() const {
    std::vector<std::string> out;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(path_ + "/links", ec)) out.push_back(e.path().filename());
    return out;
  }

 private:
  std::string path_;
};

uint32_t prog_id_of(int prog_fd) {
  bpf_prog_info info{};
  uint32_t len = sizeof(info);
  return bpf_obj_get_info_by_fd(prog_fd, &info, &len) == 0 ? info.id : 0;
}

// Program ids attached through tcx at one hook of ifindex.
std::vector<uint32_t> tcx_progs(uint32_t ifindex, uint32_t type) {
  std::array<uint32_t, 128> ids{};
  uint32_t count = ids.size(), flags = 0;
  if (bpf_prog_query(static_cast<int>(ifindex), static_cast<bpf_attach_type>(type), 0, &flags, ids.data(), &count) != 0)
    return {};
  return {ids.begin(), ids.begin() + count};
}

// The pinned tcx link's id (0 if the pin is not a link).
uint32_t link_id(const std::string& path) {
  int fd = bpf_obj_get(path.c_str());
  if (fd < 0) return 0;
  Fd owned(fd);
  bpf_link_info info{};
  uint32_t len = sizeof(info);
  return bpf_obj_get_info_by_fd(owned.get(), &info, &len) == 0 ? info.id : 0;
}

// The program id of our cls_bpf filter on one hook; 0 when absent (libbpf
// kept quiet: the kernel's "no such filter" is the expected answer here).
uint32_t cls_prog(uint32_t ifindex, bool ingress) {
  LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = static_cast<int>(ifindex),
              .attach_point = ingress ? BPF_TC_INGRESS : BPF_TC_EGRESS);
  LIBBPF_OPTS(bpf_tc_opts, opts, .handle = Datapath::kTcHandle, .priority = Datapath::kTcPriority);
  libbpf_print_fn_t prev = libbpf_set_print(nullptr);
  int err = bpf_tc_query(&hook, &opts);
  libbpf_set_print(prev);
  return err == 0 ? opts.prog_id : 0;
}

// Every filter of one clsact hook (tc's view).
std::string tc_filters(bool ingress) {
  return sh_out(std::string("tc filter show dev vfat0 ") + (ingress ? "ingress" : "egress"));
}

uint64_t unknown_drops(Datapath& dp) {
  vmfence_counters c{};
  read_counters(dp.maps(), 0, c);
  return c.drops[VMFENCE_REASON_UNKNOWN_IFINDEX];
}

class AttachTest : public ::testing::Test {
 protected:
  void SetUp() override {
    VMFENCE_REQUIRE_KERNEL();
    net_ = std::make_unique<VethNet>();
    ASSERT_EQ(net_->error(), "");
    ifindex_ = net_->ifindex();
    ASSERT_NE(ifindex_, 0u);
    ASSERT_TRUE(net_->ping()) << "the veth carries nothing without vmfence";
  }
  void TearDown() override {
    dp_.reset();
    dp2_.reset();
    net_.reset();
  }

  void load(std::unique_ptr<Datapath>& dp) {
    auto s = Datapath::load(pins_.path(), dp);
    ASSERT_TRUE(s) << s.message;
  }
  std::string pin(bool from_vm) const { return Datapath::link_path(pins_.path(), ifindex_, from_vm); }

  // Nothing of vmfence left on vfat0: no tcx programs, no filters, no pins.
  void expect_nothing_attached() {
    EXPECT_FALSE(Datapath::attached(pins_.path(), ifindex_));
    EXPECT_TRUE(tcx_progs(ifindex_, kTcxIngress).empty());
    EXPECT_TRUE(tcx_progs(ifindex_, kTcxEgress).empty());
    EXPECT_EQ(cls_prog(ifindex_, true), 0u);
    EXPECT_EQ(cls_prog(ifindex_, false), 0u);
    EXPECT_EQ(tc_filters(true), "");
    EXPECT_EQ(tc_filters(false), "");
    EXPECT_TRUE(pins_.link_pins().empty()) << pins_.link_pins().front();
  }

  PinDir pins_;
  std::unique_ptr<VethNet> net_;
  std::unique_ptr<Datapath> dp_, dp2_;
  uint32_t ifindex_ = 0;
};

TEST_F(AttachTest, TcxAttachesBothAndDetachRemovesEverything) {
  if (!kernel_has_tcx()) GTEST_SKIP() << "kernel without tcx (the cls_bpf tests cover the fallback)";
  EnvGuard env("VMFENCE_ATTACH", nullptr);
  load(dp_);
  EXPECT_FALSE(dp_->attached(ifindex_));
  ASSERT_TRUE(dp_->attach(ifindex_));
  EXPECT_EQ(dp_->attach_mode(), AttachMode::kTcx);
  EXPECT_TRUE(dp_->attached(ifindex_));
  EXPECT_TRUE(Datapath::attached(pins_.path(), ifindex_));
  EXPECT_EQ(tcx_progs(ifindex_, kTcxIngress), std::vector<uint32_t>{prog_id_of(dp_->from_vm_prog_fd())});
  EXPECT_EQ(tcx_progs(ifindex_, kTcxEgress), std::vector<uint32_t>{prog_id_of(dp_->to_vm_prog_fd())});
  EXPECT_NE(link_id(pin(true)), 0u);
  EXPECT_NE(link_id(pin(false)), 0u);
  EXPECT_EQ(Datapath::linked_ifindexes(pins_.path()), std::vector<uint32_t>{ifindex_});

  uint64_t before = unknown_drops(*dp_);
  EXPECT_FALSE(net_->ping()) << "attached, a VM-less interface drops everything";
  EXPECT_GT(unknown_drops(*dp_), before);

  Datapath::detach(pins_.path(), ifindex_);
  EXPECT_FALSE(dp_->attached(ifindex_));
  expect_nothing_attached();
  EXPECT_TRUE(net_->ping());
}

TEST_F(AttachTest, TcxReattachReplacesInPlace) {
  if (!kernel_has_tcx()) GTEST_SKIP() << "kernel without tcx";
  EnvGuard env("VMFENCE_ATTACH", nullptr);
  load(dp_);
  ASSERT_TRUE(dp_->attach(ifindex_));
  uint32_t from = link_id(pin(true)), to = link_id(pin(false));
  ASSERT_NE(from, 0u);
  ASSERT_NE(to, 0u);

  // Same datapath again: the same links.
  ASSERT_TRUE(dp_->attach(ifindex_));
  EXPECT_EQ(link_id(pin(true)), from);
  EXPECT_EQ(link_id(pin(false)), to);
  EXPECT_TRUE(dp_->attached(ifindex_));

  // A restarted agent (new programs, the same pins): the programs are
  // switched under the existing links, never detached in between.
  load(dp2_);
  ASSERT_TRUE(dp2_->attach(ifindex_));
  EXPECT_EQ(link_id(pin(true)), from);
  EXPECT_EQ(link_id(pin(false)), to);
  EXPECT_TRUE(dp2_->attached(ifindex_));
  EXPECT_FALSE(dp_->attached(ifindex_)) << "the old programs are no longer the ones attached";
  EXPECT_EQ(tcx_progs(ifindex_, kTcxIngress), std::vector<uint32_t>{prog_id_of(dp2_->from_vm_prog_fd())});
  EXPECT_EQ(tcx_progs(ifindex_, kTcxEgress), std::vector<uint32_t>{prog_id_of(dp2_->to_vm_prog_fd())});
  EXPECT_EQ(pins_.link_pins().size(), 2u);
  EXPECT_FALSE(net_->ping());

  Datapath::detach(pins_.path(), ifindex_);
  expect_nothing_attached();
}

TEST_F(AttachTest, TcxDefunctLinkIsReplaced) {
  if (!kernel_has_tcx()) GTEST_SKIP() << "kernel without tcx";
  EnvGuard env("VMFENCE_ATTACH", nullptr);
  load(dp_);
  ASSERT_TRUE(dp_->attach(ifindex_));
  uint32_t from = link_id(pin(true));
  ASSERT_NE(from, 0u);

  // The interface goes and comes back with the same ifindex: the pinned
  // links are defunct (tcx ifindex 0), not attached to anything.
  ASSERT_TRUE(net_->delete_veth());
  ASSERT_TRUE(net_->make_veth(ifindex_));
  ASSERT_EQ(net_->ifindex(), ifindex_);
  EXPECT_FALSE(dp_->attached(ifindex_));
  EXPECT_FALSE(Datapath::attached(pins_.path(), ifindex_));
  EXPECT_TRUE(tcx_progs(ifindex_, kTcxIngress).empty());
  EXPECT_TRUE(net_->ping()) << "nothing attached to the new interface yet";

  ASSERT_TRUE(dp_->attach(ifindex_));
  EXPECT_TRUE(dp_->attached(ifindex_));
  EXPECT_NE(link_id(pin(true)), from) << "a new link replaced the defunct one";
  EXPECT_EQ(tcx_progs(ifindex_, kTcxIngress).size(), 1u);
  EXPECT_EQ(tcx_progs(ifindex_, kTcxEgress).size(), 1u);
  EXPECT_EQ(pins_.link_pins().size(), 2u);
  EXPECT_FALSE(net_->ping());

  // Gone again: detach (as on RTM_DELLINK) removes the defunct links' pins.
  ASSERT_TRUE(net_->delete_veth());
  Datapath::detach(pins_.path(), ifindex_);
  EXPECT_TRUE(pins_.link_pins().empty());
  EXPECT_TRUE(Datapath::linked_ifindexes(pins_.path()).empty());
}

// A trivial TC program (returns TCX_NEXT), to fill a tcx hook.
Fd trivial_prog() {
  const bpf_insn insns[] = {
      {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .src_reg = 0, .off = 0, .imm = -1},
      {.code = BPF_JMP | BPF_EXIT, .dst_reg = 0, .src_reg = 0, .off = 0, .imm = 0},
  };
  return Fd(bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, "vft_occupy", "GPL", insns, 2, nullptr));
}

TEST_F(AttachTest, TcxFailedSecondAttachLeavesNothing) {
  if (!kernel_has_tcx()) GTEST_SKIP() << "kernel without tcx";
  EnvGuard env("VMFENCE_ATTACH", nullptr);
  load(dp_);
  // Fill the egress hook up to the kernel's limit of programs per hook, so
  // the second attach (to_vm, egress) fails after the first one succeeded.
  std::vector<Fd> progs, links;
  for (int i = 0; i < 200; ++i) {
    Fd prog = trivial_prog();
    ASSERT_TRUE(prog.valid()) << std::strerror(errno);
    int link =
        bpf_link_create(prog.get(), static_cast<int>(ifindex_), static_cast<bpf_attach_type>(kTcxEgress), nullptr);
    if (link < 0) {
      ASSERT_EQ(link, -ERANGE) << "a full hook";
      break;
    }
    progs.push_back(std::move(prog));
    links.push_back(Fd(link));
  }
  ASSERT_FALSE(links.empty());

  Status s = dp_->attach(ifindex_);
  EXPECT_FALSE(s);
  EXPECT_EQ(s.err, ERANGE) << s.message;
  EXPECT_NE(s.message.find("tcx attach (egress)"), std::string::npos) << s.message;
  EXPECT_EQ(dp_->attach_mode(), AttachMode::kTcx) << "ERANGE is no reason to fall back";
  EXPECT_FALSE(dp_->attached(ifindex_));
  EXPECT_FALSE(Datapath::attached(pins_.path(), ifindex_));
  EXPECT_TRUE(tcx_progs(ifindex_, kTcxIngress).empty()) << "from_vm was taken back";
  EXPECT_TRUE(pins_.link_pins().empty());
  EXPECT_TRUE(net_->ping()) << "nothing of vmfence on the veth";

  // With room again, the same call succeeds.
  links.clear();
  ASSERT_TRUE(dp_->attach(ifindex_));
  EXPECT_TRUE(dp_->attached(ifindex_));
  Datapath::detach(pins_.path(), ifindex_);
  expect_nothing_attached();
}

TEST_F(AttachTest, ClsBpfAttachesBothAndDetachRemovesEverything) {
  EnvGuard env("VMFENCE_ATTACH", "cls_bpf");
  load(dp_);
  EXPECT_EQ(dp_->attach_mode(), AttachMode::kClsBpf);
  ASSERT_TRUE(dp_->attach(ifindex_));
  EXPECT_EQ(dp_->attach_mode(), AttachMode::kClsBpf);
  EXPECT_TRUE(dp_->attached(ifindex_));
  EXPECT_TRUE(Datapath::attached(pins_.path(), ifindex_));
  uint32_t from = prog_id_of(dp_->from_vm_prog_fd()), to = prog_id_of(dp_->to_vm_prog_fd());
  EXPECT_EQ(cls_prog(ifindex_, true), from);
  EXPECT_EQ(cls_prog(ifindex_, false), to);
  EXPECT_NE(tc_filters(true).find("direct-action"), std::string::npos) << tc_filters(true);
  EXPECT_NE(tc_filters(false).find("direct-action"), std::string::npos) << tc_filters(false);
  if (kernel_has_tcx()) {
    EXPECT_TRUE(tcx_progs(ifindex_, kTcxIngress).empty());
    EXPECT_TRUE(tcx_progs(ifindex_, kTcxEgress).empty());
  }
  EXPECT_EQ(Datapath::linked_ifindexes(pins_.path()), std::vector<uint32_t>{ifindex_});

  uint64_t before = unknown_drops(*dp_);
  EXPECT_FALSE(net_->ping()) << "attached, a VM-less interface drops everything";
  EXPECT_GT(unknown_drops(*dp_), before);

  // Again: the same filters, replaced in place (one per hook).
  std::string filters_in = tc_filters(true), filters_out = tc_filters(false);
  ASSERT_TRUE(dp_->attach(ifindex_));
  EXPECT_EQ(tc_filters(true), filters_in);
  EXPECT_EQ(tc_filters(false), filters_out);

  // A restarted agent: its programs replace ours under the same handle.
  load(dp2_);
  ASSERT_TRUE(dp2_->attach(ifindex_));
  EXPECT_TRUE(dp2_->attached(ifindex_));
  EXPECT_FALSE(dp_->attached(ifindex_));
  EXPECT_EQ(cls_prog(ifindex_, true), prog_id_of(dp2_->from_vm_prog_fd()));
  EXPECT_EQ(cls_prog(ifindex_, false), prog_id_of(dp2_->to_vm_prog_fd()));
  EXPECT_EQ(pins_.link_pins().size(), 2u);
  EXPECT_FALSE(net_->ping());

  Datapath::detach(pins_.path(), ifindex_);
  EXPECT_FALSE(dp2_->attached(ifindex_));
  expect_nothing_attached();
  EXPECT_TRUE(net_->ping());
}

TEST_F(AttachTest, ClsBpfFailedSecondAttachLeavesNothing) {
  EnvGuard env("VMFENCE_ATTACH", "cls_bpf");
  load(dp_);
  // A filter of another protocol at our priority on egress (a classic BPF
  // one: cls_bpf is all this needs): the cls_bpf attach of to_vm fails
  // (protocol mismatch), after from_vm's succeeded.
  ASSERT_EQ(sh("tc qdisc add dev vfat0 clsact"), 0);
  ASSERT_EQ(sh("tc filter add dev vfat0 egress protocol ip pref " + std::to_string(Datapath::kTcPriority) +
               " handle 1 bpf bytecode '1,6 0 0 0,'"),
            0);
  Status s = dp_->attach(ifindex_);
  EXPECT_FALSE(s);
  EXPECT_NE(s.message.find("cls_bpf attach (egress)"), std::string::npos) << s.message;
  std::printf("expected failure: %s\n", s.message.c_str());
  EXPECT_FALSE(dp_->attached(ifindex_));
  EXPECT_FALSE(Datapath::attached(pins_.path(), ifindex_));
  EXPECT_EQ(cls_prog(ifindex_, true), 0u) << "from_vm was taken back";
  EXPECT_EQ(tc_filters(true), "");
  EXPECT_TRUE(pins_.link_pins().empty());
  EXPECT_TRUE(net_->ping()) << "nothing of vmfence on the veth";

  ASSERT_EQ(sh("tc filter del dev vfat0 egress"), 0);
  ASSERT_TRUE(dp_->attach(ifindex_));
  EXPECT_TRUE(dp_->attached(ifindex_));
  Datapath::detach(pins_.path(), ifindex_);
  expect_nothing_attached();
}

TEST_F(AttachTest, SwitchingModesLeavesOneAttachment) {
  if (!kernel_has_tcx()) GTEST_SKIP() << "kernel without tcx";
  {
    EnvGuard env("VMFENCE_ATTACH", nullptr);
    load(dp_);
    ASSERT_TRUE(dp_->attach(ifindex_));
  }
  // tcx -> cls_bpf: the filters go in, then the links go.
  {
    EnvGuard env("VMFENCE_ATTACH", "cls_bpf");
    load(dp2_);
    ASSERT_TRUE(dp2_->attach(ifindex_));
  }
  EXPECT_TRUE(dp2_->attached(ifindex_));
  EXPECT_TRUE(tcx_progs(ifindex_, kTcxIngress).empty());
  EXPECT_TRUE(tcx_progs(ifindex_, kTcxEgress).empty());
  EXPECT_EQ(cls_prog(ifindex_, true), prog_id_of(dp2_->from_vm_prog_fd()));
  // cls_bpf -> tcx: the links go in, then our filters go.
  ASSERT_TRUE(dp_->attach(ifindex_));
  EXPECT_TRUE(dp_->attached(ifindex_));
  EXPECT_EQ(cls_prog(ifindex_, true), 0u);
  EXPECT_EQ(cls_prog(ifindex_, false), 0u);
  EXPECT_EQ(tcx_progs(ifindex_, kTcxIngress).size(), 1u);
  EXPECT_EQ(tcx_progs(ifindex_, kTcxEgress).size(), 1u);
  EXPECT_FALSE(net_->ping());
  Datapath::detach(pins_.path(), ifindex_);
  expect_nothing_attached();
}

}  // namespace
