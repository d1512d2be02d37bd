// The Reconciler's ordering rules against the fake map backend (no root):
// conflicts blamed on the newcomer, refused files' interfaces in no_policy,
// address moves with exactly one owner at every instant, rollback of a
// change whose Nth write fails, per-instance state, the trust boundary.
#include "agent/daemon/reconciler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <string>

#include "maps/fake_backend.h"

using namespace vmfence;

namespace {

// A VM file as the daemon would read it (no disk needed).
VmFile vm_file(const std::string& path, int64_t mtime, const std::string& json) {
  VmFile f;
  f.path = path;
  f.mtime_ns = mtime;
  f.vm = parse_vm(path, json, ViolationPolicy{}, f.errors);
  if (!f.errors.empty()) f.vm.reset();
  // What a broken file still names (read_spec_files does this from the text).
  auto grab = [&](const char* key) {
    std::string k = std::string("\"") + key + "\": \"";
    auto p = json.find(k);
    if (p == std::string::npos) return std::string();
    p += k.size();
    return json.substr(p, json.find('"', p) - p);
  };
  f.name = grab("name");
  f.interface = grab("interface");
  return f;
}

std::string vm_json(const std::string& name, const std::string& ifname, int mac, const std::string& addrs,
                    const std::string& extra = "") {
  char m[32];
  std::snprintf(m, sizeof m, "02:00:00:00:00:%02x", mac);
  return "{\"name\": \"" + name + "\", \"interface\": \"" + ifname + "\", \"mac\": \"" + m +
         "\", \"addresses\": " + addrs + extra + "}";
}

struct World {
  FakeBackend* fake;
  MapWriter writer;
  std::map<std::string, uint32_t> links;  // interface name -> ifindex
  Reconciler rec;
  std::vector<VmSpec> in_force;

  World()
      : fake(new FakeBackend()), writer(std::unique_ptr<MapBackend>(fake)), rec(writer, [this](const std::string& n) {
          auto it = links.find(n);
          return it == links.end() ? 0u : it->second;
        }) {
    EXPECT_TRUE(writer.adopt());
  }

  ReconcileResult apply(const std::vector<VmFile>& vms) {
    SpecFiles files;
    files.host.file = "host.json";
    files.vms = vms;
    ReconcileResult r = rec.reconcile(files, in_force);
    in_force = r.in_force;
    return r;
  }

  // The owner (vm_id) of a host address, or 0.
  uint32_t owner(const char* ip) {
    vmfence_addr a{};
    auto c = parse_ip(ip);
    std::memcpy(a.addr, c->addr.data(), 16);
    Bytes v;
    if (!fake->lookup(MapId::owners, to_bytes(a), v)) return 0;
    vmfence_owner o;
    std::memcpy(&o, v.data(), sizeof o);
    return o.vm_id;
  }
  // The vms entry of an interface.
  std::optional<vmfence_vm> vm_entry(uint32_t ifindex) {
    Bytes v;
    if (!fake->lookup(MapId::vms, to_bytes(ifindex), v)) return std::nullopt;
    vmfence_vm vm;
    std::memcpy(&vm, v.data(), sizeof vm);
    return vm;
  }
};

const RejectedFile* find_rejected(const ReconcileResult& r, const std::string& file) {
  for (const auto& x : r.rejected)
    if (x.file == file) return &x;
  return nullptr;
}

// Reloads reuse compiled plans, but a VM whose file did not change is still
// compiled again when the VM address space moves (its egress trie marks
// every VM net) and when its spec changes.
TEST(Reconciler, UnchangedVmIsRecompiledWhenTheVmAddressSpaceMoves) {
  World w;
  w.links = {{"tap-a", 10}, {"tap-b", 11}};
  auto marks = [&](const char* net) {
    auto c = parse_cidr(net);
    for (const auto& e : w.writer.installed().at("a").plan.egress)
      if ((e.value.flags & VMFENCE_POLICY_F_VM_NET) && e.key.prefixlen == c->mapped_prefix_len() &&
          std::memcmp(e.key.addr, c->addr.data(), 16) == 0)
        return true;
    return false;
  };
  const VmFile a = vm_file(
      "vms.d/a.json", 1,
      vm_json("a", "tap-a", 1, "[\"10.1.0.2/32\"]", ", \"egress\": [{\"to\": \"0.0.0.0/0\", \"proto\": \"tcp\"}]"));
  w.apply({a});
  EXPECT_TRUE(marks("10.1.0.0/16"));
  EXPECT_FALSE(marks("10.200.0.0/16"));
  uint32_t gen = w.writer.installed().at("a").policy_id;
  auto r = w.apply({a, vm_file("vms.d/b.json", 2, vm_json("b", "tap-b", 2, "[\"10.200.0.2/32\"]"))});
  EXPECT_TRUE(marks("10.200.0.0/16"));
  EXPECT_NE(w.writer.installed().at("a").policy_id, gen);
  EXPECT_NE(std::find(r.changed.begin(), r.changed.end(), "a"), r.changed.end());
  // Nothing moved: nothing rewritten.
  gen = w.writer.installed().at("a").policy_id;
  r = w.apply({a, vm_file("vms.d/b.json", 2, vm_json("b", "tap-b", 2, "[\"10.200.0.2/32\"]"))});
  EXPECT_TRUE(r.changed.empty());
  // The same name with another spec is compiled anew.
  w.apply({vm_file("vms.d/a.json", 3,
                   vm_json("a", "tap-a", 1, "[\"10.1.0.2/32\"]", ", \"egress\": [{\"to\": \"192.0.2.0/24\"}]")),
           vm_file("vms.d/b.json", 2, vm_json("b", "tap-b", 2, "[\"10.200.0.2/32\"]"))});
  bool has_rule = false;
  for (const auto& e : w.writer.installed().at("a").plan.egress)
    has_rule |= e.key.prefixlen == 96 + 24 && e.key.addr[12] == 192 && e.key.addr[14] == 2;
  EXPECT_TRUE(has_rule);
  EXPECT_NE(w.writer.installed().at("a").policy_id, gen);
}

TEST(Reconciler, NewcomerConflictingWithEnforcedVmIsRefusedAndItsInterfaceDropsEverything) {
  World w;
  w.links = {{"tap-a", 10}, {"tap-z", 11}};
  auto a = vm_file("vms.d/z-a.json", 200, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"));
  auto r1 = w.apply({a});
  ASSERT_EQ(r1.in_force.size(), 1u);
  // The newcomer sorts first by file name and is older by mtime than
  // nothing that matters: the enforced VM wins regardless.
  auto b = vm_file("vms.d/a-b.json", 100, vm_json("b", "tap-z", 2, "[\"10.0.0.1/32\"]"));
  auto r2 = w.apply({a, b});
  ASSERT_EQ(r2.in_force.size(), 1u);
  EXPECT_EQ(r2.in_force[0].name, "a");
  const RejectedFile* rb = find_rejected(r2, "vms.d/a-b.json");
  ASSERT_TRUE(rb);
  EXPECT_FALSE(rb->kept_last_good);
  ASSERT_FALSE(rb->errors.empty());
  EXPECT_EQ(rb->errors[0].str(),
            "vms.d/a-b.json: addresses[0]: 10.0.0.1/32 overlaps 10.0.0.1/32 of a (vms.d/z-a.json)");
  EXPECT_EQ(w.owner("10.0.0.1"), name_id("a"));
  auto blocked = w.vm_entry(11);
  ASSERT_TRUE(blocked);
  EXPECT_TRUE(blocked->flags & VMFENCE_VM_F_NO_POLICY);
  ASSERT_TRUE(w.vm_entry(10));
  EXPECT_FALSE(w.vm_entry(10)->flags & VMFENCE_VM_F_NO_POLICY);
}

TEST(Reconciler, NewcomerTakingAnEnforcedInterfaceNeverBlocksIt) {
  World w;
  w.links = {{"tap-a", 10}};
  auto a = vm_file("vms.d/b.json", 200, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"));
  w.apply({a});
  auto b = vm_file("vms.d/a.json", 100, vm_json("b", "tap-a", 2, "[\"10.0.0.2/32\"]"));
  auto r = w.apply({a, b});
  ASSERT_TRUE(find_rejected(r, "vms.d/a.json"));
  EXPECT_TRUE(r.blocked.empty());
  EXPECT_EQ(w.vm_entry(10)->vm_id, name_id("a"));
  EXPECT_FALSE(w.vm_entry(10)->flags & VMFENCE_VM_F_NO_POLICY);
}

TEST(Reconciler, BetweenNewcomersTheLaterFileIsBlamedNotTheLaterName) {
  World w;
  auto early = vm_file("vms.d/zz.json", 100, vm_json("zz", "tap-1", 1, "[\"10.0.0.1/32\"]"));
  auto late = vm_file("vms.d/aa.json", 200, vm_json("aa", "tap-2", 2, "[\"10.0.0.0/24\"]"));
  auto r = w.apply({late, early});
  ASSERT_EQ(r.in_force.size(), 1u);
  EXPECT_EQ(r.in_force[0].name, "zz");
  EXPECT_TRUE(find_rejected(r, "vms.d/aa.json"));
}

TEST(Reconciler, ChangedFileConflictingWithEnforcedVmKeepsItsLastGoodPolicy) {
  World w;
  w.links = {{"tap-a", 10}, {"tap-b", 11}};
  auto a = vm_file("vms.d/a.json", 100, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"));
  auto b = vm_file("vms.d/b.json", 100, vm_json("b", "tap-b", 2, "[\"10.0.0.2/32\"]"));
  w.apply({a, b});
  uint32_t gen = w.writer.installed().at("a").policy_id;
  // a now claims b's address: refused, a keeps 10.0.0.1 and its generation.
  auto a2 = vm_file("vms.d/a.json", 300, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\", \"10.0.0.2/32\"]"));
  auto r = w.apply({a2, b});
  const RejectedFile* ra = find_rejected(r, "vms.d/a.json");
  ASSERT_TRUE(ra);
  EXPECT_TRUE(ra->kept_last_good);
  EXPECT_EQ(w.writer.installed().at("a").policy_id, gen);
  EXPECT_EQ(w.owner("10.0.0.1"), name_id("a"));
  EXPECT_EQ(w.owner("10.0.0.2"), name_id("b"));
  EXPECT_EQ(r.in_force.size(), 2u);
}

TEST(Reconciler, BrokenFileOfEnforcedVmKeepsLastGoodAndNewFileBrokenIsBlocked) {
  World w;
  w.links = {{"tap-a", 10}, {"tap-n", 12}};
  auto a = vm_file("vms.d/a.json", 100, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"));
  w.apply({a});
  auto broken_a = vm_file("vms.d/a.json", 200, "{\"name\": \"a\", \"interface\": \"tap-a\", \"mac\": 7}");
  auto broken_new = vm_file("vms.d/n.json", 200, "{\"name\": \"n\", \"interface\": \"tap-n\", \"bogus\": 1}");
  auto r = w.apply({broken_a, broken_new});
  ASSERT_EQ(r.in_force.size(), 1u);
  EXPECT_EQ(r.in_force[0].name, "a");
  EXPECT_TRUE(find_rejected(r, "vms.d/a.json")->kept_last_good);
  EXPECT_FALSE(w.vm_entry(10)->flags & VMFENCE_VM_F_NO_POLICY);
  ASSERT_TRUE(w.vm_entry(12));
  EXPECT_TRUE(w.vm_entry(12)->flags & VMFENCE_VM_F_NO_POLICY);
}

// Every map operation is checked: the moving address has an owner after each.
class WatchedBackend : public FakeBackend {
 public:
  std::function<void()> after;
  Status update(MapId m, const Bytes& k, const Bytes& v) override {
    auto s = FakeBackend::update(m, k, v);
    if (after) after();
    return s;
  }
  Status erase(MapId m, const Bytes& k) override {
    auto s = FakeBackend::erase(m, k);
    if (after) after();
    return s;
  }
};

void expect_move_keeps_one_owner(bool swap, bool reversed_files) {
  auto* fake = new WatchedBackend();
  MapWriter writer{std::unique_ptr<MapBackend>(fake)};
  ASSERT_TRUE(writer.adopt());
  std::map<std::string, uint32_t> links = {{"tap-a", 10}, {"tap-b", 11}};
  Reconciler rec(writer, [&](const std::string& n) { return links.count(n) ? links[n] : 0u; });
  SpecFiles files;
  files.host.file = "host.json";
  files.vms = {vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\", \"10.0.0.3/32\"]")),
               vm_file("vms.d/b.json", 1, vm_json("b", "tap-b", 2, "[\"10.0.0.2/32\"]"))};
  auto r1 = rec.reconcile(files, {});
  ASSERT_EQ(r1.in_force.size(), 2u);
  auto owner = [&](const char* ip) {
    vmfence_addr a{};
    std::memcpy(a.addr, parse_ip(ip)->addr.data(), 16);
    Bytes v;
    return fake->lookup(MapId::owners, to_bytes(a), v);
  };
  int checks = 0;
  fake->after = [&] {
    ++checks;
    EXPECT_TRUE(owner("10.0.0.1")) << "10.0.0.1 unowned after operation " << checks;
    EXPECT_TRUE(owner("10.0.0.2")) << "10.0.0.2 unowned after operation " << checks;
  };
  // 10.0.0.1 moves from a to b (and with swap, 10.0.0.2 from b to a).
  files.vms = {vm_file("vms.d/a.json", 2,
                       vm_json("a", "tap-a", 1, swap ? "[\"10.0.0.2/32\", \"10.0.0.3/32\"]" : "[\"10.0.0.3/32\"]")),
               vm_file("vms.d/b.json", 2,
                       vm_json("b", "tap-b", 2, swap ? "[\"10.0.0.1/32\"]" : "[\"10.0.0.1/32\", \"10.0.0.2/32\"]"))};
  if (reversed_files) std::swap(files.vms[0], files.vms[1]);
  auto r2 = rec.reconcile(files, r1.in_force);
  fake->after = nullptr;
  EXPECT_GT(checks, 0);
  EXPECT_TRUE(r2.rejected.empty()) << r2.rejected[0].errors[0].str();
  vmfence_addr x{};
  std::memcpy(x.addr, parse_ip("10.0.0.1")->addr.data(), 16);
  Bytes v;
  ASSERT_TRUE(fake->lookup(MapId::owners, to_bytes(x), v));
  vmfence_owner o;
  std::memcpy(&o, v.data(), sizeof o);
  EXPECT_EQ(o.vm_id, name_id("b"));
}

TEST(Reconciler, AddressMoveKeepsExactlyOneOwnerThroughout) {
  expect_move_keeps_one_owner(false, false);
  expect_move_keeps_one_owner(false, true);
}

TEST(Reconciler, AddressSwapKeepsExactlyOneOwnerThroughout) {
  expect_move_keeps_one_owner(true, false);
  expect_move_keeps_one_owner(true, true);
}

TEST(Reconciler, RenamedVmKeepsItsAddressOwnedAndNothingStale) {
  World w;
  w.links = {{"tap-a", 10}};
  w.apply({vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"))});
  auto r = w.apply({vm_file("vms.d/a.json", 2, vm_json("a2", "tap-a", 1, "[\"10.0.0.1/32\"]"))});
  EXPECT_TRUE(r.rejected.empty());
  EXPECT_EQ(w.owner("10.0.0.1"), name_id("a2"));
  EXPECT_EQ(w.vm_entry(10)->vm_id, name_id("a2"));
  EXPECT_FALSE(w.vm_entry(10)->flags & VMFENCE_VM_F_NO_POLICY);
  EXPECT_EQ(w.writer.installed().count("a"), 0u);
}

// A change whose Nth write fails leaves the maps exactly as they were.
TEST(Reconciler, FailedChangeLeavesNothingBehindWhicheverWriteFails) {
  auto rules = [](int n) {
    std::string e = ", \"egress\": [";
    for (int i = 0; i < n; ++i) e += std::string(i ? ", " : "") + "{\"to\": \"192.0.2." + std::to_string(i) + "/32\"}";
    return e + "]";
  };
  const auto before_json = vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]", rules(2));
  const auto after_json = vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\", \"10.0.0.9/32\"]", rules(4));
  // How many writes a successful change takes.
  uint64_t writes = 0;
  {
    World w;
    w.links = {{"tap-a", 10}};
    w.apply({vm_file("vms.d/a.json", 1, before_json)});
    uint64_t u0 = w.fake->updates();
    w.apply({vm_file("vms.d/a.json", 2, after_json)});
    writes = w.fake->updates() - u0;
  }
  ASSERT_GT(writes, 6u);
  uint64_t refused = 0;
  for (uint64_t n = 1; n <= writes; ++n) {
    World w;
    w.links = {{"tap-a", 10}};
    w.apply({vm_file("vms.d/a.json", 1, before_json)});
    auto snapshot = w.fake->copy();
    InstalledVm was = w.writer.installed().at("a");
    w.fake->fail_update(n);
    auto r = w.apply({vm_file("vms.d/a.json", 2, after_json)});
    w.fake->fail_update(std::nullopt);
    bool failed = find_rejected(r, "vms.d/a.json") != nullptr;
    if (!failed) continue;  // the failing write was a config or state write that does not matter
    ++refused;
    EXPECT_TRUE(find_rejected(r, "vms.d/a.json")->kept_last_good) << "write " << n;
    auto now = w.fake->copy();
    // State (quarantine) writes are not part of a change; compare the rest.
    snapshot.maps.erase(MapId::state);
    now.maps.erase(MapId::state);
    EXPECT_TRUE(now == snapshot) << "write " << n << " of " << writes << " failed and left changes behind";
    EXPECT_EQ(w.writer.installed().at("a").policy_id, was.policy_id) << "write " << n;
    EXPECT_EQ(w.owner("10.0.0.9"), 0u) << "write " << n;
    EXPECT_EQ(w.owner("10.0.0.1"), name_id("a")) << "write " << n;
  }
  // Every write of the change itself (tables, 4 rules, 2 owners, the switch)
  // was made to fail once.
  EXPECT_GE(refused, 8u);
}

TEST(Reconciler, NewcomerWhoseInstallFailsIsRefusedAndBlockedWithoutLeftovers) {
  World w;
  w.links = {{"tap-a", 10}};
  w.fake->fail_map(MapId::egress, true);
  auto r = w.apply({vm_file("vms.d/a.json", 1,
                            vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]", ", \"egress\": [{\"to\": \"0.0.0.0/0\"}]"))});
  w.fake->fail_map(MapId::egress, false);
  ASSERT_TRUE(find_rejected(r, "vms.d/a.json"));
  EXPECT_TRUE(r.in_force.empty());
  EXPECT_EQ(w.fake->size(MapId::owners), 0u);
  EXPECT_EQ(w.fake->size(MapId::egress), 0u);
  ASSERT_TRUE(w.vm_entry(10));
  EXPECT_TRUE(w.vm_entry(10)->flags & VMFENCE_VM_F_NO_POLICY);
  // Fixed: the next reconcile installs it and lifts the block.
  auto r2 = w.apply({vm_file(
      "vms.d/a.json", 2, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]", ", \"egress\": [{\"to\": \"0.0.0.0/0\"}]"))});
  EXPECT_TRUE(r2.rejected.empty());
  EXPECT_FALSE(w.vm_entry(10)->flags & VMFENCE_VM_F_NO_POLICY);
  EXPECT_FALSE(w.writer.is_blocked(10));
}

// A VM quarantined on one TAP instance, whose TAP was re-created while the
// agent was down, starts clear on the new instance after the restart.
TEST(Reconciler, QuarantineBelongsToTheInterfaceInstance) {
  auto* fake = new FakeBackend();
  // What a previous run left: vm a on ifindex 10, slot 3, quarantined.
  vmfence_vm old{};
  old.vm_id = name_id("a");
  old.slot = 3;
  old.policy_id = 7;
  ASSERT_TRUE(fake->update(MapId::vms, to_bytes(uint32_t{10}), to_bytes(old)));
  vmfence_state st{};
  st.quarantined = 1;
  st.violations = 5;
  ASSERT_TRUE(fake->update(MapId::state, to_bytes(uint32_t{3}), to_bytes(st)));
  MapWriter writer{std::unique_ptr<MapBackend>(fake)};
  ASSERT_TRUE(writer.adopt());
  Reconciler rec(writer, [](const std::string&) { return 11u; });  // the new instance
  SpecFiles files;
  files.host.file = "host.json";
  files.vms = {vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"))};
  auto r = rec.reconcile(files, {}, {"a"});
  ASSERT_EQ(r.in_force.size(), 1u);
  EXPECT_EQ(writer.installed().at("a").slot, 3u);
  Bytes v;
  ASSERT_TRUE(fake->lookup(MapId::state, to_bytes(uint32_t{3}), v));
  vmfence_state now;
  std::memcpy(&now, v.data(), sizeof now);
  EXPECT_EQ(now.quarantined, 0u);
  EXPECT_EQ(now.violations, 0u);
}

TEST(Reconciler, SameInstanceAfterRestartStaysQuarantined) {
  auto* fake = new FakeBackend();
  vmfence_vm old{};
  old.vm_id = name_id("a");
  old.slot = 3;
  old.policy_id = 7;
  ASSERT_TRUE(fake->update(MapId::vms, to_bytes(uint32_t{10}), to_bytes(old)));
  vmfence_state st{};
  st.quarantined = 1;
  ASSERT_TRUE(fake->update(MapId::state, to_bytes(uint32_t{3}), to_bytes(st)));
  MapWriter writer{std::unique_ptr<MapBackend>(fake)};
  ASSERT_TRUE(writer.adopt());
  Reconciler rec(writer, [](const std::string&) { return 10u; });  // the same TAP
  SpecFiles files;
  files.host.file = "host.json";
  files.vms = {vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"))};
  rec.reconcile(files, {}, {"a"});
  Bytes v;
  ASSERT_TRUE(fake->lookup(MapId::state, to_bytes(uint32_t{3}), v));
  vmfence_state now;
  std::memcpy(&now, v.data(), sizeof now);
  EXPECT_EQ(now.quarantined, 1u);
}

// a moves to another TAP and b takes a's old TAP in the same reload: b's
// entry must survive a's release.
TEST(Reconciler, InterfaceHandedOverInOneReloadStaysWithItsNewVm) {
  World w;
  w.links = {{"tap-x", 10}, {"tap-y", 11}};
  w.apply({vm_file("vms.d/a.json", 1, vm_json("a", "tap-x", 1, "[\"10.0.0.1/32\"]"))});
  auto r = w.apply({vm_file("vms.d/a.json", 2, vm_json("a", "tap-y", 1, "[\"10.0.0.1/32\"]")),
                    vm_file("vms.d/b.json", 2, vm_json("b", "tap-x", 2, "[\"10.0.0.2/32\"]"))});
  EXPECT_TRUE(r.rejected.empty());
  ASSERT_TRUE(w.vm_entry(10));
  EXPECT_EQ(w.vm_entry(10)->vm_id, name_id("b"));
  ASSERT_TRUE(w.vm_entry(11));
  EXPECT_EQ(w.vm_entry(11)->vm_id, name_id("a"));
}

// Two VMs swap addresses; whichever write of the reload fails, every address
// stays with exactly the VM that the maps and the in-force set agree on.
TEST(Reconciler, FailedSwapLeavesEachAddressWithOneVm) {
  const auto a1 = vm_json("a", "tap-a", 1, "[\"10.0.0.5/32\"]"), b1 = vm_json("b", "tap-b", 2, "[\"10.0.0.6/32\"]");
  const auto a2 = vm_json("a", "tap-a", 1, "[\"10.0.0.6/32\"]"), b2 = vm_json("b", "tap-b", 2, "[\"10.0.0.5/32\"]");
  for (uint64_t n = 1; n <= 12; ++n) {
    World w;
    w.links = {{"tap-a", 10}, {"tap-b", 11}};
    w.apply({vm_file("vms.d/a.json", 1, a1), vm_file("vms.d/b.json", 1, b1)});
    w.fake->fail_update(n);
    auto r = w.apply({vm_file("vms.d/a.json", 2, a2), vm_file("vms.d/b.json", 2, b2)});
    w.fake->fail_update(std::nullopt);
    std::map<std::string, std::string> holder;  // address -> VM, per the in-force set
    for (const auto& vm : r.in_force)
      for (const auto& c : vm.addresses) {
        EXPECT_FALSE(holder.count(c.str())) << "write " << n << ": " << c.str() << " held by two VMs";
        holder[c.str()] = vm.name;
      }
    for (const char* ip : {"10.0.0.5", "10.0.0.6"}) {
      std::string key = std::string(ip) + "/32";
      ASSERT_TRUE(holder.count(key)) << "write " << n << ": " << ip << " held by none";
      EXPECT_EQ(w.owner(ip), name_id(holder[key])) << "write " << n << ": maps and in-force set disagree on " << ip;
    }
  }
}

// A second file naming an enforced VM cannot take it over while the VM's own
// file is broken.
TEST(Reconciler, SecondFileCannotTakeOverAVmWhoseFileIsBroken) {
  World w;
  w.links = {{"tap-a", 10}};
  w.apply({vm_file("vms.d/vm1.json", 1, vm_json("vm1", "tap-a", 1, "[\"10.0.0.1/32\"]"))});
  uint32_t gen = w.writer.installed().at("vm1").policy_id;
  auto r =
      w.apply({vm_file("vms.d/vm1.json", 2, "{\"name\": \"vm1\", "),
               vm_file("vms.d/evil.json", 2,
                       vm_json("vm1", "tap-a", 1, "[\"10.0.0.1/32\"]", ", \"egress\": [{\"to\": \"0.0.0.0/0\"}]"))});
  EXPECT_EQ(w.writer.installed().at("vm1").policy_id, gen);
  ASSERT_EQ(r.in_force.size(), 1u);
  EXPECT_EQ(r.in_force[0].file, "vms.d/vm1.json");
  EXPECT_TRUE(find_rejected(r, "vms.d/evil.json"));
  EXPECT_TRUE(find_rejected(r, "vms.d/vm1.json")->kept_last_good);
}

// Renaming the VM of a quarantined TAP does not let it out of quarantine.
TEST(Reconciler, RenameOnTheSameTapKeepsItsQuarantine) {
  World w;
  w.links = {{"tap-a", 10}};
  w.apply({vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"))});
  uint32_t slot = w.writer.installed().at("a").slot;
  vmfence_state st{};
  st.quarantined = 1;
  ASSERT_TRUE(w.fake->update(MapId::state, to_bytes(slot), to_bytes(st)));
  w.apply({vm_file("vms.d/a.json", 2, vm_json("a2", "tap-a", 1, "[\"10.0.0.1/32\"]"))});
  uint32_t now = w.writer.installed().at("a2").slot;
  Bytes v;
  ASSERT_TRUE(w.fake->lookup(MapId::state, to_bytes(now), v));
  vmfence_state after;
  std::memcpy(&after, v.data(), sizeof after);
  EXPECT_EQ(after.quarantined, 1u);
}

// A refused change leaves the VM's flow table as it was (size included).
TEST(Reconciler, RefusedChangeKeepsTheFlowTable) {
  World w;
  w.links = {{"tap-a", 10}};
  w.apply({vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"))});
  uint32_t slot = w.writer.installed().at("a").slot;
  uint32_t before = w.fake->snapshot().tables.at(slot).flow_limit;
  w.fake->fail_map(MapId::owners, true);
  auto r = w.apply(
      {vm_file("vms.d/a.json", 2,
               vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\", \"10.0.0.7/32\"]", ", \"limits\": {\"flows\": 10}"))});
  w.fake->fail_map(MapId::owners, false);
  ASSERT_TRUE(find_rejected(r, "vms.d/a.json"));
  EXPECT_EQ(w.fake->snapshot().tables.at(slot).flow_limit, before);
  // Accepted later: the new size is in place.
  w.apply({vm_file("vms.d/a.json", 3, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]", ", \"limits\": {\"flows\": 10}"))});
  EXPECT_EQ(w.fake->snapshot().tables.at(slot).flow_limit, 10u);
}

// A VM whose interface is absent has no flow tables (kernel memory for a VM
// that is not running); binding its interface creates them with its limit,
// and a limit changed meanwhile applies.
TEST(Reconciler, FlowTablesComeWithTheInterface) {
  World w;
  w.apply({vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"))});
  uint32_t slot = w.writer.installed().at("a").slot;
  EXPECT_FALSE(w.fake->snapshot().tables.count(slot));
  w.apply({vm_file("vms.d/a.json", 2, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]", ", \"limits\": {\"flows\": 10}"))});
  EXPECT_FALSE(w.fake->snapshot().tables.count(slot));
  ASSERT_TRUE(w.writer.bind("a", 10));
  ASSERT_TRUE(w.fake->snapshot().tables.count(slot));
  EXPECT_EQ(w.fake->snapshot().tables.at(slot).flow_limit, 10u);
  // A failure to create them leaves the VM unbound (the caller blocks it).
  ASSERT_TRUE(w.writer.unbind("a"));
  w.apply({vm_file("vms.d/b.json", 1, vm_json("b", "tap-b", 2, "[\"10.0.0.2/32\"]"))});
  uint32_t slot_b = w.writer.installed().at("b").slot;
  w.fake->fail_update(1);  // the tables are the first write of a bind
  EXPECT_FALSE(w.writer.bind("b", 11));
  EXPECT_EQ(w.writer.installed().at("b").ifindex, 0u);
  EXPECT_FALSE(w.fake->snapshot().tables.count(slot_b));
}

// One VM's policy change with its claims unchanged takes the short path
// (a reload after one file changed): the maps end exactly as a full
// reconcile leaves them; anything else (a claim changed, a failed write) is
// refused with nothing written, for the full reconcile to handle.
TEST(Reconciler, UpdateInPlaceEndsWhereAFullReconcileDoes) {
  auto files = [](const std::string& rules) {
    return std::vector<VmFile>{vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]", rules)),
                               vm_file("vms.d/b.json", 1, vm_json("b", "tap-b", 2, "[\"10.0.1.1/32\"]"))};
  };
  const std::string v2 = ", \"egress\": [{\"to\": \"192.0.2.0/24\", \"proto\": \"udp\", \"ports\": [\"53\"]}]";
  World full, fast;
  for (World* w : {&full, &fast}) {
    w->links = {{"tap-a", 10}, {"tap-b", 11}};
    w->apply(files(""));
  }
  HostSpec host;
  host.file = "host.json";
  const VmSpec next = *files(v2)[0].vm;
  const VmSpec current = fast.in_force[0];
  ASSERT_EQ(current.name, "a");

  full.apply(files(v2));
  bool changed = false;
  ASSERT_TRUE(fast.rec.update_in_place(next, current, host, &changed));
  EXPECT_TRUE(changed);
  EXPECT_TRUE(fast.fake->snapshot() == full.fake->snapshot());
  EXPECT_EQ(fast.writer.installed().at("a").policy_id, full.writer.installed().at("a").policy_id);
  // The same spec again: nothing to write.
  auto before = fast.fake->copy();
  ASSERT_TRUE(fast.rec.update_in_place(next, next, host, &changed));
  EXPECT_FALSE(changed);
  EXPECT_TRUE(fast.fake->copy() == before);

  // A claim changed (an address): refused, nothing written.
  VmSpec moved = next;
  moved.addresses[0] = *parse_cidr("10.0.0.7/32");
  EXPECT_FALSE(fast.rec.update_in_place(moved, next, host, &changed));
  EXPECT_TRUE(fast.fake->copy() == before);
  // Another host.json: refused.
  HostSpec other = host;
  other.flow_timeouts.udp_s = 60;
  VmSpec v3 = next;
  v3.egress.clear();
  EXPECT_FALSE(fast.rec.update_in_place(v3, next, other, &changed));
  EXPECT_TRUE(fast.fake->copy() == before);
  // A failed write: refused and undone.
  fast.fake->fail_update(3);
  EXPECT_FALSE(fast.rec.update_in_place(v3, next, host, &changed));
  fast.fake->fail_update(std::nullopt);
  EXPECT_TRUE(fast.fake->copy() == before);
  // Then it goes through.
  ASSERT_TRUE(fast.rec.update_in_place(v3, next, host, &changed));
  EXPECT_TRUE(changed);
}

// Admission checks every file against the address space of all files, the
// refused ones included: where that differs from the space in force, the
// short path cannot give admission's verdict and leaves it to a full reload.
TEST(Reconciler, UpdateInPlaceDefersWhileARefusedFileWidensTheAddressSpace) {
  World w;
  w.links = {{"tap-a", 10}};
  const std::string rules = ", \"egress\": [{\"to\": \"0.0.0.0/0\", \"proto\": \"tcp\"}]";
  auto r = w.apply({vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]", rules)),
                    vm_file("vms.d/z.json", 2, vm_json("z", "tap-a", 3, "[\"10.200.0.1/32\"]"))});
  ASSERT_TRUE(find_rejected(r, "vms.d/z.json"));  // a newcomer on a's interface
  HostSpec host;
  host.file = "host.json";
  VmSpec next = w.in_force[0];
  next.egress.clear();
  bool changed = false;
  EXPECT_FALSE(w.rec.update_in_place(next, w.in_force[0], host, &changed));
}

// Reserved claims (a previous run's VM whose file is broken now) hold their
// name, interface and addresses against newcomers, and are never in force.
TEST(Reconciler, ReservedClaimsHoldAgainstNewcomers) {
  World w;
  w.links = {{"tap-a", 10}, {"tap-n", 11}};
  VmSpec held;
  held.name = "a";
  held.group = "a";
  held.interface = "tap-a";
  held.file = "(previous run)";
  held.addresses = {*parse_cidr("10.0.0.1/32")};
  SpecFiles files;
  files.host.file = "host.json";
  files.vms = {vm_file("vms.d/n.json", 1, vm_json("n", "tap-n", 2, "[\"10.0.0.0/30\"]")),
               vm_file("vms.d/m.json", 1, vm_json("m", "tap-a", 3, "[\"10.0.0.9/32\"]"))};
  auto r = w.rec.reconcile(files, {}, {}, {held});
  EXPECT_TRUE(r.in_force.empty());
  ASSERT_TRUE(find_rejected(r, "vms.d/n.json"));
  EXPECT_EQ(find_rejected(r, "vms.d/n.json")->errors[0].str(),
            "vms.d/n.json: addresses[0]: 10.0.0.0/30 overlaps 10.0.0.1/32 of a ((previous run))");
  ASSERT_TRUE(find_rejected(r, "vms.d/m.json"));
  EXPECT_EQ(w.owner("10.0.0.1"), 0u);
}

TEST(TrustBoundary, VmFileMayNotSayHowToTerminate) {
  for (const char* field : {"\"command\": [\"/bin/sh\", \"-c\", \"id\"]", "\"systemd_unit\": \"x.service\"",
                            "\"qmp_socket\": \"/tmp/q\""}) {
    std::vector<SpecError> errors;
    auto vm = parse_vm("vms.d/a.json",
                       vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]",
                               std::string(", \"on_violation\": {\"action\": \"alert\", ") + field + "}"),
                       ViolationPolicy{}, errors);
    EXPECT_FALSE(vm) << field;
    ASSERT_EQ(errors.size(), 1u) << field;
    EXPECT_NE(errors[0].str().find("vms.d/a.json: on_violation."), std::string::npos) << errors[0].str();
    EXPECT_NE(errors[0].message.find("host.json"), std::string::npos) << errors[0].message;
  }
  std::vector<SpecError> errors;
  auto ok = parse_vm("vms.d/a.json",
                     vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]",
                             ", \"on_violation\": {\"action\": \"alert\", \"threshold\": 3, \"window_ms\": 50}"),
                     ViolationPolicy{}, errors);
  ASSERT_TRUE(ok) << (errors.empty() ? "" : errors[0].str());
  EXPECT_EQ(ok->on_violation.threshold, 3u);
  // The host's command still applies to the VM ({vm} substituted later).
  ViolationPolicy host;
  host.action = Action::terminate;
  host.command = {"systemctl", "stop", "microvm@{vm}.service"};
  auto inherits = parse_vm("vms.d/a.json", vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"), host, errors);
  ASSERT_TRUE(inherits);
  EXPECT_EQ(inherits->on_violation.command, host.command);
}

}  // namespace

// Per-VM policy tries: a change fills the VM's idle trie (the other parity of
// the generation), the old trie goes whole, the pin name follows the VM.
namespace {
size_t entries_at(FakeBackend& fake, MapId m, uint32_t index) {
  size_t n = 0;
  for (const Bytes& k : fake.keys(m)) {
    PolicyKey pk{};
    std::memcpy(&pk, k.data(), sizeof pk);
    n += pk.index == index;
  }
  return n;
}
}  // namespace

TEST(PolicyTries, ChangeFillsTheIdleTrieAndDropsTheOldOne) {
  World w;
  w.links = {{"tap-a", 10}};
  auto rules = [](int port) {
    return ", \"egress\": [{\"to\": \"192.0.2.0/24\", \"proto\": \"tcp\", \"ports\": [\"" + std::to_string(port) +
           "\"]}, {\"to\": \"198.51.100.0/24\"}]";
  };
  w.apply({vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]", rules(80)))});
  for (int i = 0; i < 4; ++i) {
    const InstalledVm before = w.writer.installed().at("a");
    w.apply({vm_file("vms.d/a.json", 2 + i, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]", rules(81 + i)))});
    const InstalledVm& after = w.writer.installed().at("a");
    uint32_t old_index = vmfence_policy_index(before.slot, before.policy_id);
    uint32_t new_index = vmfence_policy_index(after.slot, after.policy_id);
    EXPECT_GT(after.policy_id, before.policy_id) << "generations only grow";
    EXPECT_NE(new_index, old_index) << "change " << i << " wrote into the live trie";
    EXPECT_EQ(w.vm_entry(10)->policy_id, after.policy_id);
    EXPECT_EQ(entries_at(*w.fake, MapId::egress, new_index), after.plan.egress.size());
    EXPECT_EQ(entries_at(*w.fake, MapId::egress, old_index), 0u) << "the old generation's trie is dropped";
    EXPECT_EQ(w.fake->size(MapId::egress), after.plan.egress.size());
    EXPECT_EQ(w.writer.entries(MapId::egress), after.plan.egress.size());
    EXPECT_EQ(w.fake->policy_names().at("a"), new_index) << "the pin names the trie in force";
  }
  // Renamed: the old name's pin goes, the new name's points at the new trie.
  w.apply({vm_file("vms.d/a.json", 9, vm_json("b", "tap-a", 1, "[\"10.0.0.1/32\"]", rules(90)))});
  EXPECT_EQ(w.fake->policy_names().count("a"), 0u);
  const InstalledVm& b = w.writer.installed().at("b");
  EXPECT_EQ(w.fake->policy_names().at("b"), vmfence_policy_index(b.slot, b.policy_id));
  // Removed: no trie, no name.
  w.apply({});
  EXPECT_EQ(w.fake->size(MapId::egress), 0u);
  EXPECT_TRUE(w.fake->policy_names().empty());
}

// After a restart the kernel still uses the previous run's trie: the first
// change goes to the other one.
TEST(PolicyTries, FirstChangeAfterRestartAvoidsThePreviousRunsTrie) {
  for (uint32_t old_policy : {6u, 7u}) {
    auto* fake = new FakeBackend();
    vmfence_vm old{};
    old.vm_id = name_id("a");
    old.slot = 3;
    old.policy_id = old_policy;
    ASSERT_TRUE(fake->update(MapId::vms, to_bytes(uint32_t{10}), to_bytes(old)));
    PolicyKey live{vmfence_policy_index(3, old_policy), {}};
    live.prefix.prefixlen = 96;
    live.prefix.addr[10] = live.prefix.addr[11] = 0xff;
    vmfence_policy_value allow_all{};
    ASSERT_TRUE(fake->update(MapId::egress, to_bytes(live), to_bytes(allow_all)));
    MapWriter writer{std::unique_ptr<MapBackend>(fake)};
    ASSERT_TRUE(writer.adopt());
    Reconciler rec(writer, [](const std::string&) { return 10u; });
    SpecFiles files;
    files.host.file = "host.json";
    files.vms = {vm_file("vms.d/a.json", 1, vm_json("a", "tap-a", 1, "[\"10.0.0.1/32\"]"))};
    rec.reconcile(files, {}, {"a"});
    const InstalledVm& now = writer.installed().at("a");
    EXPECT_EQ(now.slot, 3u);
    EXPECT_GT(now.policy_id, old_policy);
    EXPECT_NE(now.policy_id & 1, old_policy & 1) << "previous generation " << old_policy;
  }
}
