// The compiler from a Spec to map contents (what the datapath will see).
#pragma once

#include <string>
#include <vector>

#include "agent/spec/spec.h"
#include "vmfence_abi.h"

namespace vmfence {

struct PolicyEntry {
  vmfence_addr_key key{};  // the peer prefix in the VM's trie
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
  std::vector<vmfence_addr> host_addresses;     // -> VMFENCE_MAP_OWNERS
  std::vector<vmfence_addr_key> net_addresses;  // -> VMFENCE_MAP_OWNER_NETS
  uint32_t flow_limit = VMFENCE_DEFAULT_FLOWS;  // size of the VM's flow table
  vmfence_limit limit{};                        // rate limits (buckets zero)
};

// The datapath's form of a VM's rate limits (README, "Rate limits"): costs
// in ns, bucket depths as time at the rate. All zero without limits.
vmfence_limit compile_limits(const RateLimits& r);

// The EUI-64 link-local address of a MAC (fe80::, U/L bit flipped, ff:fe in
// the middle): registered as the VM's own, so no other VM may claim it.
vmfence_addr eui64_link_local(const std::array<uint8_t, 6>& mac);

// The Plan of a Spec: what the maps hold (per VM) and the datapath's global
// knobs. The nftables side is built from the same Spec by agent/nft
// (build_ruleset), which owns the libnftnl representation.
struct Plan {
  std::vector<VmPlan> vms;        // in spec order (sorted by name)
  vmfence_config config{};        // the datapath's global knobs
  std::vector<SpecError> errors;  // limits the spec cannot express (port rules per prefix)
  bool ok() const { return errors.empty(); }
};

// VM address space: the supernets (IPv4 /16, IPv6 /48, or the address itself
// when shorter) that hold every VM address. Each egress policy gets an entry
// for each, flagged VMFENCE_POLICY_F_VM_NET, so one lookup tells the datapath
// whether a destination can belong to a VM at all.
std::vector<Cidr> vm_address_space(const std::vector<VmSpec>& vms);
std::vector<Cidr> vm_address_space(const std::vector<const VmSpec*>& vms);

// Compile one VM. `host` supplies the IMDS address; `vm_nets` must be
// vm_address_space() of every VM in force (this one included). Errors (too
// many port rules apply to one prefix) are appended with the VM's file.
VmPlan compile_vm(const VmSpec& vm, const HostSpec& host, const std::vector<Cidr>& vm_nets,
                  std::vector<SpecError>& errors);
Plan compile(const Spec& spec);

// The owner-map key of one VM address: a full-length one goes to owners, a
// prefix to owner_nets.
void add_owner_key(const Cidr& a, std::vector<vmfence_addr>& hosts, std::vector<vmfence_addr_key>& nets);

// The datapath's global knobs for a set of VMs (flow timeouts, the event
// budget; OWNER_NETS when a VM owns a prefix).
vmfence_config datapath_config(const HostSpec& host, const std::vector<VmSpec>& vms);

// 16-byte IPv4-mapped form of a Cidr's address, masked to its prefix.
std::array<uint8_t, 16> masked_addr(const Cidr& c);

// Sampling threshold for bpf_get_prandom_u32() < threshold.
uint32_t sample_threshold(double rate);

}  // namespace vmfence
