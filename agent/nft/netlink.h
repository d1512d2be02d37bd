// table inet vmfence in the kernel: each RuleDesc as libnftnl expressions, and the
// netlink side (libmnl): apply the whole table as one batch, remove it, verify it
// against a Ruleset. Include agent/nft/nft.h.
#pragma once

#include <string>

#include "agent/nft/ruleset.h"
#include "agent/spec/spec.h"
#include "maps/status.h"

namespace vmfence::nft {

// errno-style result: err is a positive errno (0 = success), message says what
// failed. The one error convention at the OS boundary (maps/status.h).
using Result = Status;

// The libnftnl expressions of one rule, one "[ expr ... ]" per line, as
// nftnl_expr_snprintf prints them (the same text as `nft --debug=netlink`).
// Throws std::runtime_error (std::bad_alloc when out of memory) when libnftnl
// refuses to build or print the rule.
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
// (message says what) or holds something libnftnl cannot parse; other errno when the
// dump failed.
Result verify(const Ruleset& ruleset);

// verify() against the last ruleset apply() programmed in this process (false when
// nothing was applied). One small netlink dump: fine for a periodic check.
bool table_intact();

}  // namespace vmfence::nft
