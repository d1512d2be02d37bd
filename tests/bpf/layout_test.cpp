// The ABI header compiled twice (clang -target bpf, and this C++ compiler)
// must give one layout: every shared struct's size and member offsets in the
// BTF of the compiled BPF object are checked against sizeof/offsetof here
// (as cilium's alignchecker does), and every map of the object is checked
// against VMFENCE_MAP_* names, key/value types and sizes, and map sizes. The map
// names are checked against the VMFENCE_MAPS list at compile time.
//
// Opens the embedded object without loading it: no root needed.
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include <gtest/gtest.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "maps/pinned_maps.h"
#include "maps/reasons.h"
#include "vmfence_abi.h"
#include "vmfence_tc.skel.h"

namespace {

struct Field {
  const char* name;
  size_t offset;
  size_t size;
};

struct Layout {
  const char* name;
  size_t size;
  std::vector<Field> fields;
};

#define VMF_FIELD(S, f) \
  Field { #f, offsetof(S, f), sizeof(S::f) }

// Every struct of vmfence_abi.h, member by member (a new member must be
// added here: the test compares member counts).
const std::vector<Layout>& abi_structs() {
  static const std::vector<Layout> structs = {
      {"vmfence_vm",
       sizeof(vmfence_vm),
       {VMF_FIELD(vmfence_vm, vm_id), VMF_FIELD(vmfence_vm, group_id), VMF_FIELD(vmfence_vm, policy_id),
        VMF_FIELD(vmfence_vm, slot), VMF_FIELD(vmfence_vm, sample_threshold), VMF_FIELD(vmfence_vm, window_ms),
        VMF_FIELD(vmfence_vm, threshold), VMF_FIELD(vmfence_vm, mac), VMF_FIELD(vmfence_vm, mode),
        VMF_FIELD(vmfence_vm, flags), VMF_FIELD(vmfence_vm, v4_plen), VMF_FIELD(vmfence_vm, v6_plen),
        VMF_FIELD(vmfence_vm, v4_addr), VMF_FIELD(vmfence_vm, v6_addr)}},
      {"vmfence_addr", sizeof(vmfence_addr), {VMF_FIELD(vmfence_addr, addr)}},
      {"vmfence_addr_key",
       sizeof(vmfence_addr_key),
       {VMF_FIELD(vmfence_addr_key, prefixlen), VMF_FIELD(vmfence_addr_key, addr)}},
      {"vmfence_owner",
       sizeof(vmfence_owner),
       {VMF_FIELD(vmfence_owner, vm_id), VMF_FIELD(vmfence_owner, group_id), VMF_FIELD(vmfence_owner, flags)}},
      {"vmfence_config",
       sizeof(vmfence_config),
       {VMF_FIELD(vmfence_config, flags), VMF_FIELD(vmfence_config, event_budget),
        VMF_FIELD(vmfence_config, budget_window_ns), VMF_FIELD(vmfence_config, tcp_timeout_s),
        VMF_FIELD(vmfence_config, udp_timeout_s), VMF_FIELD(vmfence_config, icmp_timeout_s),
        VMF_FIELD(vmfence_config, fleet_ifaces), VMF_FIELD(vmfence_config, fleet_ifindex)}},

      {"vmfence_port_rule",
       sizeof(vmfence_port_rule),
       {VMF_FIELD(vmfence_port_rule, port_lo), VMF_FIELD(vmfence_port_rule, port_hi),
        VMF_FIELD(vmfence_port_rule, proto), VMF_FIELD(vmfence_port_rule, pad)}},
      {"vmfence_policy_value",
       sizeof(vmfence_policy_value),
       {VMF_FIELD(vmfence_policy_value, count), VMF_FIELD(vmfence_policy_value, flags),
        VMF_FIELD(vmfence_policy_value, pad), VMF_FIELD(vmfence_policy_value, rules)}},
      {"vmfence_gateway_key",
       sizeof(vmfence_gateway_key),
       {VMF_FIELD(vmfence_gateway_key, vm_id), VMF_FIELD(vmfence_gateway_key, addr)}},
      {"vmfence_flow_key",
       sizeof(vmfence_flow_key),
       {VMF_FIELD(vmfence_flow_key, vm_addr), VMF_FIELD(vmfence_flow_key, peer_addr),
        VMF_FIELD(vmfence_flow_key, vm_port), VMF_FIELD(vmfence_flow_key, peer_port),
        VMF_FIELD(vmfence_flow_key, vm_id), VMF_FIELD(vmfence_flow_key, proto), VMF_FIELD(vmfence_flow_key, pad)}},
      {"vmfence_flow",
       sizeof(vmfence_flow),
       {VMF_FIELD(vmfence_flow, last_seen_ns), VMF_FIELD(vmfence_flow, policy_id), VMF_FIELD(vmfence_flow, opened_by),
        VMF_FIELD(vmfence_flow, flags), VMF_FIELD(vmfence_flow, pad)}},
      {"vmfence_frag_key",
       sizeof(vmfence_frag_key),
       {VMF_FIELD(vmfence_frag_key, saddr), VMF_FIELD(vmfence_frag_key, daddr), VMF_FIELD(vmfence_frag_key, id),
        VMF_FIELD(vmfence_frag_key, vm_id), VMF_FIELD(vmfence_frag_key, proto), VMF_FIELD(vmfence_frag_key, pad)}},
      {"vmfence_counters",
       sizeof(vmfence_counters),
       {VMF_FIELD(vmfence_counters, from_vm_packets), VMF_FIELD(vmfence_counters, from_vm_bytes),
        VMF_FIELD(vmfence_counters, to_vm_packets), VMF_FIELD(vmfence_counters, to_vm_bytes),
        VMF_FIELD(vmfence_counters, events_suppressed), VMF_FIELD(vmfence_counters, events_lost),
        VMF_FIELD(vmfence_counters, drops), VMF_FIELD(vmfence_counters, to_vm_drops)}},
      {"vmfence_state",
       sizeof(vmfence_state),
       {VMF_FIELD(vmfence_state, budget_window_ns), VMF_FIELD(vmfence_state, violation_window_ns),
        VMF_FIELD(vmfence_state, budget_used), VMF_FIELD(vmfence_state, violations),
        VMF_FIELD(vmfence_state, quarantined), VMF_FIELD(vmfence_state, flows_added)}},
      {"vmfence_limit",
       sizeof(vmfence_limit),
       {VMF_FIELD(vmfence_limit, lock), VMF_FIELD(vmfence_limit, pad), VMF_FIELD(vmfence_limit, egress_byte_ns_q16),
        VMF_FIELD(vmfence_limit, egress_pkt_ns), VMF_FIELD(vmfence_limit, ingress_byte_ns_q16),
        VMF_FIELD(vmfence_limit, ingress_pkt_ns), VMF_FIELD(vmfence_limit, egress_burst_ns),
        VMF_FIELD(vmfence_limit, ingress_burst_ns), VMF_FIELD(vmfence_limit, egress_pkt_burst_ns),
        VMF_FIELD(vmfence_limit, ingress_pkt_burst_ns), VMF_FIELD(vmfence_limit, egress_bytes_at),
        VMF_FIELD(vmfence_limit, egress_pkts_at), VMF_FIELD(vmfence_limit, ingress_pkts_at),
        VMF_FIELD(vmfence_limit, ingress_next_ns)}},
      {"vmfence_event",
       sizeof(vmfence_event),
       {VMF_FIELD(vmfence_event, timestamp_ns), VMF_FIELD(vmfence_event, vm_id), VMF_FIELD(vmfence_event, ifindex),
        VMF_FIELD(vmfence_event, policy_id), VMF_FIELD(vmfence_event, reason), VMF_FIELD(vmfence_event, direction),
        VMF_FIELD(vmfence_event, mode), VMF_FIELD(vmfence_event, family), VMF_FIELD(vmfence_event, saddr),
        VMF_FIELD(vmfence_event, daddr), VMF_FIELD(vmfence_event, sport), VMF_FIELD(vmfence_event, dport),
        VMF_FIELD(vmfence_event, proto), VMF_FIELD(vmfence_event, flags), VMF_FIELD(vmfence_event, pad),
        VMF_FIELD(vmfence_event, smac), VMF_FIELD(vmfence_event, ethertype)}},
  };
  return structs;
}

struct MapDef {
  const char* name;
  bpf_map_type type;
  uint32_t max_entries;
  const char* key;  // BTF type name; nullptr: no key (ring buffer)
  size_t key_size;
  const char* value;
  size_t value_size;
};

const std::vector<MapDef>& abi_maps() {
  static const std::vector<MapDef> maps = {
      {VMFENCE_MAP_VMS, BPF_MAP_TYPE_HASH, VMFENCE_MAX_VMS, "__u32", 4, "vmfence_vm", sizeof(vmfence_vm)},
      {VMFENCE_MAP_OWNERS, BPF_MAP_TYPE_HASH, VMFENCE_MAX_OWNERS, "vmfence_addr", sizeof(vmfence_addr), "vmfence_owner",
       sizeof(vmfence_owner)},
      {VMFENCE_MAP_OWNER_NETS, BPF_MAP_TYPE_LPM_TRIE, VMFENCE_MAX_OWNER_NETS, "vmfence_addr_key",
       sizeof(vmfence_addr_key), "vmfence_owner", sizeof(vmfence_owner)},
      // Arrays of per-VM tries (key vmfence_addr_key, value vmfence_policy_value:
      // PolicyTriesCarryBtf checks the agent creates them so).
      {VMFENCE_MAP_EGRESS, BPF_MAP_TYPE_ARRAY_OF_MAPS, VMFENCE_MAX_POLICIES, "__u32", 4, "", 4},
      {VMFENCE_MAP_INGRESS, BPF_MAP_TYPE_ARRAY_OF_MAPS, VMFENCE_MAX_POLICIES, "__u32", 4, "", 4},
      {VMFENCE_MAP_GATEWAYS, BPF_MAP_TYPE_HASH, VMFENCE_MAX_GATEWAYS, "vmfence_gateway_key",
       sizeof(vmfence_gateway_key), "__u8", 1},
      // Arrays of per-VM maps: the value is an inner map's fd/id (no BTF type).
      {VMFENCE_MAP_FLOWS, BPF_MAP_TYPE_ARRAY_OF_MAPS, VMFENCE_MAX_VMS, "__u32", 4, "", 4},
      {VMFENCE_MAP_FRAGS, BPF_MAP_TYPE_ARRAY_OF_MAPS, VMFENCE_MAX_VMS, "__u32", 4, "", 4},
      {VMFENCE_MAP_COUNTERS, BPF_MAP_TYPE_PERCPU_ARRAY, VMFENCE_MAX_VMS, "__u32", 4, "vmfence_counters",
       sizeof(vmfence_counters)},
      {VMFENCE_MAP_STATE, BPF_MAP_TYPE_ARRAY, VMFENCE_MAX_VMS, "__u32", 4, "vmfence_state", sizeof(vmfence_state)},
      {VMFENCE_MAP_CONFIG, BPF_MAP_TYPE_ARRAY, 1, "__u32", 4, "vmfence_config", sizeof(vmfence_config)},
      {VMFENCE_MAP_EVENTS, BPF_MAP_TYPE_RINGBUF, VMFENCE_EVENTS_BYTES, nullptr, 0, nullptr, 0},
      {VMFENCE_MAP_LIMITS, BPF_MAP_TYPE_ARRAY, VMFENCE_MAX_VMS, "__u32", 4, "vmfence_limit", sizeof(vmfence_limit)},
  };
  return maps;
}

// The map names: each VMFENCE_MAP_<ID> string is its VMFENCE_MAPS row's name, and
// each row is a map of the compiled object under that identifier (a skeleton
// field, as agent/datapath/loader.cpp uses them).
#define VMF_CHECK_MAP_NAME(ID, name)                                                                   \
  static_assert(std::string_view(VMFENCE_MAP_##ID) == VMFENCE_MAP_NAME(ID, name),                      \
                "VMFENCE_MAP_" #ID " is not the name of its VMFENCE_MAPS row");                        \
  static_assert(std::is_pointer_v<decltype(std::declval<vmfence_tc>().maps.VMFENCE_MAP_ID(ID, name))>, \
                "the BPF object has no map " VMFENCE_MAP_NAME(ID, name));
VMFENCE_MAPS(VMF_CHECK_MAP_NAME)
#undef VMF_CHECK_MAP_NAME

std::set<std::string> listed_maps() {
  std::set<std::string> out;
#define VMF_LISTED(ID, name) out.insert(VMFENCE_MAP_##ID);
  VMFENCE_MAPS(VMF_LISTED)
#undef VMF_LISTED
  return out;
}

struct SkelDeleter {
  void operator()(vmfence_tc* s) const { vmfence_tc__destroy(s); }
};

class AbiLayout : public ::testing::Test {
 protected:
  void SetUp() override {
    skel_.reset(vmfence_tc__open());
    ASSERT_TRUE(skel_) << "open the embedded BPF object";
    btf_ = bpf_object__btf(skel_->obj);
    ASSERT_TRUE(btf_) << "the BPF object carries BTF";
  }
  // Name of a BTF type, through const/volatile (typedefs keep their name).
  std::string type_name(uint32_t id) const {
    const btf_type* t = btf__type_by_id(btf_, id);
    while (t && (btf_is_const(t) || btf_is_volatile(t))) t = btf__type_by_id(btf_, t->type);
    return t ? btf__name_by_offset(btf_, t->name_off) : "";
  }
  std::unique_ptr<vmfence_tc, SkelDeleter> skel_;
  const struct btf* btf_ = nullptr;
};

TEST_F(AbiLayout, StructsMatchBpfObjectBtf) {
  for (const auto& s : abi_structs()) {
    SCOPED_TRACE(s.name);
    int id = btf__find_by_name_kind(btf_, s.name, BTF_KIND_STRUCT);
    ASSERT_GT(id, 0) << "struct " << s.name << " is not in the BTF of the BPF object";
    const btf_type* t = btf__type_by_id(btf_, static_cast<uint32_t>(id));
    EXPECT_EQ(t->size, s.size) << "sizeof(struct " << s.name << ")";
    ASSERT_EQ(btf_vlen(t), s.fields.size()) << "member count (update this table with the header)";
    const btf_member* m = btf_members(t);
    for (size_t i = 0; i < s.fields.size(); ++i, ++m) {
      const Field& f = s.fields[i];
      EXPECT_STREQ(btf__name_by_offset(btf_, m->name_off), f.name) << "member " << i;
      EXPECT_EQ(btf_member_bitfield_size(t, static_cast<uint32_t>(i)), 0u) << f.name << " is a bit field";
      EXPECT_EQ(btf_member_bit_offset(t, static_cast<uint32_t>(i)) / 8, f.offset)
          << "offsetof(" << s.name << ", " << f.name << ")";
      EXPECT_EQ(static_cast<size_t>(btf__resolve_size(btf_, m->type)), f.size)
          << "sizeof(" << s.name << "::" << f.name << ")";
    }
  }
}

TEST_F(AbiLayout, EveryMapNamedInTheAbiHeader) {
  std::set<std::string> abi_names;
  for (const auto& d : abi_maps()) {
    SCOPED_TRACE(d.name);
    abi_names.insert(d.name);
    bpf_map* m = bpf_object__find_map_by_name(skel_->obj, d.name);
    ASSERT_TRUE(m) << d.name << " is not a map of the BPF object";
    EXPECT_EQ(bpf_map__type(m), d.type);
    EXPECT_EQ(bpf_map__max_entries(m), d.max_entries);
    if (!d.key) continue;
    EXPECT_EQ(bpf_map__key_size(m), d.key_size);
    EXPECT_EQ(bpf_map__value_size(m), d.value_size);
    EXPECT_EQ(type_name(bpf_map__btf_key_type_id(m)), d.key) << "key type (bpftool prints named fields)";
    if (*d.value) {
      EXPECT_EQ(type_name(bpf_map__btf_value_type_id(m)), d.value) << "value type";
    }
  }
  // The reverse: every map of the object (but .bss/.rodata) is in the header,
  // and the agent's MapSet opens each of them.
  bpf_map* m;
  bpf_object__for_each_map(m, skel_->obj) {
    if (bpf_map__is_internal(m)) continue;
    EXPECT_TRUE(abi_names.count(bpf_map__name(m))) << bpf_map__name(m) << " has no VMFENCE_MAP_* name";
  }
  std::set<std::string> mapset_names;
  vmfence::MapSet().for_each([&](const char* name, int) { mapset_names.insert(name); });
  EXPECT_EQ(mapset_names, abi_names) << "MapSet covers every map";
  EXPECT_EQ(listed_maps(), abi_names) << "VMFENCE_MAPS lists every map (and this test's table too)";
}

// The drop reasons: the enum and the names in logs, journald and status both come
// from VMFENCE_REASONS, and the names map back to their values.
TEST(AbiReasons, NamesAndValuesFromTheList) {
  int rows = 0;
#define VMF_CHECK_REASON(value, NAME, name, kind)                                    \
  EXPECT_EQ(VMFENCE_REASON_##NAME, value);                                           \
  EXPECT_STREQ(vmfence::reason_name(value), name);                                   \
  EXPECT_EQ(vmfence::reason_from_name(name), std::optional<uint8_t>(value)) << name; \
  EXPECT_EQ(vmfence_reason_kind(value), VMFENCE_DROP_##kind) << name;                \
  ++rows;
  VMFENCE_REASONS(VMF_CHECK_REASON)
#undef VMF_CHECK_REASON
  EXPECT_EQ(rows, VMFENCE_REASON_COUNT);
  EXPECT_STREQ(vmfence::reason_name(VMFENCE_REASON_COUNT), "unknown");
  EXPECT_EQ(vmfence::reason_from_name("unknown"), std::nullopt);
  EXPECT_EQ(vmfence_reason_kind(VMFENCE_REASON_COUNT), VMFENCE_DROP_VIOLATION);
}

}  // namespace
