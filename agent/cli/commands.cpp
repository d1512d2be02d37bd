#include "agent/cli/commands.h"

#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/ip6.h>
#include <signal.h>
#include <spdlog/fmt/fmt.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "agent/daemon/state_file.h"
#include "agent/datapath/loader.h"
#include "agent/events/events.h"
#include "agent/fleet/fleet.h"
#include "agent/nft/nft.h"
#include "agent/spec/json.h"
#include "maps/compiler.h"
#include "maps/pinned_maps.h"
#include "maps/reasons.h"
#include "vmfence_tc.skel.h"

namespace vmfence {

namespace fs = std::filesystem;

// Local VMs that an earlier claim of another host's VM beats (README
// "Fleet"), asked of etcd; nullopt when the cluster cannot be asked.
static std::optional<std::vector<SpecError>> fleet_conflicts(const FleetSpec& spec, const std::vector<VmSpec>& vms,
                                                             std::string* why) {
  fleet::EtcdClient client(fleet::etcd_options(spec));
  fleet::RangeResult list;
  if (auto s = client.range_prefix(fleet::vms_prefix(spec.prefix), 0, &list); !s) {
    *why = s.message;
    return std::nullopt;
  }
  fleet::Records records;
  for (const auto& kv : list.kvs)
    if (auto r = fleet::record_from(spec.prefix, kv)) records[kv.key] = std::move(*r);
  std::vector<const VmSpec*> local;
  for (const auto& vm : vms) local.push_back(&vm);
  std::vector<SpecError> out;
  for (const auto& [name, l] : fleet::resolve(spec.host, local, records).local_losers) out.push_back(l.error);
  return out;
}

int cmd_check(const std::string& config_dir) {
  SpecLoad load = load_spec(config_dir);
  Plan plan = compile(load.spec);
  // Errors on stderr, one per line; the OK line on stdout.
  for (const auto& e : load.errors) std::fprintf(stderr, "%s\n", e.str().c_str());
  if (load.ok())
    for (const auto& e : plan.errors) std::fprintf(stderr, "%s\n", e.str().c_str());
  if (!load.ok() || !plan.ok()) return 1;
  if (const auto& f = load.spec.host.fleet) {
    std::string why;
    auto conflicts = fleet_conflicts(*f, load.spec.vms, &why);
    if (!conflicts) {
      std::fprintf(stderr,
                   "%s: fleet.etcd: the cluster could not be asked (%s); checked the local files only, not "
                   "addresses other hosts' VMs claim\n",
                   load.spec.host.file.c_str(), why.c_str());
    } else {
      for (const auto& e : *conflicts) std::fprintf(stderr, "%s\n", e.str().c_str());
      if (!conflicts->empty()) return 1;
    }
  }
  std::printf("%s: OK (%zu VMs)\n", config_dir.c_str(), load.spec.vms.size());
  return 0;
}

// --- down ---------------------------------------------------------------------

// The running agent of this pin dir, if any (a stopped agent is not restarted by down).
static pid_t running_agent() {
  std::ifstream f(run_dir() + "/vms.json");
  std::string text((std::istreambuf_iterator<char>(f)), {});
  auto pos = text.find("\"pid\": ");
  if (pos == std::string::npos) return 0;
  pid_t pid = static_cast<pid_t>(std::atoi(text.c_str() + pos + 7));
  std::ifstream comm("/proc/" + std::to_string(pid) + "/comm");
  std::string name;
  std::getline(comm, name);
  return pid > 0 && pid != getpid() && name == "vmfence" ? pid : 0;
}

int cmd_down(const std::string& config_dir) {
  // Everything vmfence owns in the kernel is found under its pin dir and
  // table; the config names the fleet whose records go too.
  std::string dir = pin_dir();
  if (pid_t pid = running_agent()) {
    std::printf("stopping agent (pid %d)\n", pid);
    kill(pid, SIGTERM);
    for (int i = 0; i < 500 && kill(pid, 0) == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  int rc = 0;
  std::vector<SpecError> host_errors;
  std::ifstream host_in(config_dir + "/host.json");
  std::string host_text((std::istreambuf_iterator<char>(host_in)), {});
  HostSpec host = parse_host(config_dir + "/host.json", host_text, host_errors);
  if (host.fleet) {
    if (auto s = fleet::Fleet::withdraw(*host.fleet, run_dir()); !s) {
      std::fprintf(stderr, "vmfence down: fleet: %s (this host's records expire with its lease, %u s)\n",
                   s.message.c_str(), host.fleet->lease_s);
      rc = 1;
    } else {
      std::printf("deleted host %s's records from etcd\n", host.fleet->host.c_str());
    }
  }
  for (uint32_t ifindex : Datapath::linked_ifindexes(dir)) {
    Datapath::detach(dir, ifindex);
    char name[IF_NAMESIZE] = "";
    std::printf("detached from %s (ifindex %u)\n", if_indextoname(ifindex, name) ? name : "?", ifindex);
  }
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    auto n = fs::remove_all(dir, ec);
    if (ec) {
      std::fprintf(stderr, "vmfence down: remove %s: %s\n", dir.c_str(), ec.message().c_str());
      rc = 1;
    } else {
      std::printf("removed %s (%ju pinned objects)\n", dir.c_str(), static_cast<uintmax_t>(n));
    }
  }
  if (auto r = nft::remove(); !r) {
    std::fprintf(stderr, "vmfence down: nftables: %s\n", r.message.c_str());
    rc = 1;
  } else {
    std::printf("removed nftables table inet vmfence\n");
  }
  fs::remove(run_dir() + "/vms.json", ec);
  return rc;
}

// --- status -------------------------------------------------------------------

static uint32_t map_max_entries(int fd, uint32_t* type = nullptr) {
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) return 0;
  if (type) *type = info.type;
  return info.max_entries;
}

static bool attached(const std::string& dir, uint32_t ifindex) { return ifindex && Datapath::attached(dir, ifindex); }

namespace {

// A trie key as the operator wrote it: IPv4 for IPv4-mapped prefixes.
std::string prefix_text(const vmfence_addr_key& k) {
  static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  Cidr c;
  std::memcpy(c.addr.data(), k.addr, 16);
  bool v4 = k.prefixlen >= 96 && std::memcmp(k.addr, mapped, 12) == 0;
  c.family = v4 ? 4 : 6;
  c.prefix_len = static_cast<uint8_t>(v4 ? k.prefixlen - 96 : k.prefixlen);
  return c.str();
}

std::string port_rule_text(const vmfence_port_rule& r) {
  std::string proto = proto_name(static_cast<Proto>(r.proto));
  if (r.port_lo == 0 && r.port_hi == 65535) return proto;
  if (r.port_lo == r.port_hi) return fmt::format("{} {}", proto, r.port_lo);
  return fmt::format("{} {}-{}", proto, r.port_lo, r.port_hi);
}

// A VM's rules as the kernel holds them: from its live generation when its
// interface is bound, else from the pinned tries of its last generation.
PolicyRules vm_rules(const MapSet& maps, const std::string& dir, const std::string& name, bool egress,
                     const vmfence_vm* vm) {
  if (vm) return read_policy(maps, egress, vm->slot, vm->policy_id);
  return read_policy(dir + "/policy/" + policy_pin_name(name) + (egress ? "_egress" : "_ingress"));
}

void rules_json(rj::PrettyWriter<rj::StringBuffer>& w, const PolicyRules& rules) {
  w.StartArray();
  for (const auto& [k, v] : rules) {
    w.StartObject();
    w.Key("prefix");
    w.String(prefix_text(k).c_str());
    w.Key("allow");
    w.StartArray();
    for (int i = 0; i < v.count && i < VMFENCE_MAX_PORT_RULES; ++i) w.String(port_rule_text(v.rules[i]).c_str());
    w.EndArray();
    w.Key("vm_address_space");
    w.Bool(v.flags & VMFENCE_POLICY_F_VM_NET);
    w.Key("imds");
    w.Bool(v.flags & VMFENCE_POLICY_F_IMDS);
    w.EndObject();
  }
  w.EndArray();
}

std::string rules_text(const char* dir, const PolicyRules& rules) {
  std::string out = fmt::format("  {} rules ({} prefixes, longest match wins):\n", dir, rules.size());
  for (const auto& [k, v] : rules) {
    std::string allow;
    for (int i = 0; i < v.count && i < VMFENCE_MAX_PORT_RULES; ++i)
      allow += (allow.empty() ? "" : ", ") + port_rule_text(v.rules[i]);
    out += fmt::format("    {:<24} {}{}{}\n", prefix_text(k), allow.empty() ? "deny" : allow,
                       v.flags & VMFENCE_POLICY_F_VM_NET ? "  [VM address space: group decides]" : "",
                       v.flags & VMFENCE_POLICY_F_IMDS ? "  [IMDS]" : "");
  }
  return out;
}

}  // namespace

// The fleet part of `status`: etcd's state, the age of the remote view and
// the remote VMs (README "Fleet"). Nothing without a fleet.
static void fleet_status(bool json, rj::PrettyWriter<rj::StringBuffer>& w, std::string& out) {
  auto f = read_fleet_status(run_dir());
  if (!f) return;
  int64_t now_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  double age = f->confirmed_ns ? std::max(0.0, (now_ns - f->confirmed_ns) / 1e9) : -1;
  std::vector<const fleet::Record*> remote;
  fleet::Records records = fleet::Fleet::load_saved_view(run_dir());
  for (const auto& [key, r] : records)
    if (r.host != f->host) remote.push_back(&r);
  if (json) {
    w.Key("fleet");
    w.StartObject();
    w.Key("host");
    w.String(f->host.c_str());
    w.Key("etcd_connected");
    w.Bool(f->connected);
    w.Key("synced");
    w.Bool(f->synced);
    w.Key("sync_age_seconds");
    if (age < 0)
      w.Null();
    else
      w.Double(std::round(age * 10) / 10);
    w.Key("conflicts");
    w.Uint64(f->conflicts);
    w.Key("last_error");
    w.String(f->error.c_str());
    w.Key("remote_vms");
    w.StartArray();
    for (const auto* r : remote) {
      w.StartObject();
      w.Key("name");
      w.String(r->name.c_str());
      w.Key("host");
      w.String(r->host.c_str());
      w.Key("group");
      w.String(r->group.c_str());
      w.Key("addresses");
      w.StartArray();
      for (const auto& a : r->addresses) w.String(a.str().c_str());
      w.EndArray();
      w.Key("revision");
      w.Int64(r->create_revision);
      w.EndObject();
    }
    w.EndArray();
    w.EndObject();
    return;
  }
  out += fmt::format("fleet: host {}, etcd {}, remote view {}, {} remote VMs{}\n", f->host,
                     f->connected ? "connected" : "UNREACHABLE (enforcing the last known view)",
                     age < 0 ? std::string("never synced") : fmt::format("{:.1f} s old", age), remote.size(),
                     f->conflicts ? fmt::format(", {} local VMs refused for a conflict", f->conflicts) : "");
  if (!f->connected && !f->error.empty()) out += "  last error: " + f->error + "\n";
  for (const auto* r : remote) {
    std::string addrs;
    for (const auto& a : r->addresses) addrs += (addrs.empty() ? "" : ",") + a.str();
    out += fmt::format("  remote {:<20} host {:<16} group {:<16} {}\n", r->name, r->host, r->group, addrs);
  }
}

int cmd_status(const StatusOptions& opt) {
  bool json = opt.json;
  std::string dir = pin_dir();
  MapSet maps;
  if (auto s = MapSet::open_pinned(dir, maps); !s) {
    std::fprintf(stderr, "vmfence status: no datapath (%s)\n", s.message.c_str());
    return 1;
  }
  State st = read_state(run_dir());
  auto name_of = [&](uint32_t vm_id) -> const StateVm* {
    for (const auto& n : st.vms)
      if (n.vm_id == vm_id) return &n;
    return nullptr;
  };
  rj::StringBuffer buf;
  rj::PrettyWriter<rj::StringBuffer> w(buf);
  std::string out;
  size_t shown = 0;  // VMs and refused files matching --vm
  if (json) {
    w.StartObject();
    w.Key("pin_dir");
    w.String(dir.c_str());
    w.Key("vms");
    w.StartArray();
  }
  for (const auto& [ifindex, vm] : read_vms(maps)) {
    const StateVm* n = name_of(vm.vm_id);
    char ifname[IF_NAMESIZE] = "";
    if (!if_indextoname(ifindex, ifname)) std::strcpy(ifname, "?");
    vmfence_counters c{};
    vmfence_state vs{};
    (void)read_counters(maps, vm.slot, c);  // a slot without counters reads as zeros
    (void)read_state(maps, vm.slot, vs);
    std::string name = n ? n->name : fmt::format("vm#{:08x}", vm.vm_id);
    if (!opt.vm.empty() && name != opt.vm) continue;
    ++shown;
    bool no_policy = vm.flags & VMFENCE_VM_F_NO_POLICY;
    bool with_rules = opt.rules && !no_policy;
    bool is_attached = attached(dir, ifindex);
    // Enforced: programs on the interface and the policy installed (a VM
    // the agent reports as not yet attached is not).
    bool enforced = is_attached && !no_policy && (!n || n->enforced);
    const TableFill flows = flow_table_fill(maps, vm.slot);
    if (json) {
      w.StartObject();
      w.Key("name");
      w.String(name.c_str());
      w.Key("interface");
      w.String(ifname);
      w.Key("ifindex");
      w.Uint(ifindex);
      w.Key("attached");
      w.Bool(is_attached);
      w.Key("enforced");
      w.Bool(enforced);
      w.Key("mode");
      w.String(datapath_mode_name(vm.mode));
      w.Key("group");
      w.String(n ? n->group.c_str() : "");
      w.Key("policy_generation");
      w.Uint(vm.policy_id);
      w.Key("quarantined");
      w.Bool(vs.quarantined);
      w.Key("spec_removed");
      w.Bool(no_policy);
      w.Key("no_policy");
      w.Bool(no_policy);
      w.Key("counters");
      w.StartObject();
      w.Key("from_vm_packets");
      w.Uint64(c.from_vm_packets);
      w.Key("from_vm_bytes");
      w.Uint64(c.from_vm_bytes);
      w.Key("to_vm_packets");
      w.Uint64(c.to_vm_packets);
      w.Key("to_vm_bytes");
      w.Uint64(c.to_vm_bytes);
      w.Key("events_suppressed");
      w.Uint64(c.events_suppressed);
      w.Key("events_lost");
      w.Uint64(c.events_lost);
      w.EndObject();
      w.Key("flows");
      w.StartObject();
      w.Key("entries");
      w.Uint64(flows.entries);
      w.Key("max_entries");
      w.Uint(flows.max_entries);
      w.EndObject();
      w.Key("drops");
      w.StartObject();
      for (int r = 1; r < VMFENCE_REASON_COUNT; ++r) {
        w.Key(reason_name(r));
        w.Uint64(c.drops[r]);
      }
      w.EndObject();
      if (with_rules) {
        w.Key("rules");
        w.StartObject();
        w.Key("egress");
        rules_json(w, vm_rules(maps, dir, name, true, &vm));
        w.Key("ingress");
        rules_json(w, vm_rules(maps, dir, name, false, &vm));
        w.EndObject();
      }
      w.EndObject();
    } else {
      out += fmt::format("{} on {} (ifindex {}, {}) mode {} generation {}{}{}\n", name, ifname, ifindex,
                         !is_attached            ? "NOT attached"
                         : enforced || no_policy ? "attached"
                                                 : "NOT enforced",
                         datapath_mode_name(vm.mode), vm.policy_id, vs.quarantined ? " QUARANTINED" : "",
                         no_policy ? " NO POLICY (drop all)" : "");
      out +=
          fmt::format("  from vm: {} packets {} bytes; to vm: {} packets {} bytes; flows {} / {}\n", c.from_vm_packets,
                      c.from_vm_bytes, c.to_vm_packets, c.to_vm_bytes, flows.entries, flows.max_entries);
      std::string drops;
      for (int r = 1; r < VMFENCE_REASON_COUNT; ++r)
        if (c.drops[r]) drops += fmt::format("{}{} {}", drops.empty() ? "" : ", ", reason_name(r), c.drops[r]);
      out += "  drops: " + (drops.empty() ? std::string("none") : drops) + "\n";
      if (c.events_suppressed || c.events_lost)
        out += fmt::format("  events: {} suppressed (budget), {} lost (ring buffer full)\n", c.events_suppressed,
                           c.events_lost);
      if (with_rules)
        out += rules_text("egress", vm_rules(maps, dir, name, true, &vm)) +
               rules_text("ingress", vm_rules(maps, dir, name, false, &vm));
    }
  }
  // VMs the agent knows whose interface is not there.
  for (const auto& n : st.vms) {
    if (n.ifindex) continue;
    if (!opt.vm.empty() && n.name != opt.vm) continue;
    ++shown;
    if (json) {
      w.StartObject();
      w.Key("name");
      w.String(n.name.c_str());
      w.Key("interface");
      w.String(n.interface.c_str());
      w.Key("ifindex");
      w.Uint(0);
      w.Key("attached");
      w.Bool(false);
      w.Key("enforced");
      w.Bool(false);
      w.Key("mode");
      w.String(n.mode.c_str());
      w.Key("group");
      w.String(n.group.c_str());
      w.Key("policy_generation");
      w.Uint(n.policy_id);
      if (opt.rules) {
        w.Key("rules");
        w.StartObject();
        w.Key("egress");
        rules_json(w, vm_rules(maps, dir, n.name, true, nullptr));
        w.Key("ingress");
        rules_json(w, vm_rules(maps, dir, n.name, false, nullptr));
        w.EndObject();
      }
      w.EndObject();
    } else {
      out += fmt::format("{} on {}: interface not present (policy generation {} ready)\n", n.name, n.interface,
                         n.policy_id);
      if (opt.rules)
        out += rules_text("egress", vm_rules(maps, dir, n.name, true, nullptr)) +
               rules_text("ingress", vm_rules(maps, dir, n.name, false, nullptr));
    }
  }
  if (json) {
    w.EndArray();
    w.Key("rejected");
    w.StartArray();
  } else if (!st.rejected.empty()) {
    out += "refused files:\n";
  }
  for (const auto& r : st.rejected) {
    if (!opt.vm.empty() && r.name != opt.vm) continue;
    ++shown;
    if (json) {
      w.StartObject();
      w.Key("file");
      w.String(r.file.c_str());
      w.Key("name");
      w.String(r.name.c_str());
      w.Key("interface");
      w.String(r.interface.c_str());
      w.Key("kept_last_good");
      w.Bool(r.kept_last_good);
      w.Key("errors");
      w.StartArray();
      for (const auto& e : r.errors) w.String(e.c_str());
      w.EndArray();
      w.EndObject();
    } else {
      out += fmt::format("  {}{}\n", r.file,
                         r.kept_last_good      ? fmt::format(" (vm {} keeps its last good policy)", r.name)
                         : r.interface.empty() ? std::string()
                                               : fmt::format(" ({} drops everything)", r.interface));
      for (const auto& e : r.errors) out += "    " + e + "\n";
    }
  }
  if (json) {
    w.EndArray();
    w.Key("maps");
    w.StartObject();
  } else {
    out += "maps:\n";
  }
  if (!opt.vm.empty() && !shown) {
    std::fprintf(stderr, "vmfence status: no VM named %s (neither enforced nor refused)\n", opt.vm.c_str());
    return 1;
  }
  maps.for_each([&](const char* name, int fd) {
    if (!opt.vm.empty()) return;  // one VM: its own lines only
    uint32_t type = 0;
    uint32_t max = map_max_entries(fd, &type);
    // Arrays are always full; the per-VM flow tables are shown with each VM.
    if (type == BPF_MAP_TYPE_RINGBUF || type == BPF_MAP_TYPE_ARRAY || type == BPF_MAP_TYPE_PERCPU_ARRAY ||
        type == BPF_MAP_TYPE_ARRAY_OF_MAPS)
      return;
    bpf_map_info info{};
    uint32_t len = sizeof(info);
    if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) return;
    size_t n = count_entries(fd, info.key_size);
    if (json) {
      w.Key(name);
      w.StartObject();
      w.Key("entries");
      w.Uint64(n);
      w.Key("max_entries");
      w.Uint(max);
      w.EndObject();
    } else {
      out += fmt::format("  {:<24} {:>7} / {:<7} ({:.1f}%)\n", name, n, max, max ? 100.0 * n / max : 0.0);
    }
  });
  if (json) w.EndObject();
  if (opt.vm.empty()) fleet_status(json, w, out);
  if (json) {
    w.EndObject();
    out = std::string(buf.GetString()) + "\n";
  }
  std::fputs(out.c_str(), stdout);
  return 0;
}

// --- wait ---------------------------------------------------------------------

// A refused file for `vm` (by name, or by file name when the file names
// nothing readable) that is still as the daemon saw it: wait fails at once.
static const StateRejected* refused(const State& st, const std::string& vm) {
  // vms.d changed (a file added, removed, renamed) after the agent's last
  // scan: the refusal may be stale; let the agent look first.
  struct stat dir {};
  if (::stat((st.config_dir + "/vms.d").c_str(), &dir) == 0 &&
      int64_t{dir.st_mtim.tv_sec} * 1000000000 + dir.st_mtim.tv_nsec > st.scanned_ns)
    return nullptr;
  for (const auto& r : st.rejected) {
    if (r.kept_last_good) continue;  // the VM is enforced at its last good policy
    bool named = r.name == vm || (r.name.empty() && fs::path(r.file).stem() == vm);
    if (!named) continue;
    struct stat sb {};
    int64_t now = 0;
    if (::stat(r.file.c_str(), &sb) == 0) now = int64_t{sb.st_mtim.tv_sec} * 1000000000 + sb.st_mtim.tv_nsec;
    if (now != r.mtime_ns) continue;  // changed since: the daemon has yet to look at it
    return &r;
  }
  return nullptr;
}

int cmd_wait(const std::string& vm, double timeout_s) {
  std::string dir = pin_dir();
  uint32_t id = name_id(vm);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    // The kernel first (below): a refusal only counts for a VM the agent
    // does not enforce (a second file naming an enforced VM is not it).
    State st = read_state(run_dir());
    bool in_force = std::any_of(st.vms.begin(), st.vms.end(), [&](const StateVm& v) { return v.name == vm; });
    const StateRejected* r = in_force ? nullptr : refused(st, vm);
    if (r) {
      std::fprintf(stderr, "vmfence wait: %s is refused by the running agent:\n", vm.c_str());
      for (const auto& e : r->errors) std::fprintf(stderr, "%s\n", e.c_str());
      return 1;
    }
    MapSet maps;
    if (MapSet::open_pinned(dir, maps)) {
      for (const auto& [ifindex, v] : read_vms(maps))
        if (v.vm_id == id && !(v.flags & VMFENCE_VM_F_NO_POLICY) && attached(dir, ifindex)) {
          char ifname[IF_NAMESIZE] = "?";
          if_indextoname(ifindex, ifname);
          std::printf("%s: enforced on %s (ifindex %u, generation %u)\n", vm.c_str(), ifname, ifindex, v.policy_id);
          return 0;
        }
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      std::fprintf(stderr, "vmfence wait: %s not enforced after %.1f s\n", vm.c_str(), timeout_s);
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// --- explain ------------------------------------------------------------------

std::optional<Target> parse_target(const std::string& text, std::string* why) {
  Target t;
  std::string rest = text, addr;
  auto slash = rest.rfind('/');
  std::string proto;
  if (slash != std::string::npos && rest.find_first_of(".:", slash) == std::string::npos) {
    proto = rest.substr(slash + 1);
    rest = rest.substr(0, slash);
  }
  std::string port;
  if (!rest.empty() && rest[0] == '[') {
    auto close = rest.find(']');
    if (close == std::string::npos) return *why = "missing ']'", std::nullopt;
    addr = rest.substr(1, close - 1);
    if (close + 1 < rest.size()) {
      if (rest[close + 1] != ':') return *why = "expected ':' after ']'", std::nullopt;
      port = rest.substr(close + 2);
    }
  } else if (std::count(rest.begin(), rest.end(), ':') == 1) {
    addr = rest.substr(0, rest.find(':'));
    port = rest.substr(rest.find(':') + 1);
  } else {
    addr = rest;
  }
  auto ip = parse_ip(addr);
  if (!ip) return *why = "'" + addr + "' is not an IP address", std::nullopt;
  t.addr = *ip;
  if (!port.empty()) {
    char* end = nullptr;
    long p = std::strtol(port.c_str(), &end, 10);
    if (!end || *end || p < 0 || p > 65535) return *why = "'" + port + "' is not a port", std::nullopt;
    t.port = static_cast<uint16_t>(p);
    t.has_port = true;
  }
  if (proto.empty()) proto = t.has_port ? "tcp" : (t.addr.family == 4 ? "icmp" : "icmpv6");
  if (proto == "tcp")
    t.proto = Proto::tcp;
  else if (proto == "udp")
    t.proto = Proto::udp;
  else if (proto == "icmp")
    t.proto = Proto::icmp;
  else if (proto == "icmpv6")
    t.proto = Proto::icmpv6;
  else
    return *why = "'" + proto + "' is not tcp, udp, icmp or icmpv6", std::nullopt;
  return t;
}

static std::string rule_text(const char* field, size_t i, const Rule& r) {
  std::string s =
      fmt::format("{}[{}] {{{} {} {}", field, i, field[0] == 'e' ? "to" : "from", r.peer.str(), proto_name(r.proto));
  for (size_t k = 0; k < r.ports.size(); ++k)
    s += fmt::format("{}{}", k ? "," : " ",
                     r.ports[k].lo == r.ports[k].hi ? std::to_string(r.ports[k].lo)
                                                    : fmt::format("{}-{}", r.ports[k].lo, r.ports[k].hi));
  return s + "}";
}

Explanation explain_spec(const Spec& spec, const VmSpec& vm, const Target& t, const std::vector<RemoteVm>& remote) {
  Explanation x;
  // A remote VM (fleet) decides by group like a local one: the datapath
  // looks up the owner of every destination when a fleet is configured.
  for (const auto& other : remote)
    for (const auto& a : other.addresses)
      if (a.family == t.addr.family && a.contains(t.addr)) {
        if (other.group == vm.group) {
          x.allowed = true;
          x.rule = fmt::format("same group '{}' ({} on host {})", vm.group, other.name, other.host);
        } else {
          x.reason = "cross_group";
          x.rule = fmt::format("{} is {} on host {} of group '{}', {} is in group '{}'", t.addr.str(), other.name,
                               other.host, other.group, vm.name, vm.group);
        }
        return x;
      }
  for (const auto& other : spec.vms)
    for (const auto& a : other.addresses)
      if (a.family == t.addr.family && a.contains(t.addr)) {
        if (other.group == vm.group) {
          x.allowed = true;
          x.rule = fmt::format("same group '{}' ({})", vm.group, other.name);
        } else {
          x.reason = "cross_group";
          x.rule = fmt::format("{} is {} of group '{}', {} is in group '{}'", t.addr.str(), other.name, other.group,
                               vm.name, vm.group);
        }
        return x;
      }
  if (vm.mode == Mode::direct) {
    x.allowed = true;
    x.rule = "mode direct: no policy (anti-spoofing and isolation only)";
    return x;
  }
  bool imds =
      spec.host.imds && spec.host.imds->address.family == t.addr.family && spec.host.imds->address.addr == t.addr.addr;
  if (imds) {
    if (vm.imds && t.proto == Proto::tcp && t.port == spec.host.imds->port) {
      x.allowed = true;
      x.rule = fmt::format("imds: true (IMDS {}:{})", spec.host.imds->address.str(), spec.host.imds->port);
      return x;
    }
  }
  // Longest matching prefix wins; every rule whose prefix contains the target applies.
  const Rule* best = nullptr;
  size_t best_i = 0;
  for (size_t i = 0; i < vm.egress.size(); ++i) {
    const Rule& r = vm.egress[i];
    if (r.peer.family != t.addr.family || !r.peer.contains(t.addr)) continue;
    if (imds && r.peer.prefix_len < (t.addr.family == 4 ? 32 : 128)) continue;  // IMDS is fenced off
    bool proto_ok = r.proto == Proto::any || r.proto == t.proto;
    bool port_ok = r.ports.empty() || std::any_of(r.ports.begin(), r.ports.end(),
                                                  [&](const PortRange& p) { return t.port >= p.lo && t.port <= p.hi; });
    if (proto_ok && port_ok && (!best || r.peer.prefix_len > best->peer.prefix_len)) {
      best = &r;
      best_i = i;
    }
  }
  if (best) {
    x.allowed = true;
    x.rule = rule_text("egress", best_i, *best);
    return x;
  }
  x.reason = imds ? "imds_denied" : "egress_denied";
  x.rule = imds ? std::string("IMDS needs \"imds\": true") : std::string("no egress rule matches: default deny");
  return x;
}

// Replay a synthetic packet through a dry-run instance of the loaded
// program: the kernel's own verdict, with no side effects.
static std::string kernel_replay(const VmSpec& vm, const Target& t, bool* allowed, std::string* reason) {
  std::string dir = pin_dir();
  if (!fs::exists(dir + "/" VMFENCE_MAP_VMS)) return "no datapath loaded under " + dir;
  uint32_t ifindex = if_nametoindex(vm.interface.c_str());
  if (!ifindex) return "interface " + vm.interface + " not present";
  const Cidr* src = nullptr;
  for (const auto& a : vm.addresses)
    if (a.family == t.addr.family) {
      src = &a;
      break;
    }
  if (!src) return "the VM has no IPv" + std::to_string(t.addr.family) + " address";

  libbpf_set_print([](enum libbpf_print_level, const char*, va_list) { return 0; });
  LIBBPF_OPTS(bpf_object_open_opts, opts, .pin_root_path = dir.c_str());
  vmfence_tc* skel = vmfence_tc__open_opts(&opts);
  if (!skel) return "open BPF object failed";
  skel->rodata->dry_run = 1;
  if (vmfence_tc__load(skel)) {
    vmfence_tc__destroy(skel);
    return "load dry-run program failed";
  }
  uint8_t pkt[128] = {};
  auto* eth = reinterpret_cast<ethhdr*>(pkt);
  std::memcpy(eth->h_source, vm.mac.data(), 6);
  eth->h_dest[0] = 0x02;
  eth->h_dest[5] = 0x01;
  size_t l4 = 0;
  uint8_t proto = static_cast<uint8_t>(t.proto);
  if (t.addr.family == 4) {
    eth->h_proto = htons(ETH_P_IP);
    auto* ip = reinterpret_cast<iphdr*>(pkt + 14);
    ip->version = 4;
    ip->ihl = 5;
    ip->ttl = 64;
    ip->protocol = proto;
    std::memcpy(&ip->saddr, src->addr.data() + 12, 4);
    std::memcpy(&ip->daddr, t.addr.addr.data() + 12, 4);
    l4 = 34;
    ip->tot_len = htons(20 + 20);
  } else {
    eth->h_proto = htons(ETH_P_IPV6);
    auto* ip6 = reinterpret_cast<ip6_hdr*>(pkt + 14);
    ip6->ip6_vfc = 0x60;
    ip6->ip6_nxt = proto;
    ip6->ip6_hlim = 64;
    ip6->ip6_plen = htons(20);
    std::memcpy(&ip6->ip6_src, src->addr.data(), 16);
    std::memcpy(&ip6->ip6_dst, t.addr.addr.data(), 16);
    l4 = 54;
  }
  if (t.proto == Proto::tcp || t.proto == Proto::udp) {
    uint16_t sport = htons(40000), dport = htons(t.port);
    std::memcpy(pkt + l4, &sport, 2);
    std::memcpy(pkt + l4 + 2, &dport, 2);
    if (t.proto == Proto::tcp) {
      pkt[l4 + 12] = 5 << 4;
      pkt[l4 + 13] = 0x02;  // SYN
    }
  } else {
    pkt[l4] = t.proto == Proto::icmp ? 8 : 128;  // echo request
  }
  __sk_buff ctx{};
  ctx.ifindex = ifindex;
  LIBBPF_OPTS(bpf_test_run_opts, run, .data_in = pkt, .data_size_in = static_cast<uint32_t>(l4 + 20), .ctx_in = &ctx,
              .ctx_size_in = sizeof(ctx));
  std::string err;
  skel->bss->last_reason = 0;
  if (bpf_prog_test_run_opts(bpf_program__fd(skel->progs.vmfence_from_vm), &run) != 0) {
    err = std::string("BPF_PROG_TEST_RUN: ") + std::strerror(errno);
  } else {
    *allowed = static_cast<int>(run.retval) != TC_ACT_SHOT;
    *reason = reason_name(skel->bss->last_reason);
  }
  vmfence_tc__destroy(skel);
  return err;
}

int cmd_explain(const std::string& config_dir, const std::string& vm_name, const std::string& to) {
  std::string why;
  auto t = parse_target(to, &why);
  if (!t) {
    std::fprintf(stderr, "vmfence explain: --to %s: %s\n", to.c_str(), why.c_str());
    return 2;
  }
  SpecLoad load = load_spec(config_dir);
  if (!load.ok()) {
    for (const auto& e : load.errors) std::fprintf(stderr, "%s\n", e.str().c_str());
    return 1;
  }
  const VmSpec* vm = nullptr;
  for (const auto& v : load.spec.vms)
    if (v.name == vm_name) vm = &v;
  if (!vm) {
    std::fprintf(stderr, "vmfence explain: no VM named '%s' in %s/vms.d\n", vm_name.c_str(), config_dir.c_str());
    return 2;
  }
  // Remote VMs as the running agent last saw them (RUN_DIR/fleet-view.json).
  std::vector<RemoteVm> remote;
  if (const auto& f = load.spec.host.fleet)
    for (const auto& [key, r] : fleet::Fleet::load_saved_view(run_dir()))
      if (r.host != f->host) remote.push_back({r.name, r.host, r.group, r.addresses});
  Explanation x = explain_spec(load.spec, *vm, *t, remote);
  std::string target = t->addr.str();
  target = target.substr(0, target.find('/'));
  std::printf("%s -> %s%s/%s: %s", vm->name.c_str(), target.c_str(),
              t->has_port ? (":" + std::to_string(t->port)).c_str() : "", proto_name(t->proto),
              x.allowed ? "ALLOW" : "DENY");
  if (!x.allowed) std::printf(" (%s)", x.reason.c_str());
  std::printf("\n  rule: %s\n", x.rule.c_str());
  bool k_allowed = false;
  std::string k_reason;
  std::string err = kernel_replay(*vm, *t, &k_allowed, &k_reason);
  if (!err.empty()) {
    std::printf("  kernel: not replayed (%s)\n", err.c_str());
    return 0;
  }
  bool agree = k_allowed == x.allowed && (x.allowed || k_reason == x.reason);
  std::printf("  kernel: %s%s (BPF_PROG_TEST_RUN on the loaded program) - %s\n", k_allowed ? "ALLOW" : "DENY",
              k_allowed ? "" : (" (" + k_reason + ")").c_str(), agree ? "agrees" : "DISAGREES");
  return agree ? 0 : 3;
}

}  // namespace vmfence
