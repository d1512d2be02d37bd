// The fleet's records and the rules over them (README, "Fleet"): what one
// host publishes about a VM, where it lives in etcd, and which claim wins
// when two hosts' VMs overlap. Pure logic: no etcd, no maps.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "agent/spec/spec.h"
#include "maps/map_writer.h"

namespace vmfence::fleet {

// One VM as published: key PREFIX "vms/" HOST "/" NAME, value the JSON
// {"name","host","group","addresses"} (record_json), under the host's lease.
struct Record {
  std::string host, name, group;
  std::vector<Cidr> addresses;
  int64_t create_revision = 0;  // etcd's: the claim's place in revision order
  int64_t lease = 0;
  bool operator==(const Record&) const = default;
};

std::string vms_prefix(const std::string& prefix);                            // PREFIX "vms/"
std::string host_prefix(const std::string& prefix, const std::string& host);  // PREFIX "vms/" HOST "/"
std::string record_key(const std::string& prefix, const std::string& host, const std::string& name);
std::string record_json(const Record& r);
// A record from its key and value; nullopt (with *why) when either is not
// one (another writer's key under the prefix, a torn value).
std::optional<Record> parse_record(const std::string& prefix, const std::string& key, const std::string& value,
                                   std::string* why);
// The record a local VM publishes.
Record local_record(const std::string& host, const VmSpec& vm);
// Remote VMs' vm_id: FNV-1a of "host/name" (never a local VM's by accident).
uint32_t remote_vm_id(const std::string& host, const std::string& name);

// Every record known, by key.
using Records = std::map<std::string, Record>;

// A local VM that loses to an earlier claim of another host's VM.
struct Loser {
  SpecError error;  // FILE: addresses[i]: ... names the winner's host and VM
};

struct Resolution {
  std::map<std::string, Loser> local_losers;  // by VM name
  std::vector<const Record*> remote;          // remote claims in force (winners), by key order
  std::vector<std::string> remote_refused;    // remote records on this host's own addresses (why, to log)
};

// Decide overlapping claims: the earlier create_revision wins, across hosts.
// `local` are this host's candidate VMs; their revision is that of their
// own record in `records` when it holds every address they claim now, else
// they come after every published claim (not published yet, or claiming
// more than was published). A loser claims nothing, so it blocks nobody.
// Records of this host (`self`) only give local VMs their revisions.
// `reserved`: this host's own addresses a remote VM may never take (the
// local VMs' gateways, IMDS): a record claiming one is not in force here.
Resolution resolve(const std::string& self, const std::vector<const VmSpec*>& local, const Records& records,
                   const std::vector<Cidr>& reserved = {});

// The owner-map entries of the remote claims in force. A remote VM whose
// group is its own name (the default: isolated), or the name of a local VM
// isolated that way, gets a group of its own: VM names are only unique per
// host, so "web" on two hosts must not become one group.
MapWriter::RemoteOwners remote_owners(const std::vector<const Record*>& remote,
                                      const std::set<std::string>& local_isolated = {});

// Refuse the losers: their files read as invalid (the reason as the error)
// and they are no incumbents, so admission refuses them and their
// interfaces drop everything. Returns how many files it refused.
size_t refuse_losers(const Resolution& r, SpecFiles& files, std::vector<VmSpec>& incumbents);

}  // namespace vmfence::fleet
