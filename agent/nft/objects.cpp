// libnftnl objects for table inet vmfence: the table, its chains, its rules with the
// expressions `nft` would generate for the same text, and the canonical text of a rule
// that verify() compares. No netlink here (netlink.cpp sends and dumps them).
#include <arpa/inet.h>
#include <libnftnl/chain.h>
#include <libnftnl/expr.h>
#include <libnftnl/rule.h>
#include <libnftnl/set.h>
#include <libnftnl/table.h>
#include <libnftnl/udata.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_conntrack_common.h>
#include <linux/netfilter/nf_tables.h>
#include <net/if.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "agent/nft/internal.h"
#include "agent/nft/netlink.h"

namespace vmfence::nft {

namespace internal {

void RuleFree::operator()(nftnl_rule* r) const { nftnl_rule_free(r); }
void ChainFree::operator()(nftnl_chain* c) const { nftnl_chain_free(c); }
void TableFree::operator()(nftnl_table* t) const { nftnl_table_free(t); }
void SetFree::operator()(nftnl_set* s) const { nftnl_set_free(s); }

// libnftnl setters return < 0 when they cannot allocate (errno ENOMEM) or do not know
// the attribute or refuse its length (a bug here: EINVAL).
void check(int ret, const char* what) {
  if (ret >= 0) return;
  const int e = errno == ENOMEM ? ENOMEM : EINVAL;
  throw BuildError(e, std::string("nftables: ") + what + ": " + std::strerror(e));
}
// nftnl_udata_put*: false when the attribute does not fit the buffer.
void check(bool ok, const char* what) {
  if (!ok) throw BuildError(EMSGSIZE, std::string("nftables: ") + what + ": " + std::strerror(EMSGSIZE));
}

RulePtr alloc_rule() {
  RulePtr r(nftnl_rule_alloc());
  if (!r) throw std::bad_alloc();
  return r;
}
ChainPtr alloc_chain() {
  ChainPtr c(nftnl_chain_alloc());
  if (!c) throw std::bad_alloc();
  return c;
}
SetPtr alloc_set() {
  SetPtr s(nftnl_set_alloc());
  if (!s) throw std::bad_alloc();
  return s;
}
TablePtr alloc_table() {
  TablePtr t(nftnl_table_alloc());
  if (!t) throw std::bad_alloc();
  return t;
}

std::string table_comment(const Ruleset& rs) { return table_comment(rs.fingerprint()); }
std::string table_comment(uint64_t fingerprint) { return "managed by vmfence, ruleset " + hex64(fingerprint); }

int hook_number(const std::string& hook) {
  if (hook == "prerouting") return NF_INET_PRE_ROUTING;
  if (hook == "input") return NF_INET_LOCAL_IN;
  if (hook == "forward") return NF_INET_FORWARD;
  if (hook == "output") return NF_INET_LOCAL_OUT;
  if (hook == "postrouting") return NF_INET_POST_ROUTING;
  return -1;
}

}  // namespace internal

namespace {

using internal::BuildError;
using internal::check;
using internal::clamp_comment;
using internal::full_bits;
using internal::full_range;
using internal::has_ports;
using internal::net_bytes;

struct UdataFree {
  void operator()(nftnl_udata_buf* b) const { nftnl_udata_buf_free(b); }
};
struct ExprIterFree {
  void operator()(nftnl_expr_iter* it) const { nftnl_expr_iter_destroy(it); }
};
using UdataPtr = std::unique_ptr<nftnl_udata_buf, UdataFree>;
using ExprIterPtr = std::unique_ptr<nftnl_expr_iter, ExprIterFree>;

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
    set_data(e, NFTNL_EXPR_CMP_DATA, data, len, "cmp data");
  }
  void payload(uint32_t base, uint32_t offset, uint32_t len) {
    auto* e = add("payload");
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_DREG, NFT_REG_1);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_BASE, base);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_OFFSET, offset);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_LEN, len);
  }
  void payload_write(uint32_t base, uint32_t offset, uint32_t len, uint32_t csum_type, uint32_t csum_offset) {
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
    set_data(e, NFTNL_EXPR_BITWISE_MASK, mask, len, "bitwise mask");
    set_data(e, NFTNL_EXPR_BITWISE_XOR, xor_, len, "bitwise xor");
  }
  void ct(uint32_t key) {
    auto* e = add("ct");
    nftnl_expr_set_u32(e, NFTNL_EXPR_CT_KEY, key);
    nftnl_expr_set_u32(e, NFTNL_EXPR_CT_DREG, NFT_REG_1);
  }
  void immediate_data(const void* data, uint32_t len) {
    auto* e = add("immediate");
    nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_DREG, NFT_REG_1);
    set_data(e, NFTNL_EXPR_IMM_DATA, data, len, "immediate data");
  }
  void verdict(int verdict, const std::string& chain = {}) {
    auto* e = add("immediate");
    nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT);
    nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_VERDICT, static_cast<uint32_t>(verdict));
    if (!chain.empty()) check(nftnl_expr_set_str(e, NFTNL_EXPR_IMM_CHAIN, chain.c_str()), "immediate: jump target");
  }
  // Loads into a given register (set lookups: a concatenated key spans several).
  void payload_to(uint32_t base, uint32_t offset, uint32_t len, uint32_t reg) {
    auto* e = add("payload");
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_DREG, reg);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_BASE, base);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_OFFSET, offset);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_LEN, len);
  }
  void meta_to(uint32_t key, uint32_t reg) {
    auto* e = add("meta");
    nftnl_expr_set_u32(e, NFTNL_EXPR_META_KEY, key);
    nftnl_expr_set_u32(e, NFTNL_EXPR_META_DREG, reg);
  }
  void lookup(const std::string& set, uint32_t sreg) {
    auto* e = add("lookup");
    nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_SREG, sreg);
    nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_FLAGS, 0);  // the kernel dumps it: verify compares it
    check(nftnl_expr_set_str(e, NFTNL_EXPR_LOOKUP_SET, set.c_str()), "lookup: set name");
  }
  // `key @set`: each field loaded into the next 4-byte registers (as nft does: a
  // 16-byte-aligned one is named NFT_REG_1..4, others NFT_REG32_xx), then the lookup.
  void set_lookup(const std::string& set, const std::vector<KeyField>& key, int family) {
    uint32_t word = 0;
    for (KeyField f : key) {
      const uint32_t reg = word % 4 == 0 ? NFT_REG_1 + word / 4 : NFT_REG32_00 + word;
      switch (f) {
        case KeyField::saddr:
        case KeyField::daddr: {
          const bool src = f == KeyField::saddr;
          const uint32_t off = family == 4 ? (src ? 12 : 16) : (src ? 8 : 24);
          const uint32_t len = family == 4 ? 4 : 16;
          payload_to(NFT_PAYLOAD_NETWORK_HEADER, off, len, reg);
          word += len / 4;
          break;
        }
        case KeyField::l4proto:
          meta_to(NFT_META_L4PROTO, reg);
          word += 1;
          break;
        case KeyField::dport:
          payload_to(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg);
          word += 1;
          break;
      }
    }
    lookup(set, NFT_REG_1);
  }
  void counter() { add("counter"); }
  void masq() { add("masq"); }

  // name match: 16 bytes, zero padded (an exact interface name, as nft does).
  void ifname(uint32_t key, const std::string& name) {
    meta(key);
    std::vector<char> data(std::max<size_t>(IFNAMSIZ, name.size() + 1), 0);
    std::memcpy(data.data(), name.data(), name.size());
    cmp(NFT_CMP_EQ, data.data(), static_cast<uint32_t>(data.size()));
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
  // The expression is the rule's from here on (freed with it).
  nftnl_expr* add(const char* name) {
    nftnl_expr* e = nftnl_expr_alloc(name);
    if (!e) throw std::bad_alloc();  // only on OOM (every name here is built in); never crosses a C callback
    nftnl_rule_add_expr(r_, e);
    return e;
  }
  // nftnl_expr_set_u32 returns nothing (it cannot fail for a fixed-size value);
  // nftnl_expr_set copies `len` bytes and fails for an unknown attribute.
  static void set_data(nftnl_expr* e, uint16_t attr, const void* data, uint32_t len, const char* what) {
    if (len > NFT_DATA_VALUE_MAXLEN)  // libnftnl 1.2.4 copies without checking
      throw BuildError(EINVAL, std::string("nftables: ") + what + ": " + std::to_string(len) + " bytes");
    check(nftnl_expr_set(e, attr, data, len), what);
  }
  nftnl_rule* r_;
};

// A rule or table comment as userdata (NFTNL_UDATA_*_COMMENT, what `nft` writes).
UdataPtr comment_udata(uint8_t type, const std::string& comment) {
  UdataPtr ud(nftnl_udata_buf_alloc(NFT_USERDATA_MAXLEN));
  if (!ud) throw std::bad_alloc();
  check(nftnl_udata_put_strz(ud.get(), type, clamp_comment(comment).c_str()), "comment");
  return ud;
}

void set_comment(nftnl_rule* r, const std::string& comment) {
  if (comment.empty()) return;
  UdataPtr ud = comment_udata(NFTNL_UDATA_RULE_COMMENT, comment);
  check(nftnl_rule_set_data(r, NFTNL_RULE_USERDATA, nftnl_udata_buf_data(ud.get()), nftnl_udata_buf_len(ud.get())),
        "rule comment");
}

// The string of the userdata attribute `type` (a comment), "" when absent. Throws
// std::bad_alloc (the callback's only failure); safe to call from a dump callback,
// which catches it.
std::string udata_comment(const void* data, uint32_t len, uint8_t type) {
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
  if (nftnl_udata_parse(data, len, cb, &ctx) < 0) throw std::bad_alloc();
  return ctx.out;
}

std::string rule_comment(const nftnl_rule* r) {
  if (!nftnl_rule_is_set(r, NFTNL_RULE_USERDATA)) return {};
  uint32_t len = 0;
  const void* data = nftnl_rule_get_data(r, NFTNL_RULE_USERDATA, &len);
  return udata_comment(data, len, NFTNL_UDATA_RULE_COMMENT);
}

// One expression as nftnl_expr_snprintf prints it (without the name).
std::string expr_text(const nftnl_expr* e) {
  char buf[1024] = {};
  const int n = nftnl_expr_snprintf(buf, sizeof buf, e, NFTNL_OUTPUT_DEFAULT, 0);
  if (n < 0) throw BuildError(EINVAL, "nftables: cannot print an expression");
  if (static_cast<size_t>(n) < sizeof buf) return buf;
  std::string big(static_cast<size_t>(n) + 1, '\0');  // truncated: print it again, whole
  if (nftnl_expr_snprintf(big.data(), big.size(), e, NFTNL_OUTPUT_DEFAULT, 0) < 0)
    throw BuildError(EINVAL, "nftables: cannot print an expression");
  big.resize(std::strlen(big.c_str()));
  return big;
}

ExprIterPtr expr_iter(const nftnl_rule* r) {
  ExprIterPtr it(nftnl_expr_iter_create(r));
  if (!it) throw std::bad_alloc();
  return it;
}

// The expressions of a rule as text; counters without their values so a live rule
// compares equal to a freshly built one.
std::string exprs_text(const nftnl_rule* r) {
  std::string out;
  ExprIterPtr it = expr_iter(r);
  for (nftnl_expr* e = nftnl_expr_iter_next(it.get()); e; e = nftnl_expr_iter_next(it.get())) {
    const char* name = nftnl_expr_get_str(e, NFTNL_EXPR_NAME);
    out += "[ ";
    out += name ? name : "?";
    if (name && std::strcmp(name, "counter") == 0) {
      out += " ]\n";
      continue;
    }
    const std::string body = expr_text(e);
    if (!body.empty()) {
      out += " ";
      out += body;
    }
    out += " ]\n";
  }
  return out;
}

}  // namespace

namespace internal {

RulePtr make_rule(const RuleDesc& d) {
  RulePtr r = alloc_rule();
  nftnl_rule_set_u32(r.get(), NFTNL_RULE_FAMILY, NFPROTO_INET);
  check(nftnl_rule_set_str(r.get(), NFTNL_RULE_TABLE, kTableName), "rule table");
  check(nftnl_rule_set_str(r.get(), NFTNL_RULE_CHAIN, d.chain.c_str()), "rule chain");
  Exprs x(r.get());
  if (!d.iifname.empty()) x.ifname(NFT_META_IIFNAME, d.iifname);
  if (!d.oifname.empty()) x.ifname(NFT_META_OIFNAME, d.oifname);
  if (const int fam = d.family(); fam != 0) x.nfproto(fam);
  if (!d.set.empty()) x.set_lookup(d.set, d.set_key, d.family());
  if (d.saddr) x.addr(*d.saddr, true);
  if (d.daddr) x.addr(*d.daddr, false);
  if (d.l4 != Proto::any) {
    x.l4proto(d.l4);
    if (has_ports(d.l4)) {
      if (d.sport) x.port(*d.sport, true);
      if (d.dport) x.port(*d.dport, false);
    }
  }
  if (d.ct_established) x.ct_bits(NFT_CT_STATE, NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED));
  if (d.ct_snat) x.ct_bits(NFT_CT_STATUS, IPS_SRC_NAT);
  if (d.counter) x.counter();
  switch (d.verdict) {
    case Verdict::accept:
      x.verdict(NF_ACCEPT);
      break;
    case Verdict::drop:
      x.verdict(NF_DROP);
      break;
    case Verdict::jump:
      x.verdict(NFT_JUMP, d.target);
      break;
    case Verdict::masquerade:
      x.masq();
      break;
    case Verdict::set_ttl:
      x.set_ttl(d.family() == 6 ? 6 : 4, d.ttl);
      break;
  }
  set_comment(r.get(), d.comment);
  return r;
}

ChainPtr make_chain(const ChainDesc& c) {
  ChainPtr ch = alloc_chain();
  nftnl_chain_set_u32(ch.get(), NFTNL_CHAIN_FAMILY, NFPROTO_INET);
  check(nftnl_chain_set_str(ch.get(), NFTNL_CHAIN_TABLE, kTableName), "chain table");
  check(nftnl_chain_set_str(ch.get(), NFTNL_CHAIN_NAME, c.name.c_str()), "chain name");
  if (!c.hook.empty()) {
    const int hook = hook_number(c.hook);
    if (hook < 0) throw BuildError(EINVAL, "nftables: chain " + c.name + ": unknown hook " + c.hook);
    nftnl_chain_set_u32(ch.get(), NFTNL_CHAIN_HOOKNUM, static_cast<uint32_t>(hook));
    nftnl_chain_set_s32(ch.get(), NFTNL_CHAIN_PRIO, c.priority);
    check(nftnl_chain_set_str(ch.get(), NFTNL_CHAIN_TYPE, c.type.c_str()), "chain type");
    nftnl_chain_set_u32(ch.get(), NFTNL_CHAIN_POLICY, NF_ACCEPT);
  }
  return ch;
}

TablePtr make_table(const std::string& comment) {
  TablePtr t = alloc_table();
  nftnl_table_set_u32(t.get(), NFTNL_TABLE_FAMILY, NFPROTO_INET);
  check(nftnl_table_set_str(t.get(), NFTNL_TABLE_NAME, kTableName), "table name");
  if (!comment.empty()) {
    UdataPtr ud = comment_udata(NFTNL_UDATA_TABLE_COMMENT, comment);
    check(nftnl_table_set_data(t.get(), NFTNL_TABLE_USERDATA, nftnl_udata_buf_data(ud.get()),
                               nftnl_udata_buf_len(ud.get())),
          "table comment");
  }
  return t;
}

namespace {

// nft's datatype numbers (for `nft list`; the kernel does not look at them) and the
// concatenation of several: (type << 6) | next.
constexpr uint32_t kTypeBits = 6;
uint32_t field_type(KeyField f, int family) {
  switch (f) {
    case KeyField::saddr:
    case KeyField::daddr:
      return family == 6 ? 8 : 7;  // ipv6_addr, ipv4_addr
    case KeyField::l4proto:
      return 12;  // inet_proto
    case KeyField::dport:
      return 13;  // inet_service
  }
  return 0;
}
uint8_t field_bytes(KeyField f, int family) {
  if (f == KeyField::l4proto) return 1;
  if (f == KeyField::dport) return 2;
  return family == 6 ? 16 : 4;
}
// A hash unless an element is a range; a concatenation of ranges needs the
// concatenation flag (the kernel's pipapo set).
bool concat_ranges(const SetDesc& s) { return s.interval && s.fields.size() > 1; }
uint32_t set_flags(const SetDesc& s) {
  return (s.interval ? NFT_SET_INTERVAL : 0) | (concat_ranges(s) ? NFT_SET_CONCAT : 0);
}

void set_header(nftnl_set* set, const SetDesc& s) {
  nftnl_set_set_u32(set, NFTNL_SET_FAMILY, NFPROTO_INET);
  check(nftnl_set_set_str(set, NFTNL_SET_TABLE, kTableName), "set table");
  check(nftnl_set_set_str(set, NFTNL_SET_NAME, s.name.c_str()), "set name");
}

// hi + 1 over the whole key (big endian); false when hi is all ones.
bool next_key(std::vector<uint8_t>& key) {
  for (size_t i = key.size(); i-- > 0;)
    if (++key[i] != 0) return true;
  return false;
}

nftnl_set_elem* add_elem(nftnl_set* set) {
  nftnl_set_elem* e = nftnl_set_elem_alloc();
  if (!e) throw std::bad_alloc();
  nftnl_set_elem_add(set, e);  // the set's from here on
  return e;
}

void set_elem_key(nftnl_set_elem* e, uint16_t attr, const std::vector<uint8_t>& key, const char* what) {
  if (key.empty() || key.size() > NFT_DATA_VALUE_MAXLEN)
    throw BuildError(EINVAL, std::string("nftables: ") + what + ": " + std::to_string(key.size()) + " bytes");
  check(nftnl_set_elem_set(e, attr, key.data(), static_cast<uint32_t>(key.size())), what);
}

std::string hex(const void* data, uint32_t len) {
  static const char* d = "0123456789abcdef";
  const auto* p = static_cast<const uint8_t*>(data);
  std::string out;
  for (uint32_t i = 0; i < len; ++i) {
    out += d[p[i] >> 4];
    out += d[p[i] & 15];
  }
  return out;
}

}  // namespace

SetPtr make_set(const SetDesc& s) {
  static uint32_t next_id = 1;
  SetPtr set = alloc_set();
  set_header(set.get(), s);
  nftnl_set_set_u32(set.get(), NFTNL_SET_FLAGS, set_flags(s));
  uint32_t type = 0;
  std::vector<uint8_t> lens;
  for (KeyField f : s.fields) {
    type = type << kTypeBits | field_type(f, s.family);
    lens.push_back(field_bytes(f, s.family));
  }
  nftnl_set_set_u32(set.get(), NFTNL_SET_KEY_TYPE, type);
  nftnl_set_set_u32(set.get(), NFTNL_SET_KEY_LEN, s.key_len());
  nftnl_set_set_u32(set.get(), NFTNL_SET_ID, next_id++);
  if (concat_ranges(s))
    check(nftnl_set_set_data(set.get(), NFTNL_SET_DESC_CONCAT, lens.data(), static_cast<uint32_t>(lens.size())),
          "set concatenation");
  if (s.counter) {
    nftnl_expr* e = nftnl_expr_alloc("counter");
    if (!e) throw std::bad_alloc();
    nftnl_set_add_expr(set.get(), e);  // the set's from here on
  }
  return set;
}

SetPtr make_set_elems(const SetDesc& s, size_t first, size_t count) {
  SetPtr set = alloc_set();
  set_header(set.get(), s);
  const bool concat = concat_ranges(s);
  for (size_t i = first; i < std::min(s.elems.size(), first + count); ++i) {
    const SetElemDesc& d = s.elems[i];
    nftnl_set_elem* e = add_elem(set.get());
    set_elem_key(e, NFTNL_SET_ELEM_KEY, d.lo, "set element key");
    if (concat) set_elem_key(e, NFTNL_SET_ELEM_KEY_END, d.hi, "set element key end");
    if (!d.comment.empty()) {
      UdataPtr ud = comment_udata(NFTNL_UDATA_SET_ELEM_COMMENT, d.comment);
      check(
          nftnl_set_elem_set(e, NFTNL_SET_ELEM_USERDATA, nftnl_udata_buf_data(ud.get()), nftnl_udata_buf_len(ud.get())),
          "set element comment");
    }
    // One field: the kernel's interval set takes a range as its start and, unless it
    // runs to the end of the key space, an end element at hi + 1.
    std::vector<uint8_t> end = d.hi;
    if (s.interval && !concat && next_key(end)) {
      nftnl_set_elem* ee = add_elem(set.get());
      set_elem_key(ee, NFTNL_SET_ELEM_KEY, end, "set element end");
      nftnl_set_elem_set_u32(ee, NFTNL_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
    }
  }
  return set;
}

std::string set_canon(const nftnl_set* s) {
  std::string out = "set ";
  const char* name = nftnl_set_get_str(s, NFTNL_SET_NAME);
  out += name ? name : "?";
  out += " flags " + std::to_string(nftnl_set_get_u32(s, NFTNL_SET_FLAGS));
  out += " type " + std::to_string(nftnl_set_get_u32(s, NFTNL_SET_KEY_TYPE));
  out += " len " + std::to_string(nftnl_set_get_u32(s, NFTNL_SET_KEY_LEN));
  bool counter = false;
  nftnl_set_expr_foreach(
      s,
      [](nftnl_expr* e, void* data) -> int {
        const char* n = nftnl_expr_get_str(e, NFTNL_EXPR_NAME);
        if (n && std::strcmp(n, "counter") == 0) *static_cast<bool*>(data) = true;
        return 0;
      },
      &counter);
  if (counter) out += " counter";
  return out;
}

std::string elem_canon(nftnl_set_elem* e) {
  std::string out;
  uint32_t len = 0;
  if (nftnl_set_elem_is_set(e, NFTNL_SET_ELEM_KEY)) {
    const void* k = nftnl_set_elem_get(e, NFTNL_SET_ELEM_KEY, &len);
    out += hex(k, len);
  }
  if (nftnl_set_elem_is_set(e, NFTNL_SET_ELEM_KEY_END)) {
    const void* k = nftnl_set_elem_get(e, NFTNL_SET_ELEM_KEY_END, &len);
    out += "-" + hex(k, len);
  }
  const uint32_t flags =
      nftnl_set_elem_is_set(e, NFTNL_SET_ELEM_FLAGS) ? nftnl_set_elem_get_u32(e, NFTNL_SET_ELEM_FLAGS) : 0;
  if (flags & NFT_SET_ELEM_INTERVAL_END) out += " end";
  if (nftnl_set_elem_is_set(e, NFTNL_SET_ELEM_USERDATA)) {
    const void* data = nftnl_set_elem_get(e, NFTNL_SET_ELEM_USERDATA, &len);
    const std::string c = udata_comment(data, len, NFTNL_UDATA_SET_ELEM_COMMENT);
    if (!c.empty()) out += " comment " + quote(c);
  }
  return out;
}

std::string table_comment(const nftnl_table* t) {
  if (!nftnl_table_is_set(t, NFTNL_TABLE_USERDATA)) return {};
  uint32_t len = 0;
  const void* data = nftnl_table_get_data(t, NFTNL_TABLE_USERDATA, &len);
  return udata_comment(data, len, NFTNL_UDATA_TABLE_COMMENT);
}

std::string rule_canon(const nftnl_rule* r) { return exprs_text(r) + "comment " + quote(rule_comment(r)) + "\n"; }

}  // namespace internal

std::string rule_exprs(const RuleDesc& rule) {
  internal::RulePtr r = internal::make_rule(rule);
  std::string out;
  ExprIterPtr it = expr_iter(r.get());
  for (nftnl_expr* e = nftnl_expr_iter_next(it.get()); e; e = nftnl_expr_iter_next(it.get())) {
    std::string body = expr_text(e);
    while (!body.empty() && body.back() == ' ') body.pop_back();
    const char* name = nftnl_expr_get_str(e, NFTNL_EXPR_NAME);
    out += std::string("[ ") + (name ? name : "?") + (body.empty() ? "" : " ") + body + " ]\n";
  }
  return out;
}

}  // namespace vmfence::nft
