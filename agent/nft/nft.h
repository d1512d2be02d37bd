// nftables: vmfence's one table, `inet vmfence`, built with libnftnl and applied
// through libmnl as one netlink batch (never by shelling out to `nft`).
//
// What the table does (see README "NAT and IMDS"):
//   prerouting  (filter, mangle -150)  IMDSv2: restore the TTL/hop limit of IMDS replies
//                                      to NATed VMs (AWS sends the PUT token reply with 1)
//   forward     (filter, 0)            ct established,related accept;
//                                      to IMDS -> imds_forward; in from a WAN -> wan_to_vm
//   postrouting (nat, srcnat 100)      masquerade imds:true VMs -> IMDS; nothing else
//                                      toward IMDS; masquerade nat.masquerade out a WAN
//   imds_forward                       imds:true VMs may reach imds.address:port; other
//                                      VM addresses -> IMDS dropped
//   wan_to_vm                          VM ingress rules accepted; the rest to VMs dropped
//
// apply() replaces the table in one transaction (add table; delete table; add table,
// chains, rules): there is never a moment without NAT or with two copies, and a batch
// the kernel rejects leaves the previous table in force. Other tables are never touched.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "agent/spec/spec.h"

struct mnl_socket;  // libmnl

namespace vmfence::nft {

inline constexpr const char* kFamilyName = "inet";
inline constexpr const char* kTableName = "vmfence";

// errno-style result: err is a positive errno (0 = success), message says what failed.
struct Result {
  int err = 0;
  std::string message;
  explicit operator bool() const { return err == 0; }
};

enum class Verdict : uint8_t { accept, drop, jump, masquerade, set_ttl };

// One generated rule. Every field that is set is a match; all must hold. text() is the
// rule in nft's own syntax (what `nft list table inet vmfence` prints, minus counters).
struct RuleDesc {
  std::string chain;
  std::string iifname;
  std::string oifname;
  std::optional<Cidr> saddr;          // implies meta nfproto of its family
  std::optional<Cidr> daddr;
  Proto l4 = Proto::any;              // meta l4proto
  std::optional<PortRange> sport;     // tcp/udp only
  std::optional<PortRange> dport;
  bool ct_established = false;        // ct state established,related
  bool ct_snat = false;               // ct status snat
  bool counter = false;
  Verdict verdict = Verdict::accept;
  std::string target;                 // Verdict::jump: the chain
  uint8_t ttl = 0;                    // Verdict::set_ttl: ip ttl / ip6 hoplimit (family of saddr)
  std::string comment;                // stored in the rule's userdata; nft shows it

  int family() const;                 // 4, 6, or 0 (both)
  std::string text() const;
};

struct ChainDesc {
  std::string name;
  std::string type;                   // "filter" | "nat"; "" = regular chain
  std::string hook;                   // "prerouting" | "forward" | "postrouting"; "" = regular
  int priority = 0;
  std::string text() const;           // e.g. "type nat hook postrouting priority 100; policy accept;"
};

struct Ruleset {
  std::vector<ChainDesc> chains;      // created in this order
  std::vector<RuleDesc> rules;        // appended in this order
  std::string text() const;           // the whole table in nft syntax
  uint64_t fingerprint() const;       // FNV-1a 64 of text(); kept in the table's comment
  std::vector<const RuleDesc*> in_chain(const std::string& chain) const;
};

// Pure: the table vmfence programs for this spec.
Ruleset build_ruleset(const Spec& spec);

// The libnftnl expressions of one rule, one "[ expr ... ]" per line, as
// nftnl_expr_snprintf prints them (the same text as `nft --debug=netlink`).
std::string rule_exprs(const RuleDesc& rule);

// Atomically replace table inet vmfence (created when absent). On failure the kernel's
// error (errno + the batch message it rejected) is returned and the previous table
// stays in force. On success the ruleset is remembered for table_intact().
Result apply(const Spec& spec);
Result apply(const Ruleset& ruleset);

// Delete table inet vmfence and nothing else; success when it is absent.
Result remove();

// Compare the kernel's table inet vmfence with `ruleset`: ok when present and identical
// (chains, rules, expressions, comments); ENOENT when missing; EPROTO when it differs
// (message says what); other errno when the dump failed.
Result verify(const Ruleset& ruleset);

// verify() against the last ruleset apply() programmed in this process (false when
// nothing was applied). One small netlink dump: fine for a periodic check.
bool table_intact();

// Watches nftables changes (NFNLGRP_NFTABLES) in the current network namespace.
// Poll fd() for POLLIN (edge or level), then call handle_readable().
class Monitor {
 public:
  Monitor() = default;
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;
  Monitor(Monitor&& other) noexcept;
  Monitor& operator=(Monitor&& other) noexcept;

  Result open();
  void close();
  int fd() const;  // -1 when not open

  // Drain pending events. When one concerned table inet vmfence (or events were lost),
  // verify the table against build_ruleset(spec) and re-apply it when missing or
  // different, logging what it found. Returns true when it re-applied successfully.
  bool handle_readable(const Spec& spec);
  bool handle_readable(const Ruleset& ruleset);

  // Drain only: true when a pending event concerned our table (or events were lost).
  bool drain();

 private:
  ::mnl_socket* sock_ = nullptr;
};

}  // namespace vmfence::nft
