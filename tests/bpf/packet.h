// Frame builder for the BPF program tests: Ethernet (+802.1Q tags), ARP,
// IPv4 (options, fragments), IPv6 (extension headers, fragments), TCP, UDP,
// ICMP, ICMPv6 with ND options and MLD. Headers are appended in wire order;
// build() fills in what depends on what follows (ethertype, IPv4 protocol,
// IPv6 next header, lengths, checksums), so a test writes only what it means:
//
//   Frame f = Packet().eth(vm_mac, gw_mac).ipv4(ip("10.1.0.2"), ip("1.1.1.1"))
//                 .tcp(40000, 443, SYN).build();
//
// Frame::info is what the datapath should report about the frame in a
// violation event (addresses IPv4-mapped, ports as the datapath keys them).
#pragma once

#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace vmfence::test {

using Mac = std::array<uint8_t, 6>;

inline Mac mac(const std::string& text) {
  Mac m{};
  unsigned v[6];
  if (std::sscanf(text.c_str(), "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6)
    throw std::invalid_argument("bad MAC " + text);
  for (int i = 0; i < 6; ++i) m[i] = static_cast<uint8_t>(v[i]);
  return m;
}

// An IPv4 or IPv6 address; IPv4 is kept IPv4-mapped like the datapath's keys.
struct Ip {
  int family = 4;
  std::array<uint8_t, 16> mapped{};
  const uint8_t* raw() const { return family == 4 ? mapped.data() + 12 : mapped.data(); }
  size_t size() const { return family == 4 ? 4 : 16; }
};

inline Ip ip(const std::string& text) {
  Ip a;
  if (inet_pton(AF_INET, text.c_str(), a.mapped.data() + 12) == 1) {
    a.mapped[10] = a.mapped[11] = 0xff;
    a.family = 4;
  } else if (inet_pton(AF_INET6, text.c_str(), a.mapped.data()) == 1) {
    a.family = 6;
  } else {
    throw std::invalid_argument("bad IP " + text);
  }
  return a;
}

// TCP flags.
constexpr uint8_t FIN = 0x01, SYN = 0x02, RST = 0x04, PSH = 0x08, ACK = 0x10;

constexpr uint16_t kEthIp = 0x0800, kEthArp = 0x0806, kEthIpv6 = 0x86dd, kEthVlan = 0x8100, kEthQinQ = 0x88a8;
constexpr uint8_t kProtoIcmp = 1, kProtoTcp = 6, kProtoUdp = 17, kProtoIcmpv6 = 58;

// What a violation event should carry about this frame.
struct FrameInfo {
  uint8_t family = 0;  // 4, 6, 0 (no IP header)
  std::array<uint8_t, 16> saddr{}, daddr{};
  uint8_t proto = 0;
  uint16_t sport = 0, dport = 0;  // host order; ICMP echo id on the VM's side
  uint16_t ethertype = 0;         // the outer ethertype (0x8100 for a tagged frame)
  Mac smac{};
  bool is_arp = false;
};

struct Frame {
  std::vector<uint8_t> bytes;
  FrameInfo info;
  // The first n bytes: headers still claim the full length (a cut frame).
  Frame truncated(size_t n) const {
    Frame f = *this;
    f.bytes.resize(std::min(n, f.bytes.size()));
    return f;
  }
};

struct Ip4Opts {
  uint16_t id = 0x1234;
  bool df = false;
  bool mf = false;           // more fragments
  uint16_t frag_offset = 0;  // in 8-byte units
  uint8_t ttl = 64;
  std::vector<uint8_t> options;  // padded to a multiple of 4 with EOL
  int version = 4;               // for malformed-header fixtures
  int ihl = -1;                  // -1: from the options
};

inline Ip4Opts ip4_frag(uint16_t id, bool more, uint16_t offset_units) {
  Ip4Opts o;
  o.id = id;
  o.mf = more;
  o.frag_offset = offset_units;
  return o;
}
inline Ip4Opts ip4_ttl(uint8_t ttl) {
  Ip4Opts o;
  o.ttl = ttl;
  return o;
}
inline Ip4Opts ip4_options(std::vector<uint8_t> options) {
  Ip4Opts o;
  o.options = std::move(options);
  return o;
}
inline Ip4Opts ip4_header(int version, int ihl) {
  Ip4Opts o;
  o.version = version;
  o.ihl = ihl;
  return o;
}

class Packet {
 public:
  Packet& eth(const Mac& src, const Mac& dst) {
    put(dst.data(), 6);
    put(src.data(), 6);
    info_.smac = src;
    type_at_ = b_.size();
    put16(0);  // filled by the next header or ethertype()
    return *this;
  }
  // An 802.1Q (or 802.1ad) tag: the current ethertype becomes the TPID.
  Packet& vlan(uint16_t vid, uint16_t tpid = kEthVlan) {
    set16(type_at_, tpid);
    put16(vid & 0x0fff);
    type_at_ = b_.size();
    put16(0);
    return *this;
  }
  Packet& ethertype(uint16_t t) {
    set16(type_at_, t);
    return *this;
  }

  Packet& ipv4(const Ip& src, const Ip& dst, Ip4Opts o = {}) {
    need(src.family == 4 && dst.family == 4, "ipv4() needs IPv4 addresses");
    fill_ethertype(kEthIp);
    std::vector<uint8_t> opts = o.options;
    while (opts.size() % 4) opts.push_back(0);
    ip_off_ = b_.size();
    ip_family_ = 4;
    int ihl = o.ihl >= 0 ? o.ihl : static_cast<int>(5 + opts.size() / 4);
    put8(static_cast<uint8_t>((o.version << 4) | (ihl & 0xf)));
    put8(0);   // tos
    put16(0);  // total length: build()
    put16(o.id);
    uint16_t fo = static_cast<uint16_t>((o.df ? 0x4000 : 0) | (o.mf ? 0x2000 : 0) | (o.frag_offset & 0x1fff));
    put16(fo);
    put8(o.ttl);
    nh_at_ = b_.size();
    put8(0);   // protocol: the next header
    put16(0);  // checksum: build()
    put(src.raw(), 4);
    put(dst.raw(), 4);
    b_.insert(b_.end(), opts.begin(), opts.end());
    fragment_ = o.mf || o.frag_offset;
    later_fragment_ = o.frag_offset != 0;
    set_addrs(src, dst);
    return *this;
  }

  Packet& ipv6(const Ip& src, const Ip& dst, uint8_t hop_limit = 64) {
    need(src.family == 6 && dst.family == 6, "ipv6() needs IPv6 addresses");
    fill_ethertype(kEthIpv6);
    ip_off_ = b_.size();
    ip_family_ = 6;
    put32(0x60000000);
    put16(0);  // payload length: build()
    nh_at_ = b_.size();
    put8(59);  // no next header until something follows
    put8(hop_limit);
    put(src.raw(), 16);
    put(dst.raw(), 16);
    set_addrs(src, dst);
    return *this;
  }
  // Hop-by-hop options (default: router alert, as MLD sends), padded to 8.
  Packet& hop_by_hop(std::vector<uint8_t> opts = {5, 2, 0, 0}) {
    ext_header(0, opts);
    return *this;
  }
  Packet& dest_opts(std::vector<uint8_t> opts = {}) {
    ext_header(60, opts);
    return *this;
  }
  // A routing header of `type` with `segments_left` and that many addresses.
  Packet& routing_header(uint8_t type, uint8_t segments_left, const std::vector<Ip>& addrs = {}) {
    std::vector<uint8_t> opts = {type, segments_left, 0, 0, 0, 0};
    for (const auto& a : addrs) opts.insert(opts.end(), a.raw(), a.raw() + 16);
    ext_header(43, opts);
    return *this;
  }
  Packet& ipv6_frag(uint16_t offset_units, bool more, uint32_t id) {
    set_next(44);
    nh_at_ = b_.size();
    put8(59);
    put8(0);
    put16(static_cast<uint16_t>((offset_units << 3) | (more ? 1 : 0)));
    put32(id);
    fragment_ = true;
    later_fragment_ = offset_units != 0;
    return *this;
  }

  Packet& tcp(uint16_t sport, uint16_t dport, uint8_t flags, std::vector<uint8_t> options = {}) {
    while (options.size() % 4) options.push_back(1);  // NOP
    l4(kProtoTcp);
    put16(sport);
    put16(dport);
    put32(1000);  // seq
    put32((flags & ACK) ? 2000 : 0);
    put8(static_cast<uint8_t>(((5 + options.size() / 4) & 0xf) << 4));
    put8(flags);
    put16(64240);  // window
    put16(0);      // checksum: build()
    put16(0);      // urgent
    b_.insert(b_.end(), options.begin(), options.end());
    ports(sport, dport);
    return *this;
  }
  Packet& udp(uint16_t sport, uint16_t dport) {
    l4(kProtoUdp);
    put16(sport);
    put16(dport);
    put16(0);  // length: build()
    put16(0);  // checksum: build()
    ports(sport, dport);
    return *this;
  }
  // ICMP: type, code, checksum, then the 4-byte rest of header (echo: id, seq).
  Packet& icmp(uint8_t type, uint8_t code, uint16_t id = 0, uint16_t seq = 0) {
    l4(kProtoIcmp);
    icmp_header(type, code, static_cast<uint32_t>(id) << 16 | seq);
    if (type == 8) ports(id, 0);
    if (type == 0) ports(0, id);
    return *this;
  }
  Packet& icmp6(uint8_t type, uint8_t code, uint32_t rest = 0) {
    l4(kProtoIcmpv6);
    icmp_header(type, code, rest);
    if (type == 128) ports(static_cast<uint16_t>(rest >> 16), 0);
    if (type == 129) ports(0, static_cast<uint16_t>(rest >> 16));
    return *this;
  }
  Packet& echo6(bool request, uint16_t id, uint16_t seq = 1) {
    return icmp6(request ? 128 : 129, 0, static_cast<uint32_t>(id) << 16 | seq);
  }

  // Neighbour discovery messages (RFC 4861); options follow with lla().
  Packet& ns(const Ip& target) {
    icmp6(135, 0);
    put(target.mapped.data(), 16);
    return *this;
  }
  Packet& na(const Ip& target, bool solicited = true, bool override_flag = true) {
    icmp6(136, 0, (solicited ? 0x40000000u : 0) | (override_flag ? 0x20000000u : 0));
    put(target.mapped.data(), 16);
    return *this;
  }
  Packet& rs() { return icmp6(133, 0); }
  Packet& ra() {
    icmp6(134, 0, 64u << 24 | 1800);  // hop limit 64, router lifetime 1800 s
    put32(0);                         // reachable time
    put32(0);                         // retrans timer
    return *this;
  }
  Packet& redirect(const Ip& target, const Ip& dst) {
    icmp6(137, 0);
    put(target.mapped.data(), 16);
    put(dst.mapped.data(), 16);
    return *this;
  }
  // Source (type 1) or target (type 2) link-layer address option.
  Packet& lla(uint8_t type, const Mac& m) {
    put8(type);
    put8(1);
    put(m.data(), 6);
    return *this;
  }
  // An ND option of any type and length (units of 8 bytes; 0 is invalid).
  Packet& nd_option(uint8_t type, uint8_t len_units) {
    put8(type);
    put8(len_units);
    for (int i = 2; i < len_units * 8; ++i) put8(0);
    return *this;
  }
  // MLDv2 report (type 143) with one record joining `group`.
  Packet& mld2_report(const Ip& group) {
    icmp6(143, 0, 1);  // reserved, one record
    put8(4);           // CHANGE_TO_EXCLUDE_MODE
    put8(0);
    put16(0);
    put(group.mapped.data(), 16);
    return *this;
  }

  Packet& arp(uint16_t op, const Mac& sha, const Ip& spa, const Mac& tha, const Ip& tpa) {
    fill_ethertype(kEthArp);
    put16(1);
    put16(kEthIp);
    put8(6);
    put8(4);
    put16(op);
    put(sha.data(), 6);
    put(spa.raw(), 4);
    put(tha.data(), 6);
    put(tpa.raw(), 4);
    info_.family = 4;
    info_.saddr = spa.mapped;
    info_.daddr = tpa.mapped;
    info_.is_arp = true;
    return *this;
  }

  // The transport protocol of a fragment that carries no transport header.
  Packet& next_proto(uint8_t proto) {
    set_next(proto);
    nh_at_ = 0;
    info_.proto = proto;
    return *this;
  }

  // The L3 packet of `inner` (from its IP header on), at most `max_bytes`:
  // the body of an ICMP error.
  Packet& embed(const Frame& inner, size_t max_bytes = SIZE_MAX) {
    size_t l3 = 14;
    while (l3 + 4 <= inner.bytes.size() && get16(inner.bytes, l3 - 2) == kEthVlan) l3 += 4;
    size_t n = std::min(max_bytes, inner.bytes.size() - l3);
    b_.insert(b_.end(), inner.bytes.begin() + static_cast<long>(l3), inner.bytes.begin() + static_cast<long>(l3 + n));
    return *this;
  }
  Packet& payload(size_t n, uint8_t fill = 0xab) {
    b_.insert(b_.end(), n, fill);
    return *this;
  }
  Packet& raw(const std::vector<uint8_t>& bytes) {
    b_.insert(b_.end(), bytes.begin(), bytes.end());
    return *this;
  }

  Frame build() const {
    Frame f{b_, info_};
    auto& b = f.bytes;
    if (ip_family_ == 4) {
      set16(b, ip_off_ + 2, static_cast<uint16_t>(b.size() - ip_off_));
      size_t ihl = (b[ip_off_] & 0xf) * 4u;
      if (ihl >= 20 && ip_off_ + ihl <= b.size()) set16(b, ip_off_ + 10, csum(b, ip_off_, ihl, 0));
    } else if (ip_family_ == 6) {
      set16(b, ip_off_ + 4, static_cast<uint16_t>(b.size() - ip_off_ - 40));
    }
    if (l4_off_ && !fragment_) {
      size_t len = b.size() - l4_off_;
      uint32_t pseudo = 0;
      if (l4_proto_ != kProtoIcmp) {  // TCP, UDP, ICMPv6: pseudo-header
        const uint8_t* s = &b[ip_family_ == 4 ? ip_off_ + 12 : ip_off_ + 8];
        size_t alen = ip_family_ == 4 ? 4 : 16;
        for (size_t i = 0; i < 2 * alen; i += 2) pseudo += static_cast<uint32_t>(s[i] << 8 | s[i + 1]);
        pseudo += static_cast<uint32_t>(len >> 16) + static_cast<uint32_t>(len & 0xffff) + l4_proto_;
      }
      size_t at = l4_proto_ == kProtoTcp ? 16 : l4_proto_ == kProtoUdp ? 6 : 2;
      if (l4_proto_ == kProtoUdp) set16(b, l4_off_ + 4, static_cast<uint16_t>(len));
      set16(b, l4_off_ + at, 0);
      uint16_t c = csum(b, l4_off_, len, pseudo);
      if (l4_proto_ == kProtoUdp && c == 0) c = 0xffff;
      set16(b, l4_off_ + at, c);
    }
    f.info.ethertype = type_at_ >= 12 ? get16(b, 12) : 0;
    // After the lengths: bytes the IP header does not announce, or bytes it
    // announces that the frame lacks.
    b.insert(b.end(), trailer_, 0);
    b.resize(b.size() - std::min(chop_, b.size()));
    return f;
  }
  // n bytes after the IP datagram (not counted in its length).
  Packet& trailer(size_t n) {
    trailer_ = n;
    return *this;
  }
  // The frame ends n bytes before the IP length says.
  Packet& chopped(size_t n) {
    chop_ = n;
    return *this;
  }

 private:
  size_t trailer_ = 0;
  size_t chop_ = 0;
  static void need(bool ok, const char* what) {
    if (!ok) throw std::logic_error(what);
  }
  void put(const uint8_t* p, size_t n) { b_.insert(b_.end(), p, p + n); }
  void put8(uint8_t v) { b_.push_back(v); }
  void put16(uint16_t v) {
    put8(static_cast<uint8_t>(v >> 8));
    put8(static_cast<uint8_t>(v));
  }
  void put32(uint32_t v) {
    put16(static_cast<uint16_t>(v >> 16));
    put16(static_cast<uint16_t>(v));
  }
  static uint16_t get16(const std::vector<uint8_t>& b, size_t at) {
    return static_cast<uint16_t>(b[at] << 8 | b[at + 1]);
  }
  static void set16(std::vector<uint8_t>& b, size_t at, uint16_t v) {
    b[at] = static_cast<uint8_t>(v >> 8);
    b[at + 1] = static_cast<uint8_t>(v);
  }
  void set16(size_t at, uint16_t v) { set16(b_, at, v); }
  void fill_ethertype(uint16_t t) {
    if (type_at_ && get16(b_, type_at_) == 0) set16(type_at_, t);
  }
  void set_next(uint8_t proto) {
    need(nh_at_ != 0, "a transport header needs an IP header first");
    b_[nh_at_] = proto;
  }
  void ext_header(uint8_t type, std::vector<uint8_t> opts) {
    set_next(type);
    while ((opts.size() + 2) % 8) opts.push_back(0);  // Pad1
    nh_at_ = b_.size();
    put8(59);
    put8(static_cast<uint8_t>((opts.size() + 2) / 8 - 1));
    b_.insert(b_.end(), opts.begin(), opts.end());
  }
  void l4(uint8_t proto) {
    set_next(proto);
    nh_at_ = 0;
    l4_off_ = b_.size();
    l4_proto_ = proto;
    info_.proto = proto;
  }
  void icmp_header(uint8_t type, uint8_t code, uint32_t rest) {
    put8(type);
    put8(code);
    put16(0);  // checksum: build()
    put32(rest);
  }
  void set_addrs(const Ip& src, const Ip& dst) {
    if (info_.family) return;  // the outer header decides
    info_.family = static_cast<uint8_t>(src.family);
    info_.saddr = src.mapped;
    info_.daddr = dst.mapped;
  }
  void ports(uint16_t s, uint16_t d) {
    if (later_fragment_) return;
    info_.sport = s;
    info_.dport = d;
  }
  // Internet checksum of b[off, off+len) plus a pre-summed pseudo header.
  static uint16_t csum(const std::vector<uint8_t>& b, size_t off, size_t len, uint32_t sum) {
    for (size_t i = 0; i + 1 < len; i += 2) sum += static_cast<uint32_t>(b[off + i] << 8 | b[off + i + 1]);
    if (len % 2) sum += static_cast<uint32_t>(b[off + len - 1] << 8);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return static_cast<uint16_t>(~sum);
  }

  std::vector<uint8_t> b_;
  FrameInfo info_;
  size_t type_at_ = 0;  // offset of the innermost ethertype field
  size_t ip_off_ = 0;
  int ip_family_ = 0;
  size_t nh_at_ = 0;  // offset of the byte naming the next header
  size_t l4_off_ = 0;
  uint8_t l4_proto_ = 0;
  bool fragment_ = false;
  bool later_fragment_ = false;
};

}  // namespace vmfence::test
