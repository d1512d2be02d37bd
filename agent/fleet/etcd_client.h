// An etcd v3 client over etcd's JSON gRPC gateway (HTTP/1.1 POST of JSON,
// libcurl), for the fleet layer: keys under a prefix, leases, and a blocking
// watch. Written against etcd 3.4 (Debian etcd-server); never runs etcdctl.
//
// Gateway quirks this handles: keys and values are base64 in the JSON; int64
// fields (revisions, lease IDs, TTLs, counts) come back as JSON strings;
// fields at their default value are omitted (a watch event of type PUT has no
// "type", a compaction cancel has no header.revision, an expired lease's
// keepalive has no "TTL"); streaming calls (/v3/lease/keepalive, /v3/watch)
// answer with a sequence of {"result":{...}} or {"error":{...}} objects.
//
// Errors are vmfence::Status (positive errno + message naming the endpoint
// and what failed), never exceptions. All methods are safe to call from
// several threads at once (e.g. put/keepalive on one while another sits in
// watch_prefix).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "maps/status.h"

namespace vmfence::fleet {

struct EtcdTls {
  std::string ca_file, cert_file, key_file;  // all optional; https:// endpoints use them
};

struct EtcdOptions {
  std::vector<std::string> endpoints;  // e.g. "http://127.0.0.1:2379" (no trailing path)
  EtcdTls tls;
  int timeout_ms = 2000;     // whole unary request per endpoint; connect timeout of the watch
  int range_limit = 2000;    // keys per range request in range_prefix (pagination)
  int keepalive_idle_s = 5;  // TCP keepalive: idle time and probe interval (a dead peer is seen)
};

struct KeyValue {
  std::string key, value;
  int64_t create_revision = 0, mod_revision = 0, lease = 0;
};

struct RangeResult {
  std::vector<KeyValue> kvs;  // sorted by key
  // The revision of this view: the asked revision, or when 0 was asked, the
  // store revision (header.revision) of the first page, at which the later
  // pages were read. Watch from revision + 1 to follow on from the list.
  int64_t revision = 0;
};

struct WatchEvent {
  enum class Type { put, del } type;
  KeyValue kv;  // del: kv.key + kv.mod_revision only
};

enum class WatchEnd { stopped, compacted, failed };  // compacted: start revision no longer available (re-list)

class EtcdClient {
 public:
  explicit EtcdClient(EtcdOptions o);
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  // Each call tries the endpoints in order, starting with the last one that
  // answered, honours timeout_ms per endpoint, and returns errors naming the
  // endpoint and what failed. Transport errors (ECONNREFUSED, ETIMEDOUT,
  // ECONNRESET, EHOSTUNREACH, EPROTO for TLS) move on to the next endpoint;
  // an answer from etcd (e.g. ENOENT "requested lease not found", ERANGE
  // "required revision has been compacted") is returned as it is.

  // All keys under prefix ("" = every key), read in pages of range_limit keys
  // at one fixed revision (0 = latest).
  Status range_prefix(const std::string& prefix, int64_t revision, RangeResult* out);
  Status get(const std::string& key, std::optional<KeyValue>* out, int64_t* revision = nullptr);
  Status put(const std::string& key, const std::string& value, int64_t lease, int64_t* revision = nullptr);
  // deleted: how many keys went (optional).
  Status del(const std::string& key, int64_t* revision = nullptr, int64_t* deleted = nullptr);
  Status del_prefix(const std::string& prefix, int64_t* revision = nullptr, int64_t* deleted = nullptr);
  // etcd may grant more than asked (its minimum TTL); *granted_ttl says what.
  Status grant_lease(int64_t ttl_s, int64_t* lease_id, int64_t* granted_ttl = nullptr);
  Status keepalive(int64_t lease_id, int64_t* ttl_left);  // ttl_left 0 = lease expired/unknown
  Status lease_ttl(int64_t lease_id, int64_t* ttl_left);  // ttl_left -1 = gone
  Status revoke(int64_t lease_id);                        // ENOENT: no such lease (expired)
  // Compacts the history before revision (physical: waits for it).
  Status compact(int64_t revision);

  // Blocking watch of a prefix from start_revision (inclusive; 0 = from now)
  // on the calling thread. For each response batch calls on_events(events,
  // header_revision); a progress notification (asked for, so idle streams
  // still advance) calls it with no events. Returns when *stop becomes true
  // (checked at least every 200 ms), when the stream ends or errors (failed,
  // with *why), or when etcd reports start_revision compacted (compacted;
  // *why names compact_revision: re-list and watch again).
  WatchEnd watch_prefix(const std::string& prefix, int64_t start_revision,
                        const std::function<void(const std::vector<WatchEvent>&, int64_t)>& on_events,
                        const std::atomic<bool>* stop, std::string* why);

  // The gateway encodings, exposed for tests.
  static std::string base64_encode(const std::string& in);
  static bool base64_decode(const std::string& in, std::string* out);
  static std::string prefix_range_end(const std::string& prefix);

 private:
  struct Json;  // an rj::Document (agent/spec/json.h), kept out of this header
  // POSTs body to path on the endpoints (in order from the last good one) and
  // parses the answer (the first JSON object of the body) into *doc; an
  // {"error":...} answer or an HTTP error status is an error Status.
  Status call(const char* path, const std::string& body, Json* doc);
  void* take_handle();
  void give_handle(void* h);
  void set_common(void* h, const std::string& endpoint) const;

  EtcdOptions o_;
  std::atomic<size_t> good_{0};  // index of the last endpoint that answered
  std::mutex pool_mu_;
  std::vector<void*> pool_;  // idle CURL easy handles (their connections stay open)
};

}  // namespace vmfence::fleet
