// Datapath benchmark: ns per packet of vmfence_from_vm on a 64-byte TCP ACK
// (an established flow, allowed by an egress rule) through BPF_PROG_TEST_RUN,
// with 1, 1,000 and 10,000 VMs loaded and 10 and 1,000 egress rules on the VM
// under test, against two references measured in the same run on maps with
// the same contents: ref_empty (an empty TC program: the cost of the test
// harness itself) and ref_minimal (parse + one hash lookup on the ifindex +
// one LPM lookup on the destination), from bench/reference.bpf.c.
//
// The maps are seeded as the daemon does (spec text -> parse_vm -> compile_vm
// -> MapWriter::install); the reference maps get copies of the very entries
// the agent wrote. Run as root, pinned to one CPU:
//
//   sudo taskset -c 1 build/vmfence_bench [--repeat N] [--runs N] [--quick]
//
// Results and the machine are in BENCHMARKS.md.
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <sched.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tests/bpf/harness.h"
#include "tests/bpf/packet.h"
#include "vmfence_ref.skel.h"

using namespace vmfence;
using namespace vmfence::test;

namespace {

constexpr uint32_t kIfindex = 1;  // the VM under test: lo exists in every netns
const char* kHostJson = R"({ "imds": { "address": "169.254.169.254", "port": 80 } })";
const Mac kVmMac = mac("02:00:00:00:00:02");
const Mac kGwMac = mac("02:00:00:00:00:01");

struct Options {
  int repeat = 1000000;
  int runs = 7;
  bool quick = false;
};

// VM i's address: 100.64.0.0/10 holds 4M of them.
std::string vm_addr(uint32_t i) {
  uint32_t a = (100u << 24 | 64u << 16) + i + 2;
  return std::to_string(a >> 24) + "." + std::to_string(a >> 16 & 255) + "." + std::to_string(a >> 8 & 255) + "." +
         std::to_string(a & 255);
}

// Egress rule i of the VM under test: 172.16.0.0/12 in /24 steps.
std::string rule_net(uint32_t i) { return "172." + std::to_string(16 + (i >> 8)) + "." + std::to_string(i & 255); }

// The VM under test: `rules` distinct /24s (tcp 443) + 0.0.0.0/0 tcp 443.
std::string vm_under_test(int rules, const char* mode) {
  std::string egress = R"({ "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] })";
  for (int i = 0; i < rules - 1; ++i)
    egress += R"(, { "to": ")" + rule_net(static_cast<uint32_t>(i)) + R"(.0/24", "proto": "tcp", "ports": ["443"] })";
  return R"({ "name": "bench0", "interface": "lo", "mac": "02:00:00:00:00:02", "addresses": [")" + vm_addr(0) +
         R"(/32"], "mode": ")" + mode + R"(", "egress": [ )" + egress + " ] }";
}

// "xx:xx:xx" of VM i's MAC 02:00:xx:xx:xx:02.
std::string mac_bytes(uint32_t i) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%02x:%02x:%02x:02", i >> 16 & 255, i >> 8 & 255, i & 255);
  return buf;
}

// Every other VM: one address, one rule (and the IMDS barrier the compiler adds).
std::string other_vm(uint32_t i, bool with_rule) {
  return R"({ "name": "vm)" + std::to_string(i) + R"(", "interface": "vmb)" + std::to_string(i) +
         R"(", "mac": "02:00:)" + mac_bytes(i) + R"(", "addresses": [")" + vm_addr(i) + R"(/32"], "egress": [ )" +
         (with_rule ? R"({ "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] })" : "") + " ] }";
}

// 64 bytes: Ethernet + IPv4 + TCP ACK + 10 bytes of payload.
Frame ack_to(const std::string& dst) {
  return Packet().eth(kVmMac, kGwMac).ipv4(ip(vm_addr(0)), ip(dst)).tcp(40000, 443, ACK).payload(10).build();
}
Frame ack_from(const std::string& src) {
  return Packet().eth(kGwMac, kVmMac).ipv4(ip(src), ip(vm_addr(0))).tcp(443, 40000, ACK).payload(10).build();
}

const std::string kPinPrefix = "vmfence-bench-" + std::to_string(getpid()) + "-";

// Remove this process's pin dirs (also when interrupted: pins outlive us).
void remove_pins() {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/sys/fs/bpf", ec))
    if (e.path().filename().string().rfind(kPinPrefix, 0) == 0) std::filesystem::remove_all(e.path(), ec);
}

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "vmfence_bench: %s\n", what.c_str());
  remove_pins();
  std::exit(1);
}

struct RefDeleter {
  void operator()(vmfence_ref* r) const { vmfence_ref__destroy(r); }
};

// A loaded datapath with `vms` VMs (the VM under test on ifindex 1 with
// `rules` egress rules), and the reference programs on copies of its maps.
class Setup {
 public:
  // others_rules: the other VMs get one egress rule each (and the IMDS entry
  // the compiler adds), so their policies share the egress LPM trie.
  Setup(int vms, int rules, const char* mode = "filtered", bool others_rules = true) : vms_(vms), rules_(rules) {
    static int serial = 0;
    dir_ = "/sys/fs/bpf/" + kPinPrefix + std::to_string(serial++);
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
    if (auto s = Datapath::load(dir_, dp_); !s) die(s.message);
    writer_ = std::make_unique<MapWriter>(dp_->maps(), dp_->dir());
    writer_->adopt();
    vmfence_config cfg{};
    cfg.event_budget = VMFENCE_DEFAULT_EVENT_BUDGET;
    cfg.budget_window_ns = VMFENCE_DEFAULT_BUDGET_WINDOW_NS;
    writer_->write_config(cfg);
    host_ = host_spec(others_rules ? kHostJson : "{}");
    install(vm_under_test(rules, mode), kIfindex);
    for (int i = 1; i < vms; ++i)
      install(other_vm(static_cast<uint32_t>(i), others_rules), 100000 + static_cast<uint32_t>(i));

    ref_.reset(vmfence_ref__open_and_load());
    if (!ref_) die("load bench/reference.bpf.c");
    copy_map(dp_->maps().vms.get(), bpf_map__fd(ref_->maps.ref_vms), sizeof(uint32_t), sizeof(vmfence_vm));
    // The reference's one trie: the VM under test's own prefixes.
    const InstalledVm& vm = writer_->installed().at("bench0");
    Fd trie = inner_map(dp_->maps().egress.get(), vmfence_policy_index(vm.slot, vm.policy_id));
    if (!trie.valid()) die("the VM under test has no egress trie");
    copy_map(trie.get(), bpf_map__fd(ref_->maps.ref_egress), sizeof(vmfence_addr_key), sizeof(vmfence_policy_value));
  }
  ~Setup() {
    ref_.reset();
    writer_.reset();
    dp_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  void install(const std::string& json, uint32_t ifindex) {
    std::vector<SpecError> errors;
    // VM address space of every VM the bench installs (vm_addr(): 100.64/16;
    // the peer: 198.18/16), as vm_address_space() computes it.
    static const std::vector<Cidr> nets = {*parse_cidr("100.64.0.0/16"), *parse_cidr("198.18.0.0/16")};
    VmPlan plan = compile_vm(vm_spec(json, host_), host_, nets, errors);
    if (!errors.empty()) die(errors.front().str());
    if (auto s = writer_->install(plan, ifindex); !s) die(s.message);
  }
  // A destination the rules allow: inside the middle /24 (the deepest match),
  // or anywhere (0.0.0.0/0) with one rule.
  std::string allowed_dst() const {
    return rules_ > 1 ? rule_net(static_cast<uint32_t>(rules_ / 2)) + ".10" : "93.184.216.34";
  }

  int from_vm() const { return dp_->from_vm_prog_fd(); }
  int to_vm() const { return dp_->to_vm_prog_fd(); }
  int empty() const { return bpf_program__fd(ref_->progs.ref_empty); }
  int minimal() const { return bpf_program__fd(ref_->progs.ref_minimal); }
  MapWriter& writer() { return *writer_; }
  Datapath& dp() { return *dp_; }

 private:
  static void copy_map(int from, int to, size_t key_size, size_t value_size) {
    std::vector<uint8_t> key(key_size), next(key_size), value(value_size);
    void* prev = nullptr;
    while (bpf_map_get_next_key(from, prev, next.data()) == 0) {
      if (bpf_map_lookup_elem(from, next.data(), value.data()) == 0 &&
          bpf_map_update_elem(to, next.data(), value.data(), BPF_ANY) != 0)
        die(std::string("copy map entry: ") + std::strerror(errno));
      key = next;
      prev = key.data();
    }
  }

  int vms_, rules_;
  std::string dir_;
  HostSpec host_;
  std::unique_ptr<Datapath> dp_;
  std::unique_ptr<MapWriter> writer_;
  std::unique_ptr<vmfence_ref, RefDeleter> ref_;
};

struct Variant {
  std::string name;
  int prog_fd;
  Frame frame;
  int want;  // expected verdict
};

struct Stat {
  double median, min, max;
  operator double() const { return median; }
  double spread() const { return (max - min) / median * 100; }  // % of the median
};

// ns/packet of each variant over the runs; variants interleaved within each
// run so drift (frequency, neighbours) hits them alike.
std::vector<Stat> measure(const std::vector<Variant>& vs, const Options& o) {
  std::vector<std::vector<double>> samples(vs.size());
  for (size_t i = 0; i < vs.size(); ++i) {  // warm up, and check the verdict
    RunResult r = test_run(vs[i].prog_fd, kIfindex, vs[i].frame.bytes, std::max(1, o.repeat / 10));
    if (r.err) die(vs[i].name + ": BPF_PROG_TEST_RUN: " + std::strerror(r.err));
    if (r.retval != vs[i].want)
      die(vs[i].name + ": verdict " + std::to_string(r.retval) + ", expected " + std::to_string(vs[i].want));
  }
  for (int run = 0; run < o.runs; ++run)
    for (size_t i = 0; i < vs.size(); ++i) {
      // The kernel reports whole ns per repetition (time spent rescheduling
      // excluded). The wall time of the call refines it when it falls within
      // that ns (the run was not preempted); otherwise the kernel's figure + 0.5.
      timespec a{}, b{};
      clock_gettime(CLOCK_MONOTONIC, &a);
      RunResult r = test_run(vs[i].prog_fd, kIfindex, vs[i].frame.bytes, o.repeat);
      clock_gettime(CLOCK_MONOTONIC, &b);
      if (r.err) die(vs[i].name + ": BPF_PROG_TEST_RUN: " + std::strerror(r.err));
      double wall = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / o.repeat;
      double d = r.duration;
      samples[i].push_back(wall >= d && wall < d + 1 ? wall : d + 0.5);
    }
  std::vector<Stat> out;
  for (auto& s : samples) {
    std::sort(s.begin(), s.end());
    out.push_back({s[s.size() / 2], s.front(), s.back()});
  }
  return out;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "?";
}

std::string read_line(const char* path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--repeat" && i + 1 < argc)
      o.repeat = std::atoi(argv[++i]);
    else if (a == "--runs" && i + 1 < argc)
      o.runs = std::atoi(argv[++i]);
    else if (a == "--quick")
      o.quick = true;
    else
      die("usage: vmfence_bench [--repeat N] [--runs N] [--quick]");
  }
  if (o.quick) {
    o.repeat = 100000;
    o.runs = 3;
  }
  if (geteuid() != 0) die("needs root (BPF_PROG_TEST_RUN, bpffs)");
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE})
    std::signal(sig, [](int) {
      remove_pins();
      _exit(130);
    });
  libbpf_set_print([](libbpf_print_level level, const char* fmt, va_list ap) {
    return level == LIBBPF_WARN ? std::vfprintf(stderr, fmt, ap) : 0;
  });

  cpu_set_t set;
  CPU_ZERO(&set);
  sched_getaffinity(0, sizeof(set), &set);
  utsname u{};
  uname(&u);
  std::printf("vmfence datapath benchmark: ns/packet via BPF_PROG_TEST_RUN, repeat %d, median of %d runs\n", o.repeat,
              o.runs);
  std::printf("machine: %s, %ld CPUs, pinned to %d CPU(s) (on CPU %d), kernel %s, bpf_jit_enable=%s\n",
              cpu_model().c_str(), sysconf(_SC_NPROCESSORS_ONLN), CPU_COUNT(&set), sched_getcpu(), u.release,
              read_line("/proc/sys/net/core/bpf_jit_enable").c_str());
  std::printf("load average at start: %s\n", read_line("/proc/loadavg").c_str());
  std::printf(
      "frame: 64-byte TCP ACK from the VM under test (ifindex 1) to tcp/443; dst \"/24\": inside its middle\n"
      "/24 rule (the deepest LPM match), dst \"0/0\": 93.184.216.34, matched by 0.0.0.0/0 only\n\n");
  std::printf("%7s %6s %4s | %6s %8s %8s %7s | %10s %9s | %s\n", "VMs", "rules", "dst", "empty", "minimal", "from_vm",
              "spread", "vs minimal", "vs empty", "net of empty: from_vm / minimal");

  struct Row {
    int vms, rules;
    bool deep;
    double empty, minimal, from_vm;
  };
  std::vector<Row> rows;
  // The three VM counts of one rule count are loaded side by side and
  // measured interleaved, so drift hits them alike.
  const int kVms[] = {1, 1000, 10000};
  for (int rules : {10, 1000}) {
    std::vector<std::unique_ptr<Setup>> setups;
    std::vector<Variant> vs;
    for (int vms : kVms) {
      setups.push_back(std::make_unique<Setup>(vms, rules));
      Setup& s = *setups.back();
      Frame deep = ack_to(s.allowed_dst()), wide = ack_to("93.184.216.34");
      vs.push_back({"ref_empty", s.empty(), deep, kPass});
      vs.push_back({"ref_minimal /24", s.minimal(), deep, kPass});
      vs.push_back({"vmfence_from_vm /24", s.from_vm(), deep, kPass});
      vs.push_back({"ref_minimal 0/0", s.minimal(), wide, kPass});
      vs.push_back({"vmfence_from_vm 0/0", s.from_vm(), wide, kPass});
    }
    auto m = measure(vs, o);
    for (size_t k = 0; k < 3; ++k) {
      const Stat* v = &m[k * 5];
      for (bool deep : {true, false}) {
        const Stat &e = v[0], &mi = deep ? v[1] : v[3], &fv = deep ? v[2] : v[4];
        rows.push_back({kVms[k], rules, deep, e, mi, fv});
        std::printf("%7d %6d %4s | %6.1f %8.1f %8.1f %6.0f%% | %9.2fx %8.2fx | %.2fx (%.1f vs %.1f ns)\n", kVms[k],
                    rules, deep ? "/24" : "0/0", e.median, mi.median, fv.median, fv.spread(), fv / mi, fv / e,
                    (fv - e) / (mi - e), fv - e, mi - e);
      }
    }
    std::fflush(stdout);
  }
  std::printf("spread: (max - min) / median of from_vm over the runs\n");
  std::printf("\nflatness (ns/packet at 10,000 VMs vs 1 VM):\n");
  for (int rules : {10, 1000})
    for (bool deep : {true, false}) {
      double one = 0, many = 0, rone = 0, rmany = 0;
      for (const auto& r : rows)
        if (r.rules == rules && r.deep == deep) {
          if (r.vms == 1) one = r.from_vm, rone = r.minimal;
          if (r.vms == 10000) many = r.from_vm, rmany = r.minimal;
        }
      std::printf("  %4d rules, dst %s: from_vm %+.1f%%, minimal %+.1f%%\n", rules, deep ? "/24" : "0/0",
                  (many / one - 1) * 100, (rmany / rone - 1) * 100);
    }
  std::printf("\n");

  // Where the time goes: the same program with parts of its path switched
  // off by what it is given (mode, destination), at 10,000 VMs / 1,000 rules.
  std::printf("breakdown at 10,000 VMs, 1,000 rules (same run, ns/packet):\n");
  {
    Setup s(10000, 1000);
    std::string dst = s.allowed_dst();
    Frame f = ack_to(dst);
    // A peer of the VM's own group (group "bench0", the VM under test's name).
    s.install(R"({ "name": "peer", "interface": "vmpeer", "mac": "02:00:00:00:00:03",
                   "addresses": ["198.18.0.2/32"], "group": "bench0" })",
              99999);
    std::vector<Variant> vs = {
        {"ref_empty", s.empty(), f, kPass},
        {"ref_minimal", s.minimal(), f, kPass},
        {"from_vm filtered (full path)", s.from_vm(), f, kPass},
        {"from_vm to a group peer (no policy LPM)", s.from_vm(), ack_to("198.18.0.2"), kPass},
        {"to_vm reply of the flow (flow LRU)", s.to_vm(), ack_from(dst), kPass},
    };
    // The reply needs the flow the VM opened: a SYN first.
    Frame syn = Packet().eth(kVmMac, kGwMac).ipv4(ip(vm_addr(0)), ip(dst)).tcp(40000, 443, SYN).payload(10).build();
    if (test_run(s.from_vm(), kIfindex, syn.bytes).retval != kPass) die("SYN not allowed");
    auto m = measure(vs, o);
    for (size_t i = 0; i < vs.size(); ++i) std::printf("  %-44s %7.1f\n", vs[i].name.c_str(), m[i].median);

    // Mode variants of the VM under test (a re-install: new generation).
    s.install(vm_under_test(1000, "direct"), kIfindex);
    auto direct = measure({{"direct", s.from_vm(), f, kPass}}, o);
    std::printf("  %-44s %7.1f\n", "from_vm mode direct (no policy, no flow key)", direct[0].median);
    s.install(vm_under_test(1000, "conntrack"), kIfindex);
    if (test_run(s.from_vm(), kIfindex, syn.bytes).retval != kPass) die("conntrack SYN not allowed");
    auto ct = measure({{"conntrack", s.from_vm(), f, kPass}}, o);
    std::printf("  %-44s %7.1f\n", "from_vm mode conntrack, cached flow (LRU)", ct[0].median);
  }

  // What makes the cost grow with the VM count: the same 10 rules, with the
  // other VMs' policies in the shared egress trie, or with none of theirs.
  std::printf("\nflatness diagnosis, 10 rules, 1 -> 10,000 VMs (ns/packet, interleaved):\n");
  for (bool others_rules : {true, false}) {
    Setup one(1, 10, "filtered", others_rules), many(10000, 10, "filtered", others_rules);
    Frame f1 = ack_to(one.allowed_dst()), fm = ack_to(many.allowed_dst());
    auto m = measure({{"ref_minimal 1", one.minimal(), f1, kPass},
                      {"ref_minimal 10000", many.minimal(), fm, kPass},
                      {"from_vm 1", one.from_vm(), f1, kPass},
                      {"from_vm 10000", many.from_vm(), fm, kPass}},
                     o);
    std::printf("  other VMs %-33s minimal %6.1f -> %6.1f (%+.0f%%)   from_vm %6.1f -> %6.1f (%+.0f%%)\n",
                others_rules ? "with a rule each (shared trie):" : "with no policy entries:", m[0].median, m[1].median,
                (m[1] / m[0] - 1) * 100, m[2].median, m[3].median, (m[3] / m[2] - 1) * 100);
  }
  return 0;
}
