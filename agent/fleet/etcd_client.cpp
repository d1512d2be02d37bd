#include "agent/fleet/etcd_client.h"

#include <curl/curl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <utility>

#include "agent/spec/json.h"

namespace vmfence::fleet {

struct EtcdClient::Json {
  rj::Document d;
};

namespace {

constexpr size_t kMaxIdleHandles = 8;
constexpr long kWatchPollMs = 100;  // the stop flag is looked at least this often

// The request headers every call sends: JSON, and no "Expect: 100-continue"
// (curl adds it to bodies over 1 KB and then waits for the 100).
curl_slist* request_headers() {
  static curl_slist* headers = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    curl_global_init(CURL_GLOBAL_DEFAULT);
    headers = curl_slist_append(headers, "Content-Type: application/json");
    headers = curl_slist_append(headers, "Expect:");
  });
  return headers;
}

// TCP keepalive gives up after 3 unanswered probes (curl 7.88 has no
// CURLOPT_TCP_KEEPCNT), so a silently dead peer is seen in idle + 3 * interval.
int on_socket(void*, curl_socket_t fd, curlsocktype purpose) {
  if (purpose == CURLSOCKTYPE_IPCXN) {
    int cnt = 3;
    ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
  }
  return CURL_SOCKOPT_OK;
}

size_t append_body(char* p, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(p, size * n);
  return size * n;
}

// errno for a curl transport error (the socket's own errno where curl has it).
int curl_errno(CURL* h, CURLcode rc) {
  long os = 0;
  if (rc == CURLE_COULDNT_CONNECT && curl_easy_getinfo(h, CURLINFO_OS_ERRNO, &os) == CURLE_OK && os > 0)
    return static_cast<int>(os);
  switch (rc) {
    case CURLE_COULDNT_CONNECT:
      return ECONNREFUSED;
    case CURLE_OPERATION_TIMEDOUT:
      return ETIMEDOUT;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
      return EHOSTUNREACH;
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
      return ECONNRESET;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_CRL_BADFILE:
      return EPROTO;
    case CURLE_ABORTED_BY_CALLBACK:
      return ECANCELED;
    case CURLE_OUT_OF_MEMORY:
      return ENOMEM;
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL:
      return EINVAL;
    default:
      return EIO;
  }
}

// errno for a gRPC status code in a gateway error answer.
int grpc_errno(int64_t code) {
  switch (code) {
    case 1:   // Canceled
    case 10:  // Aborted
      return ECANCELED;
    case 3:  // InvalidArgument
      return EINVAL;
    case 4:  // DeadlineExceeded
      return ETIMEDOUT;
    case 5:  // NotFound
      return ENOENT;
    case 6:  // AlreadyExists
      return EEXIST;
    case 7:   // PermissionDenied
    case 16:  // Unauthenticated
      return EACCES;
    case 8:  // ResourceExhausted
      return ENOSPC;
    case 9:  // FailedPrecondition
      return EPERM;
    case 11:  // OutOfRange (e.g. "required revision has been compacted")
      return ERANGE;
    case 12:  // Unimplemented
      return ENOSYS;
    case 14:  // Unavailable ("no leader", "request timed out")
      return EAGAIN;
    default:
      return EIO;
  }
}

// An int64 field: the gateway writes them as strings; numbers are taken too.
// Absent (the default value is omitted) = 0.
int64_t i64(const rj::Value& o, const char* name) {
  if (!o.IsObject()) return 0;
  auto it = o.FindMember(name);
  if (it == o.MemberEnd()) return 0;
  const rj::Value& v = it->value;
  if (v.IsInt64()) return v.GetInt64();
  if (v.IsUint64()) return static_cast<int64_t>(v.GetUint64());
  if (v.IsString()) {
    errno = 0;
    char* end = nullptr;
    long long x = std::strtoll(v.GetString(), &end, 10);
    if (errno == 0 && end && *end == '\0') return x;
  }
  return 0;
}

bool boolean(const rj::Value& o, const char* name) {
  if (!o.IsObject()) return false;
  auto it = o.FindMember(name);
  return it != o.MemberEnd() && it->value.IsBool() && it->value.GetBool();
}

std::string str(const rj::Value& o, const char* name) {
  if (!o.IsObject()) return {};
  auto it = o.FindMember(name);
  if (it == o.MemberEnd() || !it->value.IsString()) return {};
  return std::string(it->value.GetString(), it->value.GetStringLength());
}

const rj::Value& member(const rj::Value& o, const char* name) {
  static const rj::Value null;
  if (!o.IsObject()) return null;
  auto it = o.FindMember(name);
  return it == o.MemberEnd() ? null : it->value;
}

bool parse_kv(const rj::Value& v, KeyValue* kv) {
  if (!v.IsObject()) return false;
  if (!EtcdClient::base64_decode(str(v, "key"), &kv->key)) return false;
  if (!EtcdClient::base64_decode(str(v, "value"), &kv->value)) return false;
  kv->create_revision = i64(v, "create_revision");
  kv->mod_revision = i64(v, "mod_revision");
  kv->lease = i64(v, "lease");
  return true;
}

// The error of an answer, if it is one: unary calls answer
// {"error":"text","message":"text","code":N}, streaming ones
// {"error":{"grpc_code":N,"http_code":N,"message":"text","http_status":"..."}}.
bool answer_error(const rj::Value& d, int64_t* code, std::string* msg) {
  const rj::Value& e = member(d, "error");
  if (e.IsNull()) return false;
  if (e.IsObject()) {
    *code = i64(e, "grpc_code");
    *msg = str(e, "message");
  } else {
    *code = i64(d, "code");
    *msg = str(d, "message");
    if (msg->empty()) *msg = str(d, "error");
  }
  return true;
}

std::string q(const std::string& s) { return "\"" + s + "\""; }  // base64 and digits need no escaping
std::string q(int64_t v) { return "\"" + std::to_string(v) + "\""; }

}  // namespace

std::string EtcdClient::base64_encode(const std::string& in) {
  static const char* t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    out += t[v >> 18];
    out += t[(v >> 12) & 63];
    out += t[(v >> 6) & 63];
    out += t[v & 63];
  }
  if (i + 1 == in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    out += t[v >> 18];
    out += t[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8);
    out += t[v >> 18];
    out += t[(v >> 12) & 63];
    out += t[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

bool EtcdClient::base64_decode(const std::string& in, std::string* out) {
  out->clear();
  out->reserve(in.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t pad = 0;
  for (char c : in) {
    int v;
    if (c >= 'A' && c <= 'Z')
      v = c - 'A';
    else if (c >= 'a' && c <= 'z')
      v = c - 'a' + 26;
    else if (c >= '0' && c <= '9')
      v = c - '0' + 52;
    else if (c == '+' || c == '-')
      v = 62;
    else if (c == '/' || c == '_')
      v = 63;
    else if (c == '=') {
      ++pad;
      continue;
    } else
      return false;
    if (pad) return false;  // data after padding
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out->push_back(char((acc >> bits) & 0xff));
    }
  }
  return pad <= 2;
}

std::string EtcdClient::prefix_range_end(const std::string& prefix) {
  std::string end = prefix;
  while (!end.empty()) {
    auto& c = reinterpret_cast<unsigned char&>(end.back());
    if (c < 0xff) {
      ++c;
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // "" or all 0xff: every key from prefix on
}

EtcdClient::EtcdClient(EtcdOptions o) : o_(std::move(o)) {
  request_headers();  // curl_global_init, once per process
  for (auto& e : o_.endpoints)
    while (!e.empty() && e.back() == '/') e.pop_back();
}

EtcdClient::~EtcdClient() {
  for (void* h : pool_) curl_easy_cleanup(static_cast<CURL*>(h));
}

void* EtcdClient::take_handle() {
  {
    std::lock_guard<std::mutex> l(pool_mu_);
    if (!pool_.empty()) {
      void* h = pool_.back();
      pool_.pop_back();
      return h;
    }
  }
  return curl_easy_init();
}

void EtcdClient::give_handle(void* h) {
  if (!h) return;
  {
    std::lock_guard<std::mutex> l(pool_mu_);
    if (pool_.size() < kMaxIdleHandles) {
      pool_.push_back(h);
      return;
    }
  }
  curl_easy_cleanup(static_cast<CURL*>(h));
}

void EtcdClient::set_common(void* hv, const std::string& endpoint) const {
  (void)endpoint;
  CURL* h = static_cast<CURL*>(hv);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, long(o_.timeout_ms));
  curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
  curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(h, CURLOPT_TCP_KEEPIDLE, long(o_.keepalive_idle_s));
  curl_easy_setopt(h, CURLOPT_TCP_KEEPINTVL, long(o_.keepalive_idle_s));
  curl_easy_setopt(h, CURLOPT_SOCKOPTFUNCTION, on_socket);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, request_headers());
  curl_easy_setopt(h, CURLOPT_POST, 1L);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  if (!o_.tls.ca_file.empty()) curl_easy_setopt(h, CURLOPT_CAINFO, o_.tls.ca_file.c_str());
  if (!o_.tls.cert_file.empty()) curl_easy_setopt(h, CURLOPT_SSLCERT, o_.tls.cert_file.c_str());
  if (!o_.tls.key_file.empty()) curl_easy_setopt(h, CURLOPT_SSLKEY, o_.tls.key_file.c_str());
}

Status EtcdClient::call(const char* path, const std::string& body, Json* doc) {
  size_t n = o_.endpoints.size();
  if (n == 0) return Status::error(EINVAL, std::string("etcd ") + path + ": no endpoints configured");
  CURL* h = static_cast<CURL*>(take_handle());
  if (!h) return Status::error(ENOMEM, "etcd: curl_easy_init");
  struct Give {
    EtcdClient* c;
    CURL* h;
    ~Give() { c->give_handle(h); }
  } give{this, h};

  size_t start = good_.load() % n;
  std::string failures;  // per endpoint, when more than one is tried
  int err = 0;
  std::string last;
  for (size_t i = 0; i < n; ++i) {
    size_t idx = (start + i) % n;
    const std::string& ep = o_.endpoints[idx];
    std::string url = ep + path;
    std::string resp;
    char errbuf[CURL_ERROR_SIZE] = "";
    curl_easy_reset(h);  // keeps the open connections
    set_common(h, ep);
    curl_easy_setopt(h, CURLOPT_URL, url.c_str());
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body.data());
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, long(body.size()));
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, long(o_.timeout_ms));
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, append_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &resp);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    CURLcode rc = curl_easy_perform(h);
    if (rc != CURLE_OK) {
      err = curl_errno(h, rc);
      last = "etcd " + url + ": " + (errbuf[0] ? errbuf : curl_easy_strerror(rc));
      failures += (failures.empty() ? "" : "; ") + last;
      continue;  // transport error: the next endpoint
    }
    long http = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &http);
    doc->d.Parse<rj::kParseStopWhenDoneFlag>(resp.data(), resp.size());
    if (doc->d.HasParseError() || !doc->d.IsObject()) {
      if (http == 404) return Status::error(ENOSYS, "etcd " + url + ": HTTP 404 (no such gateway path)");
      std::string head = resp.substr(0, 120);
      while (!head.empty() && (head.back() == '\n' || head.back() == '\r')) head.pop_back();
      return Status::error(EPROTO, "etcd " + url + ": HTTP " + std::to_string(http) + ", not a JSON object: " + head);
    }
    int64_t code = 0;
    std::string msg;
    if (answer_error(doc->d, &code, &msg)) {
      if (code == 14) {  // Unavailable: this member cannot serve (no leader); another may
        err = EAGAIN;
        last = "etcd " + url + ": " + msg;
        failures += (failures.empty() ? "" : "; ") + last;
        continue;
      }
      good_.store(idx);
      return Status::error(grpc_errno(code), "etcd " + url + ": " + msg);
    }
    if (http != 200) {
      good_.store(idx);
      return Status::error(EPROTO, "etcd " + url + ": HTTP " + std::to_string(http));
    }
    good_.store(idx);
    return Status::success();
  }
  if (n == 1) return Status::error(err, last);
  return Status::error(err, "etcd: no endpoint answered: " + failures);
}

Status EtcdClient::range_prefix(const std::string& prefix, int64_t revision, RangeResult* out) {
  out->kvs.clear();
  out->revision = revision;
  std::string key = prefix;
  const std::string end = base64_encode(prefix_range_end(prefix));
  const int limit = o_.range_limit > 0 ? o_.range_limit : 2000;
  int64_t rev = revision;
  for (;;) {
    std::string body = "{\"key\":" + q(base64_encode(key)) + ",\"range_end\":" + q(end) +
                       ",\"limit\":" + q(int64_t(limit)) + (rev ? ",\"revision\":" + q(rev) : "") + "}";
    Json doc;
    Status st = call("/v3/kv/range", body, &doc);
    if (!st) return st;
    if (rev == 0) rev = i64(member(doc.d, "header"), "revision");  // the rest at the first page's revision
    const rj::Value& kvs = member(doc.d, "kvs");
    size_t got = 0;
    if (kvs.IsArray()) {
      for (const auto& v : kvs.GetArray()) {
        KeyValue kv;
        if (!parse_kv(v, &kv)) return Status::error(EPROTO, "etcd /v3/kv/range: a key or value is not base64");
        out->kvs.push_back(std::move(kv));
        ++got;
      }
    }
    if (!boolean(doc.d, "more") || got == 0) break;
    key = out->kvs.back().key + std::string(1, '\0');  // the next key after the last one
  }
  out->revision = rev;
  return Status::success();
}

Status EtcdClient::get(const std::string& key, std::optional<KeyValue>* out, int64_t* revision) {
  Json doc;
  Status st = call("/v3/kv/range", "{\"key\":" + q(base64_encode(key)) + "}", &doc);
  if (!st) return st;
  out->reset();
  const rj::Value& kvs = member(doc.d, "kvs");
  if (kvs.IsArray() && !kvs.Empty()) {
    KeyValue kv;
    if (!parse_kv(kvs[rj::SizeType(0)], &kv))
      return Status::error(EPROTO, "etcd /v3/kv/range: a key or value is not base64");
    *out = std::move(kv);
  }
  if (revision) *revision = i64(member(doc.d, "header"), "revision");
  return Status::success();
}

Status EtcdClient::put(const std::string& key, const std::string& value, int64_t lease, int64_t* revision) {
  std::string body = "{\"key\":" + q(base64_encode(key)) + ",\"value\":" + q(base64_encode(value)) +
                     (lease ? ",\"lease\":" + q(lease) : "") + "}";
  Json doc;
  Status st = call("/v3/kv/put", body, &doc);
  if (!st) return st;
  if (revision) *revision = i64(member(doc.d, "header"), "revision");
  return Status::success();
}

Status EtcdClient::del(const std::string& key, int64_t* revision, int64_t* deleted) {
  Json doc;
  Status st = call("/v3/kv/deleterange", "{\"key\":" + q(base64_encode(key)) + "}", &doc);
  if (!st) return st;
  if (revision) *revision = i64(member(doc.d, "header"), "revision");
  if (deleted) *deleted = i64(doc.d, "deleted");
  return Status::success();
}

Status EtcdClient::del_prefix(const std::string& prefix, int64_t* revision, int64_t* deleted) {
  Json doc;
  Status st = call(
      "/v3/kv/deleterange",
      "{\"key\":" + q(base64_encode(prefix)) + ",\"range_end\":" + q(base64_encode(prefix_range_end(prefix))) + "}",
      &doc);
  if (!st) return st;
  if (revision) *revision = i64(member(doc.d, "header"), "revision");
  if (deleted) *deleted = i64(doc.d, "deleted");
  return Status::success();
}

Status EtcdClient::grant_lease(int64_t ttl_s, int64_t* lease_id, int64_t* granted_ttl) {
  Json doc;
  Status st = call("/v3/lease/grant", "{\"TTL\":" + q(ttl_s) + "}", &doc);
  if (!st) return st;
  *lease_id = i64(doc.d, "ID");
  if (granted_ttl) *granted_ttl = i64(doc.d, "TTL");
  if (*lease_id == 0) return Status::error(EPROTO, "etcd /v3/lease/grant: no lease ID in the answer");
  return Status::success();
}

Status EtcdClient::keepalive(int64_t lease_id, int64_t* ttl_left) {
  // A streaming call: one request in the body, one {"result":...} back.
  Json doc;
  Status st = call("/v3/lease/keepalive", "{\"ID\":" + q(lease_id) + "}", &doc);
  if (!st) return st;
  *ttl_left = i64(member(doc.d, "result"), "TTL");  // absent: expired or unknown
  if (*ttl_left < 0) *ttl_left = 0;
  return Status::success();
}

Status EtcdClient::lease_ttl(int64_t lease_id, int64_t* ttl_left) {
  Json doc;
  Status st = call("/v3/lease/timetolive", "{\"ID\":" + q(lease_id) + "}", &doc);
  if (!st) return st;
  auto it = doc.d.FindMember("TTL");
  *ttl_left = it == doc.d.MemberEnd() ? -1 : i64(doc.d, "TTL");
  return Status::success();
}

Status EtcdClient::revoke(int64_t lease_id) {
  Json doc;
  return call("/v3/lease/revoke", "{\"ID\":" + q(lease_id) + "}", &doc);
}

Status EtcdClient::compact(int64_t revision) {
  Json doc;
  return call("/v3/kv/compaction", "{\"revision\":" + q(revision) + ",\"physical\":true}", &doc);
}

// --- watch --------------------------------------------------------------------

namespace {

struct WatchState {
  const std::function<void(const std::vector<WatchEvent>&, int64_t)>* on_events;
  const std::atomic<bool>* stop;
  std::string url;
  int64_t start_revision = 0;
  // The object splitter: the body is a sequence of JSON objects.
  std::string cur;
  int depth = 0;
  bool in_str = false, esc = false;
  bool created = false, any_byte = false;
  bool done = false;  // end decided by an answer
  WatchEnd end = WatchEnd::failed;
  std::string why;

  void finish(WatchEnd e, std::string w) {
    done = true;
    end = e;
    why = std::move(w);
  }

  void on_object() {
    rj::Document d;
    d.Parse(cur.data(), cur.size());
    if (d.HasParseError() || !d.IsObject()) return finish(WatchEnd::failed, "etcd " + url + ": bad JSON in the stream");
    int64_t code = 0;
    std::string msg;
    if (answer_error(d, &code, &msg))
      return finish(WatchEnd::failed, "etcd " + url + ": " + msg + " (gRPC code " + std::to_string(code) + ")");
    const rj::Value& r = member(d, "result");
    if (!r.IsObject()) return;
    int64_t compact_rev = i64(r, "compact_revision");
    if (compact_rev > 0)
      return finish(WatchEnd::compacted, "etcd " + url + ": watch from revision " + std::to_string(start_revision) +
                                             ": compacted (compact_revision " + std::to_string(compact_rev) + ")");
    if (boolean(r, "canceled")) {
      std::string reason = str(r, "cancel_reason");
      return finish(WatchEnd::failed, "etcd " + url + ": watch canceled" + (reason.empty() ? "" : ": " + reason));
    }
    if (boolean(r, "created")) {
      created = true;
      return;  // its header revision is "now", not what has been delivered
    }
    std::vector<WatchEvent> events;
    const rj::Value& evs = member(r, "events");
    if (evs.IsArray()) {
      for (const auto& e : evs.GetArray()) {
        WatchEvent ev{str(e, "type") == "DELETE" ? WatchEvent::Type::del : WatchEvent::Type::put, {}};
        if (!parse_kv(member(e, "kv"), &ev.kv))
          return finish(WatchEnd::failed, "etcd " + url + ": an event's key or value is not base64");
        events.push_back(std::move(ev));
      }
    }
    (*on_events)(events, i64(member(r, "header"), "revision"));  // no events: a progress notification
  }

  // Splits the bytes into top-level JSON objects; false = stop reading.
  bool feed(const char* p, size_t n) {
    any_byte = true;
    for (size_t i = 0; i < n && !done; ++i) {
      char c = p[i];
      if (depth == 0) {
        if (c != '{') continue;  // newlines between objects
        cur.clear();
      }
      cur.push_back(c);
      if (in_str) {
        if (esc)
          esc = false;
        else if (c == '\\')
          esc = true;
        else if (c == '"')
          in_str = false;
      } else if (c == '"') {
        in_str = true;
      } else if (c == '{' || c == '[') {
        ++depth;
      } else if (c == '}' || c == ']') {
        if (--depth == 0) on_object();
      }
    }
    return !done;
  }
};

size_t watch_write(char* p, size_t size, size_t n, void* user) {
  auto* ws = static_cast<WatchState*>(user);
  try {
    if (!ws->feed(p, size * n)) return 0;  // ends the transfer
  } catch (const std::exception& e) {
    ws->finish(WatchEnd::failed, std::string("watch: on_events threw: ") + e.what());
    return 0;
  } catch (...) {
    ws->finish(WatchEnd::failed, "watch: on_events threw");
    return 0;
  }
  if (ws->stop && ws->stop->load()) return 0;
  return size * n;
}

int watch_progress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  auto* ws = static_cast<WatchState*>(user);
  return ws->stop && ws->stop->load() ? 1 : 0;  // non-zero aborts
}

}  // namespace

WatchEnd EtcdClient::watch_prefix(const std::string& prefix, int64_t start_revision,
                                  const std::function<void(const std::vector<WatchEvent>&, int64_t)>& on_events,
                                  const std::atomic<bool>* stop, std::string* why) {
  std::string dummy;
  if (!why) why = &dummy;
  why->clear();
  size_t n = o_.endpoints.size();
  if (n == 0) {
    *why = "etcd /v3/watch: no endpoints configured";
    return WatchEnd::failed;
  }
  const std::string body = "{\"create_request\":{\"key\":" + q(base64_encode(prefix)) +
                           ",\"range_end\":" + q(base64_encode(prefix_range_end(prefix))) +
                           (start_revision > 0 ? ",\"start_revision\":" + q(start_revision) : "") +
                           ",\"progress_notify\":true}}";
  size_t start = good_.load() % n;
  std::string failures;
  for (size_t i = 0; i < n; ++i) {
    size_t idx = (start + i) % n;
    WatchState ws;
    ws.on_events = &on_events;
    ws.stop = stop;
    ws.url = o_.endpoints[idx] + "/v3/watch";
    ws.start_revision = start_revision;
    char errbuf[CURL_ERROR_SIZE] = "";

    CURL* h = curl_easy_init();
    CURLM* m = curl_multi_init();
    if (!h || !m) {
      if (h) curl_easy_cleanup(h);
      if (m) curl_multi_cleanup(m);
      *why = "etcd watch: out of memory (curl)";
      return WatchEnd::failed;
    }
    set_common(h, o_.endpoints[idx]);
    curl_easy_setopt(h, CURLOPT_URL, ws.url.c_str());
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body.data());
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, long(body.size()));
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, watch_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &ws);
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, watch_progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, &ws);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_multi_add_handle(m, h);

    CURLcode rc = CURLE_OK;
    bool stopped = false;
    for (;;) {
      if (stop && stop->load()) {
        stopped = true;
        break;
      }
      int running = 0;
      CURLMcode mc = curl_multi_perform(m, &running);
      if (mc != CURLM_OK) {
        rc = CURLE_FAILED_INIT;
        snprintf(errbuf, sizeof errbuf, "curl_multi_perform: %s", curl_multi_strerror(mc));
        break;
      }
      if (running == 0) {
        int left = 0;
        while (CURLMsg* msg = curl_multi_info_read(m, &left))
          if (msg->msg == CURLMSG_DONE) rc = msg->data.result;
        break;
      }
      curl_multi_poll(m, nullptr, 0, kWatchPollMs, nullptr);
    }
    long http = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &http);
    int os_err = curl_errno(h, rc);
    curl_multi_remove_handle(m, h);
    curl_easy_cleanup(h);
    curl_multi_cleanup(m);

    if (stopped || (stop && stop->load() && !ws.done)) {
      *why = "stopped";
      return WatchEnd::stopped;
    }
    if (ws.created) good_.store(idx);
    if (ws.done) {
      *why = ws.why;
      return ws.end;
    }
    std::string what = errbuf[0] ? errbuf : curl_easy_strerror(rc);
    if (!ws.any_byte && rc != CURLE_OK) {
      // Never connected / nothing came back: the next endpoint may answer.
      failures +=
          (failures.empty() ? "" : "; ") + ("etcd " + ws.url + ": " + what + " (" + std::strerror(os_err) + ")");
      continue;
    }
    if (http != 200) {
      *why = "etcd " + ws.url + ": HTTP " + std::to_string(http);
      return WatchEnd::failed;
    }
    *why = "etcd " + ws.url + ": watch stream ended" + (rc == CURLE_OK ? "" : ": " + what);
    return WatchEnd::failed;
  }
  *why = (n == 1 ? "" : "etcd watch: no endpoint answered: ") + failures;
  return WatchEnd::failed;
}

}  // namespace vmfence::fleet
