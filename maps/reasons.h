// Names of the datapath enums, as they appear in logs, journald and status.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace vmfence {

// "spoofed_ip", "cross_group", ... ("unknown" outside the enum): the names of
// VMFENCE_REASONS in vmfence_abi.h.
const char* reason_name(uint8_t reason);
std::optional<uint8_t> reason_from_name(std::string_view name);
const char* direction_name(uint8_t direction);  // "from_vm" | "to_vm"
const char* datapath_mode_name(uint8_t mode);   // "filtered", ...
// "tcp", "udp", "icmp", "icmpv6"; otherwise the number as text.
std::string l4_proto_name(uint8_t proto);

}  // namespace vmfence
