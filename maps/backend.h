// The map writer's view of the kernel: a few byte-level operations on the
// datapath's maps. Two implementations: the pinned BPF maps (PinnedBackend,
// maps/pinned_maps.cpp) and an in-memory fake that can fail any write on
// purpose (FakeBackend, maps/fake_backend.h), so the writer's ordering and
// rollback are unit-tested without root.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "maps/status.h"
#include "vmfence_abi.h"

namespace vmfence {

struct MapSet;

// The maps the writer changes (the flow and fragment tables are per slot and
// handled by ensure_tables / drop_tables). egress and ingress are arrays of
// per-VM tries; the writer addresses their entries with a PolicyKey.
enum class MapId : uint8_t { vms, owners, owner_nets, egress, ingress, gateways, state, limits };
const char* map_id_name(MapId id);

using Bytes = std::vector<uint8_t>;

// A policy entry's key as the writer sees it: which VM trie
// (vmfence_policy_index of the VM's slot and generation) and the key in it.
struct PolicyKey {
  uint32_t index;
  vmfence_addr_key prefix;
};

template <typename T>
Bytes to_bytes(const T& x) {
  auto p = reinterpret_cast<const uint8_t*>(&x);
  return Bytes(p, p + sizeof(T));
}

class MapBackend {
 public:
  virtual ~MapBackend() = default;
  virtual Status update(MapId map, const Bytes& key, const Bytes& value) = 0;
  // Deleting a key that is not there is not an error.
  virtual Status erase(MapId map, const Bytes& key) = 0;
  // False when absent.
  virtual bool lookup(MapId map, const Bytes& key, Bytes& value) = 0;
  virtual std::vector<Bytes> keys(MapId map) = 0;
  // The slot's own flow table (flow_limit entries; a changed limit keeps the
  // live flows) and fragment table.
  virtual Status ensure_tables(uint32_t slot, uint32_t flow_limit) = 0;
  virtual void drop_tables(uint32_t slot) = 0;
  // A fresh slot: counters zeroed, state (quarantine, windows, budget) zeroed.
  virtual Status reset_slot(uint32_t slot) = 0;
  // Delete flows idle past their timeout from the slots' tables; how many
  // went. `left` (optional) gets each slot's remaining flows and table size.
  struct TableUse {
    size_t entries = 0;
    uint32_t max_entries = 0;
  };
  virtual size_t sweep_flows(const std::vector<uint32_t>& slots, const vmfence_config& cfg,
                             std::map<uint32_t, TableUse>* left) = 0;
  virtual Status write_config(const vmfence_config& cfg) = 0;

  // Per-VM policy tries (MapId::egress / ingress, keyed by PolicyKey).
  // Start the tries at `index` afresh, empty (a new generation fills them;
  // whatever an earlier generation left there is never written to).
  virtual void reset_policy(uint32_t index) = 0;
  // Free the tries at `index` (a generation no longer in force).
  virtual void drop_policy(uint32_t index) = 0;
  // Publish the tries at `index` as the VM's (pins policy/<vm>_egress and
  // _ingress, replacing the previous generation's).
  virtual Status name_policy(uint32_t index, const std::string& vm) = 0;
  virtual void unname_policy(const std::string& vm) = 0;
  // Free every trie whose index is not live and unpin every name not live.
  virtual void prune_policies(const std::set<uint32_t>& live_indexes, const std::set<std::string>& live_names) = 0;
  // Put in force what the calls above prepared (new per-VM tries and flow
  // tables, freed tries): before a VM entry may point at them. Installing
  // inner maps waits for an RCU grace period, once per call.
  virtual Status flush() = 0;
};

// The real maps (fds borrowed from `maps`, which must outlive the backend);
// the VMs' policy tries are pinned by VM name under policy_dir (none when
// empty).
std::unique_ptr<MapBackend> pinned_backend(MapSet& maps, std::string policy_dir);

}  // namespace vmfence
