// Spec parsing and validation. The JSON DOM is walked by hand (not deserialised)
// so that every error is reported at once, each with its JSON path.
#include "agent/spec/spec.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <string_view>
#include <system_error>
#include <tuple>

#include "agent/spec/json.h"
#include "vmfence_abi.h"

namespace vmfence {

std::string SpecError::str() const {
  return path.empty() ? file + ": " + message : file + ": " + path + ": " + message;
}

// ---- addresses -------------------------------------------------------------

namespace {

// True when a and b agree on their first `bits` bits.
bool prefix_equal(const std::array<uint8_t, 16>& a, const std::array<uint8_t, 16>& b, unsigned bits) {
  unsigned whole = bits / 8;
  if (std::memcmp(a.data(), b.data(), whole) != 0) return false;
  unsigned rest = bits % 8;
  if (rest == 0) return true;
  uint8_t mask = static_cast<uint8_t>(0xff << (8 - rest));
  return (a[whole] & mask) == (b[whole] & mask);
}

// The host bits of byte i of a prefix `bits` long (in the 128-bit mapped space).
uint8_t host_mask(unsigned bits, unsigned i) {
  if (bits >= 8 * (i + 1)) return 0;
  unsigned keep = bits > 8 * i ? bits - 8 * i : 0;
  return static_cast<uint8_t>(0xff >> keep);
}

// The prefix with its host bits cleared.
Cidr network_of(const Cidr& c) {
  Cidr n = c;
  for (unsigned i = 0; i < 16; ++i) n.addr[i] &= static_cast<uint8_t>(~host_mask(c.mapped_prefix_len(), i));
  return n;
}

// The last address of the prefix.
std::array<uint8_t, 16> last_of(const Cidr& c) {
  std::array<uint8_t, 16> a = c.addr;
  for (unsigned i = 0; i < 16; ++i) a[i] |= host_mask(c.mapped_prefix_len(), i);
  return a;
}

}  // namespace

std::string Cidr::str() const {
  char buf[INET6_ADDRSTRLEN];
  if (family == 4)
    inet_ntop(AF_INET, addr.data() + 12, buf, sizeof buf);
  else
    inet_ntop(AF_INET6, addr.data(), buf, sizeof buf);
  return std::string(buf) + "/" + std::to_string(prefix_len);
}

bool Cidr::contains(const Cidr& other) const {
  return family == other.family && other.prefix_len >= prefix_len &&
         prefix_equal(addr, other.addr, mapped_prefix_len());
}

bool Cidr::overlaps(const Cidr& other) const { return contains(other) || other.contains(*this); }

std::optional<Cidr> parse_cidr(const std::string& text, std::string* why) {
  auto fail = [&](const char* reason) -> std::optional<Cidr> {
    if (why) *why = reason;
    return std::nullopt;
  };
  auto slash = text.find('/');
  std::string host = text.substr(0, slash);
  Cidr c;
  if (inet_pton(AF_INET, host.c_str(), c.addr.data() + 12) == 1) {
    c.family = 4;
    c.addr[10] = c.addr[11] = 0xff;
  } else if (inet_pton(AF_INET6, host.c_str(), c.addr.data()) == 1) {
    c.family = 6;
  } else {
    return fail("not an IPv4 or IPv6 address");
  }
  unsigned max = c.family == 4 ? 32 : 128;
  c.prefix_len = static_cast<uint8_t>(max);
  if (slash == std::string::npos) return c;
  std::string len = text.substr(slash + 1);
  if (len.empty() || len.size() > 3 ||
      !std::all_of(len.begin(), len.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
    return fail("the prefix length is not a number");
  unsigned n = static_cast<unsigned>(std::stoul(len));
  if (n > max) return fail(c.family == 4 ? "the prefix length must be 0-32" : "the prefix length must be 0-128");
  c.prefix_len = static_cast<uint8_t>(n);
  return c;
}

std::optional<Cidr> parse_ip(const std::string& text) {
  if (text.find('/') != std::string::npos) return std::nullopt;
  return parse_cidr(text);
}

std::optional<ListenAddress> parse_listen(const std::string& text, std::string* why) {
  auto fail = [&](const std::string& w) -> std::optional<ListenAddress> {
    if (why) *why = w;
    return std::nullopt;
  };
  auto colon = text.rfind(':');
  if (colon == std::string::npos) return fail("expected ADDRESS:PORT or [IPV6]:PORT");
  std::string host = text.substr(0, colon), port = text.substr(colon + 1);
  bool bracketed = host.size() >= 2 && host.front() == '[' && host.back() == ']';
  if (bracketed) host = host.substr(1, host.size() - 2);
  auto addr = parse_ip(host);
  // An IPv6 address needs its brackets ("::1:9727" reads both ways).
  if (!addr || (addr->family == 6) != bracketed)
    return fail("expected ADDRESS:PORT or [IPV6]:PORT with a numeric address (127.0.0.1:9727, [::1]:9727)");
  unsigned long n = 0;
  bool digits = !port.empty() && port.size() <= 5 &&
                std::all_of(port.begin(), port.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  if (digits) n = std::stoul(port);
  if (!digits || n < 1 || n > 65535) return fail("the port must be 1-65535");
  return ListenAddress{*addr, static_cast<uint16_t>(n)};
}

std::optional<std::array<uint8_t, 6>> parse_mac(const std::string& text) {
  if (text.size() != 17) return std::nullopt;
  auto hex = [](char ch) -> int {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
  };
  std::array<uint8_t, 6> mac{};
  for (size_t i = 0; i < 6; ++i) {
    int hi = hex(text[3 * i]), lo = hex(text[3 * i + 1]);
    if (hi < 0 || lo < 0 || (i < 5 && text[3 * i + 2] != ':')) return std::nullopt;
    mac[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return mac;
}

std::string mac_str(const std::array<uint8_t, 6>& mac) {
  char buf[18];
  std::snprintf(buf, sizeof buf, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
  return buf;
}

const char* proto_name(Proto p) {
  switch (p) {
    case Proto::any:
      return "any";
    case Proto::icmp:
      return "icmp";
    case Proto::tcp:
      return "tcp";
    case Proto::udp:
      return "udp";
    case Proto::icmpv6:
      return "icmpv6";
  }
  return "?";
}

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::filtered:
      return "filtered";
    case Mode::conntrack:
      return "conntrack";
    case Mode::sampled:
      return "sampled";
    case Mode::direct:
      return "direct";
  }
  return "?";
}

const char* action_name(Action a) {
  switch (a) {
    case Action::alert:
      return "alert";
    case Action::terminate:
      return "terminate";
  }
  return "?";
}

uint32_t name_id(const std::string& name) {
  uint32_t h = 2166136261u;
  for (unsigned char ch : name) {
    h ^= ch;
    h *= 16777619u;
  }
  return h == 0 ? 1 : h;  // 0 means "no VM" in the maps
}

// ---- JSON walking ----------------------------------------------------------

namespace {

using Value = rj::Value;

// A user string inside a message: JSON-quoted (so control characters cannot
// break the one-line error format) and cut short when long.
std::string quote(std::string_view s) {
  constexpr size_t kMax = 80;
  bool cut = s.size() > kMax;
  if (cut) {
    size_t n = kMax;
    while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xc0) == 0x80) --n;  // not inside a UTF-8 sequence
    s = s.substr(0, n);
  }
  std::string out = "\"";
  for (unsigned char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += static_cast<char>(ch);
    } else if (ch < 0x20 || ch == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      out += buf;
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out + (cut ? "...\"" : "\"");
}

std::string number_str(double d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", d);
  return buf;
}

std::string field_path(const std::string& base, std::string_view key) {
  bool ident = !key.empty() && !(key[0] >= '0' && key[0] <= '9') && std::all_of(key.begin(), key.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_';
  });
  if (!ident) return base + "[" + quote(key) + "]";  // keeps odd keys unambiguous
  return base.empty() ? std::string(key) : base + "." + std::string(key);
}

std::string index_path(const std::string& base, size_t i) { return base + "[" + std::to_string(i) + "]"; }

const char* type_name(const Value& v) {
  switch (v.GetType()) {
    case rj::kNullType:
      return "null";
    case rj::kFalseType:
    case rj::kTrueType:
      return "a boolean";
    case rj::kObjectType:
      return "an object";
    case rj::kArrayType:
      return "an array";
    case rj::kStringType:
      return "a string";
    case rj::kNumberType:
      return "a number";
  }
  return "?";
}

// Errors of one file.
class Ctx {
 public:
  Ctx(const std::string& file, std::vector<SpecError>& errors) : file_(file), errors_(errors), start_(errors.size()) {}
  void error(const std::string& path, std::string message) { errors_.push_back({file_, path, std::move(message)}); }
  bool failed() const { return errors_.size() > start_; }

 private:
  const std::string& file_;
  std::vector<SpecError>& errors_;
  size_t start_;
};

// Parses `json`; a syntax error is reported with its line:column.
bool parse_document(Ctx& c, const std::string& json, rj::Document& doc) {
  doc.Parse<rj::kParseValidateEncodingFlag | rj::kParseIterativeFlag>(json.data(), json.size());
  if (!doc.HasParseError()) return true;
  size_t offset = std::min(doc.GetErrorOffset(), json.size());
  size_t line = 1, column = 1;
  for (size_t i = 0; i < offset; ++i) {
    unsigned char ch = static_cast<unsigned char>(json[i]);
    if (ch == '\n') {
      ++line;
      column = 1;
    } else if ((ch & 0xc0) != 0x80) {  // count characters, not UTF-8 bytes
      ++column;
    }
  }
  c.error("", std::to_string(line) + ":" + std::to_string(column) + ": " + rj::GetParseError_En(doc.GetParseError()));
  return false;
}

std::string join(std::initializer_list<std::string_view> words) {
  std::string out;
  for (auto w : words) out += (out.empty() ? "" : ", ") + std::string(w);
  return out;
}

// Checks that v is an object whose members are all in `known`, each once.
bool check_object(Ctx& c, const Value& v, const std::string& path, std::initializer_list<std::string_view> known) {
  if (!v.IsObject()) {
    c.error(path, std::string("expected an object, got ") + type_name(v));
    return false;
  }
  std::set<std::string_view> seen;
  for (const auto& m : v.GetObject()) {
    std::string_view key(m.name.GetString(), m.name.GetStringLength());
    if (!seen.insert(key).second)
      c.error(field_path(path, key), "duplicate field");
    else if (std::find(known.begin(), known.end(), key) == known.end())
      c.error(field_path(path, key), "unknown field (known: " + join(known) + ")");
  }
  return true;
}

const Value* member(const Value& obj, const char* key) {
  auto it = obj.FindMember(key);
  return it == obj.MemberEnd() ? nullptr : &it->value;
}

const Value* required(Ctx& c, const Value& obj, const std::string& path, const char* key) {
  const Value* v = member(obj, key);
  if (!v) c.error(field_path(path, key), "required field is missing");
  return v;
}

std::optional<std::string> get_string(Ctx& c, const Value& v, const std::string& path) {
  if (!v.IsString()) {
    c.error(path, std::string("expected a string, got ") + type_name(v));
    return std::nullopt;
  }
  return std::string(v.GetString(), v.GetStringLength());
}

std::optional<bool> get_bool(Ctx& c, const Value& v, const std::string& path) {
  if (!v.IsBool()) {
    c.error(path, std::string("expected true or false, got ") + type_name(v));
    return std::nullopt;
  }
  return v.GetBool();
}

std::optional<uint32_t> get_uint(Ctx& c, const Value& v, const std::string& path, uint32_t lo, uint32_t hi) {
  if (!v.IsNumber()) {
    c.error(path, std::string("expected an integer, got ") + type_name(v));
    return std::nullopt;
  }
  if (!v.IsInt64() && !v.IsUint64()) {
    c.error(path, "expected an integer, got " + number_str(v.GetDouble()));
    return std::nullopt;
  }
  bool in_range = v.IsUint64() && v.GetUint64() >= lo && v.GetUint64() <= hi;
  if (!in_range) {
    std::string got = v.IsUint64() ? std::to_string(v.GetUint64()) : std::to_string(v.GetInt64());
    c.error(path, hi == UINT32_MAX ? "must be at least " + std::to_string(lo) + ", got " + got
                                   : "must be " + std::to_string(lo) + "-" + std::to_string(hi) + ", got " + got);
    return std::nullopt;
  }
  return static_cast<uint32_t>(v.GetUint64());
}

// Calls each(element, path) for every element; false when v is not an array.
template <typename F>
bool for_each(Ctx& c, const Value& v, const std::string& path, F each) {
  if (!v.IsArray()) {
    c.error(path, std::string("expected an array, got ") + type_name(v));
    return false;
  }
  for (rj::SizeType i = 0; i < v.Size(); ++i) each(v[i], index_path(path, i));
  return true;
}

// ---- field rules -----------------------------------------------------------

bool is_alnum(char ch) { return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9'); }

std::optional<std::string> get_name(Ctx& c, const Value& v, const std::string& path) {
  auto s = get_string(c, v, path);
  if (!s) return std::nullopt;
  bool ok = !s->empty() && s->size() <= 64 && is_alnum((*s)[0]) && std::all_of(s->begin(), s->end(), [](char ch) {
    return is_alnum(ch) || ch == '_' || ch == '.' || ch == '-';
  });
  if (!ok) {
    c.error(path,
            quote(*s) + " is not a valid name: 1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit");
    return std::nullopt;
  }
  return s;
}

// The kernel's dev_valid_name().
bool valid_ifname(const std::string& s) {
  if (s.empty() || s.size() > 15 || s == "." || s == "..") return false;
  return std::none_of(s.begin(), s.end(), [](char ch) {
    unsigned char u = static_cast<unsigned char>(ch);
    // The kernel's isspace() also counts 0xa0.
    return ch == '/' || ch == ':' || ch == '\0' || ch == ' ' || (u >= '\t' && u <= '\r') || u == 0xa0;
  });
}

std::optional<std::string> get_ifname(Ctx& c, const Value& v, const std::string& path) {
  auto s = get_string(c, v, path);
  if (!s) return std::nullopt;
  if (!valid_ifname(*s)) {
    c.error(path, quote(*s) +
                      " is not a valid interface name: 1-15 characters, no '/', ':' or whitespace, not \".\" "
                      "or \"..\"");
    return std::nullopt;
  }
  return s;
}

std::optional<std::array<uint8_t, 6>> get_mac(Ctx& c, const Value& v, const std::string& path) {
  auto s = get_string(c, v, path);
  if (!s) return std::nullopt;
  auto mac = parse_mac(*s);
  if (!mac) {
    c.error(path, quote(*s) + " is not a MAC address (xx:xx:xx:xx:xx:xx)");
    return std::nullopt;
  }
  if ((*mac)[0] & 1) {
    c.error(path, quote(*s) + " is a multicast MAC (the low bit of the first byte is set); a VM's MAC is unicast");
    return std::nullopt;
  }
  if (*mac == std::array<uint8_t, 6>{}) {
    c.error(path, quote(*s) + " is the all-zero MAC");
    return std::nullopt;
  }
  return mac;
}

// A prefix with no host bits set ("10.0.0.1/8" is almost always a typo).
std::optional<Cidr> get_cidr(Ctx& c, const Value& v, const std::string& path) {
  auto s = get_string(c, v, path);
  if (!s) return std::nullopt;
  std::string why;
  auto cidr = parse_cidr(*s, &why);
  if (!cidr) {
    c.error(path, quote(*s) + ": " + why);
    return std::nullopt;
  }
  if (network_of(*cidr) != *cidr) {
    Cidr host = *cidr;
    host.prefix_len = cidr->family == 4 ? 32 : 128;
    c.error(path,
            quote(*s) + " has host bits set (did you mean " + network_of(*cidr).str() + " or " + host.str() + "?)");
    return std::nullopt;
  }
  return cidr;
}

std::optional<Cidr> get_ip(Ctx& c, const Value& v, const std::string& path) {
  auto s = get_string(c, v, path);
  if (!s) return std::nullopt;
  if (s->find('/') != std::string::npos) {
    c.error(path, quote(*s) + " must be a bare address (no /prefix)");
    return std::nullopt;
  }
  auto ip = parse_ip(*s);
  if (!ip) c.error(path, quote(*s) + ": not an IPv4 or IPv6 address");
  return ip;
}

// Ranges a VM's own address (or its gateway) can never be in.
std::optional<std::string> reserved_overlap(const Cidr& c) {
  struct Range {
    const char* cidr;
    const char* what;
  };
  static const std::vector<std::pair<Cidr, const char*>> kRanges = [] {
    std::vector<std::pair<Cidr, const char*>> out;
    for (const auto& r : std::initializer_list<Range>{{"0.0.0.0/32", "the unspecified address"},
                                                      {"127.0.0.0/8", "loopback"},
                                                      {"224.0.0.0/4", "multicast"},
                                                      {"255.255.255.255/32", "broadcast"},
                                                      {"::/128", "the unspecified address"},
                                                      {"::1/128", "loopback"},
                                                      {"ff00::/8", "multicast"},
                                                      {"::ffff:0:0/96", "IPv4-mapped (write the IPv4 address)"}})
      out.emplace_back(*parse_cidr(r.cidr), r.what);
    return out;
  }();
  for (const auto& [range, what] : kRanges)
    if (range.overlaps(c)) return std::string("overlaps ") + what + " (" + range.str() + ")";
  return std::nullopt;
}

}  // namespace

std::optional<std::string> remote_address_problem(const Cidr& c) {
  if (auto why = reserved_overlap(c)) return why;
  // What only the host's own link may hold: never a remote VM's.
  static const Cidr kLinkLocal6 = *parse_cidr("fe80::/10"), kLinkLocal4 = *parse_cidr("169.254.0.0/16");
  if (c.overlaps(kLinkLocal6) || c.overlaps(kLinkLocal4)) return std::string("overlaps link-local addresses");
  return std::nullopt;
}

namespace {

std::optional<PortRange> parse_port_entry(Ctx& c, const std::string& s, const std::string& path) {
  auto number = [](std::string_view t) -> std::optional<unsigned long> {
    if (t.empty() || t.size() > 5 || !std::all_of(t.begin(), t.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
      return std::nullopt;
    return std::stoul(std::string(t));
  };
  auto dash = s.find('-');
  std::string_view lo_text = std::string_view(s).substr(0, dash);
  std::string_view hi_text = dash == std::string::npos ? lo_text : std::string_view(s).substr(dash + 1);
  auto lo = number(lo_text), hi = number(hi_text);
  if (!lo || !hi) {
    c.error(path, quote(s) + " is not a port or port range (\"N\" or \"N-M\")");
    return std::nullopt;
  }
  for (auto [n, text] : {std::pair{*lo, lo_text}, std::pair{*hi, hi_text}}) {
    if (n > 65535) {
      c.error(path, dash == std::string::npos ? quote(s) + " is not a port (0-65535)"
                                              : quote(s) + ": " + std::string(text) + " is not a port (0-65535)");
      return std::nullopt;
    }
  }
  if (*lo > *hi) {
    c.error(path, quote(s) + " is a reversed range (write the lower port first)");
    return std::nullopt;
  }
  return PortRange{static_cast<uint16_t>(*lo), static_cast<uint16_t>(*hi)};
}

std::optional<Proto> get_proto(Ctx& c, const Value& v, const std::string& path) {
  auto s = get_string(c, v, path);
  if (!s) return std::nullopt;
  for (Proto p : {Proto::tcp, Proto::udp, Proto::icmp, Proto::icmpv6, Proto::any})
    if (*s == proto_name(p)) return p;
  c.error(path, quote(*s) + " is not a protocol (tcp, udp, icmp, icmpv6, any)");
  return std::nullopt;
}

// One egress ("to") or ingress ("from") rule.
std::optional<Rule> parse_rule(Ctx& c, const Value& v, const std::string& path, const char* peer_key) {
  if (!check_object(c, v, path, {peer_key, "proto", "ports"})) return std::nullopt;
  bool ok = true;
  Rule rule;
  std::optional<Cidr> peer;
  if (const Value* p = required(c, v, path, peer_key); p && (peer = get_cidr(c, *p, field_path(path, peer_key))))
    rule.peer = *peer;
  else
    ok = false;

  std::optional<Proto> proto = Proto::any;
  if (const Value* p = member(v, "proto")) proto = get_proto(c, *p, field_path(path, "proto"));
  if (proto)
    rule.proto = *proto;
  else
    ok = false;

  if (const Value* p = member(v, "ports")) {
    std::string ports_path = field_path(path, "ports");
    bool is_array = for_each(c, *p, ports_path, [&](const Value& e, const std::string& ep) {
      auto s = get_string(c, e, ep);
      auto range = s ? parse_port_entry(c, *s, ep) : std::nullopt;
      if (range)
        rule.ports.push_back(*range);
      else
        ok = false;
    });
    if (!is_array) {
      ok = false;
    } else if (p->Empty()) {
      c.error(ports_path, "must not be empty (omit \"ports\" for all ports)");
      ok = false;
    }
    if (proto && *proto != Proto::tcp && *proto != Proto::udp) {
      c.error(ports_path, std::string("ports need proto \"tcp\" or \"udp\" (proto is \"") + proto_name(*proto) + "\")");
      ok = false;
    }
  }

  if (peer && proto) {
    if (*proto == Proto::icmp && peer->family == 6) {
      c.error(field_path(path, "proto"), "\"icmp\" is IPv4 only; use \"icmpv6\" for " + peer->str());
      ok = false;
    } else if (*proto == Proto::icmpv6 && peer->family == 4) {
      c.error(field_path(path, "proto"), "\"icmpv6\" is IPv6 only; use \"icmp\" for " + peer->str());
      ok = false;
    }
  }
  return ok ? std::optional<Rule>(rule) : std::nullopt;
}

std::vector<Rule> parse_rules(Ctx& c, const Value& v, const std::string& path, const char* peer_key) {
  std::vector<Rule> rules;
  for_each(c, v, path, [&](const Value& e, const std::string& ep) {
    if (auto r = parse_rule(c, e, ep, peer_key)) rules.push_back(*r);
  });
  return rules;
}

// The on_violation fields one file sets; the others come from the defaults.
struct PolicyFields {
  std::optional<Action> action;
  std::optional<std::vector<std::string>> command;
  std::optional<std::string> systemd_unit;
  std::optional<std::string> qmp_socket;
  std::optional<uint32_t> threshold;
  std::optional<uint32_t> window_ms;
};

std::optional<std::string> get_nonempty_string(Ctx& c, const Value& v, const std::string& path) {
  auto s = get_string(c, v, path);
  if (s && s->empty()) {
    c.error(path, "must not be empty");
    return std::nullopt;
  }
  return s;
}

// `host_file`: host.json may say how to terminate (command, systemd_unit,
// qmp_socket: they run as root); a VM's file, written for a tenant, may not.
PolicyFields parse_policy(Ctx& c, const Value& v, const std::string& path, bool host_file) {
  PolicyFields f;
  if (!check_object(c, v, path, {"action", "command", "systemd_unit", "qmp_socket", "threshold", "window_ms"}))
    return f;
  if (!host_file) {
    bool root_fields = false;
    for (const char* key : {"command", "systemd_unit", "qmp_socket"})
      if (member(v, key)) {
        c.error(field_path(path, key),
                "not allowed in a VM's file (it runs as root): set it in host.json, where \"{vm}\" is replaced by "
                "the VM's name; a VM's file may set action, threshold and window_ms");
        root_fields = true;
      }
    if (root_fields) return f;
  }
  if (const Value* p = member(v, "action")) {
    std::string ap = field_path(path, "action");
    if (auto s = get_string(c, *p, ap)) {
      if (*s == "alert")
        f.action = Action::alert;
      else if (*s == "terminate")
        f.action = Action::terminate;
      else
        c.error(ap, quote(*s) + " is not an action (alert, terminate)");
    }
  }
  if (const Value* p = member(v, "command")) {
    std::string cp = field_path(path, "command");
    std::vector<std::string> argv;
    bool is_array = for_each(c, *p, cp, [&](const Value& e, const std::string& ep) {
      if (auto s = get_string(c, e, ep)) argv.push_back(*s);
    });
    if (is_array && argv.size() == p->Size()) {  // else already reported
      if (argv.empty())
        c.error(cp, "must not be empty (an argv list such as [\"systemctl\", \"stop\", \"microvm@{vm}.service\"])");
      else if (argv[0].empty())
        c.error(index_path(cp, 0), "the program must not be empty");
      else
        f.command = std::move(argv);
    }
  }
  if (const Value* p = member(v, "systemd_unit"))
    f.systemd_unit = get_nonempty_string(c, *p, field_path(path, "systemd_unit"));
  if (const Value* p = member(v, "qmp_socket"))
    f.qmp_socket = get_nonempty_string(c, *p, field_path(path, "qmp_socket"));
  if (const Value* p = member(v, "threshold"))
    f.threshold = get_uint(c, *p, field_path(path, "threshold"), 1, UINT32_MAX);
  if (const Value* p = member(v, "window_ms"))
    f.window_ms = get_uint(c, *p, field_path(path, "window_ms"), 1, UINT32_MAX);
  return f;
}

ViolationPolicy merge(ViolationPolicy base, const PolicyFields& f) {
  if (f.action) base.action = *f.action;
  if (f.command) base.command = *f.command;
  if (f.systemd_unit) base.systemd_unit = *f.systemd_unit;
  if (f.qmp_socket) base.qmp_socket = *f.qmp_socket;
  if (f.threshold) base.threshold = *f.threshold;
  if (f.window_ms) base.window_ms = *f.window_ms;
  return base;
}

bool can_terminate(const ViolationPolicy& p) {
  return !p.command.empty() || !p.systemd_unit.empty() || !p.qmp_socket.empty();
}

std::optional<std::string> read_file(const std::string& path, std::string* why) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *why = std::strerror(errno);
    return std::nullopt;
  }
  std::string text;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      *why = std::strerror(errno);
      ::close(fd);
      return std::nullopt;
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return text;
}

// host.json "fleet" (DESIGN.md): nullopt when it is not an object.
std::optional<FleetSpec> parse_fleet(Ctx& c, const Value& v) {
  if (!check_object(c, v, "fleet", {"etcd", "host", "prefix", "interfaces", "lease_s", "tls"})) return std::nullopt;
  FleetSpec f;
  char hostname[256] = "";
  if (::gethostname(hostname, sizeof hostname - 1) == 0) f.host = hostname;
  if (const Value* e = required(c, v, "fleet", "etcd")) {
    for_each(c, *e, "fleet.etcd", [&](const Value& u, const std::string& up) {
      auto url = get_string(c, u, up);
      if (!url) return;
      if (url->rfind("http://", 0) != 0 && url->rfind("https://", 0) != 0)
        c.error(up, quote(*url) + ": an etcd client URL starts with http:// or https://");
      else if (url->find_first_of(" \t\n") != std::string::npos || url->size() > 255)
        c.error(up, quote(*url) + ": not a URL");
      else
        f.etcd.push_back(*url);
    });
    if (e->IsArray() && e->Empty()) c.error("fleet.etcd", "needs at least one endpoint");
  }
  // Host and prefix end up in etcd keys: no '/' in the host, and a prefix
  // that is a directory of its own.
  auto key_part = [](const std::string& s) {
    return std::all_of(s.begin(), s.end(), [](char ch) {
      return std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.';
    });
  };
  if (const Value* h = member(v, "host"))
    if (auto s = get_string(c, *h, "fleet.host")) {
      if (s->empty() || s->size() > 253 || !key_part(*s))
        c.error("fleet.host", quote(*s) + ": a host name (letters, digits, '-', '_', '.')");
      else
        f.host = *s;
    }
  if (f.host.empty() || !key_part(f.host))
    c.error("fleet.host", "the hostname " + quote(f.host) + " cannot name this host in etcd: set fleet.host");
  if (const Value* p = member(v, "prefix"))
    if (auto s = get_string(c, *p, "fleet.prefix")) {
      if (s->size() < 2 || s->front() != '/' || s->back() != '/')
        c.error("fleet.prefix", quote(*s) + ": a key prefix starts and ends with '/'");
      else
        f.prefix = *s;
    }
  if (const Value* i = required(c, v, "fleet", "interfaces")) {
    for_each(c, *i, "fleet.interfaces", [&](const Value& e, const std::string& ep) {
      auto name = get_ifname(c, e, ep);
      if (!name) return;
      if (std::find(f.interfaces.begin(), f.interfaces.end(), *name) != f.interfaces.end())
        c.error(ep, quote(*name) + " is listed twice");
      else
        f.interfaces.push_back(*name);
    });
    if (i->IsArray() && i->Empty()) c.error("fleet.interfaces", "needs the interface(s) toward the other hosts");
    if (f.interfaces.size() > VMFENCE_MAX_FLEET_IFACES)
      c.error("fleet.interfaces", "at most " + std::to_string(VMFENCE_MAX_FLEET_IFACES) + " interfaces");
  }
  if (const Value* l = member(v, "lease_s"))
    if (auto n = get_uint(c, *l, "fleet.lease_s", FleetSpec::kMinLease, 3600)) f.lease_s = *n;
  if (const Value* t = member(v, "tls"); t && check_object(c, *t, "fleet.tls", {"ca", "cert", "key"})) {
    auto file = [&](const char* key, std::string& out) {
      if (const Value* x = member(*t, key))
        if (auto s = get_string(c, *x, field_path("fleet.tls", key))) {
          if (s->empty() || s->front() != '/')
            c.error(field_path("fleet.tls", key), quote(*s) + ": an absolute file path");
          else
            out = *s;
        }
    };
    file("ca", f.tls_ca);
    file("cert", f.tls_cert);
    file("key", f.tls_key);
    if (f.tls_cert.empty() != f.tls_key.empty())
      c.error("fleet.tls", "a client certificate needs both \"cert\" and \"key\"");
  }
  return f;
}

}  // namespace

// ---- documents -------------------------------------------------------------

HostSpec parse_host(const std::string& file, const std::string& json, std::vector<SpecError>& errors) {
  Ctx c(file, errors);
  HostSpec host;
  host.file = file;
  rj::Document doc;
  if (!parse_document(c, json, doc)) return host;
  if (!check_object(
          c, doc, "",
          {"wan_interfaces", "nat", "imds", "on_violation", "flow_timeouts", "metrics", "xdp_prefilter", "fleet"}))
    return host;

  if (const Value* v = member(doc, "wan_interfaces")) {
    for_each(c, *v, "wan_interfaces", [&](const Value& e, const std::string& ep) {
      auto name = get_ifname(c, e, ep);
      if (!name) return;
      auto dup = std::find(host.wan_interfaces.begin(), host.wan_interfaces.end(), *name);
      if (dup != host.wan_interfaces.end())
        c.error(ep, quote(*name) + " is listed twice");
      else
        host.wan_interfaces.push_back(*name);
    });
  }
  if (const Value* v = member(doc, "nat"); v && check_object(c, *v, "nat", {"masquerade"})) {
    if (const Value* m = member(*v, "masquerade")) {
      for_each(c, *m, "nat.masquerade", [&](const Value& e, const std::string& ep) {
        if (auto cidr = get_cidr(c, e, ep)) host.masquerade.push_back(*cidr);
      });
    }
  }
  if (const Value* v = member(doc, "imds"); v && check_object(c, *v, "imds", {"address", "port"})) {
    std::optional<Cidr> address;
    if (const Value* a = required(c, *v, "imds", "address")) address = get_ip(c, *a, "imds.address");
    std::optional<uint32_t> port = 80;
    if (const Value* p = member(*v, "port")) port = get_uint(c, *p, "imds.port", 1, 65535);
    if (address && port) host.imds = ImdsSpec{*address, static_cast<uint16_t>(*port)};
  }
  if (const Value* v = member(doc, "flow_timeouts");
      v && check_object(c, *v, "flow_timeouts", {"tcp_s", "udp_s", "icmp_s"})) {
    // At most a week: longer is a leak, not a timeout.
    auto timeout = [&](const char* key, uint32_t& out) {
      if (const Value* t = member(*v, key))
        if (auto n = get_uint(c, *t, field_path("flow_timeouts", key), 1, 604800)) out = *n;
    };
    timeout("tcp_s", host.flow_timeouts.tcp_s);
    timeout("udp_s", host.flow_timeouts.udp_s);
    timeout("icmp_s", host.flow_timeouts.icmp_s);
  }
  if (const Value* v = member(doc, "xdp_prefilter"))
    if (auto b = get_bool(c, *v, "xdp_prefilter")) host.xdp_prefilter = *b;
  if (const Value* v = member(doc, "metrics"); v && check_object(c, *v, "metrics", {"listen"})) {
    if (const Value* l = member(*v, "listen"))
      if (auto text = get_string(c, *l, "metrics.listen")) {
        std::string why;
        if (text->empty() || parse_listen(*text, &why))
          host.metrics.listen = *text;
        else
          c.error("metrics.listen", quote(*text) + ": " + why);
      }
  }
  if (const Value* v = member(doc, "fleet")) host.fleet = parse_fleet(c, *v);
  // The underlay is trusted with remote VMs' addresses; the WAN never is.
  if (host.fleet)
    for (size_t i = 0; i < host.fleet->interfaces.size(); ++i)
      if (std::count(host.wan_interfaces.begin(), host.wan_interfaces.end(), host.fleet->interfaces[i]))
        c.error("fleet.interfaces[" + std::to_string(i) + "]",
                quote(host.fleet->interfaces[i]) + " is also in wan_interfaces: the underlay must not be the WAN");
  if (const Value* v = member(doc, "on_violation")) {
    host.on_violation = merge(ViolationPolicy{}, parse_policy(c, *v, "on_violation", true));
    if (host.on_violation.action == Action::terminate && !can_terminate(host.on_violation))
      c.error("on_violation.action", "\"terminate\" needs one of command, systemd_unit or qmp_socket");
  }
  return host;
}

std::optional<VmSpec> parse_vm(const std::string& file, const std::string& json, const ViolationPolicy& host_default,
                               std::vector<SpecError>& errors) {
  Ctx c(file, errors);
  rj::Document doc;
  if (!parse_document(c, json, doc)) return std::nullopt;
  if (!check_object(c, doc, "",
                    {"name", "interface", "mac", "addresses", "gateway", "group", "mode", "sample_rate", "egress",
                     "ingress", "imds", "on_violation", "limits"}))
    return std::nullopt;

  VmSpec vm;
  vm.file = file;
  vm.on_violation = host_default;
  if (const Value* v = required(c, doc, "", "name"))
    if (auto s = get_name(c, *v, "name")) vm.name = *s;
  if (const Value* v = required(c, doc, "", "interface"))
    if (auto s = get_ifname(c, *v, "interface")) vm.interface = *s;
  if (const Value* v = required(c, doc, "", "mac"))
    if (auto m = get_mac(c, *v, "mac")) vm.mac = *m;

  if (const Value* v = required(c, doc, "", "addresses")) {
    bool is_array = for_each(c, *v, "addresses", [&](const Value& e, const std::string& ep) {
      auto cidr = get_cidr(c, e, ep);
      if (!cidr) return;
      if (auto why = reserved_overlap(*cidr)) {
        c.error(ep, quote(cidr->str()) + " " + *why);
        return;
      }
      for (size_t i = 0; i < vm.addresses.size(); ++i) {
        if (vm.addresses[i].overlaps(*cidr)) {
          c.error(ep, cidr->str() + " overlaps " + vm.addresses[i].str() + " (listed earlier)");
          return;
        }
      }
      vm.addresses.push_back(*cidr);
    });
    if (is_array && v->Empty()) c.error("addresses", "must list at least one address");
  }

  if (const Value* v = member(doc, "gateway")) {
    for_each(c, *v, "gateway", [&](const Value& e, const std::string& ep) {
      auto ip = get_ip(c, e, ep);
      if (!ip) return;
      if (auto why = reserved_overlap(*ip)) {
        c.error(ep, quote(ip->str()) + " " + *why);
      } else if (std::any_of(vm.addresses.begin(), vm.addresses.end(),
                             [&](const Cidr& a) { return a.contains(*ip); })) {
        c.error(ep, ip->str() + " is one of the VM's own addresses");
      } else {
        vm.gateway.push_back(*ip);
      }
    });
  }

  if (const Value* v = member(doc, "group")) {
    if (auto s = get_name(c, *v, "group")) vm.group = *s;
  } else {
    vm.group = vm.name;
  }

  if (const Value* v = member(doc, "mode")) {
    if (auto s = get_string(c, *v, "mode")) {
      bool known = false;
      for (Mode m : {Mode::direct, Mode::sampled, Mode::conntrack, Mode::filtered}) {
        if (*s == mode_name(m)) {
          vm.mode = m;
          known = true;
        }
      }
      if (!known) c.error("mode", quote(*s) + " is not a mode (direct, sampled, conntrack, filtered)");
    }
  }
  if (const Value* v = member(doc, "sample_rate")) {
    if (!v->IsNumber())
      c.error("sample_rate", std::string("expected a number, got ") + type_name(*v));
    else if (double d = v->GetDouble(); !(d > 0 && d <= 1))
      c.error("sample_rate", "must be in (0, 1], got " + number_str(d));
    else
      vm.sample_rate = d;
  }
  if (const Value* v = member(doc, "egress")) vm.egress = parse_rules(c, *v, "egress", "to");
  if (const Value* v = member(doc, "ingress")) vm.ingress = parse_rules(c, *v, "ingress", "from");
  if (const Value* v = member(doc, "imds"))
    if (auto b = get_bool(c, *v, "imds")) vm.imds = *b;

  if (const Value* v = member(doc, "limits");
      v && check_object(c, *v, "limits",
                        {"egress_mbit", "egress_pps", "ingress_mbit", "ingress_pps", "burst_kb", "flows"})) {
    if (const Value* f = member(*v, "flows"))
      if (auto n = get_uint(c, *f, "limits.flows", 1, 1048576)) vm.flows = *n;
    // Up to 100 Gbit/s, 100 Mpps and 1 GB of burst: beyond is a typo.
    auto limit = [&](const char* key, uint32_t hi, uint32_t& out) {
      if (const Value* f = member(*v, key))
        if (auto n = get_uint(c, *f, field_path("limits", key), 1, hi)) out = *n;
    };
    limit("egress_mbit", 100000, vm.rate.egress_mbit);
    limit("egress_pps", 100000000, vm.rate.egress_pps);
    limit("ingress_mbit", 100000, vm.rate.ingress_mbit);
    limit("ingress_pps", 100000000, vm.rate.ingress_pps);
    limit("burst_kb", 1048576, vm.rate.burst_kb);
    if (vm.rate.burst_kb && !vm.rate.any())
      c.error("limits.burst_kb", "applies to a rate limit; set egress_* or ingress_* too");
  }
  if (const Value* v = member(doc, "on_violation")) {
    PolicyFields f = parse_policy(c, *v, "on_violation", false);
    vm.on_violation = merge(host_default, f);
    // Only when this file asks for terminate: an inherited one is host.json's error.
    if (f.action == Action::terminate && !can_terminate(vm.on_violation))
      c.error("on_violation.action", "\"terminate\" needs one of command, systemd_unit or qmp_socket in host.json");
  }
  if (c.failed()) return std::nullopt;
  return vm;
}

namespace {

// What the VMs in force claim: names, interfaces, MACs, ids and address
// ranges. A candidate that collides with any claim is refused as a whole;
// the VMs already in the set keep theirs (first come, first served: callers
// add VMs in the order that decides who came first).
class ClaimSet {
 public:
  // Every collision of `vm` with the set, blamed on `vm`.
  std::vector<SpecError> conflicts(const VmSpec& vm) const {
    std::vector<SpecError> out;
    auto taken = [&](const char* path, const std::string& what, const VmSpec& owner) {
      out.push_back({vm.file, path, what + " is also used by " + owner.name + " (" + owner.file + ")"});
    };
    if (auto it = names_.find(vm.name); it != names_.end())
      out.push_back({vm.file, "name", quote(vm.name) + " is also used by " + it->second->file});
    if (auto it = interfaces_.find(vm.interface); it != interfaces_.end())
      taken("interface", quote(vm.interface), *it->second);
    if (auto it = macs_.find(vm.mac); it != macs_.end()) taken("mac", mac_str(vm.mac), *it->second);
    auto check_id = [&](const char* field, const std::string& name) {
      auto it = ids_.find(name_id(name));
      if (it == ids_.end() || it->second.first == name) return;
      char id[16];
      std::snprintf(id, sizeof id, "0x%08x", name_id(name));
      out.push_back({vm.file, field,
                     quote(name) + " has the same id (" + id + ") as " + quote(it->second.first) + " (" +
                         it->second.second->file + "); rename one"});
    };
    check_id("name", vm.name);
    if (vm.group != vm.name) check_id("group", vm.group);
    for (size_t i = 0; i < vm.addresses.size(); ++i)
      if (const Range* r = overlapping(vm.addresses[i]))
        out.push_back({vm.file, index_path("addresses", i),
                       vm.addresses[i].str() + " overlaps " + r->vm->addresses[r->index].str() + " of " + r->vm->name +
                           " (" + r->vm->file + ")"});
    return out;
  }

  // `vm` must outlive the set.
  void add(const VmSpec& vm) {
    names_.emplace(vm.name, &vm);
    if (!vm.interface.empty()) interfaces_.emplace(vm.interface, &vm);
    if (vm.mac != std::array<uint8_t, 6>{}) macs_.emplace(vm.mac, &vm);  // a reserved claim has none
    ids_.emplace(name_id(vm.name), std::pair{vm.name, &vm});
    if (vm.group != vm.name) ids_.emplace(name_id(vm.group), std::pair{vm.group, &vm});
    for (size_t i = 0; i < vm.addresses.size(); ++i) {
      const Cidr& a = vm.addresses[i];
      if (overlapping(a)) continue;  // nested in one of its own: covered
      ranges_[a.family].emplace(network_of(a).addr, Range{last_of(a), &vm, i});
    }
  }

 private:
  struct Range {
    std::array<uint8_t, 16> last;
    const VmSpec* vm;
    size_t index;
  };
  // Ranges in the set never overlap, so the only candidate is the one
  // starting last at or before `a`'s end.
  const Range* overlapping(const Cidr& a) const {
    auto fam = ranges_.find(a.family);
    if (fam == ranges_.end()) return nullptr;
    auto it = fam->second.upper_bound(last_of(a));
    if (it == fam->second.begin()) return nullptr;
    --it;
    return it->second.last >= network_of(a).addr ? &it->second : nullptr;
  }
  std::map<std::string, const VmSpec*> names_, interfaces_;
  std::map<std::array<uint8_t, 6>, const VmSpec*> macs_;
  std::map<uint32_t, std::pair<std::string, const VmSpec*>> ids_;
  std::map<int, std::map<std::array<uint8_t, 16>, Range>> ranges_;
};

// What a file names, as far as it can be read: a broken file's interface
// still gets no_policy, and `wait --vm` still finds its error.
void names_of(const std::string& json, std::string& name, std::string& interface) {
  rj::Document doc;
  doc.Parse(json.c_str(), json.size());
  if (doc.HasParseError() || !doc.IsObject()) return;
  if (const Value* v = member(doc, "name"); v && v->IsString()) name = v->GetString();
  if (const Value* v = member(doc, "interface"); v && v->IsString() && valid_ifname(v->GetString()))
    interface = v->GetString();
}

}  // namespace

void validate_vms(const std::vector<VmSpec>& vms, std::vector<SpecError>& errors) {
  ClaimSet claims;
  for (const auto& vm : vms) {
    auto c = claims.conflicts(vm);
    errors.insert(errors.end(), c.begin(), c.end());
    if (c.empty()) claims.add(vm);
  }
}

namespace {

int64_t realtime_now_ns() {
  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  return int64_t{now.tv_sec} * 1000000000 + now.tv_nsec;
}

SpecFileCache::FileId file_id(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return {};
  return {st.st_dev, st.st_ino, st.st_size, int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec,
          int64_t{st.st_ctim.tv_sec} * 1000000000 + st.st_ctim.tv_nsec};
}

// File times are coarse (a kernel tick): a file changed within the last
// second may change again without its times moving, so it is read again.
bool cacheable(const SpecFileCache::FileId& id, int64_t now_ns) {
  return id.ino && now_ns - std::max(id.mtime_ns, id.ctime_ns) > 1000000000;
}

// One vms.d file checked on its own against host.json. readable: the text
// could be read (an unreadable file is never cached).
VmFile read_vm_file(const std::string& path, const SpecFileCache::FileId& id, const HostSpec& host, bool host_ok,
                    bool& readable) {
  const auto& wan = host.wan_interfaces;
  VmFile f;
  f.path = path;
  f.mtime_ns = id.mtime_ns;
  std::string why;
  auto text = read_file(path, &why);
  readable = text.has_value();
  if (!text) {
    f.errors.push_back({path, "", "cannot read: " + why});
  } else {
    names_of(*text, f.name, f.interface);
    f.vm = parse_vm(path, *text, host.on_violation, f.errors);
  }
  if (f.vm) {
    const VmSpec& vm = *f.vm;
    if (std::find(wan.begin(), wan.end(), vm.interface) != wan.end())
      f.errors.push_back({path, "interface", quote(vm.interface) + " is a WAN interface in " + host.file});
    if (vm.imds && host_ok && !host.imds)  // a broken imds block is reported already
      f.errors.push_back({path, "imds", "needs \"imds\" (the metadata address) in " + host.file});
    if (host.fleet && std::count(host.fleet->interfaces.begin(), host.fleet->interfaces.end(), vm.interface))
      f.errors.push_back(
          {path, "interface", quote(vm.interface) + " is the fleet's underlay (fleet.interfaces) in " + host.file});
    if (!f.errors.empty()) f.vm.reset();
  }
  // Never no_policy on a WAN or underlay interface: that would cut the host
  // off the world or the fleet.
  if (std::find(wan.begin(), wan.end(), f.interface) != wan.end()) f.interface.clear();
  if (host.fleet && std::count(host.fleet->interfaces.begin(), host.fleet->interfaces.end(), f.interface))
    f.interface.clear();
  return f;
}

}  // namespace

bool SpecFileCache::host_unchanged(const std::filesystem::path& dir) const {
  std::string why;
  auto text = read_file((dir / "host.json").string(), &why);
  return text && *text == host_text_;
}

VmFile SpecFileCache::reread(const std::string& path, const HostSpec& host) {
  SpecFileCache::FileId id = file_id(path);
  bool readable = false;
  VmFile f = read_vm_file(path, id, host, true, readable);
  files_.erase(path);
  if (readable && cacheable(id, realtime_now_ns())) files_[path] = {id, f};
  parsed_last_ = 1;
  return f;
}

SpecFiles read_spec_files(const std::filesystem::path& dir, SpecFileCache* cache) {
  SpecFiles out;
  std::string host_file = (dir / "host.json").string();
  std::string why;
  auto host_text = read_file(host_file, &why);
  if (host_text) {
    out.host = parse_host(host_file, *host_text, out.host_errors);
  } else {
    out.host.file = host_file;
    out.host_errors.push_back({host_file, "", "cannot read: " + why});
  }
  bool host_ok = out.host_errors.empty();
  // A VM file's verdict depends on host.json (defaults, WAN interfaces, IMDS).
  if (cache && (!host_text || *host_text != cache->host_text_)) {
    cache->files_.clear();
    cache->host_text_ = host_text ? *host_text : std::string();
  }

  std::filesystem::path vms_dir = dir / "vms.d";
  std::vector<std::string> paths;
  std::error_code ec;
  if (std::filesystem::exists(vms_dir, ec)) {
    for (std::filesystem::directory_iterator it(vms_dir, ec), end; !ec && it != end; it.increment(ec)) {
      std::string name = it->path().filename().string();
      // Writers create ".name.json.tmp"-style files and rename them into place.
      if (name.starts_with(".") || !name.ends_with(".json")) continue;
      paths.push_back(it->path().string());
    }
  }
  if (ec) out.host_errors.push_back({vms_dir.string(), "", "cannot list: " + ec.message()});
  std::sort(paths.begin(), paths.end());

  const int64_t now_ns = realtime_now_ns();
  std::map<std::string, std::pair<SpecFileCache::FileId, VmFile>> seen;
  size_t parsed = 0;
  for (const auto& path : paths) {
    SpecFileCache::FileId id = file_id(path);
    if (cache && id.ino) {
      auto hit = cache->files_.find(path);
      if (hit != cache->files_.end() && hit->second.first == id) {
        auto node = cache->files_.extract(hit);
        out.vms.push_back(node.mapped().second);
        seen.insert(std::move(node));
        continue;
      }
    }
    ++parsed;
    bool readable = false;
    VmFile f = read_vm_file(path, id, out.host, host_ok, readable);
    if (cache && readable && cacheable(id, now_ns)) seen[path] = {id, f};
    out.vms.push_back(std::move(f));
  }
  if (cache) {
    cache->files_ = std::move(seen);
    cache->parsed_last_ = parsed;
  }
  return out;
}

Admission admit(const SpecFiles& files, const std::vector<VmSpec>& incumbents, const std::set<std::string>& enforced,
                const VmCheck& check, const std::vector<VmSpec>& reserved) {
  Admission out;
  std::map<std::string, const VmSpec*> incumbent;  // by name
  for (const auto& vm : incumbents) incumbent[vm.name] = &vm;

  // Candidates, in the order that decides who came first: VMs enforced now
  // (their own file before any other claiming the name), then VMs a previous
  // run enforced, then newcomers by file age (mtime), never by file name.
  struct Candidate {
    const VmFile* file;
    int rank;
  };
  std::vector<Candidate> candidates;
  std::map<std::string, std::vector<SpecError>> errors;  // by file
  for (const auto& f : files.vms) {
    if (!f.vm) {
      errors[f.path] = f.errors;
      continue;
    }
    auto inc = incumbent.find(f.vm->name);
    int rank = inc != incumbent.end() ? (inc->second->file == f.path ? 0 : 1) : enforced.count(f.vm->name) ? 2 : 3;
    candidates.push_back({&f, rank});
  }
  std::stable_sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    return std::tie(a.rank, a.file->mtime_ns, a.file->path) < std::tie(b.rank, b.file->mtime_ns, b.file->path);
  });

  // Incumbents whose file is now broken keep their last good policy; so
  // does one whose change is refused. Both are fixed before any candidate
  // is weighed; a refused change adds one and starts over (each incumbent
  // at most once).
  std::set<std::string> kept;
  // Its own file broken: kept, whatever another file says it is (a second
  // file naming it is then refused on the name).
  for (const auto& vm : incumbents)
    if (errors.count(vm.file)) kept.insert(vm.name);

  std::vector<const VmSpec*> accepted;
  std::map<std::string, std::vector<SpecError>> refused;   // by file
  std::map<std::string, std::vector<SpecError>> kept_why;  // by file: the refused change of a kept incumbent
  for (;;) {
    ClaimSet claims;
    std::set<std::string> names;
    accepted.clear();
    refused.clear();
    for (const auto& vm : reserved) claims.add(vm);
    for (const auto& name : kept) {
      claims.add(*incumbent[name]);
      accepted.push_back(incumbent[name]);
      names.insert(name);
    }
    bool restart = false;
    for (const auto& c : candidates) {
      const VmSpec& vm = *c.file->vm;
      if (auto k = kept_why.find(c.file->path); k != kept_why.end()) {
        refused[c.file->path] = k->second;
        continue;
      }
      std::vector<SpecError> why = claims.conflicts(vm);
      if (why.empty() && check) why = check(vm);
      if (why.empty()) {
        claims.add(vm);
        accepted.push_back(&vm);
        names.insert(vm.name);
        continue;
      }
      refused[c.file->path] = why;
      // An enforced VM whose change is refused keeps what it had.
      if (incumbent.count(vm.name) && !names.count(vm.name)) {
        kept.insert(vm.name);
        kept_why[c.file->path] = why;
        restart = true;
        break;
      }
    }
    if (!restart) break;
  }
  for (auto& [file, why] : refused) errors[file] = why;

  for (const VmSpec* vm : accepted) out.in_force.push_back(*vm);
  std::sort(out.in_force.begin(), out.in_force.end(), [](const VmSpec& a, const VmSpec& b) { return a.name < b.name; });
  for (const auto& f : files.vms) {
    auto e = errors.find(f.path);
    if (e == errors.end()) continue;
    RejectedFile r;
    r.file = f.path;
    r.name = f.vm ? f.vm->name : f.name;
    r.interface = f.vm ? f.vm->interface : f.interface;
    r.errors = e->second;
    r.kept_last_good = kept_why.count(f.path) != 0;
    for (const auto& name : kept)
      if (incumbent[name]->file == f.path) {
        r.kept_last_good = true;  // unreadable or not: the file of an enforced VM
        r.name = name;
      }
    out.rejected.push_back(std::move(r));
  }
  return out;
}

SpecLoad load_spec(const std::filesystem::path& dir) {
  SpecFiles files = read_spec_files(dir);
  Admission a = admit(files, {});
  SpecLoad out;
  out.spec.host = files.host;
  out.spec.vms = std::move(a.in_force);
  out.errors = files.host_errors;
  for (const auto& r : a.rejected) out.errors.insert(out.errors.end(), r.errors.begin(), r.errors.end());
  return out;
}

}  // namespace vmfence
