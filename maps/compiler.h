// The compiler from a Spec to map contents (what the datapath will see).
#pragma once

#include <string>
#include <vector>

#include "agent/spec.h"
#include "vmfence_abi.h"

namespace vmfence {

struct PolicyEntry {
  vmfence_policy_key key{};  // policy_id left 0: the applier sets the generation
  vmfence_policy_value value{};
};

// Everything one VM puts in the maps.
struct VmPlan {
  std::string name;
  std::string interface;
  vmfence_vm vm{};  // slot and policy_id left 0: the applier sets them
  std::vector<PolicyEntry> egress;
  std::vector<PolicyEntry> ingress;
  std::vector<vmfence_gateway_key> gateways;
  std::vector<vmfence_addr> host_addresses;   // -> VMFENCE_MAP_OWNERS
  std::vector<vmfence_addr_key> net_addresses;  // -> VMFENCE_MAP_OWNER_NETS
};

struct Plan {
  std::vector<VmPlan> vms;  // in spec order (sorted by name)
  std::vector<SpecError> errors;  // limits the spec cannot express (port rules per prefix)
  bool ok() const { return errors.empty(); }
};

// Compile one VM. `host` supplies the IMDS address. Errors (too many port
// rules apply to one prefix) are appended with the VM's file.
VmPlan compile_vm(const VmSpec& vm, const HostSpec& host, std::vector<SpecError>& errors);
Plan compile(const Spec& spec);

// 16-byte IPv4-mapped form of a Cidr's address, masked to its prefix.
std::array<uint8_t, 16> masked_addr(const Cidr& c);

// Sampling threshold for bpf_get_prandom_u32() < threshold.
uint32_t sample_threshold(double rate);

}  // namespace vmfence
