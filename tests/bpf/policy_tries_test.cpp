// Per-VM policy tries (issue 10): each VM's rules are a trie of its own,
// created by the agent with the datapath's key/value BTF (bpftool prints
// named fields), pinned as policy/<vm>_egress and _ingress; a change fills
// the VM's idle trie, the switch is the vms entry, and the old trie goes.
//
// Needs root (see harness.h).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include "tests/bpf/harness.h"

using namespace vmfence;
using namespace vmfence::test;

namespace {

const char* kVmA = R"({ "name": "tra", "interface": "vpt-a", "mac": "02:00:00:00:0a:02",
  "addresses": ["10.9.0.2/32"], "group": "a",
  "egress": [ { "to": "198.51.100.0/24", "proto": "tcp", "ports": ["443"] },
              { "to": "203.0.113.0/24", "proto": "udp", "ports": ["53"] } ],
  "ingress": [ { "from": "100.64.0.0/10", "proto": "tcp", "ports": ["22"] } ] })";
const char* kVmB = R"({ "name": "tr.b", "interface": "vpt-b", "mac": "02:00:00:00:0b:02",
  "addresses": ["10.9.1.2/32"], "group": "b",
  "egress": [ { "to": "192.0.2.0/24", "proto": "tcp", "ports": ["80"] } ] })";
// tra after a change: one rule left.
const char* kVmA2 = R"({ "name": "tra", "interface": "vpt-a", "mac": "02:00:00:00:0a:02",
  "addresses": ["10.9.0.2/32"], "group": "a",
  "egress": [ { "to": "203.0.113.0/24", "proto": "udp", "ports": ["53"] } ] })";

class PolicyTries : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string& why = TestNet::get().unavailable();
    if (!why.empty()) {
      if (in_ci()) FAIL() << "kernel tier unavailable in CI: " << why;
      GTEST_SKIP() << why;
    }
    std::string err;
    w_ = World::create("{}", {kVmA, kVmB}, err);
    ASSERT_TRUE(w_) << err;
  }
  // bpffs refuses '.' in names: tr.b is pinned as tr:b.
  std::string pin(const std::string& vm, const char* dir) const {
    return w_->dir() + "/policy/" + policy_pin_name(vm) + "_" + dir;
  }
  // Prefixes ("a.b.c.d/len" of the IPv4-mapped key) in a pinned trie.
  std::set<std::string> prefixes(const std::string& path) const {
    std::set<std::string> out;
    for (const auto& [k, v] : read_policy(path))
      out.insert(std::to_string(k.addr[12]) + "." + std::to_string(k.addr[13]) + "." + std::to_string(k.addr[14]) +
                 "." + std::to_string(k.addr[15]) + "/" + std::to_string(k.prefixlen - 96));
    return out;
  }
  // Tries with rules in an outer policy map (freed ones are replaced by one
  // shared empty trie).
  size_t tries_with_rules(int outer) const {
    size_t n = 0;
    for (uint32_t i = 0; i < VMFENCE_MAX_POLICIES; ++i) {
      Fd t = inner_map(outer, i);
      vmfence_addr_key k{};
      n += t.valid() && bpf_map_get_next_key(t.get(), nullptr, &k) == 0;
    }
    return n;
  }
  std::unique_ptr<World> w_;
};

TEST_F(PolicyTries, EachVmHasItsOwnPinnedTrieWithBtf) {
  for (const char* vm : {"tra", "tr.b"})
    for (const char* dir : {"egress", "ingress"}) {
      SCOPED_TRACE(std::string(vm) + "_" + dir);
      Fd t(bpf_obj_get(pin(vm, dir).c_str()));
      ASSERT_TRUE(t.valid()) << "pinned trie " << pin(vm, dir);
      bpf_map_info info{};
      uint32_t len = sizeof(info);
      ASSERT_EQ(bpf_obj_get_info_by_fd(t.get(), &info, &len), 0);
      EXPECT_EQ(info.type, BPF_MAP_TYPE_LPM_TRIE);
      EXPECT_EQ(info.key_size, sizeof(vmfence_addr_key));
      EXPECT_EQ(info.value_size, sizeof(vmfence_policy_value));
      // BTF: bpftool map dump prints named fields.
      EXPECT_NE(info.btf_id, 0u);
      EXPECT_NE(info.btf_key_type_id, 0u);
      EXPECT_NE(info.btf_value_type_id, 0u);
    }
  // One VM's trie holds its own prefixes only.
  EXPECT_EQ(prefixes(pin("tra", "egress")), (std::set<std::string>{"198.51.100.0/24", "203.0.113.0/24"}));
  EXPECT_EQ(prefixes(pin("tr.b", "egress")), (std::set<std::string>{"192.0.2.0/24"}));
  EXPECT_EQ(prefixes(pin("tra", "ingress")), (std::set<std::string>{"100.64.0.0/10"}));
  EXPECT_TRUE(prefixes(pin("tr.b", "ingress")).empty());
  // The pin is the trie the datapath uses (the vms entry's generation).
  const InstalledVm& a = w_->vm("tra");
  EXPECT_EQ(read_policy(w_->maps(), true, a.slot, a.policy_id).size(), 2u);
  EXPECT_EQ(tries_with_rules(w_->maps().egress.get()), 2u);
  EXPECT_EQ(tries_with_rules(w_->maps().ingress.get()), 1u);
}

TEST_F(PolicyTries, ChangeSwitchesToTheIdleTrieAndDropsTheOld) {
  const InstalledVm before = w_->vm("tra");
  ASSERT_TRUE(w_->reinstall(kVmA2));
  const InstalledVm& after = w_->vm("tra");
  EXPECT_EQ(after.slot, before.slot);
  EXPECT_NE(after.policy_id & 1, before.policy_id & 1) << "the new generation fills the other trie";
  auto entry = w_->vm_entry(after.ifindex);
  ASSERT_TRUE(entry);
  EXPECT_EQ(entry->policy_id, after.policy_id);
  // The pin follows the switch. The old trie is freed with the next batch
  // of installs (a grace period each): here the collection's.
  EXPECT_EQ(prefixes(pin("tra", "egress")), (std::set<std::string>{"203.0.113.0/24"}));
  EXPECT_TRUE(prefixes(pin("tra", "ingress")).empty());
  ASSERT_TRUE(w_->writer().collect_garbage());
  EXPECT_TRUE(read_policy(w_->maps(), true, before.slot, before.policy_id).empty());
  EXPECT_EQ(read_policy(w_->maps(), true, after.slot, after.policy_id).size(), 1u);
  EXPECT_EQ(tries_with_rules(w_->maps().egress.get()), 2u);
  EXPECT_EQ(tries_with_rules(w_->maps().ingress.get()), 0u);
  // And the datapath enforces the new rules: tcp/443 to 198.51.100.7 is no
  // longer allowed, udp/53 to 203.0.113.9 still is.
  auto out = [&](const char* dst, bool udp, uint16_t port) {
    Packet p = Packet().eth(mac("02:00:00:00:0a:02"), mac("02:00:00:00:00:01")).ipv4(ip("10.9.0.2"), ip(dst));
    Frame f = (udp ? p.udp(40000, port).payload(8) : p.tcp(40000, port, SYN)).build();
    return w_->run(true, after.ifindex, f).retval;
  };
  EXPECT_EQ(out("198.51.100.7", false, 443), kDrop);
  EXPECT_EQ(out("203.0.113.9", true, 53), kPass);
}

TEST_F(PolicyTries, RemovedVmLeavesNoTrieAndNoPin) {
  const InstalledVm b = w_->vm("tr.b");
  ASSERT_TRUE(w_->writer().remove("tr.b"));
  struct stat st {};
  EXPECT_NE(::stat(pin("tr.b", "egress").c_str(), &st), 0);
  EXPECT_NE(::stat(pin("tr.b", "ingress").c_str(), &st), 0);
  ASSERT_TRUE(w_->writer().collect_garbage());
  EXPECT_TRUE(read_policy(w_->maps(), true, b.slot, b.policy_id).empty());
  EXPECT_EQ(tries_with_rules(w_->maps().egress.get()), 1u);
}

// A generation without rules still gets tries of its own: whatever an
// earlier generation left at that index is never in force.
TEST_F(PolicyTries, EmptyGenerationNeverInheritsAnOldTrie) {
  // tra: 2 -> 1 -> 0 egress prefixes, the third lands on the first's index.
  const InstalledVm first = w_->vm("tra");
  ASSERT_TRUE(w_->reinstall(kVmA2));
  ASSERT_TRUE(w_->reinstall(R"({ "name": "tra", "interface": "vpt-a", "mac": "02:00:00:00:0a:02",
    "addresses": ["10.9.0.2/32"], "group": "a" })"));
  const InstalledVm& now = w_->vm("tra");
  EXPECT_EQ(vmfence_policy_index(now.slot, now.policy_id), vmfence_policy_index(first.slot, first.policy_id));
  EXPECT_TRUE(read_policy(w_->maps(), true, now.slot, now.policy_id).empty());
  EXPECT_TRUE(prefixes(pin("tra", "egress")).empty());
  Packet p = Packet().eth(mac("02:00:00:00:0a:02"), mac("02:00:00:00:00:01")).ipv4(ip("10.9.0.2"), ip("198.51.100.7"));
  EXPECT_EQ(w_->run(true, now.ifindex, p.tcp(40000, 443, SYN).build()).retval, kDrop);
}

}  // namespace

// The agent's flow sweep skips a table that was empty at its last visit and
// got no new flow since (the datapath counts new flows in the slot's state):
// a flow added after an idle visit is still found.
TEST_F(PolicyTries, FlowSweepSeesAFlowAddedAfterAnIdleVisit) {
  const InstalledVm& a = w_->vm("tra");
  vmfence_config cfg{};
  cfg.tcp_timeout_s = 7440;
  std::map<uint32_t, MapBackend::TableUse> left;
  w_->writer().sweep_flows(cfg, &left);
  ASSERT_TRUE(left.count(a.slot));
  EXPECT_EQ(left[a.slot].entries, 0u);
  EXPECT_EQ(left[a.slot].max_entries, VMFENCE_DEFAULT_FLOWS);
  uint32_t added = w_->state(a.slot).flows_added;

  auto out = [](uint8_t flags) {
    return Packet()
        .eth(mac("02:00:00:00:0a:02"), mac("02:00:00:00:00:01"))
        .ipv4(ip("10.9.0.2"), ip("198.51.100.7"))
        .tcp(40000, 443, flags)
        .build();
  };
  ASSERT_EQ(w_->run(true, a.ifindex, out(SYN)).retval, kPass);
  EXPECT_EQ(w_->state(a.slot).flows_added, added + 1);
  // The same flow again: no new entry.
  ASSERT_EQ(w_->run(true, a.ifindex, out(ACK)).retval, kPass);
  EXPECT_EQ(w_->state(a.slot).flows_added, added + 1);

  left.clear();
  w_->writer().sweep_flows(cfg, &left);
  EXPECT_EQ(left[a.slot].entries, 1u);
  left.clear();
  w_->writer().sweep_flows(cfg, &left);  // a table with flows is visited every time
  EXPECT_EQ(left[a.slot].entries, 1u);
  EXPECT_EQ(count_flows(w_->maps()), 1u);
}
