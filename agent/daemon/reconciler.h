// The Reconciler: turns (what is enforced, the spec files as they are now)
// into ordered map writes, with every ordering rule in one place:
//   1. admission: conflicts are blamed on the newcomer (agent/spec admit());
//   2. config flags that a new VM needs are written before its entries;
//   3. every changed VM stages, then every VM commits (one vms update each),
//      then removed VMs are freed, then every VM releases its old generation:
//      an address moving between VMs is owned by exactly one VM throughout;
//   4. a failed change is undone (the VM keeps what it had; a newcomer's
//      interface drops everything), and a change whose new addresses are
//      still held by a VM whose change failed is undone too;
//   5. interfaces named by refused files drop everything (no_policy).
// It talks to the kernel only through MapWriter (whose backend is a fake in
// the unit tests) and an interface-name lookup; attaching the programs is
// the caller's (it gets the list of interfaces that need them).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "agent/spec/spec.h"
#include "maps/compiler.h"
#include "maps/map_writer.h"

namespace vmfence {

struct ReconcileResult {
  std::vector<VmSpec> in_force;        // sorted by name
  std::vector<RejectedFile> rejected;  // refused files, install failures included
  std::vector<std::string> changed;    // VMs whose maps changed
  std::vector<std::string> removed;    // VMs no longer in force
  std::vector<uint32_t> blocked;       // interfaces now in no_policy for a refused file
  bool host_ok = true;                 // false: host.json is broken, nothing changed
};

class Reconciler {
 public:
  using IfindexOf = std::function<uint32_t(const std::string& ifname)>;
  Reconciler(MapWriter& writer, IfindexOf ifindex_of) : writer_(writer), ifindex_of_(std::move(ifindex_of)) {}

  // Make the maps match `files`, given the VMs enforced now (`incumbents`,
  // their last good specs). `enforced` names VMs a previous run left in the
  // kernel (first reconcile after a restart).
  // `reserved`: see admit().
  ReconcileResult reconcile(const SpecFiles& files, const std::vector<VmSpec>& incumbents,
                            const std::set<std::string>& enforced = {}, const std::vector<VmSpec>& reserved = {});

  // One VM's new spec whose claims (name, interface, MAC, addresses,
  // gateway, group) are those of `current`, the VM in force, under an
  // unchanged host.json: admission cannot change (no conflict appears or
  // goes away) nor can the VM address space, so only this VM is compiled and
  // written, with reconcile()'s steps (stage, commit, release). A reload
  // after one file changed at 10,000 VMs takes this path.
  // false: not such a change, or it failed (nothing written): the caller
  // runs reconcile(), which also reports failures. *changed: maps written.
  bool update_in_place(const VmSpec& next, const VmSpec& current, const HostSpec& host, bool* changed);

  // The fleet's part of the datapath config (host.json "fleet"): the
  // fleet interfaces present now, and whether a remote VM owns a prefix.
  // Rewrites the config when that changed (an underlay interface came or
  // went, the remote view changed); reconcile() keeps it.
  Status refresh_fleet_config(bool remote_nets);

 private:
  // compile_vm()'s verdict on a VM, kept while its spec, host.json and the VM
  // address space stay the same: a reload after one file changed compiles
  // that VM alone. The plan itself is not kept (the writer holds the one in
  // force): `installed` says the writer holds exactly this compile's plan.
  struct Compiled {
    VmSpec spec;
    std::vector<SpecError> errors;
    bool installed = false;
  };
  // The entry for vm; compiles on a miss (then `fresh`, and the plan is in
  // *plan).
  Compiled& compiled(const VmSpec& vm, const HostSpec& host, const std::vector<Cidr>& nets, VmPlan* plan, bool* fresh);

  // datapath_config() plus the fleet's part.
  vmfence_config config_for(const HostSpec& host, const std::vector<VmSpec>& vms) const;
  void add_fleet_part(const HostSpec& host, vmfence_config& cfg) const;

  MapWriter& writer_;
  IfindexOf ifindex_of_;
  bool remote_nets_ = false;
  std::optional<vmfence_config> config_written_;
  HostSpec compiled_host_;
  std::vector<Cidr> compiled_nets_;
  bool reconciled_ = false;
  HostSpec host_in_force_;                    // of the last reconcile()
  std::vector<Cidr> nets_in_force_;           // vm_address_space() of what it left in force
  std::vector<Cidr> admission_nets_;          // ... and of every file it was given
  std::map<std::string, Compiled> compiled_;  // by VM name
};

}  // namespace vmfence
