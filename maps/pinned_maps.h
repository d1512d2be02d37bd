// Typed handles on the pinned maps, and the writer that installs compiled
// VM plans with an atomic per-VM switch.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "maps/backend.h"
#include "maps/compiler.h"
#include "maps/status.h"
#include "vmfence_abi.h"

namespace vmfence {

// Pin directory: VMFENCE_PIN_DIR from the environment (tests), else the contract path.
std::string pin_dir();
// Where the agent publishes VM names for the CLI: VMFENCE_RUN_DIR or /run/vmfence.
std::string run_dir();
// Mount bpffs at /sys/fs/bpf when it is not mounted, then create `dir`.
Status ensure_bpffs(const std::string& dir);

// Every map of the datapath, as owned fds.
struct MapSet {
  Fd vms, owners, owner_nets, egress, ingress, gateways, flows, frags, counters, state, config, events, limits;
  // Open the pinned maps under dir (CLI commands, tests).
  static Status open_pinned(const std::string& dir, MapSet& out);
  // Visit (name, fd) of every map.
  void for_each(const std::function<void(const char* name, int fd)>& fn) const;
};

// Sum a VM slot's per-CPU counters.
Status read_counters(const MapSet& maps, uint32_t slot, vmfence_counters& out);
Status read_state(const MapSet& maps, uint32_t slot, vmfence_state& out);
// All (ifindex, vm) entries.
std::vector<std::pair<uint32_t, vmfence_vm>> read_vms(const MapSet& maps);
// Number of entries (iterates keys).
size_t count_entries(int map_fd, size_t key_size);
// The inner map at `slot` of an array of maps (invalid Fd when empty).
Fd inner_map(int outer_fd, uint32_t slot);
// (index, inner map id) of every entry an array of maps holds.
std::vector<std::pair<uint32_t, uint32_t>> inner_map_ids(int outer_fd);
// Flows in every VM's table together.
size_t count_flows(const MapSet& maps);
// One VM's flow table: entries and size (limits.flows); {0, 0} without one.
struct TableFill {
  size_t entries = 0;
  uint32_t max_entries = 0;
};
TableFill flow_table_fill(const MapSet& maps, uint32_t slot);
// One VM's policy trie (egress or ingress) in force for the generation
// policy_id at slot: every (prefix, rules) entry, in key order.
using PolicyRules = std::vector<std::pair<vmfence_addr_key, vmfence_policy_value>>;
PolicyRules read_policy(const MapSet& maps, bool egress, uint32_t slot, uint32_t policy_id);
// The file name a VM's tries are pinned under (policy/<name>_egress): the VM
// name with '.' (refused by bpffs) written as ':' (never in a VM name).
std::string policy_pin_name(const std::string& vm);
// The same from a trie pinned at path (policy/<vm>_egress); empty when absent.
PolicyRules read_policy(const std::string& path);

}  // namespace vmfence

#include "maps/map_writer.h"  // MapWriter: callers of the pinned maps use both
