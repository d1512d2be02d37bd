// nftables table inet vmfence: builder (pure), netlink batch apply/remove, verify, monitor.
#include "agent/nft/nft.h"

#include <arpa/inet.h>
#include <net/if.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_conntrack_common.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netlink.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libmnl/libmnl.h>
#include <libnftnl/chain.h>
#include <libnftnl/common.h>
#include <libnftnl/expr.h>
#include <libnftnl/rule.h>
#include <libnftnl/table.h>
#include <libnftnl/udata.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <deque>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

namespace vmfence::nft {

namespace {
void remember_own_portid(uint32_t portid);  // defined with the apply state below

// ---------------------------------------------------------------------------
// Small helpers: addresses, text
// ---------------------------------------------------------------------------

constexpr const char* kChainPrerouting = "prerouting";
constexpr const char* kChainForward = "forward";
constexpr const char* kChainPostrouting = "postrouting";
constexpr const char* kChainImds = "imds_forward";
constexpr const char* kChainWanToVm = "wan_to_vm";
constexpr uint8_t kRestoredTtl = 64;
constexpr size_t kCommentMax = NFTNL_UDATA_COMMENT_MAXLEN - 1;  // + NUL

// The address bytes in network order (4 for IPv4, 16 for IPv6), host bits cleared.
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
    case Proto::tcp: return "tcp";
    case Proto::udp: return "udp";
    case Proto::icmp: return "icmp";
    case Proto::icmpv6: return "ipv6-icmp";
    case Proto::any: break;
  }
  return "";
}

bool has_ports(Proto p) { return p == Proto::tcp || p == Proto::udp; }
bool full_range(const PortRange& r) { return r.lo == 0 && r.hi == 65535; }

std::string range_text(const PortRange& r) {
  return r.lo == r.hi ? std::to_string(r.lo) : std::to_string(r.lo) + "-" + std::to_string(r.hi);
}

std::string quote(const std::string& s) { return "\"" + s + "\""; }

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return h;
}

std::string hex64(uint64_t v) {
  char buf[17];
  snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string clamp_comment(std::string s) {
  if (s.size() > kCommentMax) s.resize(kCommentMax);
  return s;
}

std::string table_comment(const Ruleset& rs) {
  return "managed by vmfence, ruleset " + hex64(rs.fingerprint());
}

int hook_number(const std::string& hook) {
  if (hook == "prerouting") return NF_INET_PRE_ROUTING;
  if (hook == "input") return NF_INET_LOCAL_IN;
  if (hook == "forward") return NF_INET_FORWARD;
  if (hook == "output") return NF_INET_LOCAL_OUT;
  if (hook == "postrouting") return NF_INET_POST_ROUTING;
  return -1;
}

// ---------------------------------------------------------------------------
// RAII for libnftnl / libmnl objects
// ---------------------------------------------------------------------------

struct RuleFree {
  void operator()(nftnl_rule* r) const { nftnl_rule_free(r); }
};
struct ChainFree {
  void operator()(nftnl_chain* c) const { nftnl_chain_free(c); }
};
struct TableFree {
  void operator()(nftnl_table* t) const { nftnl_table_free(t); }
};
struct UdataFree {
  void operator()(nftnl_udata_buf* b) const { nftnl_udata_buf_free(b); }
};
struct SocketClose {
  void operator()(mnl_socket* s) const { mnl_socket_close(s); }
};
using RulePtr = std::unique_ptr<nftnl_rule, RuleFree>;
using ChainPtr = std::unique_ptr<nftnl_chain, ChainFree>;
using TablePtr = std::unique_ptr<nftnl_table, TableFree>;
using UdataPtr = std::unique_ptr<nftnl_udata_buf, UdataFree>;
using SocketPtr = std::unique_ptr<mnl_socket, SocketClose>;

Result errno_result(int err, const std::string& what) {
  return Result{err ? err : EIO, what + ": " + std::strerror(err ? err : EIO)};
}

// ---------------------------------------------------------------------------
// Expression builder: mirrors what `nft` generates for the same rule text
// (checked against `nft --debug=netlink`), so `nft list` prints it back.
// ---------------------------------------------------------------------------

class Exprs {
 public:
  explicit Exprs(nftnl_rule* r) : r_(r) {}

  void meta(uint32_t key) {
    auto* e = add("meta");
    nftnl_expr_set_u32(e, NFTNL_EXPR_META_KEY, key);
    nftnl_expr_set_u32(e, NFTNL_EXPR_META_DREG, NFT_REG_1);
  }
  void cmp(uint32_t op, const void* data, uint32_t len) {
    auto* e = add("cmp");
    nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_SREG, NFT_REG_1);
    nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_OP, op);
    nftnl_expr_set(e, NFTNL_EXPR_CMP_DATA, data, len);
  }
  void payload(uint32_t base, uint32_t offset, uint32_t len) {
    auto* e = add("payload");
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_DREG, NFT_REG_1);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_BASE, base);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_OFFSET, offset);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_LEN, len);
  }
  void payload_write(uint32_t base, uint32_t offset, uint32_t len, uint32_t csum_type,
                     uint32_t csum_offset) {
    auto* e = add("payload");
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_SREG, NFT_REG_1);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_BASE, base);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_OFFSET, offset);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_LEN, len);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_CSUM_TYPE, csum_type);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_CSUM_OFFSET, csum_offset);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_FLAGS, 0);
  }
  void bitwise(const void* mask, const void* xor_, uint32_t len) {
    auto* e = add("bitwise");
    nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_SREG, NFT_REG_1);
    nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_DREG, NFT_REG_1);
    nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_LEN, len);
    nftnl_expr_set(e, NFTNL_EXPR_BITWISE_MASK, mask, len);
    nftnl_expr_set(e, NFTNL_EXPR_BITWISE_XOR, xor_, len);
  }
  void ct(uint32_t key) {
    auto* e = add("ct");
    nftnl_expr_set_u32(e, NFTNL_EXPR_CT_KEY, key);
    nftnl_expr_set_u32(e, NFTNL_EXPR_CT_DREG, NFT_REG_1);
  }
  void immediate_data(const void* data, uint32_t len) {
    auto* e = add("immediate");
    nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_DREG, NFT_REG_1);
    nftnl_expr_set(e, NFTNL_EXPR_IMM_DATA, data, len);
  }
  void verdict(int verdict, const std::string& chain = {}) {
    auto* e = add("immediate");
    nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT);
    nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_VERDICT, static_cast<uint32_t>(verdict));
    if (!chain.empty()) nftnl_expr_set_str(e, NFTNL_EXPR_IMM_CHAIN, chain.c_str());
  }
  void counter() { add("counter"); }
  void masq() { add("masq"); }

  // name match: 16 bytes, zero padded (an exact interface name, as nft does).
  void ifname(uint32_t key, const std::string& name) {
    meta(key);
    std::vector<char> data(std::max<size_t>(IFNAMSIZ, name.size() + 1), 0);
    std::memcpy(data.data(), name.data(), name.size());
    cmp(NFT_CMP_EQ, data.data(), data.size());
  }
  void nfproto(int family) {
    const uint8_t v = family == 4 ? NFPROTO_IPV4 : NFPROTO_IPV6;
    meta(NFT_META_NFPROTO);
    cmp(NFT_CMP_EQ, &v, 1);
  }
  // ip/ip6 saddr|daddr PREFIX: byte-aligned prefixes load only the prefix bytes,
  // others load the whole address and mask it (both as nft does).
  void addr(const Cidr& c, bool source) {
    const auto bytes = net_bytes(c);
    uint32_t offset;
    if (c.family == 4)
      offset = source ? 12 : 16;
    else
      offset = source ? 8 : 24;
    const unsigned plen = std::min<unsigned>(c.prefix_len, full_bits(c));
    if (plen == 0) return;
    if (plen % 8 == 0) {
      payload(NFT_PAYLOAD_NETWORK_HEADER, offset, plen / 8);
      cmp(NFT_CMP_EQ, bytes.data(), plen / 8);
      return;
    }
    const auto len = static_cast<uint32_t>(bytes.size());
    std::vector<uint8_t> mask(len, 0), zero(len, 0);
    for (unsigned i = 0; i < plen; ++i) mask[i / 8] |= static_cast<uint8_t>(0x80 >> (i % 8));
    payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len);
    bitwise(mask.data(), zero.data(), len);
    cmp(NFT_CMP_EQ, bytes.data(), len);
  }
  void l4proto(Proto p) {
    const uint8_t v = static_cast<uint8_t>(p);
    meta(NFT_META_L4PROTO);
    cmp(NFT_CMP_EQ, &v, 1);
  }
  void port(const PortRange& r, bool source) {
    if (full_range(r)) return;
    payload(NFT_PAYLOAD_TRANSPORT_HEADER, source ? 0 : 2, 2);
    const uint16_t lo = htons(r.lo), hi = htons(r.hi);
    if (r.lo == r.hi) {
      cmp(NFT_CMP_EQ, &lo, 2);
    } else {
      cmp(NFT_CMP_GTE, &lo, 2);
      cmp(NFT_CMP_LTE, &hi, 2);
    }
  }
  // ct state/status: (reg & bits) != 0
  void ct_bits(uint32_t key, uint32_t bits) {
    ct(key);
    const uint32_t zero = 0;
    bitwise(&bits, &zero, 4);
    cmp(NFT_CMP_NEQ, &zero, 4);
  }
  void set_ttl(int family, uint8_t ttl) {
    if (family == 4) {
      // ip ttl set N: rewrite the 16-bit word (ttl, protocol) so the header
      // checksum at offset 10 can be updated incrementally.
      payload(NFT_PAYLOAD_NETWORK_HEADER, 8, 2);
      const uint8_t mask[2] = {0x00, 0xff}, val[2] = {ttl, 0x00};
      bitwise(mask, val, 2);
      payload_write(NFT_PAYLOAD_NETWORK_HEADER, 8, 2, NFT_PAYLOAD_CSUM_INET, 10);
    } else {
      immediate_data(&ttl, 1);  // ip6 hoplimit set N: no header checksum
      payload_write(NFT_PAYLOAD_NETWORK_HEADER, 7, 1, NFT_PAYLOAD_CSUM_NONE, 0);
    }
  }

 private:
  nftnl_expr* add(const char* name) {
    nftnl_expr* e = nftnl_expr_alloc(name);
    if (!e) throw std::bad_alloc();  // only on OOM; never crosses a C callback
    nftnl_rule_add_expr(r_, e);
    return e;
  }
  nftnl_rule* r_;
};

void set_comment(nftnl_rule* r, const std::string& comment) {
  if (comment.empty()) return;
  UdataPtr ud(nftnl_udata_buf_alloc(NFT_USERDATA_MAXLEN));
  if (!ud) throw std::bad_alloc();
  nftnl_udata_put_strz(ud.get(), NFTNL_UDATA_RULE_COMMENT, clamp_comment(comment).c_str());
  nftnl_rule_set_data(r, NFTNL_RULE_USERDATA, nftnl_udata_buf_data(ud.get()),
                      nftnl_udata_buf_len(ud.get()));
}

RulePtr make_rule(const RuleDesc& d) {
  RulePtr r(nftnl_rule_alloc());
  if (!r) throw std::bad_alloc();
  nftnl_rule_set_u32(r.get(), NFTNL_RULE_FAMILY, NFPROTO_INET);
  nftnl_rule_set_str(r.get(), NFTNL_RULE_TABLE, kTableName);
  nftnl_rule_set_str(r.get(), NFTNL_RULE_CHAIN, d.chain.c_str());
  Exprs x(r.get());
  if (!d.iifname.empty()) x.ifname(NFT_META_IIFNAME, d.iifname);
  if (!d.oifname.empty()) x.ifname(NFT_META_OIFNAME, d.oifname);
  if (const int fam = d.family(); fam != 0) x.nfproto(fam);
  if (d.saddr) x.addr(*d.saddr, true);
  if (d.daddr) x.addr(*d.daddr, false);
  if (d.l4 != Proto::any) {
    x.l4proto(d.l4);
    if (has_ports(d.l4)) {
      if (d.sport) x.port(*d.sport, true);
      if (d.dport) x.port(*d.dport, false);
    }
  }
  if (d.ct_established)
    x.ct_bits(NFT_CT_STATE, NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED));
  if (d.ct_snat) x.ct_bits(NFT_CT_STATUS, IPS_SRC_NAT);
  if (d.counter) x.counter();
  switch (d.verdict) {
    case Verdict::accept: x.verdict(NF_ACCEPT); break;
    case Verdict::drop: x.verdict(NF_DROP); break;
    case Verdict::jump: x.verdict(NFT_JUMP, d.target); break;
    case Verdict::masquerade: x.masq(); break;
    case Verdict::set_ttl: x.set_ttl(d.family() == 6 ? 6 : 4, d.ttl); break;
  }
  set_comment(r.get(), d.comment);
  return r;
}

std::string rule_comment(const nftnl_rule* r) {
  if (!nftnl_rule_is_set(r, NFTNL_RULE_USERDATA)) return {};
  uint32_t len = 0;
  const void* data = nftnl_rule_get_data(r, NFTNL_RULE_USERDATA, &len);
  std::string out;
  auto cb = [](const nftnl_udata* attr, void* arg) -> int {  // called from C: must not throw
    try {
      if (nftnl_udata_type(attr) == NFTNL_UDATA_RULE_COMMENT) {
        const char* s = static_cast<const char*>(nftnl_udata_get(attr));
        *static_cast<std::string*>(arg) = std::string(s, strnlen(s, nftnl_udata_len(attr)));
      }
      return 0;
    } catch (...) {
      return -1;
    }
  };
  nftnl_udata_parse(data, len, cb, &out);
  return out;
}

template <class Obj, class Getter>
std::string udata_comment(const Obj* o, uint16_t attr, uint8_t type, Getter get) {
  uint32_t len = 0;
  const void* data = get(o, attr, &len);
  if (!data) return {};
  struct Ctx {
    uint8_t type;
    std::string out;
  } ctx{type, {}};
  auto cb = [](const nftnl_udata* a, void* arg) -> int {  // called from C: must not throw
    auto* c = static_cast<Ctx*>(arg);
    try {
      if (nftnl_udata_type(a) == c->type) {
        const char* s = static_cast<const char*>(nftnl_udata_get(a));
        c->out = std::string(s, strnlen(s, nftnl_udata_len(a)));
      }
      return 0;
    } catch (...) {
      return -1;
    }
  };
  nftnl_udata_parse(data, len, cb, &ctx);
  return ctx.out;
}

// The expressions of a rule as text; counters without their values so a live rule
// compares equal to a freshly built one.
std::string exprs_text(const nftnl_rule* r) {
  std::string out;
  nftnl_expr_iter* it = nftnl_expr_iter_create(r);
  if (!it) return out;
  for (nftnl_expr* e = nftnl_expr_iter_next(it); e; e = nftnl_expr_iter_next(it)) {
    const char* name = nftnl_expr_get_str(e, NFTNL_EXPR_NAME);
    out += "[ ";
    out += name ? name : "?";
    if (name && std::strcmp(name, "counter") == 0) {
      out += " ]\n";
      continue;
    }
    char buf[1024] = {};
    nftnl_expr_snprintf(buf, sizeof buf, e, NFTNL_OUTPUT_DEFAULT, 0);
    if (buf[0]) {
      out += " ";
      out += buf;
    }
    out += " ]\n";
  }
  nftnl_expr_iter_destroy(it);
  return out;
}

std::string rule_canon(const nftnl_rule* r) {
  return exprs_text(r) + "comment " + quote(rule_comment(r)) + "\n";
}

// ---------------------------------------------------------------------------
// Netlink: sockets, batches, dumps
// ---------------------------------------------------------------------------

uint32_t next_seq() {
  static std::mutex mu;
  static uint32_t seq = static_cast<uint32_t>(time(nullptr));
  std::lock_guard lock(mu);
  seq += 1;
  return seq;
}

Result open_socket(SocketPtr& out, unsigned groups = 0, int flags = 0) {
  SocketPtr s(mnl_socket_open2(NETLINK_NETFILTER, SOCK_CLOEXEC | flags));
  if (!s) return errno_result(errno, "nftables: open netlink socket");
  if (mnl_socket_bind(s.get(), groups, MNL_SOCKET_AUTOPID) < 0)
    return errno_result(errno, "nftables: bind netlink socket");
  out = std::move(s);
  return {};
}

void set_buffer(int fd, int opt_force, int opt, size_t size) {
  int v = static_cast<int>(std::min<size_t>(size, 1u << 30));
  if (setsockopt(fd, SOL_SOCKET, opt_force, &v, sizeof v) < 0)
    setsockopt(fd, SOL_SOCKET, opt, &v, sizeof v);
}

// One transaction: BEGIN, messages, END, sent in one sendto. Only the last message
// asks for an ACK: the kernel processes the batch inside sendto, so when it returns
// the replies are queued: errors for rejected messages (with their sequence number),
// then the ACK when the whole batch committed.
class Batch {
 public:
  Batch() {
    begin_seq_ = next_seq();
    nlmsghdr* nlh = nftnl_batch_begin(reserve(), begin_seq_);
    commit(nlh);
  }

  // Header for the next message; build its payload, then call done().
  nlmsghdr* add(uint16_t type, uint16_t flags, std::string what) {
    const uint32_t seq = next_seq();
    msgs_.push_back({seq, std::move(what)});
    return nftnl_nlmsg_build_hdr(reserve(), type, NFPROTO_INET, flags, seq);
  }
  void done(nlmsghdr* nlh) { commit(nlh); }

  Result send_and_wait() {
    if (msgs_.empty()) return {};
    // Ask for an ACK on the last message only: see above.
    auto* last = reinterpret_cast<nlmsghdr*>(buf_.data() + last_off_);
    last->nlmsg_flags |= NLM_F_ACK;
    const uint32_t end_seq = next_seq();
    commit(nftnl_batch_end(reserve(), end_seq));

    SocketPtr sock;
    if (Result r = open_socket(sock); !r) return r;
    const int fd = mnl_socket_get_fd(sock.get());
    int one = 1;
    setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);  // errors: header only
    set_buffer(fd, SO_SNDBUFFORCE, SO_SNDBUF, len_ + 4096);
    set_buffer(fd, SO_RCVBUFFORCE, SO_RCVBUF, std::max<size_t>(msgs_.size() * 1024, 1 << 20));

    remember_own_portid(mnl_socket_get_portid(sock.get()));
    if (mnl_socket_sendto(sock.get(), buf_.data(), len_) < 0)
      return errno_result(errno, "nftables: send batch (" + std::to_string(len_) + " bytes)");

    const uint32_t portid = mnl_socket_get_portid(sock.get());
    const uint32_t ack_seq = msgs_.back().first;
    bool acked = false;
    std::vector<std::pair<int, uint32_t>> errors;  // (errno, seq)
    std::vector<char> rbuf(1 << 16);
    for (;;) {
      ssize_t n = recv(fd, rbuf.data(), rbuf.size(), MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        if (errno == ENOBUFS) {  // replies lost: the outcome is unknown to us
          errors.push_back({ENOBUFS, 0});
          continue;
        }
        return errno_result(errno, "nftables: receive batch replies");
      }
      int left = static_cast<int>(n);
      for (auto* nlh = reinterpret_cast<nlmsghdr*>(rbuf.data()); mnl_nlmsg_ok(nlh, left);
           nlh = mnl_nlmsg_next(nlh, &left)) {
        if (nlh->nlmsg_pid != portid && nlh->nlmsg_pid != 0) continue;
        if (nlh->nlmsg_type != NLMSG_ERROR) continue;
        if (nlh->nlmsg_len < mnl_nlmsg_size(sizeof(nlmsgerr))) continue;
        const auto* e = static_cast<const nlmsgerr*>(mnl_nlmsg_get_payload(nlh));
        if (e->error == 0) {
          if (e->msg.nlmsg_seq == ack_seq) acked = true;
        } else {
          errors.push_back({-e->error, e->msg.nlmsg_seq});
        }
      }
    }
    if (!errors.empty()) {
      const auto [err, seq] = errors.front();
      std::string what;
      if (seq == 0) {
        what = "replies lost (receive buffer overrun)";
      } else if (seq == begin_seq_ || seq == end_seq) {
        what = "the transaction (commit)";
      } else {
        for (size_t i = 0; i < msgs_.size(); ++i)
          if (msgs_[i].first == seq)
            what = "message " + std::to_string(i + 1) + "/" + std::to_string(msgs_.size()) + " (" +
                   msgs_[i].second + ")";
        if (what.empty()) what = "message seq " + std::to_string(seq);
      }
      std::string msg = "nftables: kernel rejected " + what + ": " + std::strerror(err);
      if (errors.size() > 1) msg += " (+" + std::to_string(errors.size() - 1) + " more errors)";
      return Result{err, msg};
    }
    if (!acked) return Result{EIO, "nftables: no acknowledgement for the batch"};
    return {};
  }

 private:
  char* reserve() {
    constexpr size_t kMaxMsg = 16384;  // far above any message we build
    if (buf_.size() - len_ < kMaxMsg) buf_.resize(std::max(buf_.size() * 2, len_ + kMaxMsg));
    return buf_.data() + len_;
  }
  void commit(nlmsghdr* nlh) {
    last_off_ = len_;
    len_ += NLMSG_ALIGN(nlh->nlmsg_len);
  }

  std::vector<char> buf_;
  size_t len_ = 0;
  size_t last_off_ = 0;
  uint32_t begin_seq_ = 0;
  std::vector<std::pair<uint32_t, std::string>> msgs_;
};

TablePtr make_table(const std::string& comment) {
  TablePtr t(nftnl_table_alloc());
  if (!t) throw std::bad_alloc();
  nftnl_table_set_u32(t.get(), NFTNL_TABLE_FAMILY, NFPROTO_INET);
  nftnl_table_set_str(t.get(), NFTNL_TABLE_NAME, kTableName);
  if (!comment.empty()) {
    UdataPtr ud(nftnl_udata_buf_alloc(NFT_USERDATA_MAXLEN));
    if (!ud) throw std::bad_alloc();
    nftnl_udata_put_strz(ud.get(), NFTNL_UDATA_TABLE_COMMENT, clamp_comment(comment).c_str());
    nftnl_table_set_data(t.get(), NFTNL_TABLE_USERDATA, nftnl_udata_buf_data(ud.get()),
                         nftnl_udata_buf_len(ud.get()));
  }
  return t;
}

void add_table_msg(Batch& b, uint16_t type, uint16_t flags, const std::string& comment,
                   const std::string& what) {
  TablePtr t = make_table(comment);
  nlmsghdr* nlh = b.add(type, flags, what);
  nftnl_table_nlmsg_build_payload(nlh, t.get());
  b.done(nlh);
}

// add table (so the delete cannot fail when absent) + delete table
void add_replace_prefix(Batch& b) {
  add_table_msg(b, NFT_MSG_NEWTABLE, NLM_F_CREATE, {}, "add table inet vmfence");
  add_table_msg(b, NFT_MSG_DELTABLE, 0, {}, "delete table inet vmfence");
}

ChainPtr make_chain(const ChainDesc& c) {
  ChainPtr ch(nftnl_chain_alloc());
  if (!ch) throw std::bad_alloc();
  nftnl_chain_set_u32(ch.get(), NFTNL_CHAIN_FAMILY, NFPROTO_INET);
  nftnl_chain_set_str(ch.get(), NFTNL_CHAIN_TABLE, kTableName);
  nftnl_chain_set_str(ch.get(), NFTNL_CHAIN_NAME, c.name.c_str());
  if (!c.hook.empty()) {
    nftnl_chain_set_u32(ch.get(), NFTNL_CHAIN_HOOKNUM, static_cast<uint32_t>(hook_number(c.hook)));
    nftnl_chain_set_s32(ch.get(), NFTNL_CHAIN_PRIO, c.priority);
    nftnl_chain_set_str(ch.get(), NFTNL_CHAIN_TYPE, c.type.c_str());
    nftnl_chain_set_u32(ch.get(), NFTNL_CHAIN_POLICY, NF_ACCEPT);
  }
  return ch;
}

// Run one dump request; cb is called for every reply message. Retries when the
// dump was interrupted by a concurrent change (NLM_F_DUMP_INTR).
template <class BuildReq, class OnMsg>
Result dump(uint16_t type, const char* what, BuildReq build, OnMsg on_msg) {
  for (int attempt = 0; attempt < 5; ++attempt) {
    SocketPtr sock;
    if (Result r = open_socket(sock); !r) return r;
    std::vector<char> buf(1 << 16);
    const uint32_t seq = next_seq();
    nlmsghdr* nlh = nftnl_nlmsg_build_hdr(buf.data(), type, NFPROTO_INET, NLM_F_DUMP, seq);
    build(nlh);
    if (mnl_socket_sendto(sock.get(), nlh, nlh->nlmsg_len) < 0)
      return errno_result(errno, std::string("nftables: dump ") + what);
    const uint32_t portid = mnl_socket_get_portid(sock.get());
    struct Ctx {
      OnMsg* on_msg;
      bool oom = false;
    } ctx{&on_msg};
    auto cb = [](const nlmsghdr* m, void* data) -> int {  // called from C: must not throw
      auto* c = static_cast<Ctx*>(data);
      try {
        (*c->on_msg)(m);
        return MNL_CB_OK;
      } catch (...) {
        c->oom = true;
        errno = ENOMEM;
        return MNL_CB_ERROR;
      }
    };
    int ret;
    for (;;) {
      const ssize_t n = mnl_socket_recvfrom(sock.get(), buf.data(), buf.size());
      if (n < 0) {
        ret = -1;
        break;
      }
      ret = mnl_cb_run(buf.data(), static_cast<size_t>(n), seq, portid, cb, &ctx);
      if (ret <= MNL_CB_STOP) break;
    }
    if (ret >= 0) return {};
    if (ctx.oom) return Result{ENOMEM, std::string("nftables: dump ") + what + ": out of memory"};
    if (errno == EINTR) continue;  // NLM_F_DUMP_INTR: start over
    return errno_result(errno, std::string("nftables: dump ") + what);
  }
  return Result{EINTR, std::string("nftables: dump ") + what + ": interrupted repeatedly"};
}

struct LiveTable {
  bool found = false;
  uint32_t flags = 0;
  std::string comment;
};

struct LiveChain {
  std::string name, type;
  int hook = -1;
  int prio = 0;
  uint32_t policy = NF_ACCEPT;
};

Result read_table(LiveTable& out) {
  return dump(
      NFT_MSG_GETTABLE, "tables", [](nlmsghdr*) {},
      [&](const nlmsghdr* m) {
        TablePtr t(nftnl_table_alloc());
        if (!t || nftnl_table_nlmsg_parse(m, t.get()) < 0) return;
        const char* name = nftnl_table_get_str(t.get(), NFTNL_TABLE_NAME);
        if (!name || std::strcmp(name, kTableName) != 0) return;
        if (nftnl_table_get_u32(t.get(), NFTNL_TABLE_FAMILY) != NFPROTO_INET) return;
        out.found = true;
        out.flags = nftnl_table_get_u32(t.get(), NFTNL_TABLE_FLAGS);
        out.comment = udata_comment(t.get(), NFTNL_TABLE_USERDATA, NFTNL_UDATA_TABLE_COMMENT,
                                    [](const nftnl_table* o, uint16_t a, uint32_t* len) {
                                      return nftnl_table_is_set(o, a) ? nftnl_table_get_data(o, a, len)
                                                                      : nullptr;
                                    });
      });
}

Result read_chains(std::vector<LiveChain>& out) {
  return dump(
      NFT_MSG_GETCHAIN, "chains",
      [](nlmsghdr* nlh) {
        ChainPtr c(nftnl_chain_alloc());
        nftnl_chain_set_str(c.get(), NFTNL_CHAIN_TABLE, kTableName);
        nftnl_chain_nlmsg_build_payload(nlh, c.get());
      },
      [&](const nlmsghdr* m) {
        ChainPtr c(nftnl_chain_alloc());
        if (!c || nftnl_chain_nlmsg_parse(m, c.get()) < 0) return;
        const char* table = nftnl_chain_get_str(c.get(), NFTNL_CHAIN_TABLE);
        if (!table || std::strcmp(table, kTableName) != 0) return;
        if (nftnl_chain_get_u32(c.get(), NFTNL_CHAIN_FAMILY) != NFPROTO_INET) return;
        LiveChain lc;
        lc.name = nftnl_chain_get_str(c.get(), NFTNL_CHAIN_NAME);
        if (nftnl_chain_is_set(c.get(), NFTNL_CHAIN_HOOKNUM)) {
          lc.hook = static_cast<int>(nftnl_chain_get_u32(c.get(), NFTNL_CHAIN_HOOKNUM));
          lc.prio = nftnl_chain_get_s32(c.get(), NFTNL_CHAIN_PRIO);
          if (const char* ty = nftnl_chain_get_str(c.get(), NFTNL_CHAIN_TYPE)) lc.type = ty;
          lc.policy = nftnl_chain_get_u32(c.get(), NFTNL_CHAIN_POLICY);
        }
        out.push_back(std::move(lc));
      });
}

// chain name -> canonical text of its rules, in order
Result read_rules(std::map<std::string, std::vector<std::string>>& out) {
  return dump(
      NFT_MSG_GETRULE, "rules",
      [](nlmsghdr* nlh) {
        RulePtr r(nftnl_rule_alloc());
        nftnl_rule_set_str(r.get(), NFTNL_RULE_TABLE, kTableName);
        nftnl_rule_nlmsg_build_payload(nlh, r.get());
      },
      [&](const nlmsghdr* m) {
        RulePtr r(nftnl_rule_alloc());
        if (!r || nftnl_rule_nlmsg_parse(m, r.get()) < 0) return;
        const char* table = nftnl_rule_get_str(r.get(), NFTNL_RULE_TABLE);
        if (!table || std::strcmp(table, kTableName) != 0) return;
        if (nftnl_rule_get_u32(r.get(), NFTNL_RULE_FAMILY) != NFPROTO_INET) return;
        out[nftnl_rule_get_str(r.get(), NFTNL_RULE_CHAIN)].push_back(rule_canon(r.get()));
      });
}

std::mutex g_mu;
std::optional<Ruleset> g_applied;
// Netlink port ids of our own batches: the Monitor skips the notifications
// they cause instead of dumping (at 10,000 VMs, 30,000 rules) the table again.
std::deque<uint32_t> g_own_portids;

void remember_own_portid(uint32_t portid) {
  std::lock_guard lock(g_mu);
  g_own_portids.push_back(portid);
  if (g_own_portids.size() > 16) g_own_portids.pop_front();
}

bool is_own_portid(uint32_t portid) {
  std::lock_guard lock(g_mu);
  return std::find(g_own_portids.begin(), g_own_portids.end(), portid) != g_own_portids.end();
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
    case Verdict::accept: parts.push_back("accept"); break;
    case Verdict::drop: parts.push_back("drop"); break;
    case Verdict::jump: parts.push_back("jump " + target); break;
    case Verdict::masquerade: parts.push_back("masquerade"); break;
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
  return "type " + type + " hook " + hook + " priority " + std::to_string(priority) +
         "; policy accept;";
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
    for (const auto& vm : spec.vms) {
      if (!vm.imds) continue;
      for (const auto& a : vm.addresses) {
        if (a.family != imds->address.family) continue;
        RuleDesc r;
        r.chain = kChainImds;
        r.saddr = a;
        r.l4 = Proto::tcp;
        r.dport = imds_port;
        r.verdict = Verdict::accept;
        r.comment = vm.name + ": IMDS";
        add(std::move(r));
      }
    }
    for (const auto& vm : spec.vms) {
      for (const auto& a : vm.addresses) {
        if (a.family != imds->address.family) continue;
        RuleDesc r;
        r.chain = kChainImds;
        r.saddr = a;
        r.counter = true;
        r.verdict = Verdict::drop;
        r.comment = vm.name + (vm.imds ? ": IMDS, other ports" : ": no IMDS");
        add(std::move(r));
      }
    }
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
    for (const auto& vm : spec.vms) {
      if (!vm.imds) continue;
      for (const auto& a : vm.addresses) {
        if (a.family != imds->address.family) continue;
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
      }
    }
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

std::string rule_exprs(const RuleDesc& rule) {
  RulePtr r = make_rule(rule);
  std::string out;
  nftnl_expr_iter* it = nftnl_expr_iter_create(r.get());
  for (nftnl_expr* e = nftnl_expr_iter_next(it); e; e = nftnl_expr_iter_next(it)) {
    char buf[1024] = {};
    nftnl_expr_snprintf(buf, sizeof buf, e, NFTNL_OUTPUT_DEFAULT, 0);
    std::string body = buf;
    while (!body.empty() && body.back() == ' ') body.pop_back();
    const char* name = nftnl_expr_get_str(e, NFTNL_EXPR_NAME);
    out += std::string("[ ") + (name ? name : "?") + (body.empty() ? "" : " ") + body + " ]\n";
  }
  nftnl_expr_iter_destroy(it);
  return out;
}

// ---------------------------------------------------------------------------
// apply / remove / verify
// ---------------------------------------------------------------------------

Result apply(const Spec& spec) { return apply(build_ruleset(spec)); }

Result apply(const Ruleset& rs) {
  Batch b;
  try {
    add_replace_prefix(b);
    add_table_msg(b, NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL, table_comment(rs),
                  "add table inet vmfence");
    for (const auto& c : rs.chains) {
      ChainPtr ch = make_chain(c);
      nlmsghdr* nlh = b.add(NFT_MSG_NEWCHAIN, NLM_F_CREATE | NLM_F_EXCL,
                            "add chain inet vmfence " + c.name);
      nftnl_chain_nlmsg_build_payload(nlh, ch.get());
      b.done(nlh);
    }
    for (const auto& r : rs.rules) {
      RulePtr rule = make_rule(r);
      nlmsghdr* nlh = b.add(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND,
                            "add rule inet vmfence " + r.chain + " " + r.text());
      nftnl_rule_nlmsg_build_payload(nlh, rule.get());
      b.done(nlh);
    }
  } catch (const std::bad_alloc&) {
    return Result{ENOMEM, "nftables: out of memory building the batch"};
  }
  Result res = b.send_and_wait();
  if (!res) return res;  // the caller logs it; the kernel kept the previous table
  {
    std::lock_guard lock(g_mu);
    g_applied = rs;
  }
  spdlog::info("nftables: table inet vmfence applied ({} chains, {} rules, ruleset {})",
               rs.chains.size(), rs.rules.size(), hex64(rs.fingerprint()));
  return res;
}

Result remove() {
  Batch b;
  try {
    add_replace_prefix(b);
  } catch (const std::bad_alloc&) {
    return Result{ENOMEM, "nftables: out of memory building the batch"};
  }
  Result res = b.send_and_wait();
  if (res) {
    std::lock_guard lock(g_mu);
    g_applied.reset();
  }
  return res;
}

Result verify(const Ruleset& rs) {
  LiveTable table;
  if (Result r = read_table(table); !r) return r;
  if (!table.found) return Result{ENOENT, "table inet vmfence is missing"};
  if (table.flags != 0)
    return Result{EPROTO, "table inet vmfence has flags " + std::to_string(table.flags) + " (dormant?)"};
  if (table.comment != table_comment(rs))
    return Result{EPROTO, "table inet vmfence comment is \"" + table.comment + "\", expected \"" +
                              table_comment(rs) + "\""};

  std::vector<LiveChain> chains;
  if (Result r = read_chains(chains); !r) return r;
  if (chains.size() != rs.chains.size())
    return Result{EPROTO, "table inet vmfence has " + std::to_string(chains.size()) + " chains, expected " +
                              std::to_string(rs.chains.size())};
  for (const auto& want : rs.chains) {
    auto it = std::find_if(chains.begin(), chains.end(), [&](const LiveChain& c) { return c.name == want.name; });
    if (it == chains.end()) return Result{EPROTO, "chain " + want.name + " is missing"};
    const int hook = want.hook.empty() ? -1 : hook_number(want.hook);
    if (it->hook != hook || (hook >= 0 && (it->prio != want.priority || it->type != want.type ||
                                           it->policy != NF_ACCEPT)))
      return Result{EPROTO, "chain " + want.name + " has a different type, hook, priority or policy"};
  }

  std::map<std::string, std::vector<std::string>> live;
  if (Result r = read_rules(live); !r) return r;
  for (const auto& c : rs.chains) {
    const auto want = rs.in_chain(c.name);
    const auto& got = live[c.name];
    if (got.size() != want.size())
      return Result{EPROTO, "chain " + c.name + " has " + std::to_string(got.size()) + " rules, expected " +
                                std::to_string(want.size())};
    for (size_t i = 0; i < want.size(); ++i) {
      RulePtr r = make_rule(*want[i]);
      if (rule_canon(r.get()) != got[i])
        return Result{EPROTO, "chain " + c.name + " rule " + std::to_string(i + 1) + " differs from `" +
                                  want[i]->text() + "`"};
    }
  }
  return {};
}

bool table_intact() {
  std::optional<Ruleset> rs;
  {
    std::lock_guard lock(g_mu);
    rs = g_applied;
  }
  return rs && static_cast<bool>(verify(*rs));
}

// ---------------------------------------------------------------------------
// Monitor
// ---------------------------------------------------------------------------

Monitor::~Monitor() { close(); }

Monitor::Monitor(Monitor&& other) noexcept : sock_(std::exchange(other.sock_, nullptr)) {}

Monitor& Monitor::operator=(Monitor&& other) noexcept {
  if (this != &other) {
    close();
    sock_ = std::exchange(other.sock_, nullptr);
  }
  return *this;
}

Result Monitor::open() {
  close();
  SocketPtr s;
  if (Result r = open_socket(s, 1u << (NFNLGRP_NFTABLES - 1), SOCK_NONBLOCK); !r) return r;
  set_buffer(mnl_socket_get_fd(s.get()), SO_RCVBUFFORCE, SO_RCVBUF, 4u << 20);
  sock_ = s.release();
  return {};
}

void Monitor::close() {
  if (sock_) mnl_socket_close(sock_);
  sock_ = nullptr;
}

int Monitor::fd() const { return sock_ ? mnl_socket_get_fd(sock_) : -1; }

bool Monitor::drain() {
  if (!sock_) return false;
  bool relevant = false;
  std::vector<char> buf(1 << 16);
  const int fd = mnl_socket_get_fd(sock_);
  for (;;) {
    ssize_t n = recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOBUFS) {  // events lost: check the table
        relevant = true;
        continue;
      }
      break;  // EAGAIN (drained) or a real error
    }
    if (n == 0) break;
    int left = static_cast<int>(n);
    for (auto* nlh = reinterpret_cast<nlmsghdr*>(buf.data()); mnl_nlmsg_ok(nlh, left);
         nlh = mnl_nlmsg_next(nlh, &left)) {
      if (NFNL_SUBSYS_ID(nlh->nlmsg_type) != NFNL_SUBSYS_NFTABLES) continue;
      const int msg = NFNL_MSG_TYPE(nlh->nlmsg_type);
      if (msg == NFT_MSG_NEWGEN) continue;
      if (nlh->nlmsg_pid != 0 && is_own_portid(nlh->nlmsg_pid)) continue;  // our own apply
      if (nlh->nlmsg_len < mnl_nlmsg_size(sizeof(nfgenmsg))) continue;
      const auto* g = static_cast<const nfgenmsg*>(mnl_nlmsg_get_payload(nlh));
      if (g->nfgen_family != NFPROTO_INET) continue;
      // Attribute 1 is the table name in every nf_tables object message
      // (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, ...).
      struct Ctx {
        bool ours = false;
      } ctx;
      auto cb = [](const nlattr* a, void* data) -> int {
        if (mnl_attr_get_type(a) == 1 && mnl_attr_validate(a, MNL_TYPE_NUL_STRING) == 0 &&
            std::strcmp(mnl_attr_get_str(a), kTableName) == 0)
          static_cast<Ctx*>(data)->ours = true;
        return MNL_CB_OK;
      };
      mnl_attr_parse(nlh, sizeof(nfgenmsg), cb, &ctx);
      relevant = relevant || ctx.ours;
    }
  }
  return relevant;
}

namespace {

// Verify the live table against rs; re-apply when missing or different.
bool restore(const Ruleset& rs) {
  Result v = verify(rs);
  if (v) return false;
  if (v.err != ENOENT && v.err != EPROTO) {
    spdlog::warn("nftables: cannot check table inet vmfence: {}", v.message);
    return false;
  }
  spdlog::warn("nftables: {}; restoring table inet vmfence", v.message);
  if (Result a = apply(rs); !a) {
    spdlog::error("nftables: restoring table inet vmfence failed: {}", a.message);
    return false;
  }
  spdlog::warn("nftables: table inet vmfence restored");
  return true;
}

}  // namespace

bool Monitor::handle_readable(const Spec& spec) {
  if (!drain()) return false;
  return restore(build_ruleset(spec));
}

bool Monitor::handle_readable(const Ruleset& rs) {
  if (!drain()) return false;
  return restore(rs);
}

}  // namespace vmfence::nft
