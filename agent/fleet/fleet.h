// The fleet agent (host.json "fleet", README "Fleet"): publishes this host's
// VMs to etcd under a lease it keeps alive, and keeps a view of every
// host's records by listing the prefix at a revision and watching from it.
//
// Two threads, so a slow or dead etcd never blocks the daemon's event loop:
//   sync   list, then watch; after a failure or a compaction it lists again
//          and replaces the view (what is gone is pruned exactly then);
//   lease  grants (or re-adopts after a restart) the lease, keeps it alive
//          every lease_s/3, and writes the records the daemon wants
//          published. A failed keepalive also restarts the watch: a
//          silently dead connection is noticed within lease_s/3.
// The view is never emptied because etcd went away (fail static): only a
// deletion or a re-list seen in etcd removes a record.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "agent/fleet/etcd_client.h"
#include "agent/fleet/view.h"
#include "maps/status.h"

namespace vmfence::fleet {

EtcdOptions etcd_options(const FleetSpec& spec);

// A listed or watched key as a record (with its revision and lease);
// nullopt, logged, when it is none.
std::optional<Record> record_from(const std::string& prefix, const KeyValue& kv);

class Fleet {
 public:
  Fleet(FleetSpec spec, std::string run_dir);
  ~Fleet();  // stops the threads; the lease and the records stay (SIGTERM)
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;

  void start();
  // Readable (eventfd) when the view or the connection changed.
  int wake_fd() const { return wake_.get(); }
  void drain_wake();

  struct Snapshot {
    Records records;           // every host's, this one's included
    uint64_t generation = 0;   // bumps with every change of `records`
    bool synced = false;       // a full list since start
    bool connected = false;    // etcd answered the last call
    int64_t confirmed_ns = 0;  // CLOCK_REALTIME the view was last known current (0: never)
    std::string last_error;
  };
  Snapshot snapshot() const;
  Snapshot snapshot_status() const;  // the same without the records
  // The records this host should have in etcd (its enforced VMs).
  void publish(std::vector<Record> mine);

  // The view a previous run saved (RUN_DIR/fleet-view.json): what a restart
  // enforces until its first sync. Empty when absent.
  static Records load_saved_view(const std::string& run_dir, int64_t* saved_ns = nullptr);
  static Status save_view(const std::string& run_dir, const std::string& prefix, const Snapshot& s);

  // `vmfence down`: delete this host's records and revoke its lease.
  static Status withdraw(const FleetSpec& spec, const std::string& run_dir);

 private:
  void sync_loop();
  void lease_loop();
  void set_connected(bool ok, const std::string& why);
  void notify();
  bool sleep_for(std::chrono::milliseconds d);  // false: stopping
  std::chrono::milliseconds backoff(int failures) const;
  bool ensure_lease();
  bool write_records();

  FleetSpec spec_;
  std::string run_dir_;
  EtcdClient client_;
  Fd wake_;
  std::thread sync_thread_, lease_thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> restart_watch_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;  // wakes the lease thread (publish, stop)
  Snapshot view_;
  std::vector<Record> wanted_;
  bool wanted_changed_ = false;
  // The lease thread's own.
  int64_t lease_ = 0;
  std::map<std::string, std::string> written_;  // key -> value put under lease_
  std::chrono::steady_clock::time_point next_keepalive_{};
  bool synced_seen_ = false;
  std::set<std::string> foreign_warned_;  // own-host keys under another live agent's lease (logged once)
  uint64_t written_gen_ = 0;              // view generation write_records saw
  std::map<std::string, std::chrono::steady_clock::time_point> put_at_;  // key -> when it was put
};

}  // namespace vmfence::fleet
