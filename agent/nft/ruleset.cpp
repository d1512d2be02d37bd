// The ruleset builder: Spec -> table inet vmfence as chains and rules, their nft text
// and fingerprint. Pure (no netlink); the text helpers are shared with netlink.cpp.
#include "agent/nft/ruleset.h"

#include <arpa/inet.h>
#include <libnftnl/udata.h>  // NFTNL_UDATA_COMMENT_MAXLEN
#include <sys/socket.h>

#include <algorithm>
#include <cstdio>
#include <map>
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
constexpr size_t kShardElems = 1024;  // elements per concatenated-range set, up to
constexpr size_t kMaxShards = 16;     // this many sets (and rules) per kind and family

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

std::string key_field_text(KeyField f, int family) {
  switch (f) {
    case KeyField::saddr:
      return family == 6 ? "ip6 saddr" : "ip saddr";
    case KeyField::daddr:
      return family == 6 ? "ip6 daddr" : "ip daddr";
    case KeyField::l4proto:
      return "meta l4proto";
    case KeyField::dport:
      return "th dport";
  }
  return "";
}

// Bytes a key field takes in a set key (4-byte registers).
uint32_t field_len(KeyField f, int family) {
  return (f == KeyField::saddr || f == KeyField::daddr) && family == 6 ? 16 : 4;
}

std::string hex_bytes(const uint8_t* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    out += d[p[i] >> 4];
    out += d[p[i] & 15];
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------
// Descriptions
// ---------------------------------------------------------------------------

int RuleDesc::family() const {
  if (set_family) return set_family;
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
  if (family() != 0 && set.empty() && !nonzero(saddr) && !nonzero(daddr))
    parts.push_back(family() == 4 ? "meta nfproto ipv4" : "meta nfproto ipv6");
  if (!set.empty()) {
    std::string key;
    for (KeyField f : set_key) {
      if (!key.empty()) key += " . ";
      key += key_field_text(f, family());
    }
    parts.push_back(key + " @" + set);
  }
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

uint32_t SetDesc::key_len() const {
  uint32_t n = 0;
  for (KeyField f : fields) n += field_len(f, family);
  return n;
}

std::string SetDesc::elem_text(const SetElemDesc& e) const {
  std::string out;
  size_t off = 0;
  for (KeyField f : fields) {
    const uint32_t len = field_len(f, family);
    if (!out.empty()) out += " . ";
    if (off + len > e.lo.size() || off + len > e.hi.size()) return out + "?";
    const uint8_t* lo = e.lo.data() + off;
    const uint8_t* hi = e.hi.data() + off;
    if (f == KeyField::l4proto) {
      const char* name = l4_text(static_cast<Proto>(lo[0]));
      out += *name ? name : std::to_string(lo[0]);
    } else if (f == KeyField::dport) {
      const PortRange r{static_cast<uint16_t>(lo[0] << 8 | lo[1]), static_cast<uint16_t>(hi[0] << 8 | hi[1])};
      out += range_text(r);
    } else {
      // A prefix (what the builder makes) prints as one; anything else as lo-hi.
      Cidr c;
      c.family = family;
      std::copy(lo, lo + len, c.addr.begin() + (family == 4 ? 12 : 0));
      bool printed = false;
      if (std::equal(lo, lo + len, hi)) {  // one address: the common case
        c.prefix_len = static_cast<uint8_t>(len * 8);
        out += addr_text(c);
        printed = true;
      }
      for (unsigned p = 0; p <= len * 8 && !printed; ++p) {
        bool ok = true;
        for (unsigned i = 0; ok && i < len; ++i) {
          const unsigned start = i * 8;
          const uint8_t host = start >= p ? 0xff : (p - start < 8 ? static_cast<uint8_t>(0xff >> (p - start)) : 0);
          ok = (lo[i] & host) == 0 && (lo[i] | host) == hi[i];
        }
        if (!ok) continue;
        c.prefix_len = static_cast<uint8_t>(p);
        out += addr_text(c);
        printed = true;
      }
      if (printed) {
        off += len;
        continue;
      }
      out += hex_bytes(lo, len) + "-" + hex_bytes(hi, len);
    }
    off += len;
  }
  if (!e.comment.empty()) out += " comment " + quote(clamp_comment(e.comment));
  return out;
}

std::string SetDesc::text() const {
  std::string type;
  for (KeyField f : fields) {
    if (!type.empty()) type += " . ";
    if (f == KeyField::saddr || f == KeyField::daddr)
      type += family == 6 ? "ipv6_addr" : "ipv4_addr";
    else if (f == KeyField::l4proto)
      type += "inet_proto";
    else
      type += "inet_service";
  }
  std::string out = "\tset " + name + " {\n\t\ttype " + type + "\n" + (interval ? "\t\tflags interval\n" : "");
  if (counter) out += "\t\tcounter\n";
  if (!elems.empty()) {
    out += "\t\telements = {";
    for (size_t i = 0; i < elems.size(); ++i) out += (i ? ",\n\t\t\t     " : " ") + elem_text(elems[i]);
    out += " }\n";
  }
  out += "\t}\n";
  return out;
}

size_t Ruleset::elements() const {
  size_t n = 0;
  for (const auto& s : sets) n += s.elems.size();
  return n;
}

std::string ChainDesc::text() const {
  if (hook.empty()) return "";
  return "type " + type + " hook " + hook + " priority " + std::to_string(priority) + "; policy accept;";
}

std::string Ruleset::text() const {
  std::string out = std::string("table ") + kFamilyName + " " + kTableName + " {\n";
  for (const auto& s : sets) out += s.text();
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

namespace {

// The range lo..hi of a prefix, padded to its key field (4 or 16 bytes).
void append_prefix(const Cidr& c, std::vector<uint8_t>& lo, std::vector<uint8_t>& hi) {
  const auto net = net_bytes(c);
  const unsigned bits = std::min<unsigned>(c.prefix_len, full_bits(c));
  for (size_t i = 0; i < net.size(); ++i) {
    const unsigned start = i * 8;
    const uint8_t host = start >= bits ? 0xff : (bits - start < 8 ? static_cast<uint8_t>(0xff >> (bits - start)) : 0);
    lo.push_back(net[i]);
    hi.push_back(net[i] | host);
  }
}

void append_u8(uint8_t v, std::vector<uint8_t>& out) { out.insert(out.end(), {v, 0, 0, 0}); }
void append_port(uint16_t v, std::vector<uint8_t>& out) {
  out.insert(out.end(), {static_cast<uint8_t>(v >> 8), static_cast<uint8_t>(v & 0xff), 0, 0});
}

// Prefixes sorted by start, widest first: a prefix nested in an earlier one follows
// it. Returns them without the nested ones (covered already; an interval set refuses
// overlapping elements).
std::vector<Cidr> outermost(std::vector<Cidr> v) {
  std::sort(v.begin(), v.end(), [](const Cidr& a, const Cidr& b) {
    const auto na = net_bytes(a), nb = net_bytes(b);
    if (na != nb) return na < nb;
    return a.prefix_len < b.prefix_len;
  });
  std::vector<Cidr> out;
  for (const auto& c : v)
    if (out.empty() || !out.back().contains(c)) out.push_back(c);
  return out;
}

// One-field elements for prefixes with their comments (nested ones dropped: the
// reconciler never lets VM addresses overlap; this keeps the set valid anyway).
std::vector<SetElemDesc> prefix_elems(std::vector<std::pair<Cidr, std::string>> v) {
  std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) {
    const auto na = net_bytes(a.first), nb = net_bytes(b.first);
    if (na != nb) return na < nb;
    return a.first.prefix_len < b.first.prefix_len;
  });
  std::vector<SetElemDesc> out;
  const Cidr* last = nullptr;
  for (const auto& [c, comment] : v) {
    if (last && last->contains(c)) continue;
    SetElemDesc e;
    append_prefix(c, e.lo, e.hi);
    e.comment = comment;
    out.push_back(std::move(e));
    last = &c;
  }
  return out;
}

struct IngressSets {
  std::vector<SetElemDesc> any, proto, ports;
};

// The VMs' ingress rules of one family as disjoint set elements (peer . VM address
// [. l4proto [. dport range]]): per VM address and protocol, the port ranges are cut
// at every rule's boundary and, per piece, only the outermost peer prefixes are kept
// (then equal neighbouring pieces are merged). The union is exactly what the rules
// accept; concatenated interval sets refuse overlapping elements.
IngressSets ingress_sets(const Spec& spec, int fam) {
  IngressSets out;
  for (const auto& vm : spec.vms) {
    for (const auto& a : vm.addresses) {
      if (a.family != fam) continue;
      std::vector<Cidr> any;
      std::map<uint8_t, std::vector<Cidr>> proto;
      std::map<uint8_t, std::vector<std::pair<Cidr, PortRange>>> ports;
      for (const Rule& in : vm.ingress) {
        if (in.peer.family != fam) continue;
        if (in.proto == Proto::icmp && fam != 4) continue;
        if (in.proto == Proto::icmpv6 && fam != 6) continue;
        const auto p = static_cast<uint8_t>(in.proto);
        if (in.proto == Proto::any) {
          any.push_back(in.peer);
        } else if (!has_ports(in.proto) || in.ports.empty() ||
                   std::any_of(in.ports.begin(), in.ports.end(), [](const PortRange& r) { return full_range(r); })) {
          proto[p].push_back(in.peer);
        } else {
          for (const auto& r : in.ports) ports[p].emplace_back(in.peer, r);
        }
      }
      const std::string comment = vm.name + ": ingress";
      for (const auto& peer : outermost(any)) {
        SetElemDesc e;
        append_prefix(peer, e.lo, e.hi);
        append_prefix(a, e.lo, e.hi);
        e.comment = comment;
        out.any.push_back(std::move(e));
      }
      for (const auto& [p, peers] : proto) {
        for (const auto& peer : outermost(peers)) {
          SetElemDesc e;
          append_prefix(peer, e.lo, e.hi);
          append_prefix(a, e.lo, e.hi);
          append_u8(p, e.lo);
          append_u8(p, e.hi);
          e.comment = comment;
          out.proto.push_back(std::move(e));
        }
      }
      for (const auto& [p, list] : ports) {
        std::vector<uint32_t> cuts;
        for (const auto& [peer, r] : list) {
          cuts.push_back(r.lo);
          cuts.push_back(uint32_t{r.hi} + 1);
        }
        std::sort(cuts.begin(), cuts.end());
        cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
        // Pieces [cuts[i], cuts[i+1]) with their outermost peers; equal neighbours merged.
        std::vector<std::pair<PortRange, std::vector<Cidr>>> pieces;
        for (size_t i = 0; i + 1 < cuts.size(); ++i) {
          const PortRange piece{static_cast<uint16_t>(cuts[i]), static_cast<uint16_t>(cuts[i + 1] - 1)};
          std::vector<Cidr> peers;
          for (const auto& [peer, r] : list)
            if (r.lo <= piece.lo && piece.hi <= r.hi) peers.push_back(peer);
          if (peers.empty()) continue;
          peers = outermost(std::move(peers));
          if (!pieces.empty() && pieces.back().first.hi + 1 == piece.lo && pieces.back().second == peers)
            pieces.back().first.hi = piece.hi;
          else
            pieces.emplace_back(piece, std::move(peers));
        }
        for (const auto& [range, peers] : pieces) {
          for (const auto& peer : peers) {
            SetElemDesc e;
            append_prefix(peer, e.lo, e.hi);
            append_prefix(a, e.lo, e.hi);
            append_u8(p, e.lo);
            append_u8(p, e.hi);
            append_port(range.lo, e.lo);
            append_port(range.hi, e.hi);
            e.comment = comment;
            out.ports.push_back(std::move(e));
          }
        }
      }
    }
  }
  return out;
}

}  // namespace

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

  // imds_forward: allowed VMs, then every other VM address (sets of addresses)
  SetDesc imds_allowed, imds_denied;
  if (imds) {
    const int fam = imds->address.family;
    imds_allowed = SetDesc{std::string("imds_allowed") + (fam == 4 ? "4" : "6"), fam, {KeyField::saddr}, false, {}};
    imds_denied = SetDesc{std::string("imds_denied") + (fam == 4 ? "4" : "6"), fam, {KeyField::saddr}, true, {}};
    std::vector<std::pair<Cidr, std::string>> allowed, denied;
    for_each_imds_source(spec, *imds, true,
                         [&](const VmSpec& vm, const Cidr& a) { allowed.emplace_back(a, vm.name + ": IMDS"); });
    for_each_imds_source(spec, *imds, false, [&](const VmSpec& vm, const Cidr& a) {
      denied.emplace_back(a, vm.name + (vm.imds ? ": IMDS, other ports" : ": no IMDS"));
    });
    imds_allowed.elems = prefix_elems(std::move(allowed));
    imds_denied.elems = prefix_elems(std::move(denied));
    if (!imds_allowed.elems.empty()) {
      RuleDesc r;
      r.chain = kChainImds;
      r.set = imds_allowed.name;
      r.set_key = {KeyField::saddr};
      r.set_family = fam;
      r.l4 = Proto::tcp;
      r.dport = imds_port;
      r.verdict = Verdict::accept;
      r.comment = "IMDS: VMs with imds true";
      add(std::move(r));
    }
    if (!imds_denied.elems.empty()) {
      RuleDesc r;
      r.chain = kChainImds;
      r.set = imds_denied.name;
      r.set_key = {KeyField::saddr};
      r.set_family = fam;
      r.counter = true;
      r.verdict = Verdict::drop;
      r.comment = "IMDS: every other VM address (per-VM counters in the set)";
      add(std::move(r));
    }
  }

  // wan_to_vm: the VMs' ingress rules, then drop the rest toward VM addresses
  for (int fam : {4, 6}) {
    const char* f = fam == 4 ? "4" : "6";
    IngressSets in = ingress_sets(spec, fam);
    SetDesc any{std::string("ingress_any") + f, fam, {KeyField::saddr, KeyField::daddr}, false, std::move(in.any)};
    SetDesc proto{std::string("ingress_proto") + f,
                  fam,
                  {KeyField::saddr, KeyField::daddr, KeyField::l4proto},
                  false,
                  std::move(in.proto)};
    SetDesc ports{std::string("ingress_ports") + f,
                  fam,
                  {KeyField::saddr, KeyField::daddr, KeyField::l4proto, KeyField::dport},
                  false,
                  std::move(in.ports)};
    for (SetDesc* set : {&any, &proto, &ports}) {
      // Concatenated ranges live in the kernel's pipapo sets, whose insert looks the
      // new element up among all the others: cost grows with the square of the set's
      // size (10,000 elements: ~0.3 s). Shards of kShardElems keep it linear, with at
      // most kMaxShards rules per set.
      const size_t n = set->elems.size();
      const size_t shards = std::min(kMaxShards, (n + kShardElems - 1) / kShardElems);
      for (size_t k = 0; k < shards; ++k) {
        SetDesc shard = *set;
        shard.elems.clear();
        if (k) shard.name += "_" + std::to_string(k);
        for (size_t i = k * n / shards; i < (k + 1) * n / shards; ++i) shard.elems.push_back(std::move(set->elems[i]));
        RuleDesc r;
        r.chain = kChainWanToVm;
        r.set = shard.name;
        r.set_key = shard.fields;
        r.set_family = fam;
        r.verdict = Verdict::accept;
        r.comment = "VM ingress rules";
        add(std::move(r));
        rs.sets.push_back(std::move(shard));
      }
    }
  }
  for (int fam : {4, 6}) {
    std::vector<std::pair<Cidr, std::string>> addrs;
    for (const auto& vm : spec.vms)
      for (const auto& a : vm.addresses)
        if (a.family == fam) addrs.emplace_back(a, vm.name + ": unsolicited from the WAN");
    SetDesc set{std::string("vm_addrs") + (fam == 4 ? "4" : "6"), fam, {KeyField::daddr}, true, {}};
    set.elems = prefix_elems(std::move(addrs));
    if (set.elems.empty()) continue;
    RuleDesc r;
    r.chain = kChainWanToVm;
    r.set = set.name;
    r.set_key = {KeyField::daddr};
    r.set_family = fam;
    r.counter = true;
    r.verdict = Verdict::drop;
    r.comment = "unsolicited from the WAN (per-VM counters in the set)";
    add(std::move(r));
    rs.sets.push_back(std::move(set));
  }

  // postrouting: IMDS for imds:true VMs (from the hypervisor's address), no
  // translation toward IMDS for anyone else, then masquerade out of each WAN.
  if (imds) {
    if (!imds_allowed.elems.empty()) {
      RuleDesc r;
      r.chain = kChainPostrouting;
      r.set = imds_allowed.name;
      r.set_key = {KeyField::saddr};
      r.set_family = imds->address.family;
      r.daddr = host_addr(imds->address);
      r.l4 = Proto::tcp;
      r.dport = imds_port;
      r.counter = true;
      r.verdict = Verdict::masquerade;
      r.comment = "IMDS from the hypervisor's address";
      add(std::move(r));
    }
    RuleDesc r;
    r.chain = kChainPostrouting;
    r.daddr = host_addr(imds->address);
    r.verdict = Verdict::accept;
    r.comment = "IMDS: no translation for other sources";
    add(std::move(r));
    if (!imds_allowed.elems.empty()) rs.sets.push_back(std::move(imds_allowed));
    if (!imds_denied.elems.empty()) rs.sets.push_back(std::move(imds_denied));
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
  for (auto& set : rs.sets)
    set.interval = std::any_of(set.elems.begin(), set.elems.end(), [](const SetElemDesc& e) { return e.lo != e.hi; });
  return rs;
}

}  // namespace vmfence::nft
