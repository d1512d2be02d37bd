// Spec -> map entries. The datapath does one longest-prefix lookup per packet,
// so the compiler folds every rule of a less specific prefix into each more
// specific one: the longest match alone holds all the rules that apply.
#include "maps/compiler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <tuple>

namespace vmfence {

std::array<uint8_t, 16> masked_addr(const Cidr& c) {
  std::array<uint8_t, 16> a = c.addr;
  int bits = c.mapped_prefix_len();
  for (int i = 0; i < 16; ++i) {
    int keep = std::clamp(bits - i * 8, 0, 8);
    a[i] &= static_cast<uint8_t>(keep == 8 ? 0xff : (0xff00 >> keep) & 0xff);
  }
  return a;
}

uint32_t sample_threshold(double rate) {
  if (rate >= 1.0) return 0xffffffffu;
  if (rate <= 0.0) return 0;
  return static_cast<uint32_t>(std::ldexp(rate, 32));
}

namespace {

// A prefix in the 128-bit mapped space.
struct Prefix {
  std::array<uint8_t, 16> addr{};
  int bits = 0;
  auto operator<=>(const Prefix&) const = default;
  bool contains(const Prefix& o) const {
    if (o.bits < bits) return false;
    for (int i = 0; i < bits; ++i) {
      int byte = i / 8, bit = 7 - i % 8;
      if (((addr[byte] >> bit) & 1) != ((o.addr[byte] >> bit) & 1)) return false;
    }
    return true;
  }
  std::string str() const {
    Cidr c;
    c.addr = addr;
    bool v4 = bits >= 96 && addr[10] == 0xff && addr[11] == 0xff &&
              std::all_of(addr.begin(), addr.begin() + 10, [](uint8_t b) { return b == 0; });
    c.family = v4 ? 4 : 6;
    c.prefix_len = static_cast<uint8_t>(v4 ? bits - 96 : bits);
    return c.str();
  }
};

Prefix prefix_of(const Cidr& c) { return Prefix{masked_addr(c), c.mapped_prefix_len()}; }

// The IPv4-mapped block ::ffff:0:0/96: IPv6 rules covering it must not leak
// into IPv4 (a v6 "::/0" is not "0.0.0.0/0").
Prefix v4_root() {
  Prefix p;
  p.addr[10] = p.addr[11] = 0xff;
  p.bits = 96;
  return p;
}

using PortRule = std::tuple<uint8_t, uint16_t, uint16_t>;  // proto, lo, hi

std::vector<PortRule> port_rules(const Rule& r) {
  std::vector<PortRule> out;
  auto proto = static_cast<uint8_t>(r.proto);
  if (r.ports.empty()) out.emplace_back(proto, 0, 65535);
  for (const auto& p : r.ports) out.emplace_back(proto, p.lo, p.hi);
  return out;
}

// Sort, drop rules covered by "any protocol" ones, merge overlapping ranges.
std::vector<PortRule> normalize(std::vector<PortRule> rules) {
  std::sort(rules.begin(), rules.end());
  std::vector<PortRule> out;
  for (const auto& r : rules) {
    auto [proto, lo, hi] = r;
    bool covered = std::any_of(out.begin(), out.end(), [&](const PortRule& o) {
      return (std::get<0>(o) == proto || std::get<0>(o) == VMFENCE_PROTO_ANY) && std::get<1>(o) <= lo &&
             std::get<2>(o) >= hi;
    });
    if (covered) continue;
    if (!out.empty() && std::get<0>(out.back()) == proto && std::get<2>(out.back()) + 1 >= lo) {
      std::get<2>(out.back()) = std::max(std::get<2>(out.back()), hi);
      continue;
    }
    out.push_back(r);
  }
  return out;
}

std::vector<PolicyEntry> compile_rules(const std::vector<Rule>& rules, const VmSpec& vm, const char* field,
                                       const std::optional<Prefix>& imds, bool imds_allowed, uint16_t imds_port,
                                       const std::vector<Prefix>& vm_nets, std::vector<SpecError>& errors) {
  std::map<Prefix, std::vector<PortRule>> own;
  for (const auto& r : rules) {
    auto& v = own[prefix_of(r.peer)];
    auto pr = port_rules(r);
    v.insert(v.end(), pr.begin(), pr.end());
  }
  // Barriers: prefixes that must not inherit from their ancestors.
  std::map<Prefix, uint8_t> barriers;  // prefix -> flags
  bool v6_covers_v4 = std::any_of(own.begin(), own.end(),
                                  [](const auto& kv) { return kv.first.bits < 96 && kv.first.contains(v4_root()); });
  if (v6_covers_v4) barriers[v4_root()] = 0;
  if (imds) barriers[*imds] = VMFENCE_POLICY_F_IMDS;

  std::vector<Prefix> prefixes;
  for (const auto& kv : own) prefixes.push_back(kv.first);
  for (const auto& kv : barriers)
    if (!own.count(kv.first)) prefixes.push_back(kv.first);
  // Markers of VM address space: they inherit like any prefix; the flag is
  // what they add. Only where a rule covers them: elsewhere a lookup inside
  // the net misses, and a miss is checked for an owner anyway.
  for (const auto& n : vm_nets) {
    bool covered = std::any_of(own.begin(), own.end(), [&](const auto& kv) { return kv.first.contains(n); });
    if (covered && !own.count(n) && !barriers.count(n)) prefixes.push_back(n);
  }
  std::sort(prefixes.begin(), prefixes.end());
  prefixes.erase(std::unique(prefixes.begin(), prefixes.end()), prefixes.end());

  std::vector<PolicyEntry> out;
  for (const auto& p : prefixes) {
    // The innermost barrier containing p (a barrier contains itself).
    std::optional<Prefix> fence;
    for (const auto& kv : barriers)
      if (kv.first.contains(p) && (!fence || kv.first.bits > fence->bits)) fence = kv.first;
    std::vector<PortRule> all;
    for (const auto& [q, qr] : own) {
      if (!q.contains(p)) continue;
      if (fence && !fence->contains(q)) continue;  // ancestor beyond the fence
      all.insert(all.end(), qr.begin(), qr.end());
    }
    uint8_t flags = 0;
    if (std::any_of(vm_nets.begin(), vm_nets.end(), [&](const Prefix& n) { return n.contains(p); }))
      flags |= VMFENCE_POLICY_F_VM_NET;
    if (imds && imds->contains(p)) {
      flags |= VMFENCE_POLICY_F_IMDS;
      if (imds_allowed) all.emplace_back(static_cast<uint8_t>(Proto::tcp), imds_port, imds_port);
    }
    all = normalize(std::move(all));
    if (all.size() > VMFENCE_MAX_PORT_RULES) {
      errors.push_back({vm.file, field,
                        std::to_string(all.size()) + " port rules apply to " + p.str() + "; at most " +
                            std::to_string(VMFENCE_MAX_PORT_RULES) + " (merge port ranges)"});
      continue;
    }
    PolicyEntry e;
    e.key.prefixlen = p.bits;
    std::memcpy(e.key.addr, p.addr.data(), 16);
    e.value.count = static_cast<uint16_t>(all.size());
    e.value.flags = flags;
    for (size_t i = 0; i < all.size(); ++i) {
      e.value.rules[i].proto = std::get<0>(all[i]);
      e.value.rules[i].port_lo = std::get<1>(all[i]);
      e.value.rules[i].port_hi = std::get<2>(all[i]);
    }
    out.push_back(e);
  }
  if (out.size() > VMFENCE_MAX_POLICY_PREFIXES)
    errors.push_back({vm.file, field,
                      std::to_string(out.size()) + " distinct prefixes; a VM's trie holds at most " +
                          std::to_string(VMFENCE_MAX_POLICY_PREFIXES) + " per direction"});
  return out;
}

}  // namespace

namespace {
// Covering prefixes of `addrs` no longer than `len`, with nested ones dropped.
std::vector<Cidr> cover(const std::vector<Cidr>& addrs, uint8_t len) {
  std::vector<Cidr> nets;
  for (Cidr a : addrs) {
    if (a.prefix_len > len) a.prefix_len = len;
    a.addr = masked_addr(a);
    if (std::any_of(nets.begin(), nets.end(),
                    [&](const Cidr& n) { return n.prefix_len <= a.prefix_len && n.contains(a); }))
      continue;
    std::erase_if(nets, [&](const Cidr& n) { return a.prefix_len <= n.prefix_len && a.contains(n); });
    nets.push_back(a);
  }
  return nets;
}
}  // namespace

std::vector<Cidr> vm_address_space(const std::vector<VmSpec>& vms) {
  std::vector<const VmSpec*> all;
  all.reserve(vms.size());
  for (const auto& vm : vms) all.push_back(&vm);
  return vm_address_space(all);
}

std::vector<Cidr> vm_address_space(const std::vector<const VmSpec*>& vms) {
  // Every egress policy carries one marker entry per net, so the number of
  // nets is bounded: coarser prefixes until at most kMaxNets per family (in
  // the end /0: every destination of that family is checked for an owner).
  constexpr size_t kMaxNets = 8;
  std::vector<Cidr> out;
  for (int family : {4, 6}) {
    std::vector<Cidr> addrs;
    for (const VmSpec* vm : vms)
      for (const auto& a : vm->addresses)
        if (a.family == family) addrs.push_back(a);
    if (addrs.empty()) continue;
    std::vector<Cidr> nets;
    for (uint8_t len : family == 4 ? std::vector<uint8_t>{16, 8, 0} : std::vector<uint8_t>{48, 32, 16, 0}) {
      nets = cover(addrs, len);
      if (nets.size() <= kMaxNets) break;
    }
    out.insert(out.end(), nets.begin(), nets.end());
  }
  std::sort(out.begin(), out.end(), [](const Cidr& x, const Cidr& y) {
    return std::tie(x.family, x.addr, x.prefix_len) < std::tie(y.family, y.addr, y.prefix_len);
  });
  return out;
}

vmfence_addr eui64_link_local(const std::array<uint8_t, 6>& mac) {
  vmfence_addr a{};
  vmfence_eui64_link_local(mac.data(), a.addr);
  return a;
}

vmfence_limit compile_limits(const RateLimits& r) {
  constexpr uint64_t kNsPerS = 1000000000ull;
  vmfence_limit l{};
  // ns per byte << 16 at `mbit` (10^6 bit/s): 8e9 / (mbit * 1e6) ns.
  auto byte_q16 = [](uint32_t mbit) { return mbit ? (uint64_t{8000} << 16) / mbit : 0; };
  auto pkt_ns = [&](uint32_t pps) { return pps ? kNsPerS / pps : 0; };
  // A bucket of `burst_kb`, or by default what lets a single TCP stream
  // reach the rate through a drop-based policer: half a second of the rate,
  // at least 512 KB (measured, BENCHMARKS.md "Rate limits": 100 ms gets ~50%
  // of 100 Mbit/s, 33 ms ~20% of 1 Gbit/s, 512 ms 98-100% at 10-1000 Mbit/s).
  auto burst_ns = [&](uint32_t mbit, uint64_t min_ns) -> uint64_t {
    if (!mbit) return 0;
    uint64_t bytes_per_s = uint64_t{mbit} * 125000;
    uint64_t dflt = std::max<uint64_t>(bytes_per_s * 512 / 1000, 512 * 1024);
    uint64_t bytes = r.burst_kb ? uint64_t{r.burst_kb} * 1024 : dflt;
    return std::max(bytes * kNsPerS / bytes_per_s, min_ns);
  };
  l.egress_byte_ns_q16 = byte_q16(r.egress_mbit);
  l.ingress_byte_ns_q16 = byte_q16(r.ingress_mbit);
  l.egress_pkt_ns = pkt_ns(r.egress_pps);
  l.ingress_pkt_ns = pkt_ns(r.ingress_pps);
  l.egress_burst_ns = burst_ns(r.egress_mbit, 0);
  l.ingress_burst_ns = burst_ns(r.ingress_mbit, 0);
  // Packet buckets: 10 ms of the rate, at least 32 packets.
  auto pkt_burst = [&](uint64_t ns) { return ns ? std::max<uint64_t>(kNsPerS / 100, 32 * ns) : 0; };
  l.egress_pkt_burst_ns = pkt_burst(l.egress_pkt_ns);
  l.ingress_pkt_burst_ns = pkt_burst(l.ingress_pkt_ns);
  return l;
}

VmPlan compile_vm(const VmSpec& vm, const HostSpec& host, const std::vector<Cidr>& vm_nets,
                  std::vector<SpecError>& errors) {
  VmPlan plan;
  plan.name = vm.name;
  plan.interface = vm.interface;
  auto& v = plan.vm;
  v.vm_id = name_id(vm.name);
  v.group_id = name_id(vm.group.empty() ? vm.name : vm.group);
  v.sample_threshold = sample_threshold(vm.sample_rate);
  v.window_ms = vm.on_violation.window_ms;
  v.threshold = static_cast<uint16_t>(std::min<uint32_t>(vm.on_violation.threshold, 0xffff));
  std::memcpy(v.mac, vm.mac.data(), 6);
  v.mode = static_cast<uint8_t>(vm.mode);
  if (vm.on_violation.action == Action::terminate) v.flags |= VMFENCE_VM_F_QUARANTINE;

  int v4 = 0, v6 = 0;
  for (const auto& a : vm.addresses) {
    auto m = masked_addr(a);
    if (a.family == 4 && v4++ == 0) {
      v.v4_plen = a.prefix_len;
      std::memcpy(v.v4_addr, m.data() + 12, 4);
    } else if (a.family == 6 && v6++ == 0) {
      v.v6_plen = a.prefix_len;
      std::memcpy(v.v6_addr, m.data(), 16);
    } else {
      v.flags |= VMFENCE_VM_F_MORE_ADDRS;
    }
    add_owner_key(a, plan.host_addresses, plan.net_addresses);
  }
  // Its EUI-64 link-local is its own (README "Link-local addresses").
  plan.host_addresses.push_back(eui64_link_local(vm.mac));
  v.flags |= VMFENCE_VM_F_MORE_ADDRS;
  plan.flow_limit = vm.flows;
  plan.limit = compile_limits(vm.rate);
  if (vm.rate.any()) v.flags |= VMFENCE_VM_F_RATE_LIMITED;
  for (const auto& g : vm.gateway) {
    vmfence_gateway_key k{};
    k.vm_id = v.vm_id;
    std::memcpy(k.addr, g.addr.data(), 16);
    plan.gateways.push_back(k);
  }

  std::optional<Prefix> imds;
  uint16_t imds_port = 0;
  if (host.imds) {
    Cidr a = host.imds->address;
    a.prefix_len = a.family == 4 ? 32 : 128;
    imds = prefix_of(a);
    imds_port = host.imds->port;
  }
  std::vector<Prefix> nets;
  for (const auto& n : vm_nets) nets.push_back(prefix_of(n));
  plan.egress = compile_rules(vm.egress, vm, "egress", imds, vm.imds, imds_port, nets, errors);
  plan.ingress = compile_rules(vm.ingress, vm, "ingress", std::nullopt, false, 0, {}, errors);
  return plan;
}

void add_owner_key(const Cidr& a, std::vector<vmfence_addr>& hosts, std::vector<vmfence_addr_key>& nets) {
  auto m = masked_addr(a);
  if (a.mapped_prefix_len() == 128) {
    vmfence_addr k{};
    std::memcpy(k.addr, m.data(), 16);
    hosts.push_back(k);
  } else {
    vmfence_addr_key k{};
    k.prefixlen = a.mapped_prefix_len();
    std::memcpy(k.addr, m.data(), 16);
    nets.push_back(k);
  }
}

vmfence_config datapath_config(const HostSpec& host, const std::vector<VmSpec>& vms) {
  vmfence_config cfg{};
  cfg.event_budget = VMFENCE_DEFAULT_EVENT_BUDGET;
  cfg.budget_window_ns = VMFENCE_DEFAULT_BUDGET_WINDOW_NS;
  cfg.tcp_timeout_s = host.flow_timeouts.tcp_s;
  cfg.udp_timeout_s = host.flow_timeouts.udp_s;
  cfg.icmp_timeout_s = host.flow_timeouts.icmp_s;
  if (host.fleet) cfg.flags |= VMFENCE_CFG_F_FLEET;
  for (const auto& vm : vms)
    for (const auto& a : vm.addresses)
      if (a.mapped_prefix_len() < 128) cfg.flags |= VMFENCE_CFG_F_OWNER_NETS;
  return cfg;
}

Plan compile(const Spec& spec) {
  Plan plan;
  std::vector<Cidr> nets = vm_address_space(spec.vms);
  for (const auto& vm : spec.vms) plan.vms.push_back(compile_vm(vm, spec.host, nets, plan.errors));
  plan.config = datapath_config(spec.host, spec.vms);
  return plan;
}

}  // namespace vmfence
