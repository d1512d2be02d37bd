// The map writer: installs compiled VM plans through a MapBackend.
//
// A VM's change has three steps, so a reload can order the changes of many
// VMs (every VM stages before any commits; every VM commits before any
// releases):
//   stage    the new generation's policy entries in the VM's idle tries
//            (invisible until the switch),
//            the VM's addresses and gateways (an address moving between VMs
//            is overwritten in one update: never unowned, never owned twice);
//   commit   the switch: one update of the VM's vms entry;
//   release  the old generation's tries (the new ones are pinned under the
//            VM's name), and addresses the VM gave up
//            (only while it still owns them: never an entry another VM now
//            owns).
// A failed stage or commit is undone write by write (previous values
// restored), so the VM keeps exactly what it had.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "maps/backend.h"
#include "maps/compiler.h"

namespace vmfence {

// What is installed for one VM.
struct InstalledVm {
  VmPlan plan;
  uint32_t slot = 0;
  uint32_t policy_id = 0;
  uint32_t ifindex = 0;  // 0: interface absent, no vms entry
};

// One VM's change between stage and release (or abort).
struct VmChange {
  struct Undo {
    MapId map;
    Bytes key;
    std::optional<Bytes> previous;  // nullopt: the key was absent
  };
  InstalledVm next;
  std::optional<InstalledVm> old;
  bool new_slot = false;
  bool same_instance = false;           // re-added on the interface it was removed from
  bool resize_tables = false;           // a changed limits.flows: new flow table at release
  std::optional<uint32_t> predecessor;  // slot of the VM this interface had before
  std::vector<std::string> warnings;    // non-fatal problems of release()
  bool committed = false;
  std::vector<Undo> undo;  // in write order
};

class MapWriter {
 public:
  // The pinned maps under pin_dir (the VMs' tries go to pin_dir/policy).
  MapWriter(MapSet& maps, const std::string& pin_dir);
  explicit MapWriter(std::unique_ptr<MapBackend> backend);
  ~MapWriter();
  MapWriter(const MapWriter&) = delete;
  MapWriter& operator=(const MapWriter&) = delete;

  // Learn slots, generations and interfaces from the maps of a previous run.
  Status adopt();
  // stage + commit + release; on failure nothing of the change remains.
  Status install(const VmPlan& plan, uint32_t ifindex);

  Status stage(const VmPlan& plan, uint32_t ifindex, VmChange& out);
  Status commit(VmChange& change);
  void release(VmChange& change);
  void abort(VmChange& change);

  // Bind an installed VM to an interface that appeared / went away. A new
  // interface is a new VM instance: its quarantine and windows start clear.
  Status bind(const std::string& name, uint32_t ifindex);
  Status unbind(const std::string& name);
  // The VM's spec is gone: its interface (if any) drops everything
  // (no_policy), its policy entries and addresses are freed.
  Status remove(const std::string& name);
  // An interface no valid spec may use (its file was rejected): drop
  // everything on it (no_policy). `vm_id` names it in events.
  Status block(uint32_t ifindex, uint32_t vm_id);
  // A blocked or orphaned interface went away, or a VM takes it: free its
  // entry (and an orphan's slot).
  void forget_blocked(uint32_t ifindex);
  bool is_blocked(uint32_t ifindex) const { return blocked_.count(ifindex) != 0; }
  const std::map<uint32_t, uint32_t>& blocked() const { return blocked_; }

  // Remove entries no installed VM owns (after a restart's full install).
  Status collect_garbage();
  Status write_config(const vmfence_config& cfg);
  size_t sweep_flows(const vmfence_config& cfg, std::map<uint32_t, MapBackend::TableUse>* left = nullptr);
  const std::map<std::string, InstalledVm>& installed() const { return vms_; }
  // Entries written per map by this writer (for fill levels without a walk).
  size_t entries(MapId map) const;
  // Interfaces a previous run had enforced, per VM id (adopt()).
  std::optional<uint32_t> adopted_ifindex(uint32_t vm_id) const;

  // Remote VMs (host.json "fleet"): their addresses in the owner maps,
  // flagged VMFENCE_OWNER_F_REMOTE, keyed like a local VM's (struct
  // vmfence_addr in owners, vmfence_addr_key in owner_nets).
  struct RemoteOwners {
    std::map<Bytes, vmfence_owner> hosts, nets;
    size_t size() const { return hosts.size() + nets.size(); }
  };
  // Make the remote entries exactly `next`: an entry a local VM holds is
  // never touched (admission decided it is the local VM's), and an entry is
  // removed only while it is still a remote one. adopt() took over the
  // remote entries a previous run left pinned; collect_garbage() keeps them.
  Status set_remote(const RemoteOwners& next);
  const RemoteOwners& remote() const { return remote_; }

  // Kept for callers that predate blocking: same as forget_blocked.
  void forget_orphan(uint32_t ifindex) { forget_blocked(ifindex); }
  bool is_orphaned(uint32_t ifindex) const { return is_blocked(ifindex); }

 private:
  Status put(VmChange& c, MapId map, const Bytes& key, const Bytes& value, bool record_previous);
  uint32_t alloc_slot(uint32_t vm_id, bool& fresh);
  void free_slot(uint32_t slot);
  void reset_instance(uint32_t slot);
  void erase_counted(MapId map, const Bytes& key);
  // Free a generation's policy tries (the old one after a switch).
  void drop_generation(const InstalledVm& vm);
  void recount();

  std::unique_ptr<MapBackend> backend_;
  std::map<std::string, InstalledVm> vms_;
  struct Adopted {
    uint32_t slot = 0, ifindex = 0, policy_id = 0;
  };
  std::map<uint32_t, Adopted> adopted_;  // vm_id -> what a previous run had enforced
  std::set<uint32_t> used_slots_;
  std::map<uint32_t, uint32_t> blocked_;     // ifindex -> slot (0: a rejected file's interface)
  std::map<uint32_t, uint32_t> blocked_vm_;  // ifindex -> vm_id of a removed VM still blocked there
  std::map<MapId, size_t> counts_;
  RemoteOwners remote_;  // as written (or adopted)
  uint32_t next_free_slot_ = 1;
  uint32_t next_policy_id_ = 1;
};

}  // namespace vmfence
