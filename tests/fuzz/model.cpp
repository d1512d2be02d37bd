// The reference model: README rules, one function each. See model.h.
//
// Reading order: README "What happens to a packet" as the lead engineer's
// RULINGS (2026-11-30, to be folded into the README) make it precise:
//   from_vm: MAC -> VLAN tag -> LLC/bridge-group noise -> parse -> ARP ->
//            RA/redirect, MLD/IGMP queries -> ND/MLD/IGMP control ->
//            source ownership -> link-local src/dst -> destination owned by
//            another VM -> mode -> fragments -> flows -> ICMP errors -> IMDS
//            -> egress rules (multicast/broadcast noise: link_local)
//   to_vm:   VLAN tag / ethertype -> parse -> ARP -> VM-source checks ->
//            control -> link-local -> not_for_vm -> same group / direct ->
//            fragments -> flows -> ICMP errors -> ingress rules
// and "What a guest can and cannot do" for every bound. "RULING n" marks a
// rule taken from the rulings; "CHOICE" one the contract leaves open.
#include "tests/fuzz/model.h"

#include <arpa/inet.h>

#include <cstring>
#include <stdexcept>

namespace vmfence::fuzz {

// ---- addresses -----------------------------------------------------------------

Addr Addr::v4(uint8_t a, uint8_t b, uint8_t c, uint8_t d) {
  Addr x;
  x.fam = 4;
  x.b[0] = a, x.b[1] = b, x.b[2] = c, x.b[3] = d;
  return x;
}
Addr Addr::v6(const char* text) {
  Addr x;
  x.fam = 6;
  if (inet_pton(AF_INET6, text, x.b.data()) != 1) throw std::invalid_argument(std::string("bad IPv6 ") + text);
  return x;
}
Addr Addr::parse(const std::string& text) {
  Addr x;
  if (inet_pton(AF_INET, text.c_str(), x.b.data()) == 1) return x;
  return v6(text.c_str());
}
std::string Addr::str() const {
  char buf[INET6_ADDRSTRLEN];
  inet_ntop(fam == 4 ? AF_INET : AF_INET6, b.data(), buf, sizeof buf);
  return buf;
}
bool Net::contains(const Addr& x) const {
  if (x.fam != a.fam) return false;
  int full = plen / 8, rest = plen % 8;
  if (std::memcmp(a.b.data(), x.b.data(), full) != 0) return false;
  if (rest) {
    uint8_t m = static_cast<uint8_t>(0xff << (8 - rest));
    if ((a.b[full] & m) != (x.b[full] & m)) return false;
  }
  return true;
}
std::string Net::str() const { return a.str() + "/" + std::to_string(plen); }

const char* mmode_name(MMode m) {
  switch (m) {
    case MMode::filtered:
      return "filtered";
    case MMode::conntrack:
      return "conntrack";
    case MMode::direct:
      return "direct";
  }
  return "?";
}

Addr eui64_ll(const MacAddr& m) {
  Addr x;
  x.fam = 6;
  x.b[0] = 0xfe, x.b[1] = 0x80;
  x.b[8] = m[0] ^ 0x02, x.b[9] = m[1], x.b[10] = m[2], x.b[11] = 0xff, x.b[12] = 0xfe;
  x.b[13] = m[3], x.b[14] = m[4], x.b[15] = m[5];
  return x;
}
Addr solicited_node(const Addr& a) {
  Addr x = Addr::v6("ff02::1:ff00:0");
  x.b[13] = a.b[13], x.b[14] = a.b[14], x.b[15] = a.b[15];
  return x;
}

namespace {

uint16_t be16(const std::vector<uint8_t>& f, size_t at) { return static_cast<uint16_t>(f[at] << 8 | f[at + 1]); }
uint32_t be32(const std::vector<uint8_t>& f, size_t at) {
  return static_cast<uint32_t>(be16(f, at)) << 16 | be16(f, at + 2);
}
Addr addr_at(const std::vector<uint8_t>& f, size_t at, int fam) {
  Addr x;
  x.fam = static_cast<uint8_t>(fam);
  std::memcpy(x.b.data(), &f[at], fam == 4 ? 4 : 16);
  return x;
}
bool is_ll(const Addr& a) { return a.fam == 6 && a.b[0] == 0xfe && (a.b[1] & 0xc0) == 0x80; }
bool is_unspec(const Addr& a) {
  for (size_t i = 0; i < (a.fam == 4 ? 4u : 16u); ++i)
    if (a.b[i]) return false;
  return true;
}
bool is_multicast(const Addr& a) { return a.fam == 4 ? (a.b[0] & 0xf0) == 0xe0 : a.b[0] == 0xff; }
bool is_bcast(const Addr& a) { return a.fam == 4 && a.b[0] == 255 && a.b[1] == 255 && a.b[2] == 255 && a.b[3] == 255; }
bool is_solicited_node(const Addr& a) {
  static const Net sn{Addr::v6("ff02::1:ff00:0"), 104};
  return sn.contains(a);
}

constexpr uint8_t kTcp = 6, kUdp = 17, kIcmp = 1, kIcmp6 = 58, kIgmp = 2;
constexpr uint8_t kRst = 0x04, kSyn = 0x02, kAck = 0x10;

}  // namespace

// ---- the parsed frame ----------------------------------------------------------

struct Model::Pkt {
  size_t n = 0;
  MacAddr dmac{}, smac{};
  uint16_t type = 0;
  // ARP
  uint16_t op = 0;
  MacAddr sha{};
  Addr spa, tpa;
  // IP
  uint8_t fam = 0;
  Addr src, dst;
  uint8_t ttl = 0;     // TTL / hop limit
  size_t ip_len = 0;   // IPv4 total length; IPv6 40 + payload length
  uint8_t proto = 0;   // transport protocol (after extension headers)
  bool frag = false;   // a fragment (not atomic)
  bool later = false;  // a non-first fragment: no transport header
  uint32_t frag_id = 0;
  // What names a datagram's fragments besides (src, dst, id): the IPv4
  // protocol / the fragment header's next header, the same in every fragment.
  uint8_t frag_proto = 0;
  bool has_l4 = false;            // transport header present (and complete)
  size_t l4 = 0;                  // offset of the transport header in the frame
  size_t l4_len = 0;              // transport bytes, as the IP length says
  uint16_t sport = 0, dport = 0;  // TCP/UDP ports
  uint8_t tcp_flags = 0;
  uint8_t icmp_type = 0, icmp_code = 0;
  bool is_icmp() const { return has_l4 && (proto == kIcmp || proto == kIcmp6); }
  bool icmp6(uint8_t t) const { return has_l4 && fam == 6 && proto == kIcmp6 && icmp_type == t; }
  bool igmp() const { return has_l4 && fam == 4 && proto == kIgmp; }
  // ICMP echo request / reply: the id plays the VM's port.
  bool echo() const {
    return is_icmp() && (fam == 4 ? (icmp_type == 8 || icmp_type == 0) : (icmp_type == 128 || icmp_type == 129));
  }
  bool icmp_error() const {
    if (!is_icmp()) return false;
    if (fam == 4) return icmp_type == 3 || icmp_type == 11 || icmp_type == 12;
    return icmp_type >= 1 && icmp_type <= 4;
  }
};

struct Model::Ctx {
  size_t vm;
  Hook hook;
  uint32_t mark;
  const std::vector<uint8_t>& f;
  Pkt p;
  Effects eff;       // when it passes
  Effects if_pass;   // what passing would record (for commit() after a mismatch)
  std::string note;  // appended to the deciding rule (diagnostics)
};

// IPv4: a whole header, no source-route options, total length within the
// frame, trailing bytes only as Ethernet padding.
static std::string parse_ip4(const std::vector<uint8_t>& f, size_t l3, auto& p) {
  size_t avail = f.size() - l3;
  if (avail < 20) return "malformed:ipv4 shorter than 20";
  if ((f[l3] >> 4) != 4) return "malformed:ipv4 version";
  size_t ihl = (f[l3] & 0xf) * 4u;
  if (ihl < 20 || ihl > avail) return "malformed:ipv4 ihl";
  size_t tot = be16(f, l3 + 2);
  if (tot > avail) return "malformed:ipv4 total length beyond the frame";
  if (tot < ihl) return "malformed:ipv4 total length below the header length";
  if (avail > tot && f.size() > 60) return "malformed:ipv4 trailing bytes beyond padding";  // only Ethernet padding
  // Options: walked; LSRR/SSRR (and lists that cannot be walked) are malformed.
  for (size_t o = l3 + 20; o < l3 + ihl;) {
    uint8_t t = f[o];
    if (t == 0) break;
    if (t == 1) {
      ++o;
      continue;
    }
    if (o + 2 > l3 + ihl) return "malformed:ipv4 option list cut";
    size_t len = f[o + 1];
    // CHOICE: an option that runs past the header ends the walk (nothing
    // beyond it can hide a source route); a length below 2 cannot be walked.
    if (t == 0x83 || t == 0x89) return "malformed:ipv4 source route";
    if (len < 2) return "malformed:ipv4 option length";
    if (o + len > l3 + ihl) break;
    o += len;
  }
  p.fam = 4;
  p.ttl = f[l3 + 8];
  p.proto = f[l3 + 9];
  p.src = addr_at(f, l3 + 12, 4);
  p.dst = addr_at(f, l3 + 16, 4);
  p.ip_len = tot;
  uint16_t fo = be16(f, l3 + 6);
  bool mf = fo & 0x2000;
  uint16_t off = fo & 0x1fff;
  p.frag = mf || off;
  p.later = off != 0;
  p.frag_id = be16(f, l3 + 4);
  p.frag_proto = p.proto;
  p.l4 = l3 + ihl;
  p.l4_len = tot - ihl;
  return "";
}

// IPv6: an IPv4-mapped source or destination (::ffff:0:0/96) is malformed
// (RULING 1). Extension headers walked (RULING 2: hop-by-hop only first, AH
// by its own length rule (hdrlen+2)*4, a routing header with segments left
// is malformed, a later fragment stops the walk at its fragment header;
// RULING: at most 6 of them, and one fragment header per packet (RFC 8200
// 4.5): a second one is malformed).
static std::string parse_ip6(const std::vector<uint8_t>& f, size_t l3, auto& p) {
  size_t avail = f.size() - l3;
  if (avail < 40) return "malformed:ipv6 shorter than 40";
  if ((f[l3] >> 4) != 6) return "malformed:ipv6 version";
  size_t tot = 40 + be16(f, l3 + 4);
  if (tot > avail) return "malformed:ipv6 payload length beyond frame";
  if (avail > tot && f.size() > 60) return "malformed:ipv6 trailing bytes beyond padding";
  p.fam = 6;
  p.ttl = f[l3 + 7];
  p.src = addr_at(f, l3 + 8, 6);
  p.dst = addr_at(f, l3 + 24, 6);
  p.ip_len = tot;
  static const Net mapped{Addr::v6("::ffff:0:0"), 96};
  if (mapped.contains(p.src) || mapped.contains(p.dst)) return "malformed:ipv6 ipv4-mapped address";
  uint8_t nh = f[l3 + 6];
  size_t o = l3 + 40, end = l3 + tot;
  bool seen_frag = false;
  for (int count = 0;; ++count) {
    if (nh != 0 && nh != 43 && nh != 44 && nh != 60 && nh != 51) break;
    if (count >= 6) return "malformed:ipv6 too many extension headers";
    if (o + 8 > end) return "malformed:ipv6 extension header cut";
    size_t len;
    if (nh == 0) {
      if (count != 0) return "malformed:ipv6 hop-by-hop not first";
      len = (f[o + 1] + 1u) * 8;
    } else if (nh == 43) {
      if (f[o + 3] != 0) return "malformed:ipv6 routing header segments left";  // segments left
      len = (f[o + 1] + 1u) * 8;
    } else if (nh == 44) {
      if (seen_frag) return "malformed:ipv6 second fragment header";
      seen_frag = true;
      len = 8;
      uint16_t fo = be16(f, o + 2);
      uint16_t off = fo >> 3;
      bool m = fo & 1;
      p.frag_id = be32(f, o + 4);
      p.frag_proto = f[o];
      if (off || m) p.frag = true;
      if (off) {
        p.later = true;
        p.proto = f[o];
        p.l4 = o + 8;
        p.l4_len = end - (o + 8);
        return "";
      }
    } else if (nh == 51) {
      len = (f[o + 1] + 2u) * 4;
    } else {  // 60
      len = (f[o + 1] + 1u) * 8;
    }
    if (o + len > end) return "malformed:ipv6 extension header beyond payload";
    nh = f[o];
    o += len;
  }
  p.proto = nh;
  p.l4 = o;
  p.l4_len = end - o;
  return "";
}

// The transport header of an unfragmented packet or a first fragment must
// hold, inside the IP datagram, what the policy reads (else it cannot be
// judged: malformed). CHOICE (README silent): TCP ports and flags (14
// bytes; the data offset is not checked: nothing is read beyond the flags),
// UDP ports (4), ICMP/ICMPv6/IGMP type, code and echo id (8). Bytes beyond
// the IP length are Ethernet padding, never a header.
static std::string parse_l4(const std::vector<uint8_t>& f, auto& p) {
  if (p.later) return "";
  size_t need = 0;
  switch (p.proto) {
    case 6:
      need = 14;
      break;
    case 17:
      need = 4;
      break;
    case 1:
    case 58:
    case 2:
      need = 8;
      break;
    default:
      return "";
  }
  if (p.l4_len < need) return "malformed:transport header cut";
  if (p.proto == 6) p.tcp_flags = f[p.l4 + 13];
  if (p.proto == 6 || p.proto == 17) {
    p.sport = be16(f, p.l4);
    p.dport = be16(f, p.l4 + 2);
  } else {
    p.icmp_type = f[p.l4];
    p.icmp_code = f[p.l4 + 1];
  }
  p.has_l4 = true;
  return "";
}

// ---- the model -------------------------------------------------------------------

Model::Model(MWorld world) : w_(std::move(world)) {
  for (const auto& vm : w_.vms) eui64_.push_back(eui64_ll(vm.mac));
  flows_.resize(w_.vms.size());
  peer_opened_.resize(w_.vms.size());
  frags_.resize(w_.vms.size());
}

int Model::owner_of(const Addr& a) const {
  for (size_t i = 0; i < w_.vms.size(); ++i) {
    if (owns(i, a) || eui64_[i] == a) return static_cast<int>(i);
  }
  return -1;
}
bool Model::owns(size_t vm, const Addr& a) const {
  for (const auto& n : w_.vms[vm].addrs)
    if (n.contains(a)) return true;
  return false;
}
bool Model::is_gateway(size_t vm, const Addr& a) const {
  for (const auto& g : w_.vms[vm].gateways)
    if (g == a) return true;
  return false;
}
// SAVI rule: any fe80::/10 except one another VM owns (spec address or
// EUI-64 of its MAC) or one of this VM's gateways.
bool Model::ll_usable(size_t vm, const Addr& a) const {
  if (!is_ll(a)) return false;
  int o = owner_of(a);
  if (o >= 0 && static_cast<size_t>(o) != vm) return false;
  return !is_gateway(vm, a);
}
// README "Guest noise": the /64 of the VM's first IPv6 address.
bool Model::in_own_64(size_t vm, const Addr& a) const {
  for (const auto& n : w_.vms[vm].addrs) {
    if (n.a.fam != 6) continue;
    Net n64{n.a, 64};
    if (n.plen < 64) n64.plen = n.plen;
    return n64.contains(a);
  }
  return false;
}

Verdict Model::pass(Ctx& c, const char* rule) {
  (void)c;
  return {true, "", rule};
}
static Verdict drop(const char* reason, const char* rule) { return {false, reason, rule}; }

Verdict Model::judge(size_t vm, Hook hook, uint32_t mark, const std::vector<uint8_t>& frame) {
  Ctx c{vm, hook, mark, frame, {}, {}, {}, {}};
  Verdict v = hook == Hook::from_vm ? from_vm(c) : to_vm(c);
  if (!v.pass) v.rule += c.note;
  if (c.p.fam == 4 && c.p.proto == kIcmp6) v.rule += " [IPv4 protocol 58]";  // (diagnostics: a class of its own)
  // A first fragment that passes is recorded, in every mode.
  if (c.p.fam && c.p.frag && !c.p.later) {
    FragKey k{c.p.src, c.p.dst, c.p.frag_id, c.p.frag_proto};
    c.if_pass.add_frags.push_back(k);
    if (v.pass) c.eff.add_frags.push_back(k);
  }
  pend_vm_ = vm;
  pend_pass_ = v.pass;
  pend_effects_ = v.pass ? c.eff : Effects{};
  pend_if_pass_ = c.if_pass;
  return v;
}

void Model::commit(bool passed) {
  if (!passed) return;
  const Effects& e = pend_pass_ ? pend_effects_ : pend_if_pass_;
  auto& fl = flows_[pend_vm_];
  for (const auto& k : e.del_flows) fl.erase(k), peer_opened_[pend_vm_].erase(k);
  for (const auto& k : e.add_flows)
    if (!fl.count(k) && fl.size() < w_.vms[pend_vm_].flows) {
      fl.insert(k);
      if (e.by_peer) peer_opened_[pend_vm_].insert(k);
    }
  for (const auto& k : e.add_frags) frags_[pend_vm_].insert(k);
}

// ---- L2 -----------------------------------------------------------------------

// Shared L2 part of both hooks. Returns true when it decided. RULING 7:
// from_vm: spoofed_mac, then a VLAN tag (bad_ethertype), then 802.3/LLC or a
// bridge-group destination with an unknown ethertype (link_local; a VLAN
// ethertype is never link_local). to_vm: a tag, then anything not
// IPv4/IPv6/ARP (LLC and bridge-group frames included, RULING 12) is
// bad_ethertype.
static bool l2_checks(const std::vector<uint8_t>& f, Hook hook, const MacAddr& vm_mac, Verdict& v) {
  if (f.size() < 14) {
    v = drop("malformed", "frame shorter than Ethernet");
    return true;
  }
  uint16_t type = be16(f, 12);
  // "Ethernet source = the spec's mac"
  if (hook == Hook::from_vm && std::memcmp(&f[6], vm_mac.data(), 6) != 0) {
    v = drop("spoofed_mac", "Ethernet source is not the VM's MAC");
    return true;
  }
  // "no 802.1Q/802.1ad tag ... both directions"
  if (type == 0x8100 || type == 0x88a8 || type == 0x9100) {
    v = drop("bad_ethertype", "VLAN tag");
    return true;
  }
  bool known = type == 0x0800 || type == 0x0806 || type == 0x86dd;
  // Guest noise: 802.3/LLC frames and 01:80:c2:00:00:0x (STP, LLDP, LACP, 802.1X).
  static const uint8_t kBridgeGroup[5] = {0x01, 0x80, 0xc2, 0x00, 0x00};
  if (hook == Hook::from_vm && !known &&
      (type < 0x0600 || (std::memcmp(&f[0], kBridgeGroup, 5) == 0 && f[5] <= 0x0f))) {
    v = drop("link_local", "802.3/LLC or bridge group address");
    return true;
  }
  if (!known) {
    v = drop("bad_ethertype", "not IPv4, IPv6 or ARP");
    return true;
  }
  return false;
}

// "malformed:<what>" from the parsers: reason malformed, rule "parse: <what>".
static Verdict parse_drop(const std::string& r) {
  size_t colon = r.find(':');
  if (colon == std::string::npos) return {false, r, "parse"};
  return {false, r.substr(0, colon), "parse: " + r.substr(colon + 1)};
}

// Parse ARP or IP into c.p; "" or the reason.
static std::string parse_frame(const std::vector<uint8_t>& f, auto& p) {
  p.n = f.size();
  std::memcpy(p.dmac.data(), &f[0], 6);
  std::memcpy(p.smac.data(), &f[6], 6);
  p.type = be16(f, 12);
  if (p.type == 0x0806) {
    // "ARP request/reply: <= 60-byte frame, Ethernet/IPv4"
    if (f.size() < 42 || f.size() > 60) return "malformed:arp frame length";
    if (be16(f, 14) != 1 || be16(f, 16) != 0x0800 || f[18] != 6 || f[19] != 4) return "malformed:arp not ethernet/ipv4";
    p.op = be16(f, 20);
    std::memcpy(p.sha.data(), &f[22], 6);
    p.spa = addr_at(f, 28, 4);
    p.tpa = addr_at(f, 38, 4);
    return "";
  }
  std::string r = p.type == 0x0800 ? parse_ip4(f, 14, p) : parse_ip6(f, 14, p);
  if (!r.empty()) return r;
  return parse_l4(f, p);
}

// ---- from the VM ----------------------------------------------------------------

Verdict Model::from_vm(Ctx& c) {
  const MVm& vm = w_.vms[c.vm];
  Verdict v;
  if (l2_checks(c.f, Hook::from_vm, vm.mac, v)) return v;
  if (std::string r = parse_frame(c.f, c.p); !r.empty()) return parse_drop(r);
  if (c.p.type == 0x0806) return arp_from_vm(c);
  // "A VM never sends RA (134) or redirect (137) (spoofed_nd), nor MLD/IGMP queries (link_local)."
  if (c.p.icmp6(134) || c.p.icmp6(137)) return drop("spoofed_nd", "RA/redirect from a VM");
  // RULING 5: a query is link_local whatever its bounds, when its source is
  // one the VM may use for MLD/IGMP (else spoofed_ip).
  if (c.p.icmp6(130)) {
    // Its source judged like any control packet's (an unassigned address of
    // its /64 is unassigned_src).
    Verdict src = source_v6_from_vm(c, true, true);
    if (!src.pass) return src;
    return drop("link_local", "MLD query from a VM");
  }
  if (c.p.igmp() && c.f[c.p.l4] == 0x11) {
    if (owns(c.vm, c.p.src)) return drop("link_local", "IGMP query from a VM");
    return drop("spoofed_ip", "IGMP query from a VM, source not the VM's");
  }
  bool control = false;
  v = control_from_vm(c, control);
  if (control) return v;
  v = policy_from_vm(c);
  v.vouch = v.pass;
  return v;
}

// ARP from the VM (README table "Link-local control traffic, from the VM").
Verdict Model::arp_from_vm(Ctx& c) {
  const MVm& vm = w_.vms[c.vm];
  const Pkt& p = c.p;
  // RULING 7: length/format/opcode (malformed) before the sender MAC.
  if (p.op != 1 && p.op != 2) return drop("malformed", "ARP opcode neither request nor reply");
  if (p.sha != vm.mac) return drop("spoofed_arp", "ARP sender MAC");
  // CHOICE: a target owned by a VM of another group is cross_group ("any
  // other VM-to-VM packet is a violation"), any other foreign target arp_denied.
  auto other_group_owned = [&](const Addr& t) {
    int o = owner_of(t);
    return o >= 0 && !same_group(c.vm, static_cast<size_t>(o));
  };
  auto target_ok = [&](const Addr& t) {
    if (owns(c.vm, t) || is_gateway(c.vm, t)) return true;
    int o = owner_of(t);
    return o >= 0 && same_group(c.vm, static_cast<size_t>(o));
  };
  // README "Guest noise": a target that is nobody's (no VM's, not a
  // gateway) is an on-link neighbour a guest with a /24 asks for: link_local.
  // CHOICE: the same for replies (nothing leaves the link either).
  auto foreign = [&](const char* what) {
    return other_group_owned(p.tpa)
               ? drop("cross_group", (std::string(what) + " for a VM of another group").c_str())
               : drop("link_local", (std::string(what) + " for an address that is nobody's").c_str());
  };
  if (!owns(c.vm, p.spa)) {
    if (p.op == 1 && is_unspec(p.spa))  // a probe
      return owns(c.vm, p.tpa) ? pass(c, "ARP probe for an own address")
                               : drop("link_local", "ARP probe for an address not the VM's");
    // CHOICE: an IPv4 link-local sender (169.254/16, RFC 3927 autoconfig)
    // that no VM owns is guest noise like an IPv6 link-local.
    static const Net ipv4ll{Addr::v4(169, 254, 0, 0), 16};
    if (ipv4ll.contains(p.spa) && owner_of(p.spa) < 0) return drop("link_local", "ARP from an IPv4 link-local sender");
    return drop("spoofed_arp", "ARP sender IP");
  }
  if (p.op == 1) return target_ok(p.tpa) ? pass(c, "ARP request") : foreign("ARP request");
  if (p.op == 2) return target_ok(p.tpa) ? pass(c, "ARP reply") : foreign("ARP reply");
  return drop("malformed", "ARP opcode neither request nor reply");  // CHOICE
}

// The option list of an NS/NA/RS: walked to the end, every link-layer option
// is the VM's MAC, no source link-layer option from ::.
Verdict Model::nd_options(Ctx& c, size_t first_opt) {
  const Pkt& p = c.p;
  size_t end = p.l4 + p.l4_len;
  for (size_t o = p.l4 + first_opt; o < end;) {
    if (o + 2 > end) return drop("malformed", "ND option list cannot be walked");  // CHOICE: malformed
    size_t len = c.f[o + 1] * 8u;
    uint8_t t = c.f[o];
    if (len == 0) return drop("malformed", "ND option list cannot be walked");
    // CHOICE: a link-layer option that is not 8 bytes (an Ethernet address)
    // claims another link-layer address: spoofed_nd, as soon as it is read.
    if ((t == 1 || t == 2) && len != 8) return drop("spoofed_nd", "ND link-layer option of a non-Ethernet length");
    if (o + len > end) return drop("malformed", "ND option list cannot be walked");
    if (t == 1 || t == 2) {
      if (std::memcmp(&c.f[o + 2], w_.vms[c.vm].mac.data(), 6) != 0)
        return drop("spoofed_nd", "ND link-layer option is not the VM's MAC");
      if (t == 1 && is_unspec(p.src)) return drop("spoofed_nd", "source link-layer option from ::");
    }
    o += len;
  }
  return {true, "", ""};
}

// IPv6 source of a packet from the VM: its own address; a link-local it may
// use (allow_ll); :: (allow_unspec); the rest of its /64 is unassigned_src.
Verdict Model::source_v6_from_vm(Ctx& c, bool allow_ll, bool allow_unspec) {
  const Addr& s = c.p.src;
  if (owns(c.vm, s)) return {true, "", ""};
  if (is_ll(s)) {
    if (!ll_usable(c.vm, s)) return drop("spoofed_ip", "link-local source of another VM or a gateway");
    if (allow_ll) return {true, "", ""};
    return drop("link_local", "link-local source outside ND/MLD");
  }
  if (is_unspec(s)) {
    if (allow_unspec) return {true, "", ""};
    // CHOICE: like DHCP from 0.0.0.0, :: to a multicast group is guest noise.
    if (is_multicast(c.p.dst)) return drop("link_local", "unspecified source to a multicast group");
    return drop("spoofed_ip", "unspecified source");
  }
  if (in_own_64(c.vm, s) && owner_of(s) < 0 && !is_gateway(c.vm, s))
    return drop("unassigned_src", "unassigned address in the VM's /64");
  return drop("spoofed_ip", "IPv6 source not the VM's");
}

// The source check of ND/MLD control traffic: same rule as any packet's,
// named apart (diagnostics: a mismatch class of its own).
static Verdict control_src(Verdict v) {
  v.rule = "ND/MLD source: " + v.rule;
  return v;
}

// ND/MLD/IGMP from the VM: control traffic when it meets the destination,
// size and hop-limit bounds (then it passes without a rule, or is dropped
// for its content); otherwise is_control = false and the rules judge it.
Verdict Model::control_from_vm(Ctx& c, bool& is_control) {
  const Pkt& p = c.p;
  is_control = false;
  if (p.frag || !p.has_l4) return {};
  const MVm& vm = w_.vms[c.vm];
  auto same_group_owned = [&](const Addr& a) {
    int o = owner_of(a);
    return o >= 0 && same_group(c.vm, static_cast<size_t>(o)) && owns(static_cast<size_t>(o), a);
  };
  size_t len = p.l4_len;
  if (p.fam == 6 && p.proto == kIcmp6) {
    uint8_t t = p.icmp_type;
    if (t == 135 || t == 136) {
      if (p.ttl != 255 || p.icmp_code != 0 || len < 24 || len > 64) return {};
      Addr target = addr_at(c.f, p.l4 + 8, 6);
      // CHOICE: an IPv4-mapped target (::ffff:a.b.c.d) names the IPv4 address.
      static const Net mapped{Addr::v6("::ffff:0:0"), 96};
      Addr hdr_target = target;
      if (mapped.contains(target)) target = Addr::v4(target.b[12], target.b[13], target.b[14], target.b[15]);
      if (t == 135) {
        if (!(p.dst == solicited_node(hdr_target) || p.dst == hdr_target)) return {};
      } else {
        static const Addr all_nodes = Addr::v6("ff02::1");
        if (!(p.dst == all_nodes || is_ll(p.dst) || is_gateway(c.vm, p.dst) || same_group_owned(p.dst))) return {};
      }
      is_control = true;
      // RULING 7: the source check before the option checks; RULING 4: an NA from :: is spoofed_nd.
      if (t == 136 && is_unspec(p.src)) return drop("spoofed_nd", "NA from ::");
      if (Verdict v = source_v6_from_vm(c, true, t == 135); !v.pass) return control_src(v);
      if (Verdict v = nd_options(c, 24); !v.pass) return v;
      if (t == 135 && is_unspec(p.src)) {
        // Duplicate address detection claims the target (SAVI, RFC 6620).
        // RULING 11: own or usable link-local passes; another VM's or a
        // gateway is spoofed_nd; anything else unassigned_src.
        if (owns(c.vm, target) || ll_usable(c.vm, target)) return pass(c, "NS (DAD)");
        int o = owner_of(target);
        if ((o >= 0 && static_cast<size_t>(o) != c.vm) || is_gateway(c.vm, target))
          return drop("spoofed_nd", "DAD for another VM's or a gateway's address");
        return drop("unassigned_src", "DAD for an address the VM was not given");
      }
      if (t == 135) {
        // target: the VM's own, a gateway, a VM of its group, or a
        // link-local no VM of another group owns.
        int o = owner_of(target);
        if (o >= 0 && !same_group(c.vm, static_cast<size_t>(o)))
          return drop("cross_group", "NS for a VM of another group");
        bool ok = owns(c.vm, target) || is_gateway(c.vm, target) || same_group_owned(target);
        if (!ok && is_ll(target)) {
          int o = owner_of(target);
          ok = o < 0 || same_group(c.vm, static_cast<size_t>(o));
        }
        // README "Guest noise": an NS for an address that is nobody's: link_local.
        return ok ? pass(c, "NS") : drop("link_local", "NS for an address that is nobody's");
      }
      bool ok = owns(c.vm, target) || ll_usable(c.vm, target);
      if (ok) return pass(c, "NA");
      // CHOICE (as RULING 11 for DAD): advertising a SLAAC address of its
      // own /64 that no VM owns and that is not a gateway is guest noise.
      if (in_own_64(c.vm, target) && owner_of(target) < 0 && !is_gateway(c.vm, target))
        return drop("unassigned_src", "NA for an unassigned address of the VM's /64");
      return drop("spoofed_nd", "NA for an address not the VM's");
    }
    if (t == 133) {
      static const Addr all_routers = Addr::v6("ff02::2");
      if (p.ttl != 255 || p.icmp_code != 0 || len < 8 || len > 40 || !(p.dst == all_routers)) return {};
      is_control = true;
      if (Verdict v = source_v6_from_vm(c, true, true); !v.pass) return control_src(v);
      if (Verdict v = nd_options(c, 8); !v.pass) return v;
      return pass(c, "RS");
    }
    if (t == 131 || t == 132 || t == 143) {
      if (p.ttl != 1) return {};
      if (t == 143) {
        if (len < 8 || len > 8 + 20 * 32 || !(p.dst == Addr::v6("ff02::16"))) return {};
      } else {
        if (len != 24) return {};
        if (t == 132 && !(p.dst == Addr::v6("ff02::2"))) return {};
        if (t == 131) {
          Addr group = addr_at(c.f, p.l4 + 8, 6);
          if (!is_multicast(group) || !(p.dst == group)) return {};
        }
      }
      is_control = true;
      if (Verdict v = source_v6_from_vm(c, true, true); !v.pass) return control_src(v);
      return pass(c, "MLD report/done");
    }
    return {};
  }
  if (p.igmp()) {
    uint8_t t = c.f[p.l4];
    if (p.ttl != 1 || len < 8 || len > 8 + 8 * 32) return {};
    if (t == 0x12 || t == 0x16) {
      Addr group = addr_at(c.f, p.l4 + 4, 4);
      if (!is_multicast(group) || !(p.dst == group)) return {};
    } else if (t == 0x17) {
      if (!(p.dst == Addr::v4(224, 0, 0, 2))) return {};
    } else if (t == 0x22) {
      if (!(p.dst == Addr::v4(224, 0, 0, 22))) return {};
    } else {
      return {};
    }
    is_control = true;
    if (!owns(c.vm, p.src)) return drop("spoofed_ip", "IGMP source not the VM's");
    (void)vm;
    return pass(c, "IGMP report/leave");
  }
  return {};
}

// An ICMP/ICMPv6 error that quotes a flow of this VM, with its outer
// addresses the reverse of the quoted ones as seen from the VM, within the
// RFC 1812/4443 size.
bool Model::icmp_error_of_flow(Ctx& c, bool from_vm) const {
  const Pkt& p = c.p;
  if (!p.icmp_error()) return false;
  if (p.ip_len > (p.fam == 4 ? 576u : 1280u)) return false;
  size_t q = p.l4 + 8, end = p.l4 + p.l4_len;
  if (q >= end) return false;
  Addr qs, qd;
  uint8_t qproto;
  size_t ql4;
  bool bad_version = false;  // (diagnostics) the quoted header is no IPv6 header
  bool later = false;
  if (p.fam == 4) {
    if (q + 20 > end || (c.f[q] >> 4) != 4) return false;
    size_t ihl = (c.f[q] & 0xf) * 4u;
    if (ihl < 20 || q + ihl > end) return false;
    later = be16(c.f, q + 6) & 0x1fff;  // quotes a later fragment: no transport header
    qproto = c.f[q + 9];
    qs = addr_at(c.f, q + 12, 4);
    qd = addr_at(c.f, q + 16, 4);
    ql4 = q + ihl;
  } else {
    if (q + 40 > end) return false;
    bad_version = (c.f[q] >> 4) != 6;
    qproto = c.f[q + 6];
    qs = addr_at(c.f, q + 8, 6);
    qd = addr_at(c.f, q + 24, 6);
    ql4 = q + 40;
  }
  // The quoted packet's flow key, by the same rule as any packet's: TCP/UDP
  // ports, the echo id as the requester's port, 0 for every other protocol
  // and ICMP type, and for a later fragment (CHOICE: it belongs to its
  // datagram's flow as far as its header says; ports unknown = 0).
  uint16_t qsport = 0, qdport = 0;
  if (!later && (qproto == kTcp || qproto == kUdp || qproto == (p.fam == 4 ? kIcmp : kIcmp6))) {
    if (ql4 + 8 > end) return false;  // RFC 792: the first 8 bytes are quoted
    if (qproto == kTcp || qproto == kUdp) {
      qsport = be16(c.f, ql4);
      qdport = be16(c.f, ql4 + 2);
    } else {
      uint8_t t = c.f[ql4];
      bool echo = p.fam == 4 ? (t == 8 || t == 0) : (t == 128 || t == 129);
      if (echo) {
        uint16_t id = be16(c.f, ql4 + 4);
        bool request = t == 8 || t == 128;  // the echo id is the requester's port (see echo_ports)
        qsport = request ? id : 0;
        qdport = request ? 0 : id;
      }
    }
  }
  FlowKey k;
  if (from_vm) {  // the quoted packet went peer -> VM; outer addresses = quoted ones reversed
    if (!(p.dst == qs) || !(p.src == qd)) return false;
    k = {qd, qs, qdport, qsport, qproto};
  } else {  // quoted VM -> peer; outer destination = quoted source = the VM
    if (!(p.dst == qs)) return false;
    k = {qs, qd, qsport, qdport, qproto};
  }
  if (!flows_[c.vm].count(k)) return false;
  if (bad_version) {
    c.note = " [an ICMP error quoting a flow, but its quoted header is not IPv6]";
    return false;
  }
  return true;
}

// Rules combine: every rule whose prefix contains the peer applies; then
// protocol and (TCP/UDP) port ranges.
bool Model::rules_allow(const std::vector<MRule>& rules, const Pkt& p, const Addr& peer) const {
  for (const auto& r : rules) {
    if (!r.peer.contains(peer)) continue;
    if (r.proto != 0 && r.proto != p.proto) continue;
    if (r.ports.empty()) return true;
    if (p.proto != kTcp && p.proto != kUdp) continue;
    if (p.later) continue;  // a later fragment carries no port (frag table decides)
    for (const auto& [lo, hi] : r.ports)
      if (p.dport >= lo && p.dport <= hi) return true;
  }
  return false;
}

// RULING 8 and README "Flow state per VM": a packet that passed the rules
// creates or refreshes its flow. From the VM: non-TCP packets (ICMP errors
// the rules allow included), TCP with SYN or FIN, any TCP in conntrack mode;
// the VM's RST ends an existing flow and never creates one. Toward the VM:
// every packet the ingress rules let in (not only SYNs), except that an RST
// creates nothing (and the peer's RST does not end a flow: it only starts
// the linger). A new flow in a full table is flow_limit; an existing entry
// is refreshed in place and keeps the side that opened it.
Verdict Model::open_flow(Ctx& c, const FlowKey& k, const char* rule) {
  const Pkt& p = c.p;
  bool from_vm = c.hook == Hook::from_vm;
  bool tcp = p.proto == kTcp && !p.later;
  bool rst = tcp && (p.tcp_flags & kRst);
  bool records = !rst;
  if (tcp && from_vm && !rst) records = (p.tcp_flags & (kSyn | 0x01)) || w_.vms[c.vm].mode == MMode::conntrack;
  bool exists = flows_[c.vm].count(k) != 0;
  if (rst && exists && from_vm) c.eff.del_flows.push_back(k);
  c.if_pass.by_peer = c.eff.by_peer = !from_vm;
  if (records && !exists) {
    c.if_pass.add_flows.push_back(k);
    if (flows_[c.vm].size() >= w_.vms[c.vm].flows) return drop("flow_limit", "the VM's flow table is full");
    c.eff.add_flows.push_back(k);
  }
  return pass(c, rule);
}

// ICMP echo: the id plays the port of the side that asks (as a client's
// port in UDP): a request carries it as its source port, a reply as its
// destination port. So a VM's ping and the reply to it share a flow, and a
// peer's request is not a reply to the VM's ping. CHOICE (README: "replies").
void Model::echo_ports(Ctx& c, FlowKey& k, bool from_vm) const {
  uint16_t id = be16(c.f, c.p.l4 + 4);
  bool request = c.p.icmp_type == 8 || c.p.icmp_type == 128;
  uint16_t sport = request ? id : 0, dport = request ? 0 : id;
  k.vm_port = from_vm ? sport : dport;
  k.peer_port = from_vm ? dport : sport;
}

// A packet of a flow in the table: passes; the VM's RST ends the flow (the
// peer's only starts the linger, README "Flow state per VM").
static void known_flow(auto& c, const FlowKey& k) {
  if (c.hook == Hook::from_vm && c.p.proto == 6 && !c.p.later && (c.p.tcp_flags & 0x04)) c.eff.del_flows.push_back(k);
}

Verdict Model::policy_from_vm(Ctx& c) {
  const MVm& vm = w_.vms[c.vm];
  const Pkt& p = c.p;
  // Source address owned by the VM (DHCP from 0.0.0.0 is guest noise).
  if (p.fam == 4) {
    // DHCP/BOOTP from 0.0.0.0 is guest noise. CHOICE: any 0.0.0.0 source to
    // a multicast/broadcast destination (as :: below); to a unicast one it
    // is spoofed_ip (a DHCP client broadcasts from 0.0.0.0).
    if (is_unspec(p.src) && (is_multicast(p.dst) || is_bcast(p.dst)))
      return drop("link_local", "DHCP/BOOTP or other 0.0.0.0 source to a multicast/broadcast group");
    if (!owns(c.vm, p.src)) return drop("spoofed_ip", "IPv4 source not the VM's");
  } else {
    if (Verdict v = source_v6_from_vm(c, false, false); !v.pass) return v;
    if (is_ll(p.dst)) return drop("link_local", "link-local destination outside ND/MLD");
  }
  auto isolation = [&](Verdict& v) {  // destination owned by another VM
    int o = owner_of(p.dst);
    if (o < 0 || !owns(static_cast<size_t>(o), p.dst)) return false;
    v = same_group(c.vm, static_cast<size_t>(o)) ? pass(c, "same group")
                                                 : drop("cross_group", "destination is a VM of another group");
    return true;
  };
  Verdict iso;
  if (p.later || vm.mode == MMode::direct) {
    if (isolation(iso)) return iso;
    if (vm.mode == MMode::direct) return pass(c, p.later ? "direct: later fragment" : "direct mode");
    if (frags_[c.vm].count({p.src, p.dst, p.frag_id, p.frag_proto}))
      return pass(c, "later fragment of an allowed first");
    return drop("fragment", "later fragment without its first");
  }
  FlowKey k;
  k.proto = p.proto, k.vm = p.src, k.peer = p.dst;
  if (p.proto == kTcp || p.proto == kUdp) k.vm_port = p.sport, k.peer_port = p.dport;
  if (p.echo()) echo_ports(c, k, true);
  // Modes: conntrack checks a flow's first packet, later ones hit the flow
  // (whoever opened it); filtered checks every packet (below).
  if (vm.mode == MMode::conntrack && flows_[c.vm].count(k)) {
    known_flow(c, k);
    return pass(c, "conntrack: packet of a known flow");
  }
  if (isolation(iso)) return iso;
  // The IMDS address is fenced off: with imds: true, imds.address:imds.port
  // (TCP); RULING 6: explicit egress rules for exactly its /32 apply even
  // with imds: false; broader rules never reach it.
  if (w_.host.has_imds && p.dst == w_.host.imds) {
    if (vm.imds && p.proto == kTcp && p.dport == w_.host.imds_port) return open_flow(c, k, "IMDS");
    std::vector<MRule> exact;
    for (const auto& r : vm.egress)
      if (r.peer.a.fam == 4 && r.peer.plen == 32 && r.peer.a == w_.host.imds) exact.push_back(r);
    if (rules_allow(exact, p, p.dst)) return open_flow(c, k, "IMDS /32 egress rule");
    return denied_from_vm(c, k, drop("imds_denied", "IMDS address: not imds: true or not its TCP port, no /32 rule"));
  }
  if (rules_allow(vm.egress, p, p.dst)) return open_flow(c, k, "egress rule");
  return denied_from_vm(c, k, drop("egress_denied", "no egress rule"));
}

// What the egress rules deny may still pass or be quiet noise:
//  - a reply in a flow a peer opened under an ingress rule (filtered mode:
//    the VM's own flows are what the rules just judged), the VM's RST ends it;
//  - an ICMP error of a flow (not recorded, RULING 8);
//  - README "quiet": shaped like a reply (a TCP RST, or from a source port
//    the ingress rules open to that peer) to a flow the table does not
//    hold: stale_reply;
//  - RULING 9 / README "Guest noise": egress_denied to a multicast or
//    broadcast destination, or a subnet broadcast (IPv4 ending in .255 in
//    an Ethernet broadcast frame): link_local.
Verdict Model::denied_from_vm(Ctx& c, const FlowKey& k, Verdict deny) {
  const MVm& vm = w_.vms[c.vm];
  const Pkt& p = c.p;
  if (vm.mode != MMode::conntrack && peer_opened_[c.vm].count(k)) {
    known_flow(c, k);
    return pass(c, "reply in a flow a peer opened");
  }
  if (icmp_error_of_flow(c, true)) return pass(c, "ICMP error quoting a flow");
  bool rst = p.proto == kTcp && (p.tcp_flags & kRst);
  Pkt as_reply = p;
  as_reply.dport = p.sport;  // the VM's port, as an ingress rule sees it
  if (rst || rules_allow(vm.ingress, as_reply, p.dst))
    return drop("stale_reply", rst ? "RST to a flow the table does not hold" : "from a port the ingress rules open");
  static const MacAddr bcast{0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  bool subnet_bcast = p.fam == 4 && p.dst.b[3] == 255 && p.dmac == bcast;
  if (deny.reason == "egress_denied" && (is_multicast(p.dst) || is_bcast(p.dst) || subnet_bcast))
    return drop("link_local", "multicast/broadcast no rule allows");
  return deny;
}

// ---- toward the VM ---------------------------------------------------------------

// Toward the VM, a source that a VM owns: never the VM's own; another VM's
// needs the from_vm mark; a VM of another group is cross_group, except that
// its broadcast, multicast or flooded unicast (Ethernet destination not this
// VM's MAC) reaching every port of a shared bridge is link_local (the bridge
// at work, not an attempt on this VM; lead's datapath change of 05:22).
Verdict Model::vm_source_to_vm(Ctx& c, const Addr& src) {
  if (owns(c.vm, src)) return drop("spoofed_ip", "source is the VM's own address");
  int o = owner_of(src);
  if (o < 0) return {true, "", ""};
  if (static_cast<size_t>(o) == c.vm) return drop("spoofed_ip", "source is the VM's own link-local");
  if (!(c.mark & kVouchMark)) return drop("spoofed_ip", "a VM's address without the from_vm mark");
  if (same_group(c.vm, static_cast<size_t>(o))) return {true, "", ""};
  if (c.p.dmac != w_.vms[c.vm].mac) return drop("link_local", "another group's broadcast/multicast/flooded frame");
  return drop("cross_group", "from a VM of another group");
}

// RULING 7, to_vm: L2 -> parse -> ARP -> VM-source checks -> control ->
// link_local -> not_for_vm -> same group/direct -> fragments -> flows ->
// ICMP errors -> ingress rules.
Verdict Model::to_vm(Ctx& c) {
  Verdict v;
  if (l2_checks(c.f, Hook::to_vm, w_.vms[c.vm].mac, v)) return v;
  if (std::string r = parse_frame(c.f, c.p); !r.empty()) return parse_drop(r);
  if (c.p.type == 0x0806) return arp_to_vm(c);
  if (Verdict v = vm_source_to_vm(c, c.p.src); !v.pass) return v;
  bool control = false;
  v = control_to_vm(c, control);
  // README "Toward the VM": ND/MLD another VM sent (vouch bit) from an
  // address no VM of this VM's group owns would let a tenant poison a
  // neighbour's cache or fail its DAD on a shared bridge: link_local.
  if (control && v.pass && (c.mark & kVouchMark)) {
    int o = owner_of(c.p.src);
    if (o < 0 || !same_group(c.vm, static_cast<size_t>(o)))
      return drop("link_local", "another VM's ND/MLD from an address no VM of this group owns");
  }
  if (control) return v;
  return policy_to_vm(c);
}

// "ARP of at most 60 bytes whose target is the VM's address, or whose
// sender/target is its gateway, from any sender that is not a VM of another
// group nor the VM's own address."
Verdict Model::arp_to_vm(Ctx& c) {
  const Pkt& p = c.p;
  if (p.op != 1 && p.op != 2) return drop("malformed", "ARP opcode neither request nor reply");  // CHOICE
  // The sender address goes through the same VM-source checks as an IP source.
  if (Verdict v = vm_source_to_vm(c, p.spa); !v.pass) {
    if (v.reason == "spoofed_ip") v.reason = "spoofed_arp";
    v.rule = "ARP: " + v.rule;
    return v;
  }
  if (owns(c.vm, p.tpa) || is_gateway(c.vm, p.spa) || is_gateway(c.vm, p.tpa)) return pass(c, "ARP for the VM");
  return drop("arp_denied", "ARP that does not concern the VM");  // CHOICE
}

// RULING 10: NS/NA (24..64 bytes of ICMPv6), RA (16..512), redirect
// (40..1240), hop limit 255, code 0, and MLD queries (hop limit 1, 24..540)
// to the VM's addresses, a link-local, ff02::1 or a solicited-node group;
// IGMP queries (TTL 1, 8..140 bytes, to a multicast group). Other VMs' MLD
// reports/done, RS and IGMP non-queries: link_local.
Verdict Model::control_to_vm(Ctx& c, bool& is_control) {
  const Pkt& p = c.p;
  is_control = false;
  if (p.frag || !p.has_l4) return {};
  if (p.fam == 6 && p.proto == kIcmp6) {
    uint8_t t = p.icmp_type;
    if (t == 131 || t == 132 || t == 143 || t == 133) {
      is_control = true;
      return drop("link_local", "MLD report/RS toward a VM");
    }
    auto dst_ok = [&] {
      return owns(c.vm, p.dst) || is_ll(p.dst) || p.dst == Addr::v6("ff02::1") || is_solicited_node(p.dst);
    };
    size_t len = p.l4_len;
    if (t >= 134 && t <= 137) {
      size_t min = t == 134 ? 16 : t == 137 ? 40 : 24;
      size_t max = t == 134 ? 512 : t == 137 ? 1240 : 64;
      if (p.ttl != 255 || p.icmp_code != 0 || len < min || len > max || !dst_ok()) return {};
      is_control = true;
      return pass(c, "ND toward the VM");
    }
    if (t == 130) {
      if (p.ttl != 1 || len < 24 || len > 540 || !dst_ok()) return {};
      is_control = true;
      return pass(c, "MLD query toward the VM");
    }
    return {};
  }
  if (p.igmp()) {
    uint8_t t = c.f[p.l4];
    if (t != 0x11) {
      is_control = true;
      return drop("link_local", "IGMP non-query toward a VM");
    }
    if (p.ttl == 1 && p.l4_len >= 8 && p.l4_len <= 140 && is_multicast(p.dst)) {
      is_control = true;
      return pass(c, "IGMP query toward the VM");
    }
  }
  return {};
}

Verdict Model::policy_to_vm(Ctx& c) {
  const MVm& vm = w_.vms[c.vm];
  const Pkt& p = c.p;
  // RULING 3: link-local IP traffic that is not ND/MLD control.
  if (is_ll(p.src) || is_ll(p.dst)) return drop("link_local", "link-local traffic toward the VM");
  // Destination is the VM. RULING 12: a multicast or broadcast destination
  // reaches every VM on the link; its source and the ingress rules judge it.
  if (!owns(c.vm, p.dst) && !is_multicast(p.dst) && !is_bcast(p.dst))
    return drop("not_for_vm", "destination is not the VM's");
  if (owner_of(p.src) >= 0) return pass(c, "same group");
  if (p.later) {
    if (vm.mode == MMode::direct) return pass(c, "direct: later fragment");
    if (frags_[c.vm].count({p.src, p.dst, p.frag_id, p.frag_proto}))
      return pass(c, "later fragment of an allowed first");
    return drop("fragment", "later fragment without its first");
  }
  if (vm.mode == MMode::direct) return pass(c, "direct mode");
  FlowKey k;
  k.proto = p.proto, k.vm = p.dst, k.peer = p.src;
  if (p.proto == kTcp || p.proto == kUdp) k.vm_port = p.dport, k.peer_port = p.sport;
  if (p.echo()) echo_ports(c, k, false);
  if (flows_[c.vm].count(k)) {  // CHOICE: ICMP errors too, as from the VM
    known_flow(c, k);
    return pass(c, "reply to a known flow");
  }
  if (icmp_error_of_flow(c, false)) return pass(c, "ICMP error quoting a flow");
  if (rules_allow(vm.ingress, p, p.src)) return open_flow(c, k, "ingress rule");
  return drop("ingress_denied", "no ingress rule");
}

}  // namespace vmfence::fuzz
