// An in-memory MapBackend for unit tests: maps are ordered byte maps, and any
// write can be made to fail (the Nth update from now, or every write to one
// map) to prove that a failed change leaves nothing behind.
#pragma once

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <set>

#include "maps/backend.h"

namespace vmfence {

class FakeBackend : public MapBackend {
 public:
  struct Tables {
    uint32_t flow_limit = 0;
    bool operator==(const Tables&) const = default;
  };
  struct Snapshot {
    std::map<MapId, std::map<Bytes, Bytes>> maps;
    std::map<uint32_t, Tables> tables;
    bool operator==(const Snapshot&) const = default;
  };

  Status update(MapId map, const Bytes& key, const Bytes& value) override {
    ++updates_;
    if (fail_at_ && updates_ == *fail_at_) return Status::error(ENOSPC, "fake: injected failure");
    if (failing_maps_.count(map)) return Status::error(E2BIG, "fake: map full");
    state_.maps[map][key] = value;
    return {};
  }
  Status erase(MapId map, const Bytes& key) override {
    state_.maps[map].erase(key);
    return {};
  }
  bool lookup(MapId map, const Bytes& key, Bytes& value) override {
    auto& m = state_.maps[map];
    auto it = m.find(key);
    if (it == m.end()) return false;
    value = it->second;
    return true;
  }
  std::vector<Bytes> keys(MapId map) override {
    std::vector<Bytes> out;
    for (const auto& [k, v] : state_.maps[map]) out.push_back(k);
    return out;
  }
  Status ensure_tables(uint32_t slot, uint32_t flow_limit) override {
    ++updates_;
    if (fail_at_ && updates_ == *fail_at_) return Status::error(ENOMEM, "fake: injected failure (tables)");
    state_.tables[slot].flow_limit = flow_limit;
    return {};
  }
  void drop_tables(uint32_t slot) override { state_.tables.erase(slot); }
  Status reset_slot(uint32_t slot) override {
    state_.maps[MapId::state].erase(to_bytes(slot));
    ++resets_;
    return {};
  }
  size_t sweep_flows(const std::vector<uint32_t>&, const vmfence_config&, std::map<uint32_t, TableUse>*) override {
    return 0;
  }
  Status write_config(const vmfence_config&) override { return {}; }
  void reset_policy(uint32_t index) override { drop_policy(index); }
  Status flush() override { return {}; }
  void drop_policy(uint32_t index) override {
    for (MapId m : {MapId::egress, MapId::ingress})
      std::erase_if(state_.maps[m], [&](const auto& kv) { return index_of(kv.first) == index; });
  }
  Status name_policy(uint32_t index, const std::string& vm) override {
    names_[vm] = index;
    return {};
  }
  void unname_policy(const std::string& vm) override { names_.erase(vm); }
  void prune_policies(const std::set<uint32_t>& live, const std::set<std::string>& live_names) override {
    for (MapId m : {MapId::egress, MapId::ingress})
      std::erase_if(state_.maps[m], [&](const auto& kv) { return !live.count(index_of(kv.first)); });
    std::erase_if(names_, [&](const auto& kv) { return !live_names.count(kv.first); });
  }

  // Fail the nth update from now (1 = the next one); nullopt = never.
  void fail_update(std::optional<uint64_t> nth) { fail_at_ = nth ? std::optional(updates_ + *nth) : std::nullopt; }
  void fail_map(MapId map, bool on) { on ? (void)failing_maps_.insert(map) : (void)failing_maps_.erase(map); }
  uint64_t updates() const { return updates_; }
  uint64_t resets() const { return resets_; }
  const Snapshot& snapshot() const { return state_; }
  Snapshot copy() const {
    Snapshot s = state_;
    std::erase_if(s.maps, [](const auto& kv) { return kv.second.empty(); });
    return s;
  }
  // VM name -> the policy index pinned under it.
  const std::map<std::string, uint32_t>& policy_names() const { return names_; }
  size_t size(MapId map) const {
    auto it = state_.maps.find(map);
    return it == state_.maps.end() ? 0 : it->second.size();
  }

 private:
  static uint32_t index_of(const Bytes& policy_key) {
    PolicyKey k{};
    std::memcpy(&k, policy_key.data(), std::min(policy_key.size(), sizeof(k)));
    return k.index;
  }

  Snapshot state_;
  std::map<std::string, uint32_t> names_;
  uint64_t updates_ = 0, resets_ = 0;
  std::optional<uint64_t> fail_at_;
  std::set<MapId> failing_maps_;
};

}  // namespace vmfence
