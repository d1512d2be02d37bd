// The agent publishes what it enforces (names are not in the maps) to
// RUN_DIR/vms.json for `status`, `wait` and `explain`: the VMs in force and
// the files it refused, with their errors.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "maps/status.h"

namespace vmfence {

struct StateVm {
  std::string name, interface, group, mode;
  uint32_t vm_id = 0, slot = 0, policy_id = 0, ifindex = 0;
  bool enforced = false;  // both programs attached and the policy installed
};

struct StateRejected {
  std::string file, name, interface;
  std::vector<std::string> errors;  // "FILE: json.path: message"
  bool kept_last_good = false;      // an enforced VM keeps its previous policy
  int64_t mtime_ns = 0;             // of the file when it was refused
};

struct State {
  std::string config_dir;
  int pid = 0;
  int64_t scanned_ns = 0;  // CLOCK_REALTIME when the agent last read vms.d
  std::vector<StateVm> vms;
  std::vector<StateRejected> rejected;
};

// The fleet's state (RUN_DIR/fleet.json, every second): what `status` and
// `explain` say about etcd. The remote VMs themselves are in
// RUN_DIR/fleet-view.json (agent/fleet).
struct FleetState {
  std::string host;
  bool connected = false, synced = false;
  int64_t confirmed_ns = 0;  // CLOCK_REALTIME the remote view was last known current
  uint64_t remote_vms = 0;   // remote VMs in force
  uint64_t conflicts = 0;    // local VMs refused for an earlier remote claim
  std::string error;         // etcd's last failure
};
Status write_fleet_status(const std::string& run_dir, const FleetState& f);
std::optional<FleetState> read_fleet_status(const std::string& run_dir);

// Replace the file at path with text (and a newline) in one step: a reader
// sees the old or the new file, never half of one (temp file + rename).
Status write_file_atomic(const std::string& path, const std::string& text);

// Atomic (temp file + rename).
Status write_state_file(const std::string& run_dir, const State& state);
// Empty when the file is absent or unreadable.
State read_state(const std::string& run_dir);
// The VMs only (older callers).
std::vector<StateVm> read_state_file(const std::string& run_dir, std::string* config_dir = nullptr);

}  // namespace vmfence
