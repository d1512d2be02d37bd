// The agent publishes the VMs it enforces (names are not in the maps) to
// RUN_DIR/vms.json for `status`, `wait` and `explain`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "maps/status.h"

namespace vmfence {

struct StateVm {
  std::string name, interface, group, mode;
  uint32_t vm_id = 0, slot = 0, policy_id = 0, ifindex = 0;
};

// Atomic (temp file + rename).
Status write_state_file(const std::string& run_dir, const std::string& config_dir, const std::vector<StateVm>& vms);
// Empty when the file is absent or unreadable.
std::vector<StateVm> read_state_file(const std::string& run_dir, std::string* config_dir = nullptr);

}  // namespace vmfence
