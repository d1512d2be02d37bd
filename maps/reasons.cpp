#include "maps/reasons.h"

#include <string>

#include "vmfence_abi.h"

namespace vmfence {

namespace {
// Indexed by enum vmfence_reason; the static_assert keeps them in step.
constexpr const char* kReasonNames[] = {
    "none",        "unknown_ifindex", "malformed",   "bad_ethertype", "spoofed_mac",    "spoofed_ip",     "spoofed_arp",
    "spoofed_nd",  "arp_denied",      "cross_group", "egress_denied", "ingress_denied", "fragment",       "imds_denied",
    "quarantined", "no_policy",       "not_for_vm",  "flow_limit",    "link_local",     "unassigned_src", "stale_reply",
};
static_assert(sizeof(kReasonNames) / sizeof(kReasonNames[0]) == VMFENCE_REASON_COUNT);
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
