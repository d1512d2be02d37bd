// The datapath in the kernel: the skeleton loaded with its maps pinned (a
// previous run's pinned maps are re-used as they are), and the two programs
// attached to each VM interface through pinned tcx links.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "maps/pinned_maps.h"
#include "maps/status.h"

struct vmfence_tc;

namespace vmfence {

// Route libbpf's log into spdlog (warnings and errors only).
void route_libbpf_log();

class Datapath {
 public:
  ~Datapath();
  Datapath(const Datapath&) = delete;
  Datapath& operator=(const Datapath&) = delete;

  // Mount bpffs if needed, load the programs, pin (or adopt) the maps under dir.
  static Status load(const std::string& dir, std::unique_ptr<Datapath>& out);

  // Attach both programs to ifindex. An existing pinned link (previous run)
  // is switched to the new program in place (bpf_link_update): never a
  // detach-then-attach window.
  Status attach(uint32_t ifindex);
  // Remove the links of ifindex (interface gone, or `down`).
  static void detach(const std::string& dir, uint32_t ifindex);
  // Both programs are on ifindex.
  bool attached(uint32_t ifindex) const;
  // Pin paths of ifindex's links.
  static std::string link_path(const std::string& dir, uint32_t ifindex, bool from_vm);
  // Unpin maps of other layout versions (a previous release's vmfence_*_vN)
  // once the programs on every interface use the current ones.
  static void remove_stale_pins(const std::string& dir);
  // ifindexes with pinned links under dir.
  static std::vector<uint32_t> linked_ifindexes(const std::string& dir);

  MapSet& maps() { return maps_; }
  int from_vm_prog_fd() const;
  int to_vm_prog_fd() const;
  const std::string& dir() const { return dir_; }

 private:
  Datapath() = default;
  struct vmfence_tc* skel_ = nullptr;
  MapSet maps_;
  std::string dir_;
};

}  // namespace vmfence
