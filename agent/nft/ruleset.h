// The table vmfence programs, as data: chains and rules built from a Spec, their text
// in nft's own syntax and the fingerprint kept in the table's comment. Pure: no
// netlink, no libnftnl objects (those are in netlink.h). Include agent/nft/nft.h.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "agent/spec/spec.h"

namespace vmfence::nft {

inline constexpr const char* kFamilyName = "inet";
inline constexpr const char* kTableName = "vmfence";

enum class Verdict : uint8_t { accept, drop, jump, masquerade, set_ttl };

// What a set lookup loads into its key, field by field (each field takes 4-byte
// registers: addresses 4 or 16 bytes, l4proto 1 byte and ports 2 bytes zero-padded).
enum class KeyField : uint8_t { saddr, daddr, l4proto, dport };

// One element of a named set: the range lo..hi (inclusive) of the whole key, every
// field padded to 4 bytes (a prefix, a port range, or a single value when lo == hi).
struct SetElemDesc {
  std::vector<uint8_t> lo, hi;
  std::string comment;  // NFTNL_UDATA_SET_ELEM_COMMENT; nft shows it
  bool operator==(const SetElemDesc&) const = default;
};

// A named set of table inet vmfence (a hash when every element is one value, else
// flags interval; concatenated keys when it has more than one field). The rules
// refer to it by name; per-address and per-rule matches are its elements, so the
// number of rules does not grow with the VMs.
struct SetDesc {
  std::string name;
  int family = 4;  // of the address fields
  std::vector<KeyField> fields;
  bool counter = false;  // a counter on every element (nft: `counter` in the set)
  std::vector<SetElemDesc> elems;
  bool interval = false;     // some element is a range (lo != hi): set by build_ruleset
  uint32_t key_len() const;  // bytes, padded fields
  std::string text() const;  // the set as nft lists it (roughly)
  std::string elem_text(const SetElemDesc& e) const;
};

// One generated rule. Every field that is set is a match; all must hold. text() is the
// rule in nft's own syntax (what `nft list table inet vmfence` prints, minus counters).
struct RuleDesc {
  std::string chain;
  std::string iifname;
  std::string oifname;
  std::optional<Cidr> saddr;  // implies meta nfproto of its family
  std::optional<Cidr> daddr;
  Proto l4 = Proto::any;           // meta l4proto
  std::optional<PortRange> sport;  // tcp/udp only
  std::optional<PortRange> dport;
  bool ct_established = false;  // ct state established,related
  bool ct_snat = false;         // ct status snat
  bool counter = false;
  Verdict verdict = Verdict::accept;
  std::string target;   // Verdict::jump: the chain
  uint8_t ttl = 0;      // Verdict::set_ttl: ip ttl / ip6 hoplimit (family of saddr)
  std::string comment;  // stored in the rule's userdata; nft shows it
  // A lookup in a named set: `set_key` loaded (concatenated) and looked up in `set`
  // (of family `set_family`); placed after the family match, before saddr/daddr.
  std::string set;
  std::vector<KeyField> set_key;
  int set_family = 0;

  int family() const;  // 4, 6, or 0 (both)
  std::string text() const;
};

struct ChainDesc {
  std::string name;
  std::string type;  // "filter" | "nat"; "" = regular chain
  std::string hook;  // "prerouting" | "forward" | "postrouting"; "" = regular
  int priority = 0;
  std::string text() const;  // e.g. "type nat hook postrouting priority 100; policy accept;"
};

struct Ruleset {
  std::vector<ChainDesc> chains;  // created in this order
  std::vector<SetDesc> sets;      // created after the chains, before the rules
  std::vector<RuleDesc> rules;    // appended in this order
  std::string text() const;       // the whole table in nft syntax
  uint64_t fingerprint() const;   // FNV-1a 64 of text(); kept in the table's comment
  std::vector<const RuleDesc*> in_chain(const std::string& chain) const;
  size_t elements() const;  // of every set
};

// Pure: the table vmfence programs for this spec.
Ruleset build_ruleset(const Spec& spec);

}  // namespace vmfence::nft
