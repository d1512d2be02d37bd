// The datapath in the kernel: the skeleton loaded with its maps pinned (a
// previous run's pinned maps are re-used as they are), and the two programs
// attached to each VM interface.
//
// Attachment, per interface and direction (from_vm = TC ingress of the TAP,
// to_vm = TC egress):
//  - tcx (kernel >= 6.6): a tcx link pinned at link_path(dir, ifindex, dir);
//  - cls_bpf (older kernels, or VMFENCE_ATTACH=cls_bpf): a direct-action
//    cls_bpf filter on the clsact qdisc at a fixed handle and priority, with
//    the program itself pinned at the same link_path as the record of it (so
//    `down`, linked_ifindexes() and attached() find both kinds the same way).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "maps/pinned_maps.h"
#include "maps/status.h"

struct vmfence_tc;

namespace vmfence {

// Route libbpf's log into spdlog (warnings and errors only).
void route_libbpf_log();

enum class AttachMode { kTcx, kClsBpf };
const char* attach_mode_name(AttachMode mode);  // "tcx", "cls_bpf"

class Datapath {
 public:
  ~Datapath();
  Datapath(const Datapath&) = delete;
  Datapath& operator=(const Datapath&) = delete;

  // Mount bpffs if needed, load the programs, pin (or adopt) the maps under dir.
  // The attach mode starts as tcx, or cls_bpf when VMFENCE_ATTACH=cls_bpf.
  static Status load(const std::string& dir, std::unique_ptr<Datapath>& out);

  // Attach both programs to ifindex, completely or not at all:
  //  - an attachment that is live already (a previous run's pinned tcx link,
  //    or our cls_bpf filter) is switched to this datapath's program in place
  //    (bpf_link_update / BPF_TC_F_REPLACE): never a detach-then-attach window;
  //  - otherwise (none, or a defunct link: its interface was re-created) a new
  //    link or filter is made and pinned (temp pin renamed over the old one),
  //    and only then the old one is detached;
  //  - if the second direction fails, the first one, if this call created it,
  //    is removed again, so a failed call never leaves the TAP half attached.
  // In tcx mode, a kernel without tcx (EINVAL / EOPNOTSUPP from the link
  // create) switches this datapath to cls_bpf for good (attach_mode()).
  Status attach(uint32_t ifindex);
  // Remove both kinds of attachment of ifindex (interface gone, or `down`):
  // tcx links and our cls_bpf filters, the XDP pre-filter, and their pins.
  // Failures are logged.
  static void detach(const std::string& dir, uint32_t ifindex);
  // Both programs of this datapath (its program ids) are attached to ifindex:
  // live tcx links on ifindex, or our cls_bpf filters, with their pins.
  bool attached(uint32_t ifindex) const;
  // Both directions of ifindex have a live attachment recorded under dir
  // (any vmfence programs; for CLI commands without a loaded datapath).
  static bool attached(const std::string& dir, uint32_t ifindex);
  // The XDP pre-filter (host.json "xdp_prefilter") on ifindex: a pinned XDP
  // link at xdp_path(), its program switched in place when one is live. An
  // early drop only (tcx judges every frame anyway), so a failure, e.g.
  // another XDP program on the device, leaves the interface enforced.
  Status attach_xdp(uint32_t ifindex);
  static void detach_xdp(const std::string& dir, uint32_t ifindex);
  // This datapath's XDP program is attached to ifindex through our pin.
  bool xdp_attached(uint32_t ifindex) const;
  static std::string xdp_path(const std::string& dir, uint32_t ifindex);
  // ifindexes with an XDP pre-filter pin under dir.
  static std::vector<uint32_t> prefiltered_ifindexes(const std::string& dir);

  // How this datapath attaches (tcx, or cls_bpf after a fallback / override).
  AttachMode attach_mode() const { return mode_; }

  // Pin paths of ifindex's links (or, in cls_bpf mode, programs).
  static std::string link_path(const std::string& dir, uint32_t ifindex, bool from_vm);
  // Unpin maps of other layout versions (a previous release's vmfence_*_vN)
  // once the programs on every interface use the current ones.
  static void remove_stale_pins(const std::string& dir);
  // ifindexes with a pin (link or program) of either direction under dir.
  static std::vector<uint32_t> linked_ifindexes(const std::string& dir);

  MapSet& maps() { return maps_; }
  int from_vm_prog_fd() const;
  int to_vm_prog_fd() const;
  int xdp_prog_fd() const;
  const std::string& dir() const { return dir_; }

  // cls_bpf filters: fixed handle and priority (re-attach replaces in place).
  static constexpr uint32_t kTcHandle = 0x766d66;  // "vmf"
  static constexpr uint32_t kTcPriority = 1;

 private:
  Datapath() = default;
  // One direction; *created: there was no live attachment before.
  // *tcx_unsupported: the tcx link create failed with EINVAL / EOPNOTSUPP.
  Status attach_tcx(uint32_t ifindex, bool from_vm, bool* created, bool* tcx_unsupported);
  Status attach_cls(uint32_t ifindex, bool from_vm, bool* created);
  Status attach_both(uint32_t ifindex, AttachMode mode, bool* tcx_unsupported);

  struct vmfence_tc* skel_ = nullptr;
  MapSet maps_;
  std::string dir_;
  AttachMode mode_ = AttachMode::kTcx;
  uint32_t from_vm_prog_id_ = 0;
  uint32_t to_vm_prog_id_ = 0;
  uint32_t xdp_prog_id_ = 0;
};

}  // namespace vmfence
