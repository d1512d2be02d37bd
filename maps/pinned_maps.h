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
  Fd vms, owners, owner_nets, egress, ingress, gateways, flows, frags, counters, state, config, events;
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
// Flows in every VM's table together.
size_t count_flows(const MapSet& maps);
// One VM's flow table: entries and size (limits.flows); {0, 0} without one.
struct TableFill {
  size_t entries = 0;
  uint32_t max_entries = 0;
};
TableFill flow_table_fill(const MapSet& maps, uint32_t slot);

// What is installed for one VM.
struct InstalledVm {
  VmPlan plan;
  uint32_t slot = 0;
  uint32_t policy_id = 0;
  uint32_t ifindex = 0;  // 0: interface absent, no vms entry
};

// Installs plans. A VM's change is: write the new generation's policy entries,
// switch the VM's vms entry to it in one update, then delete the old
// generation. Owners and gateways are added before and removed after.
class MapWriter {
 public:
  explicit MapWriter(MapSet& maps) : maps_(maps) {}
  // Learn slots and generations from the maps of a previous run.
  Status adopt();
  // Install or update a VM; ifindex 0 = its interface is not there yet.
  Status install(const VmPlan& plan, uint32_t ifindex);
  // Bind an installed VM to an interface that appeared / went away.
  Status bind(const std::string& name, uint32_t ifindex);
  Status unbind(const std::string& name);
  // The VM's spec is gone: its interface (if any) drops everything, its
  // policy entries and addresses are freed.
  Status remove(const std::string& name);
  // The interface of a removed VM went away: free its entry and slot.
  void forget_orphan(uint32_t ifindex);
  // Remove entries no installed VM owns (after a restart's full install).
  Status collect_garbage();
  Status write_config(const vmfence_config& cfg);
  // Delete flows idle past their timeout from every VM's table (the datapath
  // already ignores them; this frees their room). Returns how many went.
  size_t sweep_flows(const vmfence_config& cfg);
  const std::map<std::string, InstalledVm>& installed() const { return vms_; }
  // ifindex entries that drop everything because their spec was removed.
  bool is_orphaned(uint32_t ifindex) const { return orphaned_.count(ifindex) != 0; }

 private:
  Status write_policy(int fd, const std::vector<PolicyEntry>& entries, uint32_t policy_id);
  void delete_policy(int fd, const std::vector<PolicyEntry>& entries, uint32_t policy_id);
  uint32_t alloc_slot(uint32_t vm_id);
  void free_slot(uint32_t slot);
  // The slot's own flow table (limit entries) and fragment table; a changed
  // limit gets a new table with the live flows copied over.
  Status ensure_tables(uint32_t slot, uint32_t flow_limit);
  Status zero_slot(uint32_t slot);
  void clear_quarantine(uint32_t slot);

  MapSet& maps_;
  std::map<std::string, InstalledVm> vms_;
  std::map<uint32_t, uint32_t> adopted_slots_;  // vm_id -> slot of a previous run
  std::set<uint32_t> used_slots_;
  std::map<uint32_t, uint32_t> orphaned_;  // ifindex -> slot (spec removed, interface remains)
  uint32_t next_free_slot_ = 1;
  uint32_t next_policy_id_ = 1;
};

}  // namespace vmfence
