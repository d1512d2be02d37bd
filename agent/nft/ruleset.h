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
  std::vector<RuleDesc> rules;    // appended in this order
  std::string text() const;       // the whole table in nft syntax
  uint64_t fingerprint() const;   // FNV-1a 64 of text(); kept in the table's comment
  std::vector<const RuleDesc*> in_chain(const std::string& chain) const;
};

// Pure: the table vmfence programs for this spec.
Ruleset build_ruleset(const Spec& spec);

}  // namespace vmfence::nft
