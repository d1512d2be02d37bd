#include "maps/reasons.h"

#include <iterator>
#include <string>
#include <string_view>

#include "vmfence_abi.h"

namespace vmfence {

namespace {
// Indexed by enum vmfence_reason, generated from VMFENCE_REASONS (vmfence_abi.h).
#define VMFENCE_REASON_STRING_(value, NAME, name, kind) name,
#define VMFENCE_REASON_VALUE_(value, NAME, name, kind) value,
constexpr const char* kReasonNames[] = {VMFENCE_REASONS(VMFENCE_REASON_STRING_)};
constexpr int kReasonValues[] = {VMFENCE_REASONS(VMFENCE_REASON_VALUE_)};
#undef VMFENCE_REASON_STRING_
#undef VMFENCE_REASON_VALUE_

// The rows are in value order without gaps (so a value indexes kReasonNames), and
// every name is distinct (reason_from_name() is the inverse of reason_name()).
constexpr bool reasons_dense() {
  for (size_t i = 0; i < std::size(kReasonValues); ++i)
    if (kReasonValues[i] != static_cast<int>(i)) return false;
  return true;
}
constexpr bool reason_names_distinct() {
  for (size_t i = 0; i < std::size(kReasonNames); ++i)
    for (size_t j = i + 1; j < std::size(kReasonNames); ++j)
      if (std::string_view(kReasonNames[i]) == kReasonNames[j]) return false;
  return true;
}
static_assert(std::size(kReasonNames) == VMFENCE_REASON_COUNT);
static_assert(reasons_dense(), "VMFENCE_REASONS: rows must be in value order, starting at 0, without gaps");
static_assert(reason_names_distinct(), "VMFENCE_REASONS: two reasons have the same name");
static_assert(VMFENCE_REASON_COUNT <= VMFENCE_REASON_SLOTS,
              "more reasons than counter slots: raise VMFENCE_REASON_SLOTS and bump VMFENCE_MAP_COUNTERS_VERSION");
}  // namespace

const char* reason_name(uint8_t reason) { return reason < VMFENCE_REASON_COUNT ? kReasonNames[reason] : "unknown"; }

std::optional<uint8_t> reason_from_name(std::string_view name) {
  for (uint8_t i = 0; i < VMFENCE_REASON_COUNT; ++i)
    if (name == kReasonNames[i]) return i;
  return std::nullopt;
}

const char* direction_name(uint8_t direction) { return direction == VMFENCE_DIR_FROM_VM ? "from_vm" : "to_vm"; }

const char* datapath_mode_name(uint8_t mode) {
  switch (mode) {
    case VMFENCE_MODE_FILTERED:
      return "filtered";
    case VMFENCE_MODE_CONNTRACK:
      return "conntrack";
    case VMFENCE_MODE_SAMPLED:
      return "sampled";
    case VMFENCE_MODE_DIRECT:
      return "direct";
  }
  return "unknown";
}

std::string l4_proto_name(uint8_t proto) {
  switch (proto) {
    case 6:
      return "tcp";
    case 17:
      return "udp";
    case 1:
      return "icmp";
    case 58:
      return "icmpv6";
  }
  return std::to_string(proto);
}

}  // namespace vmfence
