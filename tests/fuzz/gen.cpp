// Generator of worlds (specs) and scenarios (frames). See gen.h.
#include "tests/fuzz/gen.h"

#include <algorithm>
#include <cstring>
#include <sstream>

namespace vmfence::fuzz {

namespace {

constexpr uint8_t kTcp = 6, kUdp = 17, kIcmp = 1, kIcmp6 = 58, kIgmp = 2;
const MacAddr kGwMac = {0x02, 0x00, 0x00, 0x00, 0x00, 0x01};

// ---- bytes -------------------------------------------------------------------

struct Bytes {
  std::vector<uint8_t> v;
  Bytes& u8(uint8_t x) {
    v.push_back(x);
    return *this;
  }
  Bytes& u16(uint16_t x) { return u8(static_cast<uint8_t>(x >> 8)).u8(static_cast<uint8_t>(x)); }
  Bytes& u32(uint32_t x) { return u16(static_cast<uint16_t>(x >> 16)).u16(static_cast<uint16_t>(x)); }
  Bytes& put(const uint8_t* p, size_t n) {
    v.insert(v.end(), p, p + n);
    return *this;
  }
  Bytes& put(const std::vector<uint8_t>& b) { return put(b.data(), b.size()); }
  Bytes& addr(const Addr& a) { return put(a.b.data(), a.fam == 4 ? 4 : 16); }
  Bytes& mac(const MacAddr& m) { return put(m.data(), 6); }
  Bytes& fill(size_t n, uint8_t x = 0) {
    v.insert(v.end(), n, x);
    return *this;
  }
};

void set16(std::vector<uint8_t>& b, size_t at, uint16_t x) {
  b[at] = static_cast<uint8_t>(x >> 8);
  b[at + 1] = static_cast<uint8_t>(x);
}

uint32_t sum16(const uint8_t* p, size_t n, uint32_t s = 0) {
  for (size_t i = 0; i + 1 < n; i += 2) s += static_cast<uint32_t>(p[i] << 8 | p[i + 1]);
  if (n % 2) s += static_cast<uint32_t>(p[n - 1] << 8);
  return s;
}
uint16_t fold(uint32_t s) {
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return static_cast<uint16_t>(~s);
}

// Checksum of a whole transport segment (before fragmenting).
void l4_checksum(std::vector<uint8_t>& l4, uint8_t proto, const Addr& s, const Addr& d) {
  size_t at;
  switch (proto) {
    case kTcp:
      at = 16;
      break;
    case kUdp:
      at = 6;
      break;
    case kIcmp:
    case kIcmp6:
    case kIgmp:
      at = 2;
      break;
    default:
      return;
  }
  if (l4.size() < at + 2) return;
  if (proto == kUdp) set16(l4, 4, static_cast<uint16_t>(l4.size()));
  set16(l4, at, 0);
  uint32_t ps = 0;
  if (proto != kIcmp && proto != kIgmp) {
    size_t al = s.fam == 4 ? 4 : 16;
    ps = sum16(s.b.data(), al, ps);
    ps = sum16(d.b.data(), al, ps);
    ps += static_cast<uint32_t>(l4.size() >> 16) + static_cast<uint32_t>(l4.size() & 0xffff) + proto;
  }
  uint16_t c = fold(sum16(l4.data(), l4.size(), ps));
  if (proto == kUdp && c == 0) c = 0xffff;
  set16(l4, at, c);
}

std::vector<uint8_t> tcp_seg(uint16_t sp, uint16_t dp, uint8_t flags, size_t payload, std::vector<uint8_t> opts = {}) {
  while (opts.size() % 4) opts.push_back(1);
  Bytes b;
  b.u16(sp).u16(dp).u32(1000).u32(flags & 0x10 ? 2000 : 0);
  b.u8(static_cast<uint8_t>((5 + opts.size() / 4) << 4)).u8(flags).u16(64240).u16(0).u16(0);
  b.put(opts).fill(payload, 0x61);
  return b.v;
}
std::vector<uint8_t> udp_seg(uint16_t sp, uint16_t dp, size_t payload) {
  Bytes b;
  b.u16(sp).u16(dp).u16(0).u16(0).fill(payload, 0x62);
  return b.v;
}
std::vector<uint8_t> icmp_msg(uint8_t type, uint8_t code, uint32_t rest, const std::vector<uint8_t>& body = {}) {
  Bytes b;
  b.u8(type).u8(code).u16(0).u32(rest).put(body);
  return b.v;
}

// An IP packet (before fragmenting).
struct Ip {
  Addr src, dst;
  uint8_t ttl = 64;
  uint8_t proto = kUdp;
  std::vector<uint8_t> l4;
  std::vector<uint8_t> v4opts;                                 // padded to 4
  std::vector<std::pair<uint8_t, std::vector<uint8_t>>> exts;  // IPv6 extension headers, in order
  uint32_t id = 0x4242;
  bool df = false;
  bool checksum = true;
};

// The L3 bytes of `ip`, or of its fragment [off, off+len) of the transport
// bytes (frag = true: MF/M = more).
std::vector<uint8_t> l3_bytes(Ip ip, bool frag = false, size_t off = 0, size_t len = SIZE_MAX, bool more = false) {
  if (ip.checksum) l4_checksum(ip.l4, ip.proto, ip.src, ip.dst);
  std::vector<uint8_t> data;
  if (!frag) {
    data = ip.l4;
  } else {
    off = std::min(off, ip.l4.size());
    len = std::min(len, ip.l4.size() - off);
    data.assign(ip.l4.begin() + static_cast<long>(off), ip.l4.begin() + static_cast<long>(off + len));
  }
  Bytes b;
  if (ip.src.fam == 4) {
    std::vector<uint8_t> o = ip.v4opts;
    while (o.size() % 4) o.push_back(0);
    size_t ihl = 20 + o.size();
    uint16_t fo =
        static_cast<uint16_t>((ip.df ? 0x4000 : 0) | (frag && more ? 0x2000 : 0) | (frag ? (off / 8) & 0x1fff : 0));
    b.u8(static_cast<uint8_t>(0x40 | (ihl / 4))).u8(0).u16(static_cast<uint16_t>(ihl + data.size()));
    b.u16(static_cast<uint16_t>(ip.id)).u16(fo).u8(ip.ttl).u8(ip.proto).u16(0).addr(ip.src).addr(ip.dst).put(o);
    set16(b.v, 10, fold(sum16(b.v.data(), ihl)));
    b.put(data);
    return b.v;
  }
  auto exts = ip.exts;
  if (frag) {
    Bytes fh;
    fh.u16(static_cast<uint16_t>(((off / 8) << 3) | (more ? 1 : 0))).u32(ip.id);
    exts.push_back({44, fh.v});
  }
  Bytes body;
  for (size_t i = 0; i < exts.size(); ++i) {
    uint8_t next = i + 1 < exts.size() ? exts[i + 1].first : ip.proto;
    uint8_t type = exts[i].first;
    const auto& c = exts[i].second;
    if (type == 44) {
      body.u8(next).u8(0).put(c);
    } else if (type == 51) {  // AH: length in 4-byte units minus 2
      std::vector<uint8_t> d = c;
      while ((d.size() + 2) % 4 || d.size() + 2 < 12) d.push_back(0);
      body.u8(next).u8(static_cast<uint8_t>((d.size() + 2) / 4 - 2)).put(d);
    } else {
      std::vector<uint8_t> d = c;
      while ((d.size() + 2) % 8) d.push_back(0);
      body.u8(next).u8(static_cast<uint8_t>((d.size() + 2) / 8 - 1)).put(d);
    }
  }
  body.put(data);
  uint8_t first = exts.empty() ? ip.proto : exts[0].first;
  b.u32(0x60000000)
      .u16(static_cast<uint16_t>(body.v.size()))
      .u8(first)
      .u8(ip.ttl)
      .addr(ip.src)
      .addr(ip.dst)
      .put(body.v);
  return b.v;
}

std::vector<uint8_t> eth(const MacAddr& dst, const MacAddr& src, uint16_t type, const std::vector<uint8_t>& l3) {
  Bytes b;
  b.mac(dst).mac(src).u16(type).put(l3);
  return b.v;
}
uint16_t type_of(const Addr& a) { return a.fam == 4 ? 0x0800 : 0x86dd; }

MacAddr mcast_mac(const Addr& a) {
  if (a.fam == 4) return {0x01, 0x00, 0x5e, static_cast<uint8_t>(a.b[1] & 0x7f), a.b[2], a.b[3]};
  return {0x33, 0x33, a.b[12], a.b[13], a.b[14], a.b[15]};
}
bool multicast(const Addr& a) { return a.fam == 4 ? (a.b[0] & 0xf0) == 0xe0 : a.b[0] == 0xff; }

std::string jstr(const std::string& s) { return "\"" + s + "\""; }

}  // namespace

// ---- spec text -------------------------------------------------------------------

std::string host_json(const MHost& h) {
  std::ostringstream o;
  o << "{ ";
  if (h.has_imds) o << "\"imds\": { \"address\": " << jstr(h.imds.str()) << ", \"port\": " << h.imds_port << " }, ";
  o << "\"on_violation\": { \"action\": \"alert\" } }";
  return o.str();
}

static const char* proto_text(uint8_t p) {
  switch (p) {
    case 1:
      return "icmp";
    case 6:
      return "tcp";
    case 17:
      return "udp";
    case 58:
      return "icmpv6";
  }
  return "any";
}

static std::string rules_json(const std::vector<MRule>& rules, const char* peer_key) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < rules.size(); ++i) {
    const auto& r = rules[i];
    o << (i ? ", " : " ") << "{ \"" << peer_key << "\": " << jstr(r.peer.str())
      << ", \"proto\": " << jstr(proto_text(r.proto));
    if (!r.ports.empty()) {
      o << ", \"ports\": [";
      for (size_t j = 0; j < r.ports.size(); ++j) {
        o << (j ? ", " : "") << "\"" << r.ports[j].first;
        if (r.ports[j].second != r.ports[j].first) o << "-" << r.ports[j].second;
        o << "\"";
      }
      o << "]";
    }
    o << " }";
  }
  o << " ]";
  return o.str();
}

std::string vm_json(const MVm& vm, bool limits) {
  std::ostringstream o;
  char mac[32];
  std::snprintf(mac, sizeof mac, "%02x:%02x:%02x:%02x:%02x:%02x", vm.mac[0], vm.mac[1], vm.mac[2], vm.mac[3], vm.mac[4],
                vm.mac[5]);
  o << "{ \"name\": " << jstr(vm.name) << ", \"interface\": " << jstr(vm.iface) << ", \"mac\": " << jstr(mac);
  o << ", \"addresses\": [";
  for (size_t i = 0; i < vm.addrs.size(); ++i) o << (i ? ", " : "") << jstr(vm.addrs[i].str());
  o << "]";
  if (!vm.gateways.empty()) {
    o << ", \"gateway\": [";
    for (size_t i = 0; i < vm.gateways.size(); ++i) o << (i ? ", " : "") << jstr(vm.gateways[i].str());
    o << "]";
  }
  if (vm.group_explicit) o << ", \"group\": " << jstr(vm.group);
  o << ", \"mode\": " << jstr(mmode_name(vm.mode));
  if (!vm.egress.empty()) o << ", \"egress\": " << rules_json(vm.egress, "to");
  if (!vm.ingress.empty()) o << ", \"ingress\": " << rules_json(vm.ingress, "from");
  if (vm.imds) o << ", \"imds\": true";
  if (limits && vm.flows_explicit) o << ", \"limits\": { \"flows\": " << vm.flows << " }";
  o << " }";
  return o.str();
}

// ---- worlds ------------------------------------------------------------------------

GenWorld Gen::world() {
  GenWorld g;
  MWorld& w = g.model;
  w.host.has_imds = p(0.9);
  size_t n = p(0.5) ? 1 + u(8) : 1 + u(64);
  size_t groups = 1 + u(8);
  int layout = static_cast<int>(u(3));  // 0 routed, 1 bridge per VM, 2 shared bridge
  for (size_t i = 0; i < n; ++i) {
    MVm vm;
    vm.name = "v" + std::to_string(i);
    vm.iface = "fz" + std::to_string(i);
    vm.mac = {0x02, 0x00, 0x00, 0x01, static_cast<uint8_t>(i >> 8), static_cast<uint8_t>(i)};
    uint8_t k = static_cast<uint8_t>(i + 2);
    int fams = static_cast<int>(u(20));  // 0-2 v4 only, 3-4 v6 only, else both
    bool v4 = fams >= 5 || fams < 3, v6 = fams >= 3;
    char buf[64];
    if (layout == 0) {
      if (v4) vm.addrs.push_back({Addr::v4(10, 0, 0, k), 32});
      std::snprintf(buf, sizeof buf, "fec0::%x", k);
      if (v6) vm.addrs.push_back({Addr::v6(buf), 128});
      if (p(0.5)) vm.gateways.push_back(Addr::v4(10, 0, 0, 1));
      if (p(0.5)) vm.gateways.push_back(Addr::v6("fe80::1"));
    } else if (layout == 1) {
      if (v4) vm.addrs.push_back({Addr::v4(10, static_cast<uint8_t>(i + 1), 0, 2), 32});
      std::snprintf(buf, sizeof buf, "fec0:%zx::2", i + 1);
      if (v6) vm.addrs.push_back({Addr::v6(buf), 128});
      if (p(0.8)) vm.gateways.push_back(Addr::v4(10, static_cast<uint8_t>(i + 1), 0, 1));
      std::snprintf(buf, sizeof buf, "fec0:%zx::1", i + 1);
      if (p(0.5)) vm.gateways.push_back(Addr::v6(buf));
      if (p(0.5)) vm.gateways.push_back(Addr::v6("fe80::1"));
    } else {
      if (v4) vm.addrs.push_back({Addr::v4(10, 100, 0, k), 32});
      std::snprintf(buf, sizeof buf, "fec0:100::%x", k);
      if (v6) vm.addrs.push_back({Addr::v6(buf), 128});
      if (p(0.8)) vm.gateways.push_back(Addr::v4(10, 100, 0, 1));
      if (p(0.5)) vm.gateways.push_back(Addr::v6("fec0:100::1"));
      if (p(0.5)) vm.gateways.push_back(Addr::v6("fe80::1"));
    }
    if (p(0.15)) vm.addrs.push_back({Addr::v4(10, 200, static_cast<uint8_t>(i), 16), 28});
    if (p(0.15)) {
      std::snprintf(buf, sizeof buf, "fec0:ff:%zx::", i);
      vm.addrs.push_back({Addr::v6(buf), 64});
    }
    if (p(0.1)) vm.addrs.push_back({Addr::v4(10, 150, 0, k), 32});
    if (p(0.1)) vm.gateways.clear();
    if (p(0.1)) {
      vm.group = vm.name;
      vm.group_explicit = false;
    } else {
      vm.group = "g" + std::to_string(u(groups));
    }
    int m = static_cast<int>(u(10));
    vm.mode = m < 5 ? MMode::filtered : m < 8 ? MMode::conntrack : MMode::direct;
    vm.imds = p(0.5);
    if (opt_.limits && p(0.2)) {
      vm.flows = static_cast<uint32_t>(1 + u(16));
      vm.flows_explicit = true;
    }
    w.vms.push_back(vm);
  }
  // Rules, after every VM exists (rules may name other VMs' addresses).
  auto prefix = [&](int fam) {
    Net nt;
    if (fam == 4) {
      static const Addr bases[] = {Addr::v4(0, 0, 0, 0),    Addr::v4(10, 0, 0, 0),        Addr::v4(10, 100, 0, 0),
                                   Addr::v4(100, 64, 0, 0), Addr::v4(198, 51, 100, 0),    Addr::v4(203, 0, 113, 7),
                                   Addr::v4(192, 0, 2, 0),  Addr::v4(169, 254, 169, 254), Addr::v4(224, 0, 0, 0),
                                   Addr::v4(8, 8, 8, 8),    Addr::v4(10, 200, 0, 0)};
      nt.a = bases[u(std::size(bases))];
      static const uint8_t lens[] = {0, 8, 10, 16, 24, 28, 32};
      nt.plen = p(0.7) ? lens[u(std::size(lens))] : static_cast<uint8_t>(u(33));
    } else {
      static const char* bases[] = {
          "::", "2001:db8::", "2001:db8:ffff::", "fec0::", "fec0:100::", "ff02::", "2001:db8::1"};
      nt.a = Addr::v6(bases[u(std::size(bases))]);
      static const uint8_t lens[] = {0, 16, 32, 48, 64, 128};
      nt.plen = p(0.7) ? lens[u(std::size(lens))] : static_cast<uint8_t>(u(129));
    }
    if (p(0.15) && !w.vms.empty()) {  // another VM's address
      const MVm& o = w.vms[u(w.vms.size())];
      for (const auto& a : o.addrs)
        if (a.a.fam == fam) nt = a;
    }
    // Mask host bits.
    for (int bit = nt.plen; bit < (fam == 4 ? 32 : 128); ++bit)
      nt.a.b[bit / 8] &= static_cast<uint8_t>(~(0x80 >> (bit % 8)));
    return nt;
  };
  auto ports = [&] {
    static const std::pair<uint16_t, uint16_t> pool[] = {
        {22, 22}, {53, 53}, {80, 80}, {443, 443}, {5000, 5010}, {8000, 8080}, {51900, 51900}, {1, 1024}, {1024, 65535}};
    std::vector<std::pair<uint16_t, uint16_t>> r;
    size_t k = 1 + u(2);
    for (size_t i = 0; i < k; ++i) {
      if (p(0.8)) {
        r.push_back(pool[u(std::size(pool))]);
      } else {
        uint16_t lo = static_cast<uint16_t>(1 + u(65535));
        uint16_t hi = static_cast<uint16_t>(std::min<uint64_t>(65535, lo + u(100)));
        r.push_back({lo, hi});
      }
    }
    return r;
  };
  auto rule = [&] {
    MRule r;
    int fam = p(0.6) ? 4 : 6;
    r.peer = prefix(fam);
    int pr = static_cast<int>(u(20));
    r.proto = pr < 5 ? 0 : pr < 11 ? kTcp : pr < 16 ? kUdp : (fam == 4 ? kIcmp : kIcmp6);
    if ((r.proto == kTcp || r.proto == kUdp) && p(0.6)) r.ports = ports();
    return r;
  };
  for (auto& vm : w.vms) {
    size_t ne = u(7), ni = u(5);
    for (size_t i = 0; i < ne; ++i) vm.egress.push_back(rule());
    for (size_t i = 0; i < ni; ++i) vm.ingress.push_back(rule());
  }
  g.host_json = host_json(w.host);
  for (const auto& vm : w.vms) g.vm_jsons.push_back(vm_json(vm, opt_.limits));
  return g;
}

// ---- scenarios ---------------------------------------------------------------------

struct Gen::Env {
  Gen& g;
  const MWorld& w;
  size_t x;  // the VM under test
  const MVm& vm() const { return w.vms[x]; }

  Addr in_net(const Net& n) {
    Addr a = n.a;
    int bits = a.fam == 4 ? 32 : 128;
    for (int bit = n.plen; bit < bits; ++bit)
      if (g.p(0.5))
        a.b[bit / 8] |= static_cast<uint8_t>(0x80 >> (bit % 8));
      else
        a.b[bit / 8] &= static_cast<uint8_t>(~(0x80 >> (bit % 8)));
    return a;
  }
  int fam() {
    bool v4 = false, v6 = false;
    for (const auto& n : vm().addrs) (n.a.fam == 4 ? v4 : v6) = true;
    if (v4 && v6) return g.p(0.55) ? 4 : 6;
    if (v4) return g.p(0.95) ? 4 : 6;
    return g.p(0.95) ? 6 : 4;
  }
  // One of the VM's own addresses of family f (a routed prefix: an address in it).
  Addr own(int f) {
    std::vector<Net> c;
    for (const auto& n : vm().addrs)
      if (n.a.fam == f) c.push_back(n);
    if (c.empty()) return f == 4 ? Addr::v4(10, 9, 9, 9) : Addr::v6("2001:db8:9::9");
    return in_net(c[g.u(c.size())]);
  }
  Addr random_addr(int f) {
    Addr a;
    a.fam = static_cast<uint8_t>(f);
    if (f == 4) {
      static const Addr bases[] = {Addr::v4(198, 51, 100, 0), Addr::v4(203, 0, 113, 0), Addr::v4(192, 0, 2, 0),
                                   Addr::v4(100, 64, 0, 0),   Addr::v4(8, 8, 8, 0),     Addr::v4(10, 0, 0, 0)};
      a = bases[g.u(std::size(bases))];
      a.b[3] = static_cast<uint8_t>(g.u(256));
      if (g.p(0.3)) a.b[2] = static_cast<uint8_t>(g.u(256));
      if (g.p(0.1))
        for (int i = 0; i < 4; ++i) a.b[i] = static_cast<uint8_t>(g.u(256));
    } else {
      a = Addr::v6(g.p(0.7) ? "2001:db8::" : g.p(0.5) ? "2001:db8:ffff::" : "fec0::");
      for (int i = 8; i < 16; ++i) a.b[i] = static_cast<uint8_t>(g.u(256));
      if (g.p(0.2)) a.b[5] = static_cast<uint8_t>(g.u(256));
      if (g.p(0.05))  // IPv4-mapped: must not meet IPv4 rules
        a = Addr::v6("::ffff:0:0"), a.b[12] = 10, a.b[13] = static_cast<uint8_t>(g.u(3)),
        a.b[15] = static_cast<uint8_t>(2 + g.u(4));
      if (g.p(0.05)) a = Addr::v6("::ffff:198.51.100.7");
    }
    return a;
  }
  // A VM other than x (same group or not, as asked when possible), -1 when none.
  int other_vm(int want_same) {
    std::vector<size_t> c;
    for (size_t i = 0; i < w.vms.size(); ++i) {
      if (i == x) continue;
      bool same = w.vms[i].group == vm().group;
      if (want_same < 0 || same == (want_same == 1)) c.push_back(i);
    }
    if (c.empty()) return -1;
    return static_cast<int>(c[g.u(c.size())]);
  }
  bool vm_addr(size_t i, int f, Addr& out) {
    std::vector<Net> c;
    for (const auto& n : w.vms[i].addrs)
      if (n.a.fam == f) c.push_back(n);
    if (c.empty()) return false;
    out = in_net(c[g.u(c.size())]);
    return true;
  }
  // A peer for a rule set: inside a rule's prefix (with its proto/port) or elsewhere.
  struct Peer {
    Addr a;
    uint8_t proto = kTcp;
    uint16_t port = 443;
    int vm = -1;  // owning VM, when a VM address
  };
  Peer peer(const std::vector<MRule>& rules, int f, bool allow_vm, bool allow_imds = true) {
    Peer r;
    auto l4 = [&] {
      int k = static_cast<int>(g.u(10));
      r.proto = k < 4 ? kTcp : k < 7 ? kUdp : k < 9 ? (f == 4 ? kIcmp : kIcmp6) : (g.p(0.5) ? 47 : 132);
      static const uint16_t ports[] = {22, 53, 80, 443, 5000, 5005, 5010, 8000, 8080, 51900, 123, 1024, 65535, 0};
      r.port = g.p(0.8) ? ports[g.u(std::size(ports))] : static_cast<uint16_t>(g.u(65536));
    };
    int k = static_cast<int>(g.u(100));
    std::vector<const MRule*> fr;
    for (const auto& ru : rules)
      if (ru.peer.a.fam == f) fr.push_back(&ru);
    if (k < 45 && !fr.empty()) {
      const MRule& ru = *fr[g.u(fr.size())];
      r.a = in_net(ru.peer);
      l4();
      if (ru.proto) r.proto = ru.proto;
      if (!ru.ports.empty() && g.p(0.85)) {
        auto [lo, hi] = ru.ports[g.u(ru.ports.size())];
        r.port = static_cast<uint16_t>(lo + g.u(static_cast<uint64_t>(hi - lo) + 1));
      }
      if (r.proto == kIcmp && f == 6) r.proto = kIcmp6;
      if (r.proto == kIcmp6 && f == 4) r.proto = kIcmp;
    } else if (k < 65 && allow_vm) {
      int o = other_vm(g.p(0.6) ? 1 : 0);
      if (o < 0 || !vm_addr(static_cast<size_t>(o), f, r.a))
        r.a = random_addr(f);
      else
        r.vm = o;
      l4();
    } else if (k < 72 && f == 4 && w.host.has_imds && allow_imds) {
      r.a = w.host.imds;
      r.proto = g.p(0.8) ? kTcp : kUdp;
      r.port = g.p(0.7) ? w.host.imds_port : 8080;
    } else if (k < 78 && !vm().gateways.empty()) {
      r.a = vm().gateways[g.u(vm().gateways.size())];
      if (r.a.fam != f) r.a = random_addr(f);
      l4();
    } else {
      r.a = random_addr(f);
      l4();
    }
    return r;
  }
  std::vector<uint8_t> l4_for(uint8_t proto, uint16_t sport, uint16_t dport, uint8_t tcp_flags, uint16_t echo_id,
                              bool echo_request, int f, size_t payload) {
    if (proto == kTcp) {
      std::vector<uint8_t> opts;
      if (g.p(0.2)) opts = {2, 4, 0x05, 0xb4, 1, 3, 3, 7, 4, 2};  // MSS, NOP, WS, SACK-permitted
      return tcp_seg(sport, dport, tcp_flags, payload, opts);
    }
    if (proto == kUdp) return udp_seg(sport, dport, payload);
    if (proto == kIcmp || proto == kIcmp6) {
      uint8_t t = f == 4 ? (echo_request ? 8 : 0) : (echo_request ? 128 : 129);
      return icmp_msg(t, 0, static_cast<uint32_t>(echo_id) << 16 | 1, std::vector<uint8_t>(payload, 0x63));
    }
    return std::vector<uint8_t>(8 + payload, 0x64);
  }
  // Random IPv4 options / IPv6 extension headers on a packet (sometimes).
  void decorate(Ip& ip, std::string& kind) {
    if (!g.p(0.12)) return;
    if (ip.src.fam == 4) {
      int k = static_cast<int>(g.u(8));
      switch (k) {
        case 0:
          ip.v4opts = {7, 7, 4, 0, 0, 0, 0};
          kind += "+opt_rr";
          break;
        case 1:
          ip.v4opts = {148, 4, 0, 0};
          kind += "+opt_ra";
          break;
        case 2:
          ip.v4opts = {1, 1, 1, 0};
          kind += "+opt_nop";
          break;
        case 3:
          ip.v4opts = {0x83, 7, 4, 192, 0, 2, 1};
          kind += "+opt_lsrr";
          break;
        case 4:
          ip.v4opts = {0x89, 7, 4, 192, 0, 2, 1};
          kind += "+opt_ssrr";
          break;
        case 5:
          ip.v4opts = {68, 8, 5, 0, 0, 0, 0, 0};
          kind += "+opt_ts";
          break;
        case 6:
          ip.v4opts = {7, 0, 0, 0};
          kind += "+opt_badlen";
          break;
        default:
          ip.v4opts = {1, 0x83, 40, 0};
          kind += "+opt_overrun";
          break;
      }
      return;
    }
    int k = static_cast<int>(g.u(10));
    switch (k) {
      case 0:
        ip.exts = {{0, {5, 2, 0, 0}}};
        kind += "+hbh";
        break;
      case 1:
        ip.exts = {{60, {1, 4, 0, 0, 0, 0}}};
        kind += "+dstopt";
        break;
      case 2:
        ip.exts = {{43, {0, 0, 0, 0, 0, 0}}};
        kind += "+rh0_segleft0";
        break;
      case 3:
        ip.exts = {{43, {4, 2, 0, 0, 0, 0}}};
        kind += "+rh4_segleft2";
        break;
      case 4:
        ip.exts = {{0, {}}, {60, {}}, {60, {}}};
        kind += "+hbh_do_do";
        break;
      case 5:
        ip.exts = {{51, {0, 0, 0, 0, 0, 0, 0, 1, 0, 0}}};
        kind += "+ah";
        break;
      case 6:
        ip.exts = {{60, {}}, {0, {}}};
        kind += "+hbh_not_first";
        break;
      case 7: {
        for (int i = 0; i < 10; ++i) ip.exts.push_back({60, {}});
        kind += "+10_dstopts";
        break;
      }
      case 8:
        ip.exts = {{44, {0, 0, 0, 0, 0, 7}}};
        kind += "+atomic_frag";
        break;  // offset 0, M=0
      default:
        ip.exts = {{60, {}}, {43, {0, 0, 0, 0, 0, 0}}, {60, {}}};
        kind += "+do_rh_do";
        break;
    }
  }
  Shot from(std::vector<uint8_t> frame, std::string kind) {
    Shot s;
    s.vm = x;
    s.hook = Hook::from_vm;
    s.frame = std::move(frame);
    s.kind = std::move(kind);
    if (g.p(0.1)) s.mark = g.p(0.5) ? 0x1 : 0x00ff0000;  // other bits: never touched
    return s;
  }
  Shot to(std::vector<uint8_t> frame, std::string kind, int sender_vm, bool spoofed_from_outside = false) {
    Shot s;
    s.vm = x;
    s.hook = Hook::to_vm;
    s.frame = std::move(frame);
    s.kind = std::move(kind);
    if (sender_vm >= 0 && !spoofed_from_outside) {
      s.mark = kVouchMark;
      s.ingress_vm = static_cast<uint32_t>(sender_vm);
    }
    if (g.p(0.1)) s.mark |= g.p(0.5) ? 0x1 : 0x00ff0000;
    return s;
  }
  MacAddr dmac_for(const Addr& d) { return multicast(d) ? mcast_mac(d) : kGwMac; }
};

static const char* proto_kind(uint8_t p) {
  switch (p) {
    case 6:
      return "tcp";
    case 17:
      return "udp";
    case 1:
      return "icmp";
    case 58:
      return "icmp6";
  }
  return "ipproto";
}

void Gen::egress(Env& e, std::vector<Shot>& out) {
  int f = e.fam();
  Env::Peer pr = e.peer(e.vm().egress, f, true);
  Ip ip;
  ip.src = e.own(f);
  ip.dst = pr.a;
  ip.proto = pr.proto;
  uint16_t sport = static_cast<uint16_t>(1024 + u(60000));
  ip.l4 = e.l4_for(pr.proto, sport, pr.port, p(0.8) ? 0x02 : 0x18, sport, true, f, u(4) ? u(64) : u(600));
  std::string kind = std::string(proto_kind(pr.proto)) + "_egress" + (pr.vm >= 0 ? "_vm" : "");
  e.decorate(ip, kind);
  out.push_back(e.from(eth(e.dmac_for(ip.dst), e.vm().mac, type_of(ip.src), l3_bytes(ip)), kind));
}

void Gen::ingress(Env& e, std::vector<Shot>& out) {
  int f = e.fam();
  Env::Peer pr = e.peer(e.vm().ingress, f, true);
  Ip ip;
  ip.src = pr.a;
  ip.dst = e.own(f);
  std::string kind = std::string(proto_kind(pr.proto)) + "_ingress";
  int k = static_cast<int>(u(20));
  if (k == 0 && pr.vm < 0) {
    ip.dst = e.random_addr(f), kind += "_not_for_vm";
  } else if (k == 1) {
    ip.src = e.own(f), kind += "_own_src", pr.vm = -1;
  }
  ip.proto = pr.proto;
  uint16_t sport = static_cast<uint16_t>(1024 + u(60000));
  ip.l4 = e.l4_for(pr.proto, sport, pr.port, p(0.8) ? 0x02 : 0x10, pr.port, true, f, u(64));
  bool outside = pr.vm >= 0 && p(0.2);
  if (pr.vm >= 0) kind += outside ? "_vm_unmarked" : "_vm";
  e.decorate(ip, kind);
  MacAddr smac = pr.vm >= 0 ? e.w.vms[static_cast<size_t>(pr.vm)].mac : kGwMac;
  out.push_back(e.to(eth(e.vm().mac, smac, type_of(ip.src), l3_bytes(ip)), kind, pr.vm, outside));
}

// The L3 packet of an ICMP error quoting `quoted` (its first `n` bytes).
static Ip icmp_error(const Addr& src, const Addr& dst, const std::vector<uint8_t>& quoted, size_t n, bool v4) {
  Ip e;
  e.src = src, e.dst = dst;
  e.proto = v4 ? kIcmp : kIcmp6;
  std::vector<uint8_t> q(quoted.begin(), quoted.begin() + static_cast<long>(std::min(n, quoted.size())));
  e.l4 = v4 ? icmp_msg(3, 3, 0, q) : icmp_msg(1, 4, 0, q);
  return e;
}

void Gen::flow_then_reply(Env& e, std::vector<Shot>& out) {
  int f = e.fam();
  Env::Peer pr = e.peer(e.vm().egress, f, false);
  if (pr.proto != kTcp && pr.proto != kUdp) pr.proto = p(0.5) ? (f == 4 ? kIcmp : kIcmp6) : kUdp;
  bool icmp = pr.proto == kIcmp || pr.proto == kIcmp6;
  Ip o;
  o.src = e.own(f), o.dst = pr.a, o.proto = pr.proto;
  uint16_t sport = static_cast<uint16_t>(1024 + u(60000)), id = static_cast<uint16_t>(u(65536));
  o.l4 = e.l4_for(pr.proto, sport, pr.port, 0x02, id, true, f, u(4) ? 16 : 700);
  std::string k = std::string("flow_") + proto_kind(pr.proto);
  out.push_back(e.from(eth(kGwMac, e.vm().mac, type_of(o.src), l3_bytes(o)), k + "/open"));
  // The reply (sometimes not quite).
  Ip r;
  r.src = o.dst, r.dst = o.src, r.proto = o.proto;
  uint16_t rsport = pr.port, rdport = sport;
  std::string rk = k + "/reply";
  int v = static_cast<int>(u(10));
  if (v == 0) rdport = static_cast<uint16_t>(rdport + 1), id = static_cast<uint16_t>(id + 1), rk += "_wrong_port";
  if (v == 1) r.src = e.random_addr(f), rk += "_other_peer";
  r.l4 = e.l4_for(o.proto, rsport, rdport, 0x12, id, false, f, u(64));
  out.push_back(e.to(eth(e.vm().mac, kGwMac, type_of(r.src), l3_bytes(r)), rk, -1));
  if (p(0.5)) {  // more of the flow from the VM
    Ip m = o;
    m.l4 = e.l4_for(o.proto, sport, pr.port, 0x10, static_cast<uint16_t>(id), true, f, u(100));
    out.push_back(e.from(eth(kGwMac, e.vm().mac, type_of(o.src), l3_bytes(m)), k + "/more"));
  }
  if (p(0.35)) {  // an ICMP error toward the VM quoting its packet
    std::vector<uint8_t> q = l3_bytes(o);
    size_t n = p(0.7) ? (f == 4 ? 28 : 48) : q.size();
    Addr router = p(0.5) ? o.dst : e.random_addr(f);
    Addr odst = o.src;
    std::string ek = k + "/icmp_error_to_vm";
    if (p(0.1)) odst = e.own(f), ek += "_other_dst";
    Ip err = icmp_error(router, odst, q, n, f == 4);
    if (n == q.size() && q.size() > 600) ek += "_big";
    out.push_back(e.to(eth(e.vm().mac, kGwMac, type_of(router), l3_bytes(err)), ek, -1));
  }
  if (!icmp && pr.proto == kTcp && p(0.3)) {  // RST ends the flow at once; then a late reply
    bool from_vm = p(0.5);
    Ip rst = from_vm ? o : r;
    rst.l4 = from_vm ? tcp_seg(sport, pr.port, 0x04, 0) : tcp_seg(pr.port, sport, 0x14, 0);
    if (from_vm)
      out.push_back(e.from(eth(kGwMac, e.vm().mac, type_of(o.src), l3_bytes(rst)), k + "/rst_from_vm"));
    else
      out.push_back(e.to(eth(e.vm().mac, kGwMac, type_of(o.src), l3_bytes(rst)), k + "/rst_to_vm", -1));
    Ip late = r;
    late.l4 = tcp_seg(pr.port, sport, 0x10, 10);
    out.push_back(e.to(eth(e.vm().mac, kGwMac, type_of(o.src), l3_bytes(late)), k + "/after_rst", -1));
  }
}

void Gen::peer_flow(Env& e, std::vector<Shot>& out) {
  int f = e.fam();
  Env::Peer pr = e.peer(e.vm().ingress, f, false, false);
  if (pr.proto != kTcp && pr.proto != kUdp) pr.proto = p(0.5) ? (f == 4 ? kIcmp : kIcmp6) : kTcp;
  Ip o;
  o.src = pr.a, o.dst = e.own(f), o.proto = pr.proto;
  uint16_t sport = static_cast<uint16_t>(1024 + u(60000)), id = static_cast<uint16_t>(u(65536));
  o.l4 = e.l4_for(pr.proto, sport, pr.port, 0x02, id, true, f, u(32));
  std::string k = std::string("peerflow_") + proto_kind(pr.proto);
  out.push_back(e.to(eth(e.vm().mac, kGwMac, type_of(o.src), l3_bytes(o)), k + "/open", -1));
  Ip r;
  r.src = o.dst, r.dst = o.src, r.proto = o.proto;
  std::string rk = k + "/reply";
  uint16_t rdport = sport;
  if (p(0.1)) rdport = static_cast<uint16_t>(sport ^ 1), id = static_cast<uint16_t>(id ^ 1), rk += "_wrong_port";
  r.l4 = e.l4_for(o.proto, pr.port, rdport, 0x12, id, false, f, u(64));
  out.push_back(e.from(eth(kGwMac, e.vm().mac, type_of(r.src), l3_bytes(r)), rk));
  if (p(0.4)) {  // the VM answers with an ICMP error quoting the peer's packet
    std::vector<uint8_t> q = l3_bytes(o);
    Addr odst = o.src;
    std::string ek = k + "/icmp_error_from_vm";
    if (p(0.15)) odst = e.random_addr(f), ek += "_other_dst";
    size_t n = p(0.8) ? q.size() : 8;
    if (n == 8) ek += "_short_quote";
    Ip err = icmp_error(o.dst, odst, q, n, f == 4);
    if (p(0.15)) {  // beyond 576 / 1280 bytes
      err.l4.resize(f == 4 ? 600 : 1300, 0);
      ek += "_big";
    }
    out.push_back(e.from(eth(kGwMac, e.vm().mac, type_of(o.dst), l3_bytes(err)), ek));
  }
}

void Gen::fragments(Env& e, std::vector<Shot>& out) {
  int f = e.fam();
  bool from_vm = p(0.6);
  Env::Peer pr = e.peer(from_vm ? e.vm().egress : e.vm().ingress, f, p(0.2));
  Ip ip;
  ip.src = from_vm ? e.own(f) : pr.a;
  ip.dst = from_vm ? pr.a : e.own(f);
  ip.proto = pr.proto;
  // Ids unique within a world (an odd multiplier is a bijection modulo 2^16
  // and 2^31): the model keeps every first fragment while the datapath's
  // table is LRU (256 per VM), so a reused id could meet an evicted entry.
  uint32_t seq = frag_seq_++;
  ip.id = f == 4 ? (seq * 40503u + 7919u) & 0xffff : (seq * 2654435761u + 12345u) & 0x7fffffff;
  uint16_t sport = static_cast<uint16_t>(1024 + u(60000));
  ip.l4 = e.l4_for(pr.proto, sport, pr.port, 0x18, sport, true, f, 64 + u(1200));
  size_t total = ip.l4.size();
  // Split at 8-byte boundaries.
  std::vector<size_t> cuts{0};
  size_t nfr = 2 + u(3);
  for (size_t i = 1; i < nfr; ++i) cuts.push_back(std::min(total - 1, (total * i / nfr) & ~size_t{7}));
  cuts.push_back(total);
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::string k = std::string("frag_") + proto_kind(pr.proto) + (from_vm ? "_from_vm" : "_to_vm");
  int variant = static_cast<int>(u(10));
  if (variant == 0 && cuts.size() > 2) cuts[1] = 8, k += "_tiny_first";
  std::vector<Shot> fr;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    auto l3 = l3_bytes(ip, true, cuts[i], cuts[i + 1] - cuts[i], i + 2 < cuts.size());
    auto fe = from_vm ? eth(kGwMac, e.vm().mac, type_of(ip.src), l3) : eth(e.vm().mac, kGwMac, type_of(ip.src), l3);
    std::string sk = k + (i == 0 ? "/first" : "/later");
    fr.push_back(from_vm ? e.from(fe, sk) : e.to(fe, sk, pr.vm));
  }
  if (variant == 1) {
    fr.erase(fr.begin());
    for (auto& s : fr) s.kind += "_no_first";
  } else if (variant == 2 && fr.size() > 2) {
    std::swap(fr[0], fr[1]);
    fr[0].kind += "_before_first";
  }
  for (auto& s : fr) out.push_back(std::move(s));
}

void Gen::arp(Env& e, std::vector<Shot>& out) {
  const MVm& vm = e.vm();
  auto pick = [&](std::string& k) -> Addr {
    int c = static_cast<int>(u(7));
    Addr a;
    if (c == 0) return k += "own", e.own(4);
    if (c == 1 && !vm.gateways.empty() && vm.gateways[0].fam == 4) return k += "gw", vm.gateways[0];
    if (c == 2 || c == 3) {
      int o = e.other_vm(c == 2 ? 1 : 0);
      if (o >= 0 && e.vm_addr(static_cast<size_t>(o), 4, a)) return k += c == 2 ? "samegroup" : "othergroup", a;
    }
    if (c == 4) return k += "zero", Addr::v4(0, 0, 0, 0);
    return k += "random", e.random_addr(4);
  };
  bool from_vm = p(0.6);
  uint16_t op = p(0.6) ? 1 : p(0.9) ? 2 : static_cast<uint16_t>(3 + u(10));
  std::string k = std::string("arp") +
                  (op == 1   ? "_req"
                   : op == 2 ? "_reply"
                             : "_op") +
                  (from_vm ? "_from_vm" : "_to_vm");
  std::string ks = "/spa=", kt = "_tpa=";
  Addr spa, tpa;
  MacAddr sha = vm.mac;
  int sender = -1;
  if (from_vm) {
    spa = p(0.6) ? (ks += "own", e.own(4)) : pick(ks);
    tpa = pick(kt);
    if (p(0.08)) sha[5] ^= 0x55, k += "_sha_spoof";
  } else {
    spa = pick(ks);
    tpa = p(0.5) ? (kt += "own", e.own(4)) : pick(kt);
    sha = kGwMac;
    for (size_t i = 0; i < e.w.vms.size(); ++i) {
      Addr a = spa;
      for (const auto& n : e.w.vms[i].addrs)
        if (n.contains(a) && i != e.x) sender = static_cast<int>(i), sha = e.w.vms[i].mac;
    }
  }
  Bytes b;
  b.u16(1).u16(0x0800).u8(6).u8(4).u16(op).mac(sha).addr(spa).mac(op == 2 ? kGwMac : MacAddr{}).addr(tpa);
  MacAddr dst = op == 1 ? MacAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff} : (from_vm ? kGwMac : vm.mac);
  auto fr = eth(dst, from_vm ? vm.mac : sha, 0x0806, b.v);
  int len = static_cast<int>(u(10));
  if (len < 5)
    fr.resize(60, 0), k += "_pad60";
  else if (len == 5)
    fr.resize(64 + u(100), 0), k += "_long";
  else if (len == 6)
    fr[14 + 5] = 16, k += "_plen16";  // not Ethernet/IPv4
  k += ks + kt;
  out.push_back(from_vm ? e.from(fr, k) : e.to(fr, k, sender));
}

void Gen::nd(Env& e, std::vector<Shot>& out) {
  const MVm& vm = e.vm();
  bool from_vm = p(0.7);
  if (from_vm && p(0.05)) {
    // An NS/NA inside IPv4 (protocol 58): not ND (ND is IPv6), the egress
    // rules judge it. Target: the IPv4-mapped form of the destination (a
    // gateway, the VM's own, another VM's) or of the VM's own address.
    Ip ip;
    ip.src = e.own(4), ip.proto = kIcmp6, ip.ttl = 255;
    std::string k = "nd_in_ipv4";
    Addr d = e.random_addr(4);
    for (const auto& g : vm.gateways)
      if (g.fam == 4 && p(0.7)) d = g, k += "/dst=gw";
    Addr o;
    int ov = e.other_vm(-1);
    if (p(0.2) && ov >= 0 && e.vm_addr(static_cast<size_t>(ov), 4, o)) d = o, k += "/dst=vm";
    bool na = p(0.5);
    Addr target = Addr::v6("::ffff:0:0");
    const Addr& t4 = na && p(0.7) ? ip.src : d;
    std::memcpy(&target.b[12], t4.b.data(), 4);
    ip.dst = d;
    Bytes body;
    body.addr(target).u8(na ? 2 : 1).u8(1).mac(vm.mac);
    ip.l4 = icmp_msg(na ? 136 : 135, 0, na ? 0x60000000 : 0, body.v);
    ip.checksum = false;  // an ICMPv6 checksum needs an IPv6 pseudo-header
    k += na ? "/na" : "/ns";
    out.push_back(e.from(eth(kGwMac, vm.mac, 0x0800, l3_bytes(ip)), k));
    return;
  }
  Addr ll = eui64_ll(vm.mac);
  Addr stable = Addr::v6("fe80::");
  for (int i = 8; i < 16; ++i) stable.b[i] = static_cast<uint8_t>(u(256));
  auto other_addr = [&](int same, std::string& k) {
    int o = e.other_vm(same);
    Addr a;
    if (o >= 0 && p(0.5))
      return k += same ? "samegroup_ll" : "othergroup_ll", eui64_ll(e.w.vms[static_cast<size_t>(o)].mac);
    if (o >= 0 && e.vm_addr(static_cast<size_t>(o), 6, a)) return k += same ? "samegroup" : "othergroup", a;
    return k += "random", e.random_addr(6);
  };
  auto gw6 = [&](std::string& k) {
    for (const auto& g : vm.gateways)
      if (g.fam == 6) return k += "gw", g;
    return k += "gwll", Addr::v6("fe80::1");
  };
  int t = static_cast<int>(u(100));
  uint8_t type = t < 40 ? 135 : t < 70 ? 136 : t < 82 ? 133 : t < 91 ? 134 : 137;
  std::string k = std::string(type == 135   ? "ns"
                              : type == 136 ? "na"
                              : type == 133 ? "rs"
                              : type == 134 ? "ra"
                                            : "redirect") +
                  (from_vm ? "_from_vm" : "_to_vm");
  Addr src, dst, target;
  std::string ks = "/src=", kt = "_target=", kd = "_dst=";
  if (from_vm) {
    int s = static_cast<int>(u(20));
    if (s < 8)
      src = ll, ks += "eui64";
    else if (s < 11)
      src = stable, ks += "stable";
    else if (s < 14)
      src = e.own(6), ks += "own";
    else if (s < 16)
      src = Addr::v6("::"), ks += "unspec";
    else if (s < 17)
      src = gw6(ks);
    else if (s < 18) {  // a SLAAC privacy / stable-privacy address of its /64 (guest noise, not a violation)
      src = e.own(6);
      for (int i = 8; i < 16; ++i) src.b[i] = static_cast<uint8_t>(u(256));
      ks += "own64";
    } else
      src = other_addr(static_cast<int>(u(2)), ks);
  } else {
    src = p(0.7) ? Addr::v6("fe80::1") : e.random_addr(6), ks += "router";
  }
  int tc = static_cast<int>(u(20));
  if (tc < 6)
    target = e.own(6), kt += "own";
  else if (tc < 9)
    target = ll, kt += "eui64";
  else if (tc < 11)
    target = stable, kt += "stable";
  else if (tc < 14)
    target = gw6(kt);
  else if (tc < 18)
    target = other_addr(static_cast<int>(u(2)), kt);
  else
    target = e.random_addr(6), kt += "random";
  int dc = static_cast<int>(u(20));
  if (type == 135) {
    if (dc < 12)
      dst = solicited_node(target), kd += "solicited";
    else if (dc < 17)
      dst = target, kd += "target";
    else
      dst = Addr::v6("ff02::1"), kd += "allnodes";
  } else if (type == 136) {
    if (dc < 8)
      dst = Addr::v6("ff02::1"), kd += "allnodes";
    else if (dc < 12)
      dst = Addr::v6("fe80::1"), kd += "ll";
    else if (dc < 16)
      dst = gw6(kd);
    else
      dst = other_addr(static_cast<int>(u(2)), kd);
  } else if (type == 133) {
    dst = dc < 17 ? (kd += "allrouters", Addr::v6("ff02::2")) : (kd += "allnodes", Addr::v6("ff02::1"));
  } else {
    dst = dc < 10 ? (kd += "allnodes", Addr::v6("ff02::1")) : (kd += "own", e.own(6));
  }
  if (!from_vm) {  // toward the VM: to its addresses, link-local, ff02::1, solicited-node
    if (dc < 6)
      dst = e.own(6), kd = "_dst=own";
    else if (dc < 10)
      dst = ll, kd = "_dst=eui64";
    else if (dc < 14)
      dst = Addr::v6("ff02::1"), kd = "_dst=allnodes";
    else if (dc < 17)
      dst = solicited_node(e.own(6)), kd = "_dst=solicited";
    else
      dst = e.random_addr(6), kd = "_dst=random";
  }
  Bytes body;
  uint32_t rest = type == 136 ? 0x60000000 : 0;
  if (type == 135 || type == 136) body.addr(target);
  if (type == 134) body.u32(0).u32(0);
  if (type == 137) body.addr(target).addr(e.random_addr(6));
  // Options.
  int oc = static_cast<int>(u(20));
  MacAddr lla = from_vm ? vm.mac : kGwMac;
  uint8_t lla_type = type == 136 ? 2 : 1;
  if (oc < 10) {
    if (!(src == Addr::v6("::"))) body.u8(lla_type).u8(1).mac(lla), k += "+lla";
  } else if (oc < 12) {
    MacAddr bad = lla;
    bad[4] ^= 0x77;
    body.u8(lla_type).u8(1).mac(bad), k += "+lla_spoof";
  } else if (oc < 14) {
    body.u8(14).u8(1).fill(6, 0x5a).u8(lla_type).u8(1).mac(lla), k += "+nonce+lla";
  } else if (oc < 15) {
    for (int i = 0; i < 2; ++i) body.u8(14).u8(1).fill(6, 0x5a);
    MacAddr bad = lla;
    bad[3] ^= 1;
    body.u8(lla_type).u8(1).mac(bad), k += "+2opts+lla_spoof";
  } else if (oc < 16) {
    body.u8(14).u8(0).fill(6), k += "+zero_len_opt";
  } else if (oc < 17) {
    body.u8(14).u8(3).fill(6), k += "+opt_overrun";
  } else if (oc < 18) {
    for (int i = 0; i < 6; ++i) body.u8(14).u8(1).fill(6, 0x5a);
    body.u8(lla_type).u8(1).mac(lla), k += "+big";
  } else if (oc < 19) {
    body.u8(lla_type).u8(1).mac(lla).u8(lla_type).u8(1).mac(lla), k += "+2lla";
  }
  Ip ip;
  ip.src = src, ip.dst = dst, ip.proto = kIcmp6;
  ip.ttl = p(0.9) ? 255 : 64;
  if (ip.ttl != 255) k += "+hl64";
  ip.l4 = icmp_msg(type, 0, rest, body.v);
  std::string kind = k + ks + kt + kd;
  if (p(0.05)) e.decorate(ip, kind);
  auto fr = eth(multicast(dst) ? mcast_mac(dst) : (from_vm ? kGwMac : vm.mac), from_vm ? vm.mac : kGwMac, 0x86dd,
                l3_bytes(ip));
  out.push_back(from_vm ? e.from(fr, kind) : e.to(fr, kind, -1));
}

void Gen::mld_igmp(Env& e, std::vector<Shot>& out) {
  const MVm& vm = e.vm();
  bool from_vm = p(0.7);
  bool v6 = p(0.5);
  Ip ip;
  std::string k;
  if (v6) {
    int t = static_cast<int>(u(10));
    uint8_t type = t < 5 ? 143 : t < 7 ? 131 : t < 8 ? 132 : 130;
    Addr group = Addr::v6("ff02::fb");
    if (p(0.3)) group.b[15] = static_cast<uint8_t>(u(256));
    ip.src = from_vm ? (p(0.7) ? eui64_ll(vm.mac) : p(0.5) ? Addr::v6("::") : e.own(6)) : Addr::v6("fe80::1");
    ip.ttl = p(0.9) ? 1 : 255;
    ip.proto = kIcmp6;
    ip.exts = {{0, {5, 2, 0, 0}}};
    Bytes body;
    if (type == 143) {
      size_t recs = p(0.85) ? 1 + u(4) : 30 + u(20);
      for (size_t i = 0; i < recs; ++i) body.u8(4).u8(0).u16(0).addr(group);
      ip.l4 = icmp_msg(143, 0, static_cast<uint32_t>(recs), body.v);
      ip.dst = Addr::v6("ff02::16");
      k = "mld2_report";
      if (recs > 20) k += "_big";
    } else {
      body.addr(type == 130 ? Addr::v6("::") : group);
      ip.l4 = icmp_msg(type, 0, 0, body.v);
      ip.dst = type == 131 ? group : type == 132 ? Addr::v6("ff02::2") : Addr::v6("ff02::1");
      k = type == 131 ? "mld1_report" : type == 132 ? "mld_done" : "mld_query";
    }
    if (p(0.1)) ip.dst = Addr::v6("ff02::1"), k += "_dst_allnodes";
    if (p(0.05)) ip.dst = e.random_addr(6), k += "_dst_unicast";
  } else {
    int t = static_cast<int>(u(10));
    uint8_t type = t < 4 ? 0x22 : t < 6 ? 0x16 : t < 7 ? 0x12 : t < 8 ? 0x17 : 0x11;
    Addr group = Addr::v4(239, 255, 255, 250);
    if (p(0.3)) group = Addr::v4(224, 0, 0, 251);
    ip.src = from_vm ? e.own(4) : Addr::v4(10, 0, 0, 1);
    ip.ttl = p(0.9) ? 1 : 64;
    ip.proto = kIgmp;
    ip.v4opts = {148, 4, 0, 0};
    Bytes b;
    if (type == 0x22) {
      size_t recs = p(0.85) ? 1 + u(4) : 33 + u(10);
      b.u8(0x22).u8(0).u16(0).u16(0).u16(static_cast<uint16_t>(recs));
      for (size_t i = 0; i < recs; ++i) b.u8(4).u8(0).u16(0).addr(group);
      ip.dst = Addr::v4(224, 0, 0, 22);
      k = recs > 32 ? "igmp3_report_big" : "igmp3_report";
    } else {
      b.u8(type).u8(type == 0x11 ? 100 : 0).u16(0).addr(type == 0x11 ? Addr::v4(0, 0, 0, 0) : group);
      ip.dst = type == 0x17 ? Addr::v4(224, 0, 0, 2) : type == 0x11 ? Addr::v4(224, 0, 0, 1) : group;
      k = type == 0x11 ? "igmp_query" : type == 0x17 ? "igmp_leave" : "igmp_report";
    }
    ip.l4 = b.v;
    if (p(0.1)) ip.dst = Addr::v4(224, 0, 0, 1), k += "_dst_allhosts";
    if (p(0.05)) ip.dst = e.random_addr(4), k += "_dst_unicast";
  }
  if (ip.ttl != 1) k += "_ttl";
  k += from_vm ? "_from_vm" : "_to_vm";
  auto fr =
      eth(multicast(ip.dst) ? mcast_mac(ip.dst) : kGwMac, from_vm ? vm.mac : kGwMac, type_of(ip.src), l3_bytes(ip));
  out.push_back(from_vm ? e.from(fr, k) : e.to(fr, k, -1));
}

void Gen::noise(Env& e, std::vector<Shot>& out) {
  // From the VM, or (a quarter) another tenant's noise toward it: sent by
  // another VM (through its TAP: the vouch mark) or from outside.
  bool to_vm = p(0.25);
  int sender = to_vm ? e.other_vm(-1) : static_cast<int>(e.x);
  if (to_vm && (sender < 0 || p(0.3))) sender = -1;
  MacAddr smac = sender >= 0 ? e.w.vms[static_cast<size_t>(sender)].mac : kGwMac;
  auto src_of = [&](int f) {
    Addr a;
    if (sender >= 0 && e.vm_addr(static_cast<size_t>(sender), f, a)) return a;
    return f == 4 ? Addr::v4(192, 0, 2, 77) : Addr::v6("2001:db8::77");
  };
  auto ll_of = [&] { return sender >= 0 ? eui64_ll(e.w.vms[static_cast<size_t>(sender)].mac) : Addr::v6("fe80::77"); };
  int c = static_cast<int>(u(12));
  Ip ip;
  std::string k;
  std::vector<uint8_t> fr;
  auto udp = [&](Addr s, Addr d, uint16_t sp, uint16_t dp, const char* kind) {
    ip.src = s, ip.dst = d, ip.proto = kUdp, ip.l4 = udp_seg(sp, dp, 40 + u(200));
    k = kind;
    fr = eth(multicast(d) ? mcast_mac(d) : MacAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, smac, type_of(s), l3_bytes(ip));
  };
  auto l2 = [&](MacAddr d, uint16_t type_or_len, const char* kind) {
    Bytes b;
    b.mac(d).mac(smac).u16(type_or_len).fill(46, 0x42);
    fr = b.v;
    k = kind;
  };
  switch (c) {
    case 0:
      udp(Addr::v4(0, 0, 0, 0), Addr::v4(255, 255, 255, 255), 68, 67, "dhcp_discover");
      break;
    case 1:
      udp(src_of(4), Addr::v4(224, 0, 0, 251), 5353, 5353, "mdns4");
      break;
    case 2:
      udp(src_of(4), Addr::v4(239, 255, 255, 250), 40000, 1900, "ssdp");
      break;
    case 3:
      udp(src_of(4), Addr::v4(224, 0, 0, 252), 40000, 5355, "llmnr4");
      break;
    case 4:
      udp(ll_of(), Addr::v6("ff02::1:2"), 546, 547, "dhcpv6_solicit");
      break;
    case 5:
      udp(p(0.5) ? ll_of() : src_of(6), Addr::v6("ff02::fb"), 5353, 5353, "mdns6");
      break;
    case 6:
      udp(src_of(4), Addr::v4(255, 255, 255, 255), 137, 137, "netbios_bcast");
      break;
    case 7:
      l2({0x01, 0x80, 0xc2, 0, 0, 0}, 38, "stp_llc");
      break;
    case 8:
      l2({0x01, 0x80, 0xc2, 0, 0, 0x0e}, 0x88cc, "lldp");
      break;
    case 9:
      l2({0x01, 0x80, 0xc2, 0, 0, 0x03}, 0x888e, "eapol");
      break;
    case 10:
      l2(kGwMac, 0x88b5, "unknown_ethertype");
      break;
    default:
      l2(kGwMac, 100, "llc_unicast");
      break;
  }
  if (to_vm) {
    out.push_back(e.to(fr, k + (sender >= 0 ? "_to_vm_from_vm" : "_to_vm"), sender));
    return;
  }
  out.push_back(e.from(fr, k));
}

void Gen::spoof(Env& e, std::vector<Shot>& out) {
  const MVm& vm = e.vm();
  int f = e.fam();
  Ip ip;
  ip.dst = e.peer(vm.egress, f, false).a;
  ip.proto = kUdp;
  ip.l4 = udp_seg(40000, 443, 20);
  std::string k = "spoof_src=";
  int c = static_cast<int>(u(9));
  Addr a;
  if (c == 0 || c == 1) {
    int o = e.other_vm(c == 0 ? 1 : 0);
    if (o >= 0 && e.vm_addr(static_cast<size_t>(o), f, a))
      ip.src = a, k += c == 0 ? "samegroup" : "othergroup";
    else
      ip.src = e.random_addr(f), k += "random";
  } else if (c == 2 && !vm.gateways.empty()) {
    ip.src = vm.gateways[u(vm.gateways.size())];
    k += "gw";
  } else if (c == 3 && f == 6) {  // SLAAC privacy / stable-privacy address in the VM's /64
    ip.src = e.own(6);
    for (int i = 8; i < 16; ++i) ip.src.b[i] = static_cast<uint8_t>(u(256));
    k += "own64";
  } else if (c == 4 && f == 6) {
    ip.src = eui64_ll(vm.mac), k += "eui64_to_global";
  } else if (c == 5 && f == 6) {
    int o = e.other_vm(-1);
    ip.src = o >= 0 ? eui64_ll(e.w.vms[static_cast<size_t>(o)].mac) : Addr::v6("fe80::1");
    k += "other_eui64";
  } else if (c == 6 && f == 6) {
    Addr own4 = e.own(4);
    ip.src = Addr::v6("::ffff:0:0");
    std::memcpy(&ip.src.b[12], own4.b.data(), 4);
    k += "mapped_own_v4";
  } else if (c == 7) {
    ip.src = e.own(f);
    out.push_back(e.from(eth(kGwMac, MacAddr{0x02, 0, 0, 0, 0x66, 0x66}, type_of(ip.src), l3_bytes(ip)), "spoof_mac"));
    return;
  } else {
    ip.src = e.random_addr(f), k += "random";
  }
  if (ip.src.fam != ip.dst.fam) ip.dst = e.random_addr(ip.src.fam);
  out.push_back(e.from(eth(kGwMac, vm.mac, type_of(ip.src), l3_bytes(ip)), k));
}

void Gen::flood(Env& e, std::vector<Shot>& out) {
  // Many new flows of one VM (its limits.flows share), then a reply to the first.
  int f = e.fam();
  Env::Peer pr = e.peer(e.vm().egress, f, false);
  if (pr.proto != kTcp && pr.proto != kUdp) pr.proto = kUdp;
  size_t n = std::min<size_t>(e.vm().flows + 3, 24);
  Ip first;
  for (size_t i = 0; i < n; ++i) {
    Ip ip;
    ip.src = e.own(f), ip.dst = pr.a, ip.proto = pr.proto;
    ip.l4 = e.l4_for(pr.proto, static_cast<uint16_t>(20000 + i + u(20000)), pr.port, 0x02, 0, true, f, 8);
    if (i == 0) first = ip;
    out.push_back(e.from(eth(kGwMac, e.vm().mac, type_of(ip.src), l3_bytes(ip)), "flood/new_flow"));
  }
  Ip r;
  r.src = first.dst, r.dst = first.src, r.proto = first.proto;
  uint16_t sp = static_cast<uint16_t>(first.l4[0] << 8 | first.l4[1]);
  r.l4 = e.l4_for(first.proto, pr.port, sp, 0x12, 0, false, f, 8);
  out.push_back(e.to(eth(e.vm().mac, kGwMac, type_of(r.src), l3_bytes(r)), "flood/reply_first", -1));
}

void Gen::mutate(Env& e, Shot& s) {
  auto& fr = s.frame;
  int c = static_cast<int>(u(8));
  switch (c) {
    case 0:
    case 1:
      if (fr.size() > 15) fr.resize(14 + u(fr.size() - 14)), s.kind += "+trunc";
      break;
    case 2:
      fr.insert(fr.end(), 1 + u(40), 0xee), s.kind += "+trailing";
      break;
    case 3:
      if (fr.size() < 60)
        fr.resize(60, 0), s.kind += "+pad60";
      else
        fr.insert(fr.end(), 1 + u(8), 0), s.kind += "+trailing";
      break;
    case 4: {
      uint8_t tag[4] = {0x81, 0x00, 0x00, static_cast<uint8_t>(1 + u(100))};
      fr.insert(fr.begin() + 12, tag, tag + 4);
      if (p(0.3)) {
        uint8_t outer[4] = {0x88, 0xa8, 0x00, 0x07};
        fr.insert(fr.begin() + 12, outer, outer + 4);
        s.kind += "+qinq";
      } else {
        s.kind += "+vlan";
      }
      break;
    }
    case 5:
    case 6:
      if (fr.size() > 14) {
        size_t at = 14 + u(std::min<size_t>(fr.size() - 14, 80));
        fr[at] = static_cast<uint8_t>(u(256));
        s.kind += "+flip@" + std::to_string(at);
      }
      break;
    default:
      if (s.hook == Hook::from_vm)
        fr[6 + u(6)] ^= 0x10, s.kind += "+smac";
      else
        fr.resize(std::min<size_t>(fr.size(), 14 + u(40))), s.kind += "+trunc";
      break;
  }
  (void)e;
}

std::vector<Shot> Gen::scenario(const MWorld& w) {
  Env e{*this, w, static_cast<size_t>(u(w.vms.size()))};
  std::vector<Shot> out;
  int k = static_cast<int>(u(100));
  if (k < 22)
    egress(e, out);
  else if (k < 34)
    ingress(e, out);
  else if (k < 44)
    flow_then_reply(e, out);
  else if (k < 51)
    peer_flow(e, out);
  else if (k < 58)
    fragments(e, out);
  else if (k < 67)
    arp(e, out);
  else if (k < 79)
    nd(e, out);
  else if (k < 86)
    mld_igmp(e, out);
  else if (k < 91)
    noise(e, out);
  else if (k < 97)
    spoof(e, out);
  else if (e.vm().flows_explicit)
    flood(e, out);
  else
    egress(e, out);
  for (auto& s : out)
    if (p(0.12)) mutate(e, s);
  return out;
}

}  // namespace vmfence::fuzz
