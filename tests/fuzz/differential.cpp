// Differential fuzzer: random valid specs and random/mutated frames, each run
// through the real datapath (BPF_PROG_TEST_RUN on the TC programs, maps filled
// by the agent's own parser, compiler and MapWriter via tests/bpf/harness.h)
// and through the reference model (tests/fuzz/model.*, written from the
// README). Verdict and drop reason must agree.
//
//   vmfence_fuzz --frames N --seed S [--world-frames M] [--world W] [--out DIR]
//                [--examples K] [--quiet] [--trace] [--allow-pending]
//
// A world is one spec set (1-64 VMs) with a freshly loaded datapath; it gets
// M frames (default 10000), then the next world. World W of seed S is always
// the same specs and frames: `--seed S --world W` replays it alone.
//
// On a mismatch: the seed, world and frame index, a minimal spec (host + the
// VMs the frame names), the frame in hex, and a pcap of the scenario's frames
// up to the mismatching one (first K per class, in --out, default
// ./fuzz-out). Mismatches are counted by class (hook | model rule | model
// verdict | datapath verdict). Exit 1 on any mismatch not on kAllowList
// (nor, with --allow-pending, on kPendingDatapath: reported datapath bugs).
// --trace prints every frame's verdicts and, on a mismatch, both flow tables.
//
// Needs root and the kernel (a private netns, bpffs, BPF_PROG_TEST_RUN).
#include <bpf/bpf.h>
#include <linux/bpf.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "maps/reasons.h"
#include "tests/bpf/harness.h"
#include "tests/fuzz/gen.h"
#include "tests/fuzz/model.h"

using namespace vmfence;
using namespace vmfence::fuzz;

namespace {

// Known ambiguities between the README and the model: a mismatch class
// listed here is reported but does not fail the run. Each entry says why.
// Empty: every mismatch is either a datapath bug or a model error to fix.
struct Allowed {
  const char* class_prefix;
  const char* why;
};
const Allowed kAllowList[] = {
    {nullptr, nullptr},
};

// Datapath bugs found by this fuzzer and reported to the datapath's owner,
// not yet fixed. They fail the run like any mismatch unless --allow-pending
// is given (long soaks: count only what is new). Delete an entry once the
// datapath is fixed; a class that no longer occurs is reported as stale.
const Allowed kPendingDatapath[] = {
    {nullptr, nullptr},  // none pending: the seven reported in issue 8 are fixed
};

bool allowed(const std::string& cls) {
  for (const auto& a : kAllowList)
    if (a.class_prefix && cls.rfind(a.class_prefix, 0) == 0) return true;
  return false;
}
// An entry starting with '*' matches anywhere in the class, else a prefix.
bool pending(const std::string& cls) {
  for (const auto& a : kPendingDatapath) {
    if (!a.class_prefix) continue;
    std::string pat = a.class_prefix;
    if (pat[0] == '*' ? cls.find(pat.substr(1)) != std::string::npos : cls.rfind(pat, 0) == 0) return true;
  }
  return false;
}

struct Args {
  uint64_t frames = 200000;
  uint64_t seed = 1;
  uint64_t world_frames = 10000;
  int64_t only_world = -1;
  std::string out = "fuzz-out";
  int examples = 2;
  bool quiet = false;
  bool trace = false;          // every frame's verdicts (with --world: a replay)
  bool allow_pending = false;  // kPendingDatapath classes do not fail the run
};

uint64_t mix(uint64_t seed, uint64_t world) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + world + 1;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::string hex(const std::vector<uint8_t>& b) {
  std::string s;
  char buf[4];
  for (size_t i = 0; i < b.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%02x", b[i]);
    s += buf;
  }
  return s;
}

void write_pcap(const std::string& path, const std::vector<std::vector<uint8_t>>& frames) {
  std::ofstream o(path, std::ios::binary);
  auto w32 = [&](uint32_t v) { o.write(reinterpret_cast<const char*>(&v), 4); };
  auto w16 = [&](uint16_t v) { o.write(reinterpret_cast<const char*>(&v), 2); };
  w32(0xa1b2c3d4), w16(2), w16(4), w32(0), w32(0), w32(65535), w32(1);  // LINKTYPE_ETHERNET
  uint32_t t = 0;
  for (const auto& f : frames) {
    w32(t++), w32(0), w32(static_cast<uint32_t>(f.size())), w32(static_cast<uint32_t>(f.size()));
    o.write(reinterpret_cast<const char*>(f.data()), static_cast<std::streamsize>(f.size()));
  }
}

bool contains_bytes(const std::vector<uint8_t>& hay, const uint8_t* needle, size_t n) {
  if (hay.size() < n) return false;
  for (size_t i = 0; i + n <= hay.size(); ++i)
    if (std::memcmp(&hay[i], needle, n) == 0) return true;
  return false;
}

// Host + the VM under test + every VM whose MAC or an address (a routed
// prefix: its network bytes) appears in the frame.
std::string minimal_spec(const GenWorld& gw, size_t vm, const std::vector<uint8_t>& frame, bool limits) {
  std::ostringstream o;
  o << "host.json: " << gw.host_json << "\n";
  for (size_t i = 0; i < gw.model.vms.size(); ++i) {
    const MVm& v = gw.model.vms[i];
    bool named = i == vm || contains_bytes(frame, v.mac.data(), 6);
    for (const auto& n : v.addrs) {
      size_t len = n.a.fam == 4 ? (n.plen + 7) / 8 : (n.plen + 7) / 8;
      if (len >= 3 && contains_bytes(frame, n.a.b.data(), len)) named = true;
    }
    if (named) o << "vms.d/" << v.name << ".json: " << vm_json(v, limits) << "\n";
  }
  return o.str();
}

// Entries of a VM's flow table in the datapath (diagnostics for --trace):
// an array/hash of maps indexed by slot, or one shared map. -1 when unknown.
long dp_flow_count(int map_fd, uint32_t slot) {
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(map_fd, &info, &len) != 0) return -1;
  Fd inner;
  int fd = map_fd;
  if (info.type == BPF_MAP_TYPE_ARRAY_OF_MAPS || info.type == BPF_MAP_TYPE_HASH_OF_MAPS) {
    uint32_t id = 0;
    if (bpf_map_lookup_elem(map_fd, &slot, &id) != 0) return 0;
    inner = Fd(bpf_map_get_fd_by_id(id));
    if (!inner.valid()) return -1;
    fd = inner.get();
    len = sizeof(info);
    if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) return -1;
  }
  return static_cast<long>(count_entries(fd, info.key_size));
}

// Flow keys of a VM's table in the datapath (diagnostics for --trace on a
// mismatch): vm_addr[16] peer_addr[16] vm_port peer_port vm_id proto.
void dump_dp_flows(int map_fd, uint32_t slot) {
  uint32_t id = 0;
  if (bpf_map_lookup_elem(map_fd, &slot, &id) != 0) return;
  Fd inner(bpf_map_get_fd_by_id(id));
  if (!inner.valid()) return;
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(inner.get(), &info, &len) != 0) return;
  std::vector<uint8_t> key(info.key_size), next(info.key_size);
  void* prev = nullptr;
  while (bpf_map_get_next_key(inner.get(), prev, next.data()) == 0) {
    key = next;
    prev = key.data();
    Addr va, pa;
    va.fam = pa.fam = 6;
    std::memcpy(va.b.data(), &key[0], 16);
    std::memcpy(pa.b.data(), &key[16], 16);
    std::cout << "    dp flow proto " << int(key[40]) << " vm " << va.str() << " port " << (key[32] << 8 | key[33])
              << " peer " << pa.str() << " port " << (key[34] << 8 | key[35]) << "\n";
  }
}

std::string verdict_str(bool pass, const std::string& reason) { return pass ? "pass" : "drop:" + reason; }

struct Stats {
  double setup_secs = 0, teardown_secs = 0;
  uint64_t frames = 0, skipped = 0, worlds = 0, worlds_rejected = 0, mismatches = 0, unexplained = 0;
  std::map<std::string, uint64_t> by_class;
  std::map<std::string, int> printed;
  std::map<std::string, uint64_t> model_reasons;
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << k << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--frames")
      a.frames = std::stoull(next());
    else if (k == "--seed")
      a.seed = std::stoull(next());
    else if (k == "--world-frames")
      a.world_frames = std::stoull(next());
    else if (k == "--world")
      a.only_world = std::stoll(next());
    else if (k == "--out")
      a.out = next();
    else if (k == "--examples")
      a.examples = std::stoi(next());
    else if (k == "--quiet")
      a.quiet = true;
    else if (k == "--trace")
      a.trace = true;
    else if (k == "--allow-pending")
      a.allow_pending = true;
    else {
      std::cerr << "usage: " << argv[0]
                << " --frames N --seed S [--world-frames M] [--world W] [--out DIR] [--examples K] [--quiet] [--trace]"
                   " [--allow-pending]\n";
      return 2;
    }
  }
  const std::string& why = test::TestNet::get().unavailable();
  if (!why.empty()) {
    std::cerr << "vmfence_fuzz: cannot run: " << why << "\n";
    return 2;
  }
  // Does the spec parser know limits.flows (README "Flow state per VM")?
  GenOptions opt;
  {
    std::vector<SpecError> errors;
    HostSpec h = parse_host("host.json", "{}", errors);
    parse_vm(
        "probe.json",
        R"({"name":"p","interface":"p0","mac":"02:00:00:00:00:02","addresses":["10.0.0.2/32"],"limits":{"flows":4}})",
        h.on_violation, errors);
    opt.limits = errors.empty();
  }
  uint32_t wan_ifindex = test::TestNet::get().tap("fzwan");
  ::mkdir(a.out.c_str(), 0755);

  Stats st;
  auto t0 = std::chrono::steady_clock::now();
  uint64_t world_idx = a.only_world >= 0 ? static_cast<uint64_t>(a.only_world) : 0;
  while (st.frames + st.skipped < a.frames) {
    Gen g(mix(a.seed, world_idx), opt);
    GenWorld gw = g.world();
    std::string err;
    auto ts = std::chrono::steady_clock::now();
    auto w = test::World::create(gw.host_json, gw.vm_jsons, err);
    st.setup_secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count();
    if (!w) {
      ++st.worlds_rejected;
      std::string cls = "setup | spec_rejected";
      ++st.by_class[cls];
      ++st.mismatches;
      if (!allowed(cls)) ++st.unexplained;
      if (st.printed[cls]++ < a.examples) {
        std::cout << "MISMATCH " << cls << "\n  seed " << a.seed << " world " << world_idx << ": " << err << "\n";
        std::cout << "  host.json: " << gw.host_json << "\n";
        for (const auto& j : gw.vm_jsons) std::cout << "  " << j << "\n";
      }
      if (a.only_world >= 0) break;
      ++world_idx;
      continue;
    }
    ++st.worlds;
    Model model(gw.model);
    std::vector<uint32_t> ifindex, slot;
    std::vector<vmfence_counters> last;
    for (const auto& vm : gw.model.vms) {
      uint32_t idx = test::TestNet::get().tap(vm.iface);
      auto entry = w->vm_entry(idx);
      ifindex.push_back(idx);
      slot.push_back(entry ? entry->slot : 0);
      last.push_back(w->counters(slot.back()));
    }
    // A VM whose flow table a pending-class frame changed differently in the
    // model and the datapath (same verdict, e.g. both pass, but only one
    // recorded a flow): its later flow_limit mismatches are that cascade.
    std::vector<bool> flows_tainted(gw.model.vms.size(), false);
    uint64_t budget = std::min(a.world_frames, a.frames - st.frames - st.skipped);
    uint64_t in_world = 0;
    while (in_world < budget) {
      std::vector<Shot> shots = g.scenario(gw.model);
      std::vector<std::vector<uint8_t>> so_far;
      // A mismatch leaves model and datapath with different state (a flow
      // one of them recorded): later mismatches of the same scenario are
      // classed as its cascade and share its status (allowed / pending).
      enum { kClean, kRootAllowed, kRootPending, kRootNew } root = kClean;
      for (const Shot& s : shots) {
        if (in_world >= budget) break;
        ++in_world;
        so_far.push_back(s.frame);
        Verdict mv = model.judge(s.vm, s.hook, s.mark, s.frame);
        __sk_buff ctx{};
        ctx.ifindex = ifindex[s.vm];
        ctx.mark = s.mark;
        ctx.ingress_ifindex = s.hook == Hook::from_vm              ? ifindex[s.vm]
                              : s.ingress_vm < gw.model.vms.size() ? ifindex[s.ingress_vm]
                                                                   : wan_ifindex;
        __sk_buff out{};
        bpf_test_run_opts o{};
        o.sz = sizeof(o);
        o.data_in = s.frame.data();
        o.data_size_in = static_cast<uint32_t>(s.frame.size());
        o.ctx_in = &ctx;
        o.ctx_size_in = sizeof(ctx);
        o.ctx_out = &out;
        o.ctx_size_out = sizeof(out);
        o.repeat = 1;
        int prog = s.hook == Hook::from_vm ? w->dp().from_vm_prog_fd() : w->dp().to_vm_prog_fd();
        if (bpf_prog_test_run_opts(prog, &o) != 0) {
          // BPF_PROG_TEST_RUN refuses frames with a cut IPv4/IPv6 header.
          ++st.skipped;
          model.commit(false);
          continue;
        }
        ++st.frames;
        vmfence_counters now = w->counters(slot[s.vm]);
        std::string dp_reason;
        constexpr size_t kSlots = sizeof(now.drops) / sizeof(now.drops[0]);
        for (size_t r = 0; r < kSlots; ++r) {
          if (now.drops[r] == last[s.vm].drops[r]) continue;
          std::string n = reason_name(static_cast<uint8_t>(r));
          if (n == "unknown") n = "reason#" + std::to_string(r);
          dp_reason += (dp_reason.empty() ? "" : "+") + n;
        }
        last[s.vm] = now;
        int rv = static_cast<int>(o.retval);
        bool dp_pass = rv == -1 || rv == 0;
        std::string dpv = dp_pass   ? (dp_reason.empty() ? "pass" : "pass+counted:" + dp_reason)
                          : rv == 2 ? "drop:" + (dp_reason.empty() ? std::string("(none)") : dp_reason)
                                    : "retval:" + std::to_string(rv);
        std::string mvs = verdict_str(mv.pass, mv.reason);
        ++st.model_reasons[s.hook == Hook::from_vm ? "from_vm " + mvs : "to_vm " + mvs];
        std::string note;
        if (mvs == dpv && mv.pass && mv.vouch && s.hook == Hook::from_vm) {
          // README "Same group": from_vm sets bit 0x10000000, no other bit touched.
          if (!(out.mark & kVouchMark))
            dpv = "pass(no vouch mark)";
          else if ((out.mark & ~kVouchMark) != (s.mark & ~kVouchMark))
            dpv = "pass(mark bits changed)";
        }
        model.commit(dp_pass);
        if (a.trace)
          std::cout << "  #" << in_world - 1 << " " << gw.model.vms[s.vm].name << " "
                    << (s.hook == Hook::from_vm ? "from_vm" : "to_vm") << " " << s.kind << ": model " << mvs << " ("
                    << mv.rule << ", " << model.flow_count(s.vm) << " flows) datapath " << dpv << " ("
                    << dp_flow_count(w->maps().flows.get(), slot[s.vm]) << " flows)\n";
        if (mvs == dpv) {
          std::string same_cls = std::string(s.hook == Hook::from_vm ? "from_vm" : "to_vm") + " | " + mv.rule +
                                 " | model " + mvs + " | datapath " + dpv;
          if (!flows_tainted[s.vm] && pending(same_cls) &&
              dp_flow_count(w->maps().flows.get(), slot[s.vm]) != static_cast<long>(model.flow_count(s.vm)))
            flows_tainted[s.vm] = true;
          continue;
        }
        if (a.trace) {
          dump_dp_flows(w->maps().flows.get(), slot[s.vm]);
          for (const auto& k : model.flows(s.vm))
            std::cout << "    model flow proto " << int(k.proto) << " vm " << k.vm.str() << " port " << k.vm_port
                      << " peer " << k.peer.str() << " port " << k.peer_port << "\n";
        }
        const char* hook = s.hook == Hook::from_vm ? "from_vm" : "to_vm";
        std::string cls = std::string(hook) + " | " + mv.rule + " | model " + mvs + " | datapath " + dpv;
        bool ok;
        if (root == kClean && flows_tainted[s.vm] && cls.find("flow_limit") != std::string::npos) root = kRootPending;
        if (root == kClean) {
          root = allowed(cls) ? kRootAllowed : pending(cls) ? kRootPending : kRootNew;
          ok = root == kRootAllowed || (root == kRootPending && a.allow_pending);
        } else {
          cls = std::string(root == kRootAllowed   ? "cascade of an allowed"
                            : root == kRootPending ? "cascade of a pending"
                                                   : "cascade of a new") +
                " mismatch | " + cls;
          ok = root == kRootAllowed || (root == kRootPending && a.allow_pending);
        }
        ++st.mismatches;
        ++st.by_class[cls];
        if (!ok) ++st.unexplained;
        if (st.printed[cls]++ < a.examples) {
          const MVm& vm = gw.model.vms[s.vm];
          std::cout << "MISMATCH " << cls << "\n"
                    << "  seed " << a.seed << " world " << world_idx << " frame " << in_world - 1 << " (replay: --seed "
                    << a.seed << " --world " << world_idx << " --frames " << in_world << ")\n"
                    << "  vm " << vm.name << " (" << mmode_name(vm.mode) << ", group " << vm.group << ") hook " << hook
                    << " mark 0x" << std::hex << s.mark << std::dec << " kind " << s.kind << "\n"
                    << minimal_spec(gw, s.vm, s.frame, opt.limits) << "  frame " << hex(s.frame) << "\n";
          std::string pcap = a.out + "/seed" + std::to_string(a.seed) + "-w" + std::to_string(world_idx) + "-f" +
                             std::to_string(in_world - 1) + ".pcap";
          write_pcap(pcap, so_far);
          std::cout << "  pcap " << pcap << " (" << so_far.size() << " frame(s) of the scenario)\n";
        }
      }
    }
    auto td = std::chrono::steady_clock::now();
    w.reset();
    st.teardown_secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - td).count();
    if (!a.quiet) {
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::cerr << "world " << world_idx << ": " << gw.model.vms.size() << " VMs; " << st.frames << " frames, "
                << st.mismatches << " mismatches, " << static_cast<uint64_t>(st.frames / (secs > 0 ? secs : 1))
                << " frames/s\n";
    }
    if (a.only_world >= 0) break;
    ++world_idx;
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "\n== vmfence_fuzz seed " << a.seed << ": " << st.frames << " frames (" << st.skipped
            << " refused by BPF_PROG_TEST_RUN), " << st.worlds << " worlds (" << st.worlds_rejected << " rejected), "
            << secs << " s, " << static_cast<uint64_t>(st.frames / (secs > 0 ? secs : 1))
            << " frames/s (datapath setup " << st.setup_secs << " s, teardown " << st.teardown_secs << " s)\n";
  std::cout << "model verdicts:\n";
  for (const auto& [k, n] : st.model_reasons) std::cout << "  " << n << "\t" << k << "\n";
  std::cout << "mismatches: " << st.mismatches << " (" << st.unexplained << " unexplained: not on the allow-list"
            << (a.allow_pending ? " nor pending" : "") << ")\n";
  for (const auto& [cls, n] : st.by_class)
    std::cout << "  " << n << "\t" << cls
              << (allowed(cls)   ? "   [allow-listed]"
                  : pending(cls) ? "   [reported datapath bug, pending]"
                                 : "")
              << "\n";
  return st.unexplained ? 1 : 0;
}
