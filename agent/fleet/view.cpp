#include "agent/fleet/view.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>

#include "agent/spec/json.h"

namespace vmfence::fleet {

std::string vms_prefix(const std::string& prefix) { return prefix + "vms/"; }
std::string host_prefix(const std::string& prefix, const std::string& host) { return vms_prefix(prefix) + host + "/"; }
std::string record_key(const std::string& prefix, const std::string& host, const std::string& name) {
  return host_prefix(prefix, host) + name;
}

std::string record_json(const Record& r) {
  rj::StringBuffer buf;
  rj::Writer<rj::StringBuffer> w(buf);
  w.StartObject();
  w.Key("name");
  w.String(r.name.c_str());
  w.Key("host");
  w.String(r.host.c_str());
  w.Key("group");
  w.String(r.group.c_str());
  w.Key("addresses");
  w.StartArray();
  for (const auto& a : r.addresses) w.String(a.str().c_str());
  w.EndArray();
  w.EndObject();
  return buf.GetString();
}

std::optional<Record> parse_record(const std::string& prefix, const std::string& key, const std::string& value,
                                   std::string* why) {
  auto fail = [&](const std::string& m) -> std::optional<Record> {
    if (why) *why = key + ": " + m;
    return std::nullopt;
  };
  const std::string vp = vms_prefix(prefix);
  if (key.compare(0, vp.size(), vp) != 0) return fail("not under " + vp);
  std::string rest = key.substr(vp.size());
  auto slash = rest.find('/');
  if (slash == std::string::npos || slash == 0 || slash + 1 == rest.size()) return fail("not HOST/VM");
  rj::Document doc;
  doc.Parse(value.c_str(), value.size());
  if (doc.HasParseError() || !doc.IsObject()) return fail("value is not a JSON object");
  auto str = [&](const char* k) -> std::optional<std::string> {
    auto m = doc.FindMember(k);
    if (m == doc.MemberEnd() || !m->value.IsString()) return std::nullopt;
    return std::string(m->value.GetString(), m->value.GetStringLength());
  };
  Record r;
  auto name = str("name"), host = str("host"), group = str("group");
  if (!name || !host || !group) return fail("needs name, host and group");
  r.name = *name;
  r.host = *host;
  r.group = *group;
  if (r.host != rest.substr(0, slash) || r.name != rest.substr(slash + 1))
    return fail("host and name do not match the key");
  auto addrs = doc.FindMember("addresses");
  if (addrs == doc.MemberEnd() || !addrs->value.IsArray() || addrs->value.Empty())
    return fail("needs a non-empty addresses array");
  for (const auto& a : addrs->value.GetArray()) {
    std::string w;
    auto c = a.IsString() ? parse_cidr(a.GetString(), &w) : std::nullopt;
    if (!c) return fail("address: " + (w.empty() ? std::string("not a string") : w));
    // A record is another host's word: held to what a local spec may claim,
    // so one bad record cannot own the world (::/0), multicast or the link.
    if (auto bad = remote_address_problem(*c)) return fail("address " + c->str() + " " + *bad);
    for (const auto& prev : r.addresses)
      if (prev.family == c->family && prev.overlaps(*c))
        return fail("addresses " + prev.str() + " and " + c->str() + " overlap");
    r.addresses.push_back(*c);
  }
  return r;
}

Record local_record(const std::string& host, const VmSpec& vm) {
  Record r;
  r.host = host;
  r.name = vm.name;
  r.group = vm.group.empty() ? vm.name : vm.group;
  r.addresses = vm.addresses;
  return r;
}

uint32_t remote_vm_id(const std::string& host, const std::string& name) { return name_id(host + "/" + name); }

namespace {

// Every address of `want` is one of `have`.
bool covers(const std::vector<Cidr>& have, const std::vector<Cidr>& want) {
  return std::all_of(want.begin(), want.end(),
                     [&](const Cidr& c) { return std::find(have.begin(), have.end(), c) != have.end(); });
}

struct Claim {
  int64_t revision;
  const std::string* host;
  const std::string* name;
  const std::vector<Cidr>* addresses;
  const VmSpec* vm;      // local
  const Record* record;  // remote
};

// The addresses of the claims that won so far, for overlap queries in
// O(prefix lengths + nested) instead of against every claim: CIDRs either
// nest or are disjoint, so an overlap is a won prefix containing the query
// (one lookup per prefix length in use) or one inside it (a range scan).
class WonIndex {
 public:
  using Key = std::tuple<int, std::array<uint8_t, 16>, uint8_t>;  // family, masked address, bits (mapped)
  void add(const Claim* c) {
    for (const auto& a : *c->addresses) {
      won_.emplace(key(a, a.mapped_prefix_len()), c);
      lengths_.insert({a.family, a.mapped_prefix_len()});
    }
  }
  // A won claim of another host overlapping one of c's addresses.
  const Claim* beaten_by(const Claim& c, size_t* index, Cidr* theirs) const {
    for (size_t i = 0; i < c.addresses->size(); ++i) {
      const Cidr& q = (*c.addresses)[i];
      uint8_t bits = q.mapped_prefix_len();
      auto hit = [&](const Claim* w, const Key& k) {
        if (*w->host == *c.host) return false;
        *index = i;
        theirs->family = std::get<0>(k);
        theirs->addr = std::get<1>(k);
        theirs->prefix_len = static_cast<uint8_t>(std::get<2>(k) - (theirs->family == 4 ? 96 : 0));
        return true;
      };
      for (const auto& [family, len] : lengths_) {
        if (family != q.family || len > bits) continue;
        auto it = won_.find(key(q, len));
        if (it != won_.end() && hit(it->second, it->first)) return it->second;
      }
      if (bits == 128) continue;
      for (auto it = won_.lower_bound(key(q, bits)); it != won_.end(); ++it) {
        const auto& [family, addr, len] = it->first;
        Cidr w{family, addr, static_cast<uint8_t>(len - (family == 4 ? 96 : 0))};
        if (family != q.family || !q.contains(w)) break;
        if (hit(it->second, it->first)) return it->second;
      }
    }
    return nullptr;
  }

 private:
  static Key key(const Cidr& a, uint8_t bits) {
    Cidr m = a;
    m.prefix_len = static_cast<uint8_t>(bits - (a.family == 4 ? 96 : 0));
    return {a.family, masked_addr(m), bits};
  }
  std::multimap<Key, const Claim*> won_;
  std::set<std::pair<int, uint8_t>> lengths_;
};

}  // namespace

Resolution resolve(const std::string& self, const std::vector<const VmSpec*>& local, const Records& records,
                   const std::vector<Cidr>& reserved) {
  constexpr int64_t kUnpublished = std::numeric_limits<int64_t>::max();
  std::vector<Claim> claims;
  std::map<std::string, const Record*> own;  // this host's records, by VM name
  for (const auto& [key, r] : records) {
    if (r.host == self)
      own[r.name] = &r;
    else
      claims.push_back({r.create_revision, &r.host, &r.name, &r.addresses, nullptr, &r});
  }
  for (const VmSpec* vm : local) {
    auto o = own.find(vm->name);
    int64_t rev =
        o != own.end() && covers(o->second->addresses, vm->addresses) ? o->second->create_revision : kUnpublished;
    claims.push_back({rev, &self, &vm->name, &vm->addresses, vm, nullptr});
  }
  // Revision order; ties (two unpublished local VMs) are admission's to
  // decide: they never conflict here (same host).
  std::stable_sort(claims.begin(), claims.end(), [](const Claim& a, const Claim& b) {
    return std::tie(a.revision, *a.host, *a.name) < std::tie(b.revision, *b.host, *b.name);
  });
  Resolution out;
  WonIndex won;
  for (const auto& c : claims) {
    if (c.record) {
      const Cidr* mine = nullptr;
      const Cidr* its = nullptr;
      for (const auto& a : *c.addresses)
        for (const auto& r : reserved)
          if (!mine && a.family == r.family && a.overlaps(r)) mine = &r, its = &a;
      if (mine) {
        out.remote_refused.push_back("VM \"" + *c.name + "\" of host \"" + *c.host + "\" claims " + its->str() +
                                     ", this host's own " + mine->str() + " (a gateway or IMDS): ignored here");
        continue;
      }
    }
    size_t index = 0;
    Cidr theirs;
    const Claim* w = won.beaten_by(c, &index, &theirs);
    if (!w) {
      won.add(&c);
      if (c.record) out.remote.push_back(c.record);
      continue;
    }
    if (!c.vm) continue;  // a remote loser: its own host refuses it
    std::string msg = (*c.addresses)[index].str() + " overlaps " + theirs.str() + " of VM \"" + *w->name +
                      "\" on host \"" + *w->host + "\", which claimed it first (etcd revision " +
                      std::to_string(w->revision) + "); retried when that claim goes away";
    out.local_losers[c.vm->name] = {{c.vm->file, "addresses[" + std::to_string(index) + "]", msg}};
  }
  std::sort(out.remote.begin(), out.remote.end(),
            [](const Record* a, const Record* b) { return std::tie(a->host, a->name) < std::tie(b->host, b->name); });
  return out;
}

MapWriter::RemoteOwners remote_owners(const std::vector<const Record*>& remote,
                                      const std::set<std::string>& local_isolated) {
  MapWriter::RemoteOwners out;
  for (const Record* r : remote) {
    vmfence_owner o{};
    o.vm_id = remote_vm_id(r->host, r->name);
    bool isolated = r->group == r->name || local_isolated.count(r->group);
    o.group_id = isolated ? name_id("isolated:" + r->host + "/" + r->name) : name_id(r->group);
    o.flags = VMFENCE_OWNER_F_REMOTE;
    std::vector<vmfence_addr> hosts;
    std::vector<vmfence_addr_key> nets;
    for (const auto& a : r->addresses) add_owner_key(a, hosts, nets);
    for (const auto& h : hosts) out.hosts[to_bytes(h)] = o;
    for (const auto& n : nets) out.nets[to_bytes(n)] = o;
  }
  return out;
}

size_t refuse_losers(const Resolution& r, SpecFiles& files, std::vector<VmSpec>& incumbents) {
  if (r.local_losers.empty()) return 0;
  size_t n = 0;
  for (auto& f : files.vms) {
    if (!f.vm) continue;
    auto l = r.local_losers.find(f.vm->name);
    if (l == r.local_losers.end() || l->second.error.file != f.path) continue;
    f.name = f.vm->name;
    f.interface = f.vm->interface;
    f.vm.reset();
    f.errors = {l->second.error};
    ++n;
  }
  std::erase_if(incumbents, [&](const VmSpec& vm) { return r.local_losers.count(vm.name) != 0; });
  return n;
}

}  // namespace vmfence::fleet
