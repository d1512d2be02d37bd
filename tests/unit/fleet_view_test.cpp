// The fleet's records and its conflict rule (agent/fleet/view.*): the
// earlier claim in etcd's revision order wins, across hosts, and a loser
// blocks nobody.
#include <gtest/gtest.h>

#include <cstring>

#include "agent/fleet/view.h"

namespace vmfence::fleet {
namespace {

Cidr cidr(const char* s) { return *parse_cidr(s); }

Record rec(const char* host, const char* name, const char* group, std::vector<const char*> addrs, int64_t rev) {
  Record r{host, name, group, {}, rev, 0};
  for (const char* a : addrs) r.addresses.push_back(cidr(a));
  return r;
}

VmSpec vm(const char* name, std::vector<const char*> addrs) {
  VmSpec v;
  v.name = name;
  v.group = name;
  v.file = std::string("/etc/vmfence/vms.d/") + name + ".json";
  for (const char* a : addrs) v.addresses.push_back(cidr(a));
  return v;
}

Records records(std::vector<Record> rs) {
  Records out;
  for (auto& r : rs) out[record_key("/vmfence/", r.host, r.name)] = r;
  return out;
}

TEST(FleetRecord, JsonRoundTripAndKeyMustMatch) {
  Record r = rec("hv1", "a1", "tenant-a", {"10.1.0.2/32", "fec0::1/128"}, 0);
  std::string key = record_key("/vmfence/", "hv1", "a1");
  EXPECT_EQ(key, "/vmfence/vms/hv1/a1");
  auto back = parse_record("/vmfence/", key, record_json(r), nullptr);
  ASSERT_TRUE(back);
  EXPECT_EQ(*back, r);
  std::string why;
  EXPECT_FALSE(parse_record("/vmfence/", "/vmfence/vms/hv2/a1", record_json(r), &why));  // host is not the key's
  EXPECT_NE(why.find("do not match"), std::string::npos);
  EXPECT_FALSE(parse_record("/vmfence/", key, "{\"name\":\"a1\"}", &why));
  EXPECT_FALSE(parse_record("/vmfence/", key, "not json", &why));
  EXPECT_FALSE(parse_record("/other/", key, record_json(r), &why));
}

TEST(FleetResolve, EarlierRemoteClaimBeatsAnUnpublishedLocalVm) {
  VmSpec x = vm("x2", {"10.2.0.9/32", "10.1.0.2/32"});
  // Resolution points into the records: they outlive it.
  const Records recs = records({rec("hv1", "a1", "tenant-a", {"10.1.0.2/32"}, 7)});
  auto res = resolve("hv2", {&x}, recs);
  ASSERT_EQ(res.local_losers.count("x2"), 1u);
  const SpecError& e = res.local_losers.at("x2").error;
  EXPECT_EQ(e.file, x.file);
  EXPECT_EQ(e.path, "addresses[1]");
  EXPECT_NE(e.message.find("\"a1\" on host \"hv1\""), std::string::npos) << e.message;
  ASSERT_EQ(res.remote.size(), 1u);
  EXPECT_EQ(res.remote[0]->name, "a1");
}

TEST(FleetResolve, LocalVmPublishedFirstWinsAndTheLaterRemoteIsNotInForce) {
  VmSpec a = vm("a1", {"10.1.0.2/32"});
  const Records recs =
      records({rec("hv1", "a1", "a1", {"10.1.0.2/32"}, 5), rec("hv2", "x2", "x2", {"10.1.0.2/32"}, 9)});
  auto res = resolve("hv1", {&a}, recs);
  EXPECT_TRUE(res.local_losers.empty());
  EXPECT_TRUE(res.remote.empty());  // x2 loses: its own host refuses it
}

TEST(FleetResolve, ANewAddressIsANewClaim) {
  // a1's record was published before x2's, but without 10.1.0.3: that claim
  // is a new one and comes after x2's.
  VmSpec a = vm("a1", {"10.1.0.2/32", "10.1.0.3/32"});
  const Records recs =
      records({rec("hv1", "a1", "a1", {"10.1.0.2/32"}, 5), rec("hv2", "x2", "x2", {"10.1.0.3/32"}, 9)});
  auto res = resolve("hv1", {&a}, recs);
  EXPECT_EQ(res.local_losers.count("a1"), 1u);
}

TEST(FleetResolve, PrefixesConflictBothWaysAndALoserBlocksNobody) {
  // hv2's /24 (rev 3) holds hv1's /32 inside it; hv3's /16 (rev 4) holds
  // both and loses; hv4's host address inside the /16 but outside the /24
  // (rev 6) then wins: the /16 that lost claims nothing.
  VmSpec local = vm("l", {"10.9.0.5/32"});
  const Records recs = records({rec("hv2", "n24", "g", {"10.9.0.0/24"}, 3), rec("hv3", "n16", "g", {"10.9.0.0/16"}, 4),
                                rec("hv4", "h", "g", {"10.9.7.1/32"}, 6)});
  auto res = resolve("hv1", {&local}, recs);
  EXPECT_EQ(res.local_losers.count("l"), 1u);
  std::vector<std::string> in_force;
  for (const Record* r : res.remote) in_force.push_back(r->name);
  EXPECT_EQ(in_force, (std::vector<std::string>{"n24", "h"}));
}

TEST(FleetResolve, SameHostOverlapsAreAdmissionsNotTheFleets) {
  VmSpec a = vm("a", {"10.1.0.0/24"}), b = vm("b", {"10.1.0.7/32"});
  auto res = resolve("hv1", {&a, &b}, {});
  EXPECT_TRUE(res.local_losers.empty());
}

TEST(FleetResolve, IPv6AndIPv4DoNotMix) {
  VmSpec a = vm("a", {"fec0::1/128"});
  // Resolution points into the records: they outlive it.
  const Records recs = records({rec("hv2", "r", "g", {"10.0.0.0/8"}, 1)});
  auto res = resolve("hv1", {&a}, recs);
  EXPECT_TRUE(res.local_losers.empty());
  EXPECT_EQ(res.remote.size(), 1u);
}

TEST(FleetResolve, TenThousandRemoteVmsResolveQuickly) {
  std::vector<Record> rs;
  for (int i = 0; i < 10000; ++i) {
    std::string a = "10." + std::to_string(100 + i / 65536) + "." + std::to_string((i / 256) % 256) + "." +
                    std::to_string(i % 256) + "/32";
    Record r{"hv" + std::to_string(i % 50), "vm" + std::to_string(i), "g", {cidr(a.c_str())}, i + 1, 0};
    rs.push_back(r);
  }
  Records all;
  for (auto& r : rs) all[record_key("/vmfence/", r.host, r.name)] = r;
  VmSpec local = vm("l", {"10.100.0.5/32"});  // vm5's address
  auto res = resolve("hv-local", {&local}, all);
  EXPECT_EQ(res.remote.size(), 10000u);
  EXPECT_EQ(res.local_losers.count("l"), 1u);
}

TEST(FleetOwners, RemoteEntriesAreFlaggedAndNamedByHostAndVm) {
  Record r = rec("hv2", "a2", "tenant-a", {"10.2.0.2/32", "10.2.1.0/28"}, 1);
  auto owners = remote_owners({&r});
  ASSERT_EQ(owners.hosts.size(), 1u);
  ASSERT_EQ(owners.nets.size(), 1u);
  const vmfence_owner& o = owners.hosts.begin()->second;
  EXPECT_EQ(o.flags, VMFENCE_OWNER_F_REMOTE);
  EXPECT_EQ(o.group_id, name_id("tenant-a"));
  EXPECT_EQ(o.vm_id, remote_vm_id("hv2", "a2"));
  EXPECT_NE(o.vm_id, name_id("a2"));  // never a local VM's id by accident
  vmfence_addr_key k{};
  std::memcpy(&k, owners.nets.begin()->first.data(), sizeof k);
  EXPECT_EQ(k.prefixlen, 96u + 28u);
}

TEST(FleetRefuse, LosersReadAsInvalidFilesAndAreNoIncumbents) {
  SpecFiles files;
  VmFile f;
  f.path = "/etc/vmfence/vms.d/x2.json";
  f.vm = vm("x2", {"10.1.0.2/32"});
  f.vm->file = f.path;
  f.vm->interface = "tap-x2";
  files.vms.push_back(f);
  std::vector<VmSpec> incumbents{*f.vm};
  // Resolution points into the records: they outlive it.
  const Records recs = records({rec("hv1", "a1", "a1", {"10.1.0.2/32"}, 2)});
  auto res = resolve("hv2", {&*files.vms[0].vm}, recs);
  EXPECT_EQ(refuse_losers(res, files, incumbents), 1u);
  EXPECT_FALSE(files.vms[0].vm);
  EXPECT_EQ(files.vms[0].interface, "tap-x2");  // its interface drops everything
  ASSERT_EQ(files.vms[0].errors.size(), 1u);
  EXPECT_TRUE(incumbents.empty());
}

}  // namespace
}  // namespace vmfence::fleet

namespace vmfence::fleet {
namespace {

// One bad record must not own the world: records are held to what a local
// spec may claim (attacker review, finding 1).
TEST(FleetRecord, RefusesWhatNoLocalSpecMayClaim) {
  for (const char* bad : {"::/0", "0.0.0.0/0", "ff00::/8", "224.0.0.0/4", "fe80::/10", "fe80::1/128",
                          "169.254.169.254/32", "::ffff:10.1.0.2/128", "127.0.0.1/32"}) {
    Record r = rec("hvx", "x", "g", {"10.9.0.1/32"}, 0);
    r.addresses.push_back(cidr(bad));
    std::string why;
    EXPECT_FALSE(parse_record("/vmfence/", record_key("/vmfence/", "hvx", "x"), record_json(r), &why)) << bad;
    EXPECT_NE(why.find("address"), std::string::npos) << why;
  }
}

TEST(FleetResolve, ARemoteRecordOnThisHostsGatewayOrImdsIsIgnored) {
  VmSpec a = vm("a1", {"10.1.0.2/32"});
  // Resolution points into the records: they outlive it.
  const Records recs = records({rec("hv2", "gw", "g", {"10.1.0.1/32"}, 1)});
  auto res = resolve("hv1", {&a}, recs, {cidr("10.1.0.1/32"), cidr("169.254.169.254/32")});
  EXPECT_TRUE(res.remote.empty());
  ASSERT_EQ(res.remote_refused.size(), 1u);
  EXPECT_NE(res.remote_refused[0].find("\"gw\" of host \"hv2\""), std::string::npos) << res.remote_refused[0];
  EXPECT_TRUE(res.local_losers.empty());
}

// VM names are unique per host only: "web" (its own group by default) on
// two hosts, or a remote VM naming a local isolated VM as its group, never
// make one group (attacker review, finding 4).
TEST(FleetOwners, DefaultGroupsStayIsolatedAcrossHosts) {
  Record web = rec("hv2", "web", "web", {"10.2.0.9/32"}, 1);
  Record joiner = rec("hv2", "j", "db", {"10.2.0.8/32"}, 2);
  Record tenant = rec("hv2", "t", "tenant-a", {"10.2.0.7/32"}, 3);
  auto owners = remote_owners({&web, &joiner, &tenant}, {"db"});
  auto group_of = [&](const char* a) {
    vmfence_addr k{};
    std::memcpy(k.addr, masked_addr(cidr(a)).data(), 16);
    return owners.hosts.at(to_bytes(k)).group_id;
  };
  EXPECT_NE(group_of("10.2.0.9/32"), name_id("web"));
  EXPECT_NE(group_of("10.2.0.8/32"), name_id("db"));
  EXPECT_EQ(group_of("10.2.0.7/32"), name_id("tenant-a")) << "a named group spans hosts";
}

}  // namespace
}  // namespace vmfence::fleet
