#include "agent/fleet/fleet.h"

#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "agent/daemon/state_file.h"
#include "agent/spec/json.h"

namespace vmfence::fleet {

namespace {

using Clock = std::chrono::steady_clock;

int64_t realtime_ns() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

std::string lease_file(const std::string& run_dir) { return run_dir + "/fleet-lease"; }
std::string view_file(const std::string& run_dir) { return run_dir + "/fleet-view.json"; }

int64_t read_saved_lease(const std::string& run_dir) {
  std::ifstream in(lease_file(run_dir));
  int64_t id = 0;
  if (in >> id) return id;
  return 0;
}

void save_lease(const std::string& run_dir, int64_t id) {
  if (auto s = write_file_atomic(lease_file(run_dir), std::to_string(id)); !s)
    spdlog::warn("fleet: {} (a restart will not re-adopt this lease)", s.message);
}

}  // namespace

std::optional<Record> record_from(const std::string& prefix, const KeyValue& kv) {
  std::string why;
  auto r = parse_record(prefix, kv.key, kv.value, &why);
  if (!r) {
    spdlog::warn("fleet: ignoring {}", why);
    return std::nullopt;
  }
  r->create_revision = kv.create_revision;
  r->lease = kv.lease;
  return r;
}

EtcdOptions etcd_options(const FleetSpec& spec) {
  EtcdOptions o;
  o.endpoints = spec.etcd;
  o.tls = {spec.tls_ca, spec.tls_cert, spec.tls_key};
  // A call must fail well within a keepalive period, so a dead etcd is
  // reported (and retried) before the lease could run out.
  o.timeout_ms = static_cast<int>(std::clamp<uint32_t>(spec.lease_s * 1000 / 6, 500, 3000));
  return o;
}

Fleet::Fleet(FleetSpec spec, std::string run_dir)
    : spec_(std::move(spec)), run_dir_(std::move(run_dir)), client_(etcd_options(spec_)) {
  wake_.reset(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  int64_t saved_ns = 0;
  view_.records = load_saved_view(run_dir_, &saved_ns);
  view_.confirmed_ns = saved_ns;
}

Fleet::~Fleet() {
  {
    std::lock_guard<std::mutex> lock(mu_);  // no lost wakeup for a thread about to wait
    stop_ = true;
  }
  restart_watch_ = true;  // after stop_: a sync thread that reset it sees stop_ next
  cv_.notify_all();
  if (sync_thread_.joinable()) sync_thread_.join();
  if (lease_thread_.joinable()) lease_thread_.join();
}

void Fleet::start() {
  sync_thread_ = std::thread([this] { sync_loop(); });
  lease_thread_ = std::thread([this] { lease_loop(); });
}

void Fleet::notify() {
  uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof one);
}

void Fleet::drain_wake() {
  uint64_t n;
  (void)!::read(wake_.get(), &n, sizeof n);
}

Fleet::Snapshot Fleet::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return view_;
}

Fleet::Snapshot Fleet::snapshot_status() const {
  std::lock_guard<std::mutex> lock(mu_);
  Snapshot s;
  s.generation = view_.generation;
  s.synced = view_.synced;
  s.connected = view_.connected;
  s.confirmed_ns = view_.confirmed_ns;
  s.last_error = view_.last_error;
  return s;
}

void Fleet::publish(std::vector<Record> mine) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (mine == wanted_) return;
    wanted_ = std::move(mine);
    wanted_changed_ = true;
  }
  cv_.notify_all();
}

void Fleet::set_connected(bool ok, const std::string& why) {
  bool changed, failed_before;
  {
    std::lock_guard<std::mutex> lock(mu_);
    changed = view_.connected != ok;
    failed_before = !view_.last_error.empty();  // never cleared: was etcd ever unreachable
    view_.connected = ok;
    if (!ok) view_.last_error = why;
  }
  if (changed) {
    if (ok)
      spdlog::info(failed_before ? "fleet: etcd reachable again" : "fleet: etcd reachable");
    else
      spdlog::warn("fleet: etcd unreachable ({}); enforcing the last known view", why);
    notify();
  }
}

bool Fleet::sleep_for(std::chrono::milliseconds d) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, d, [this] { return stop_.load(); });
  return !stop_;
}

// 0.5 s, doubling, at most lease_s/3: a restarted etcd hears from every host
// before it could expire a live host's lease.
std::chrono::milliseconds Fleet::backoff(int failures) const {
  int64_t cap = std::max<int64_t>(500, spec_.lease_s * 1000 / 3);
  int64_t d = 500LL << std::min(failures, 10);
  return std::chrono::milliseconds(std::min(d, cap));
}

void Fleet::sync_loop() {
  const std::string prefix = vms_prefix(spec_.prefix);
  int failures = 0;
  while (!stop_) {
    RangeResult list;
    if (auto s = client_.range_prefix(prefix, 0, &list); !s) {
      set_connected(false, s.message);
      if (!sleep_for(backoff(failures++))) return;
      continue;
    }
    Records fresh;
    for (const auto& kv : list.kvs)
      if (auto r = record_from(spec_.prefix, kv)) fresh[kv.key] = std::move(*r);
    {
      std::lock_guard<std::mutex> lock(mu_);
      // A re-list replaces the view: what is gone is pruned exactly here.
      if (fresh != view_.records || !view_.synced) ++view_.generation;
      view_.records = std::move(fresh);
      view_.synced = true;
      view_.confirmed_ns = realtime_ns();
    }
    failures = 0;
    set_connected(true, "");
    notify();
    restart_watch_ = false;
    if (stop_) return;  // read after the reset: a stop that came before it is seen here
    std::string why;
    WatchEnd end = client_.watch_prefix(
        prefix, list.revision + 1,
        [&](const std::vector<WatchEvent>& events, int64_t) {
          std::lock_guard<std::mutex> lock(mu_);
          view_.confirmed_ns = realtime_ns();
          bool changed = false;
          for (const auto& e : events) {
            if (e.type == WatchEvent::Type::del) {
              changed |= view_.records.erase(e.kv.key) != 0;
              continue;
            }
            auto r = record_from(spec_.prefix, e.kv);
            if (!r) {
              changed |= view_.records.erase(e.kv.key) != 0;
              continue;
            }
            view_.records[e.kv.key] = std::move(*r);
            changed = true;
          }
          if (changed) {
            ++view_.generation;
            notify();
          }
        },
        &restart_watch_, &why);
    if (stop_) return;
    if (end == WatchEnd::compacted) {
      spdlog::info("fleet: watch revision compacted ({}); listing again", why);
      continue;
    }
    if (end == WatchEnd::failed) {
      set_connected(false, why);
      if (!sleep_for(backoff(failures++))) return;
    }
    // stopped (restart_watch_): a failed keepalive; list again at once.
  }
}

bool Fleet::ensure_lease() {
  if (lease_) return true;
  // After a restart: the previous run's lease, if etcd still has it, keeps
  // its records (and their revisions: the claims' order) as they are.
  if (int64_t saved = read_saved_lease(run_dir_)) {
    int64_t ttl = 0;
    if (auto s = client_.keepalive(saved, &ttl); !s) {
      set_connected(false, s.message);
      return false;
    }
    if (ttl > 0) {
      lease_ = saved;
      next_keepalive_ = Clock::now() + std::chrono::milliseconds(spec_.lease_s * 1000 / 3);
      spdlog::info("fleet: kept lease {:x} of the previous run ({} s left)", lease_, ttl);
      return true;
    }
  }
  int64_t id = 0;
  if (auto s = client_.grant_lease(spec_.lease_s, &id); !s) {
    set_connected(false, s.message);
    return false;
  }
  lease_ = id;
  save_lease(run_dir_, id);
  written_.clear();  // everything goes under the new lease
  next_keepalive_ = Clock::now() + std::chrono::milliseconds(spec_.lease_s * 1000 / 3);
  spdlog::info("fleet: lease {:x} granted ({} s) for host {}", lease_, spec_.lease_s, spec_.host);
  return true;
}

// Make this host's records in etcd what the daemon wants: puts of new or
// changed VMs (a VM claiming an address it had not published gets a new
// record, so its claim's revision is the new one), deletes of the rest,
// the previous run's leftovers included. false: etcd failed.
bool Fleet::write_records() {
  std::vector<Record> wanted;
  Records own;
  bool synced;
  {
    std::lock_guard<std::mutex> lock(mu_);
    wanted = wanted_;
    wanted_changed_ = false;
    synced = view_.synced;
    for (const auto& [k, r] : view_.records)
      if (r.host == spec_.host) own[k] = r;
  }
  std::map<std::string, std::string> want;
  std::map<std::string, const Record*> by_key;
  for (const auto& r : wanted) {
    std::string key = record_key(spec_.prefix, spec_.host, r.name);
    want[key] = record_json(r);
    by_key[key] = &r;
  }
  for (const auto& [key, value] : want) {
    auto o = own.find(key);
    // Put before, and the view agrees (or has not caught up yet: a put is
    // in the view within a watch round trip): nothing to do. A record that
    // went from etcd anyway (deleted by hand, a lease mix-up) is put again.
    if (written_.count(key) && written_[key] == value &&
        (!synced || (o != own.end() && record_json(o->second) == value) ||
         Clock::now() - put_at_[key] < std::chrono::seconds(2)))
      continue;
    if (o != own.end() && o->second.lease == lease_ && record_json(o->second) == value) {
      written_[key] = value;  // already there (a restart that kept its lease)
      continue;
    }
    if (o != own.end()) {
      const auto& had = o->second.addresses;
      bool new_claim = std::any_of(by_key[key]->addresses.begin(), by_key[key]->addresses.end(),
                                   [&](const Cidr& c) { return std::find(had.begin(), had.end(), c) == had.end(); });
      if (new_claim)
        if (auto s = client_.del(key); !s) {
          set_connected(false, s.message);
          return false;
        }
    }
    if (auto s = client_.put(key, value, lease_); !s) {
      set_connected(false, s.message);
      return false;
    }
    written_[key] = value;
    put_at_[key] = Clock::now();
  }
  std::vector<std::string> gone;
  for (const auto& [key, value] : written_)
    if (!want.count(key)) gone.push_back(key);
  // The previous run's records of VMs that are gone, once the view is whole.
  // A record under a live lease that is not ours is another agent's that
  // calls itself this host (two machines with one fleet.host): left alone,
  // and said once, rather than deleting each other's records.
  if (synced)
    for (const auto& [key, r] : own) {
      if (want.count(key) || written_.count(key)) continue;
      if (r.lease && r.lease != lease_) {
        int64_t ttl = 0;
        if (auto s = client_.lease_ttl(r.lease, &ttl); !s) {
          set_connected(false, s.message);
          return false;
        }
        if (ttl > 0) {
          if (foreign_warned_.insert(key).second)
            spdlog::error(
                "fleet: {} is under a live lease ({:x}) not this agent's: another machine with fleet.host \"{}\" "
                "(set a distinct host on each), or a previous run whose lease was not re-adopted (it expires); "
                "leaving it alone",
                key, r.lease, spec_.host);
          continue;
        }
      }
      gone.push_back(key);
    }
  for (const auto& key : gone) {
    if (auto s = client_.del(key); !s) {
      set_connected(false, s.message);
      return false;
    }
    written_.erase(key);
  }
  return true;
}

void Fleet::lease_loop() {
  int failures = 0;
  const auto period = std::chrono::milliseconds(spec_.lease_s * 1000 / 3);
  bool dirty = true;
  while (!stop_) {
    bool ok = ensure_lease();
    if (ok && Clock::now() >= next_keepalive_) {
      int64_t ttl = 0;
      if (auto s = client_.keepalive(lease_, &ttl); !s) {
        set_connected(false, s.message);
        restart_watch_ = true;  // the watch's connection may be as dead
        ok = false;
      } else if (ttl <= 0) {
        spdlog::warn("fleet: lease {:x} expired in etcd; publishing under a new one", lease_);
        lease_ = 0;
        written_.clear();
        continue;
      } else {
        next_keepalive_ = Clock::now() + period;
        std::lock_guard<std::mutex> lock(mu_);
        if (view_.connected && view_.synced) view_.confirmed_ns = realtime_ns();
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      // The view changed: this host's records may be missing or stale.
      dirty = dirty || wanted_changed_ || view_.generation != written_gen_;
      written_gen_ = view_.generation;
    }
    if (ok && dirty) {
      ok = write_records();
      dirty = !ok;
    }
    if (ok) {
      failures = 0;
      set_connected(true, "");
    }
    auto wait = ok ? std::max(std::chrono::milliseconds(50),
                              std::chrono::duration_cast<std::chrono::milliseconds>(next_keepalive_ - Clock::now()))
                   : backoff(failures++);
    std::unique_lock<std::mutex> lock(mu_);
    // A re-list may have brought records of a previous run to delete:
    // look again after every sync (synced flips once) and on publish().
    cv_.wait_for(lock, std::min(wait, std::chrono::milliseconds(1000)),
                 [this] { return stop_.load() || wanted_changed_; });
    if (!ok) dirty = true;
    if (view_.synced && !synced_seen_) {
      synced_seen_ = true;
      dirty = true;
    }
  }
}

Records Fleet::load_saved_view(const std::string& run_dir, int64_t* saved_ns) {
  Records out;
  std::ifstream in(view_file(run_dir));
  if (!in) return out;
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  rj::Document doc;
  doc.Parse(text.c_str(), text.size());
  if (doc.HasParseError() || !doc.IsObject()) return out;
  auto prefix = doc.FindMember("prefix");
  auto recs = doc.FindMember("records");
  if (prefix == doc.MemberEnd() || !prefix->value.IsString() || recs == doc.MemberEnd() || !recs->value.IsArray())
    return out;
  if (auto t = doc.FindMember("confirmed_ns"); saved_ns && t != doc.MemberEnd() && t->value.IsInt64())
    *saved_ns = t->value.GetInt64();
  for (const auto& e : recs->value.GetArray()) {
    if (!e.IsObject() || !e.HasMember("key") || !e["key"].IsString() || !e.HasMember("value") ||
        !e["value"].IsString() || !e.HasMember("create_revision") || !e["create_revision"].IsInt64())
      continue;
    auto r = parse_record(prefix->value.GetString(), e["key"].GetString(), e["value"].GetString(), nullptr);
    if (!r) continue;
    r->create_revision = e["create_revision"].GetInt64();
    out[e["key"].GetString()] = std::move(*r);
  }
  return out;
}

Status Fleet::save_view(const std::string& run_dir, const std::string& prefix, const Snapshot& s) {
  rj::StringBuffer buf;
  rj::Writer<rj::StringBuffer> w(buf);
  w.StartObject();
  w.Key("prefix");
  w.String(prefix.c_str());
  w.Key("confirmed_ns");
  w.Int64(s.confirmed_ns);
  w.Key("records");
  w.StartArray();
  for (const auto& [key, r] : s.records) {
    w.StartObject();
    w.Key("key");
    w.String(key.c_str());
    w.Key("value");
    std::string v = record_json(r);
    w.String(v.c_str());
    w.Key("create_revision");
    w.Int64(r.create_revision);
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();
  return write_file_atomic(view_file(run_dir), buf.GetString());
}

Status Fleet::withdraw(const FleetSpec& spec, const std::string& run_dir) {
  EtcdClient client(etcd_options(spec));
  int64_t deleted = 0;
  if (auto s = client.del_prefix(host_prefix(spec.prefix, spec.host), nullptr, &deleted); !s) return s;
  if (int64_t lease = read_saved_lease(run_dir)) (void)client.revoke(lease);
  std::error_code ec;
  std::filesystem::remove(lease_file(run_dir), ec);
  std::filesystem::remove(view_file(run_dir), ec);
  spdlog::info("fleet: deleted {} records of host {} from etcd", deleted, spec.host);
  return {};
}

}  // namespace vmfence::fleet
