// The ruleset builder: Spec -> table inet vmfence as chains and rules, their nft text
// and fingerprint. Pure (no netlink); the text helpers are shared with netlink.cpp.
#include "agent/nft/ruleset.h"

#include <arpa/inet.h>
#include <libnftnl/udata.h>  // NFTNL_UDATA_COMMENT_MAXLEN
#include <sys/socket.h>

#include <algorithm>
#include <cstdio>
#include <utility>

#include "agent/nft/internal.h"

namespace vmfence::nft {

namespace internal {

namespace {
constexpr size_t kCommentMax = NFTNL_UDATA_COMMENT_MAXLEN - 1;  // + NUL
}  // namespace

std::vector<uint8_t> net_bytes(const Cidr& c) {
  std::vector<uint8_t> out;
  if (c.family == 4)
    out.assign(c.addr.begin() + 12, c.addr.end());
  else
    out.assign(c.addr.begin(), c.addr.end());
  const unsigned bits = std::min<unsigned>(c.prefix_len, out.size() * 8);
  for (size_t i = 0; i < out.size(); ++i) {
    const unsigned start = i * 8;
    if (start >= bits)
      out[i] = 0;
    else if (bits - start < 8)
      out[i] &= static_cast<uint8_t>(0xff << (8 - (bits - start)));
  }
  return out;
}

unsigned full_bits(const Cidr& c) { return c.family == 4 ? 32 : 128; }

bool has_ports(Proto p) { return p == Proto::tcp || p == Proto::udp; }
bool full_range(const PortRange& r) { return r.lo == 0 && r.hi == 65535; }

std::string quote(const std::string& s) { return "\"" + s + "\""; }

std::string hex64(uint64_t v) {
  char buf[17];
  snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string clamp_comment(std::string s) {
  if (s.size() > kCommentMax) s.resize(kCommentMax);
  return s;
}

}  // namespace internal

namespace {

using internal::clamp_comment;
using internal::full_bits;
using internal::full_range;
using internal::has_ports;
using internal::net_bytes;
using internal::quote;

constexpr const char* kChainPrerouting = "prerouting";
constexpr const char* kChainForward = "forward";
constexpr const char* kChainPostrouting = "postrouting";
constexpr const char* kChainImds = "imds_forward";
constexpr const char* kChainWanToVm = "wan_to_vm";
constexpr uint8_t kRestoredTtl = 64;

std::string addr_text(const Cidr& c) {
  const auto b = net_bytes(c);
  char buf[INET6_ADDRSTRLEN] = {};
  inet_ntop(c.family == 4 ? AF_INET : AF_INET6, b.data(), buf, sizeof buf);
  std::string s = buf;
  if (c.prefix_len < full_bits(c)) s += "/" + std::to_string(c.prefix_len);
  return s;
}

const char* l4_text(Proto p) {
  switch (p) {
    case Proto::tcp:
      return "tcp";
    case Proto::udp:
      return "udp";
    case Proto::icmp:
      return "icmp";
    case Proto::icmpv6:
      return "ipv6-icmp";
    case Proto::any:
      break;
  }
  return "";
}

std::string range_text(const PortRange& r) {
  return r.lo == r.hi ? std::to_string(r.lo) : std::to_string(r.lo) + "-" + std::to_string(r.hi);
}

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace

// ---------------------------------------------------------------------------
// Descriptions
// ---------------------------------------------------------------------------

int RuleDesc::family() const {
  if (saddr) return saddr->family;
  if (daddr) return daddr->family;
  return 0;
}

std::string RuleDesc::text() const {
  std::vector<std::string> parts;
  if (!iifname.empty()) parts.push_back("iifname " + quote(iifname));
  if (!oifname.empty()) parts.push_back("oifname " + quote(oifname));
  // An address match implies its family (nft elides `meta nfproto`); a /0 matches
  // only the family.
  auto nonzero = [](const std::optional<Cidr>& c) { return c && std::min<unsigned>(c->prefix_len, full_bits(*c)) > 0; };
  auto addr_part = [&](const Cidr& c, const char* dir) {
    parts.push_back(std::string(c.family == 4 ? "ip " : "ip6 ") + dir + " " + addr_text(c));
  };
  if (family() != 0 && !nonzero(saddr) && !nonzero(daddr))
    parts.push_back(family() == 4 ? "meta nfproto ipv4" : "meta nfproto ipv6");
  if (nonzero(saddr)) addr_part(*saddr, "saddr");
  if (nonzero(daddr)) addr_part(*daddr, "daddr");
  if (l4 != Proto::any) {
    const bool sp = has_ports(l4) && sport && !full_range(*sport);
    const bool dp = has_ports(l4) && dport && !full_range(*dport);
    if (sp) parts.push_back(std::string(l4_text(l4)) + " sport " + range_text(*sport));
    if (dp) parts.push_back(std::string(l4_text(l4)) + " dport " + range_text(*dport));
    if (!sp && !dp) parts.push_back(std::string("meta l4proto ") + l4_text(l4));
  }
  if (ct_established) parts.push_back("ct state established,related");
  if (ct_snat) parts.push_back("ct status snat");
  if (counter) parts.push_back("counter");
  switch (verdict) {
    case Verdict::accept:
      parts.push_back("accept");
      break;
    case Verdict::drop:
      parts.push_back("drop");
      break;
    case Verdict::jump:
      parts.push_back("jump " + target);
      break;
    case Verdict::masquerade:
      parts.push_back("masquerade");
      break;
    case Verdict::set_ttl:
      parts.push_back((family() == 6 ? "ip6 hoplimit set " : "ip ttl set ") + std::to_string(ttl));
      break;
  }
  if (!comment.empty()) parts.push_back("comment " + quote(clamp_comment(comment)));
  std::string out;
  for (const auto& p : parts) {
    if (!out.empty()) out += ' ';
    out += p;
  }
  return out;
}

std::string ChainDesc::text() const {
  if (hook.empty()) return "";
  return "type " + type + " hook " + hook + " priority " + std::to_string(priority) + "; policy accept;";
}

std::string Ruleset::text() const {
  std::string out = std::string("table ") + kFamilyName + " " + kTableName + " {\n";
  for (const auto& c : chains) {
    out += "\tchain " + c.name + " {\n";
    if (!c.hook.empty()) out += "\t\t" + c.text() + "\n";
    for (const auto* r : in_chain(c.name)) out += "\t\t" + r->text() + "\n";
    out += "\t}\n";
  }
  out += "}\n";
  return out;
}

uint64_t Ruleset::fingerprint() const { return fnv1a64(text()); }

std::vector<const RuleDesc*> Ruleset::in_chain(const std::string& chain) const {
  std::vector<const RuleDesc*> out;
  for (const auto& r : rules)
    if (r.chain == chain) out.push_back(&r);
  return out;
}

// ---------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------

// Each VM address of the IMDS address's family (only of VMs with imds: true
// when `only_allowed`).
template <typename F>
void for_each_imds_source(const Spec& spec, const ImdsSpec& imds, bool only_allowed, F fn) {
  for (const auto& vm : spec.vms) {
    if (only_allowed && !vm.imds) continue;
    for (const auto& a : vm.addresses)
      if (a.family == imds.address.family) fn(vm, a);
  }
}

Ruleset build_ruleset(const Spec& spec) {
  Ruleset rs;
  rs.chains = {
      {kChainPrerouting, "filter", "prerouting", -150},  // mangle
      {kChainForward, "filter", "forward", 0},           // filter
      {kChainPostrouting, "nat", "postrouting", 100},    // srcnat
      {kChainImds, "", "", 0},
      {kChainWanToVm, "", "", 0},
  };
  const HostSpec& host = spec.host;
  const auto& imds = host.imds;
  auto add = [&](RuleDesc r) { rs.rules.push_back(std::move(r)); };
  auto host_addr = [](Cidr c) {  // IMDS is one address: match it whole
    c.prefix_len = static_cast<uint8_t>(full_bits(c));
    return c;
  };
  const PortRange imds_port = imds ? PortRange{imds->port, imds->port} : PortRange{};
  bool any_imds_vm = false;
  for (const auto& vm : spec.vms) any_imds_vm = any_imds_vm || vm.imds;

  // prerouting: IMDSv2 PUT replies carry TTL / hop limit 1 (AWS default); one
  // routed hop (hypervisor -> VM) would expire them. Restore it on replies of
  // masqueraded flows before the forward path decrements it.
  if (imds && any_imds_vm) {
    RuleDesc r;
    r.chain = kChainPrerouting;
    r.saddr = host_addr(imds->address);
    r.l4 = Proto::tcp;
    r.sport = imds_port;
    r.ct_snat = true;
    r.verdict = Verdict::set_ttl;
    r.ttl = kRestoredTtl;
    r.comment = "IMDSv2: restore the TTL of IMDS replies to NATed VMs";
    add(std::move(r));
  }

  // forward
  {
    RuleDesc r;
    r.chain = kChainForward;
    r.ct_established = true;
    r.verdict = Verdict::accept;
    r.comment = "replies to flows the VMs opened";
    add(std::move(r));
  }
  if (imds) {
    RuleDesc r;
    r.chain = kChainForward;
    r.daddr = host_addr(imds->address);
    r.verdict = Verdict::jump;
    r.target = kChainImds;
    r.comment = "IMDS: only VMs with imds true";
    add(std::move(r));
  }
  for (const auto& wan : host.wan_interfaces) {
    RuleDesc r;
    r.chain = kChainForward;
    r.iifname = wan;
    r.verdict = Verdict::jump;
    r.target = kChainWanToVm;
    r.comment = "from the WAN";
    add(std::move(r));
  }

  // imds_forward: allowed VMs, then every other VM address
  if (imds) {
    for_each_imds_source(spec, *imds, true, [&](const VmSpec& vm, const Cidr& a) {
      RuleDesc r;
      r.chain = kChainImds;
      r.saddr = a;
      r.l4 = Proto::tcp;
      r.dport = imds_port;
      r.verdict = Verdict::accept;
      r.comment = vm.name + ": IMDS";
      add(std::move(r));
    });
    for_each_imds_source(spec, *imds, false, [&](const VmSpec& vm, const Cidr& a) {
      RuleDesc r;
      r.chain = kChainImds;
      r.saddr = a;
      r.counter = true;
      r.verdict = Verdict::drop;
      r.comment = vm.name + (vm.imds ? ": IMDS, other ports" : ": no IMDS");
      add(std::move(r));
    });
  }

  // wan_to_vm: the VMs' ingress rules, then drop the rest toward VM addresses
  for (const auto& vm : spec.vms) {
    for (size_t i = 0; i < vm.ingress.size(); ++i) {
      const Rule& in = vm.ingress[i];
      if (in.proto == Proto::icmp && in.peer.family != 4) continue;
      if (in.proto == Proto::icmpv6 && in.peer.family != 6) continue;
      std::vector<std::optional<PortRange>> ranges;
      if (has_ports(in.proto) && !in.ports.empty())
        for (const auto& p : in.ports) ranges.emplace_back(p);
      else
        ranges.emplace_back(std::nullopt);
      for (const auto& a : vm.addresses) {
        if (a.family != in.peer.family) continue;
        for (const auto& range : ranges) {
          RuleDesc r;
          r.chain = kChainWanToVm;
          r.saddr = in.peer;
          r.daddr = a;
          r.l4 = in.proto;
          r.dport = range;
          r.verdict = Verdict::accept;
          r.comment = vm.name + ": ingress[" + std::to_string(i) + "]";
          add(std::move(r));
        }
      }
    }
  }
  for (const auto& vm : spec.vms) {
    for (const auto& a : vm.addresses) {
      RuleDesc r;
      r.chain = kChainWanToVm;
      r.daddr = a;
      r.counter = true;
      r.verdict = Verdict::drop;
      r.comment = vm.name + ": unsolicited from the WAN";
      add(std::move(r));
    }
  }

  // postrouting: IMDS for imds:true VMs (from the hypervisor's address), no
  // translation toward IMDS for anyone else, then masquerade out of each WAN.
  if (imds) {
    for_each_imds_source(spec, *imds, true, [&](const VmSpec& vm, const Cidr& a) {
      RuleDesc r;
      r.chain = kChainPostrouting;
      r.saddr = a;
      r.daddr = host_addr(imds->address);
      r.l4 = Proto::tcp;
      r.dport = imds_port;
      r.counter = true;
      r.verdict = Verdict::masquerade;
      r.comment = vm.name + ": IMDS from the hypervisor's address";
      add(std::move(r));
    });
    RuleDesc r;
    r.chain = kChainPostrouting;
    r.daddr = host_addr(imds->address);
    r.verdict = Verdict::accept;
    r.comment = "IMDS: no translation for other sources";
    add(std::move(r));
  }
  for (const auto& wan : host.wan_interfaces) {
    for (const auto& prefix : host.masquerade) {
      RuleDesc r;
      r.chain = kChainPostrouting;
      r.oifname = wan;
      r.saddr = prefix;
      r.counter = true;
      r.verdict = Verdict::masquerade;
      r.comment = "masquerade " + addr_text(prefix) + " out " + wan;
      add(std::move(r));
    }
  }
  return rs;
}

}  // namespace vmfence::nft
