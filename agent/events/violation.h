// A violation as the agent sees it: one ring buffer event, decoded.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vmfence {

// One field of a violation, named once for both outputs: journald carries it
// as VMFENCE_<NAME> (upper case), `vmfence monitor --json` as "name".
struct ViolationField {
  const char* name;     // "vm", "reason", "src", ...
  std::string value;    // as text (journald fields are text)
  bool number = false;  // a number in JSON (dport)
};

struct Violation {
  std::string vm;         // VM name ("" when the interface has no VM)
  std::string interface;  // TAP name
  std::string reason;     // reason_name(): "spoofed_ip", "cross_group", ...
  std::string direction;  // "from_vm" | "to_vm"
  std::string src;        // address ("10.1.0.2"), or MAC for L2-only drops
  std::string dst;
  std::string proto;  // "tcp", "udp", "icmp", "icmpv6", "arp", number otherwise
  uint16_t sport = 0;
  uint16_t dport = 0;
  std::string mode;           // "filtered", ...
  uint64_t timestamp_ns = 0;  // CLOCK_MONOTONIC, from the datapath
  bool trigger = false;       // reached on_violation.threshold
  bool quarantined = false;   // the datapath quarantined the VM
  // One human line: "vm1: cross_group from_vm 10.1.0.2 -> 10.2.0.2 tcp/22".
  std::string summary() const;
  // vm, reason, src, dst, proto, dport, mode, direction, interface.
  std::vector<ViolationField> fields() const;
};

}  // namespace vmfence
