// Spec: host.json + vms.d/*.json, parsed and validated (see DESIGN.md contract).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace vmfence {

// One error: printed as "FILE: json.path: message".
struct SpecError {
  std::string file;
  std::string path;  // e.g. "egress[1].ports[0]"; "" for the document itself
  std::string message;
  std::string str() const;
};

// An address or prefix. IPv4 is stored IPv4-mapped in 16 bytes (::ffff:a.b.c.d),
// prefix_len is in the family's own bits (0..32 for IPv4, 0..128 for IPv6).
struct Cidr {
  int family = 4;  // 4 or 6
  std::array<uint8_t, 16> addr{};
  uint8_t prefix_len = 0;
  // Bits within the 128-bit mapped space (IPv4 adds 96).
  uint8_t mapped_prefix_len() const { return family == 4 ? prefix_len + 96 : prefix_len; }
  std::string str() const;                 // canonical "10.0.0.0/8", "fec0::1/128"
  bool contains(const Cidr& other) const;  // other is inside this (same family)
  bool overlaps(const Cidr& other) const;
  bool operator==(const Cidr&) const = default;
};

// Parse "10.0.0.0/8", "fec0::1/128" or a bare address (full length). Host bits
// are kept as written (10.1.0.2/24 stays 10.1.0.2 with prefix 24).
std::optional<Cidr> parse_cidr(const std::string& text, std::string* why = nullptr);
std::optional<Cidr> parse_ip(const std::string& text);  // bare address only
std::optional<std::array<uint8_t, 6>> parse_mac(const std::string& text);
std::string mac_str(const std::array<uint8_t, 6>& mac);

enum class Proto : uint8_t { any = 0, icmp = 1, tcp = 6, udp = 17, icmpv6 = 58 };
const char* proto_name(Proto p);

struct PortRange {
  uint16_t lo = 0;
  uint16_t hi = 65535;
  bool operator==(const PortRange&) const = default;
};

// One egress ("to") or ingress ("from") rule.
struct Rule {
  Cidr peer;
  Proto proto = Proto::any;
  std::vector<PortRange> ports;  // empty = all ports
  bool operator==(const Rule&) const = default;
};

enum class Mode : uint8_t { filtered = 0, conntrack = 1, sampled = 2, direct = 3 };  // = enum vmfence_mode
const char* mode_name(Mode m);

enum class Action { alert, terminate };
const char* action_name(Action a);

struct ViolationPolicy {
  Action action = Action::alert;
  std::vector<std::string> command;  // argv, "{vm}" replaced
  std::string systemd_unit;          // "microvm@{vm}.service"
  std::string qmp_socket;            // path, "{vm}" replaced
  uint32_t threshold = 1;
  uint32_t window_ms = 1000;
  bool operator==(const ViolationPolicy&) const = default;
};

// A VM's rate limits (its spec's "limits"); 0 = none. Egress is what the VM
// sends, ingress what it receives; mbit counts IP (L3) bytes.
struct RateLimits {
  uint32_t egress_mbit = 0, egress_pps = 0;
  uint32_t ingress_mbit = 0, ingress_pps = 0;
  uint32_t burst_kb = 0;  // 0: the default (README, "Rate limits")
  bool any() const { return egress_mbit || egress_pps || ingress_mbit || ingress_pps; }
  bool operator==(const RateLimits&) const = default;
};

struct VmSpec {
  std::string file;  // where it came from (for errors and reloads)
  std::string name;
  std::string interface;
  std::array<uint8_t, 6> mac{};
  std::vector<Cidr> addresses;
  std::vector<Cidr> gateway;  // full-length addresses
  std::string group;          // defaults to name
  Mode mode = Mode::filtered;
  double sample_rate = 0.01;
  std::vector<Rule> egress;
  std::vector<Rule> ingress;
  bool imds = false;
  ViolationPolicy on_violation;  // effective: host default merged with the VM's fields
  uint32_t flows = 16384;        // limits.flows: the VM's own flow table size
  RateLimits rate;               // limits.egress_* / ingress_* / burst_kb
  bool operator==(const VmSpec&) const = default;
};

struct ImdsSpec {
  Cidr address;  // full-length
  uint16_t port = 80;
  bool operator==(const ImdsSpec&) const = default;
};

// host.json "flow_timeouts": idle seconds before a flow is forgotten
// (conntrack's defaults).
struct FlowTimeouts {
  uint32_t tcp_s = 7440;
  uint32_t udp_s = 180;
  uint32_t icmp_s = 30;
  bool operator==(const FlowTimeouts&) const = default;
};

// host.json "metrics": where GET /metrics serves the Prometheus text format.
struct MetricsSpec {
  static constexpr const char* kDefaultListen = "127.0.0.1:9727";
  std::string listen = kDefaultListen;  // "ADDR:PORT" or "[V6ADDR]:PORT"; "" = off
  bool operator==(const MetricsSpec&) const = default;
};

// A metrics.listen value split: numeric address (brackets removed) and port.
struct ListenAddress {
  Cidr address;
  uint16_t port = 0;
};
// "127.0.0.1:9727", "[::1]:9727" (an address, not a name; port 1-65535).
std::optional<ListenAddress> parse_listen(const std::string& text, std::string* why = nullptr);

// host.json "fleet": the hosts sharing VM address space through etcd
// (README, "Fleet").
struct FleetSpec {
  static constexpr uint32_t kMinLease = 5;
  std::vector<std::string> etcd;        // endpoint URLs, http:// or https://
  std::string host;                     // this host's name; default: the hostname
  std::string prefix = "/vmfence/";     // keys: PREFIX vms/HOST/VM
  std::vector<std::string> interfaces;  // the underlay: remote VMs' packets arrive here
  uint32_t lease_s = 30;
  std::string tls_ca, tls_cert, tls_key;  // "tls": {"ca", "cert", "key"} (files)
  bool operator==(const FleetSpec&) const = default;
};

struct HostSpec {
  std::string file;
  std::vector<std::string> wan_interfaces;
  std::vector<Cidr> masquerade;
  std::optional<ImdsSpec> imds;
  ViolationPolicy on_violation;
  FlowTimeouts flow_timeouts;
  MetricsSpec metrics;
  // Drop what a VM may not send (spoofed sources and MACs, quarantined and
  // no_policy VMs) at XDP on its TAP, before tcx: README, "XDP pre-filter".
  bool xdp_prefilter = false;
  std::optional<FleetSpec> fleet;
  bool operator==(const HostSpec&) const = default;
};

struct Spec {
  HostSpec host;
  std::vector<VmSpec> vms;  // sorted by name
};

struct SpecLoad {
  Spec spec;
  std::vector<SpecError> errors;  // empty = valid
  bool ok() const { return errors.empty(); }
};

// One file of vms.d as read: the VM when the file is valid on its own.
struct VmFile {
  std::string path;
  int64_t mtime_ns = 0;           // orders newcomers: the later file is blamed
  std::optional<VmSpec> vm;       // parsed and valid against host.json
  std::vector<SpecError> errors;  // why not
  std::string name, interface;    // what it names, as far as it can be read
};

struct SpecFiles {
  HostSpec host;
  std::vector<SpecError> host_errors;  // host.json, or vms.d cannot be listed
  std::vector<VmFile> vms;             // sorted by path
};

// What read_spec_files() parsed, kept for the next call: a file is parsed
// again only when it changed on disk (inode, size, mtime or ctime) or
// host.json did, so a reload after one change at 10,000 VMs parses one file.
class SpecFileCache {
 public:
  size_t parsed_last() const { return parsed_last_; }  // files the last read parsed
  // Read one file again (inotify named it) against the host.json in force
  // (valid and unchanged: the caller knows), and keep it for later reads.
  VmFile reread(const std::string& path, const HostSpec& host);
  // host.json still reads as it did at the last read_spec_files().
  bool host_unchanged(const std::filesystem::path& dir) const;
  struct FileId {
    uint64_t dev = 0, ino = 0;
    int64_t size = 0, mtime_ns = 0, ctime_ns = 0;
    bool operator==(const FileId&) const = default;
  };

 private:
  friend SpecFiles read_spec_files(const std::filesystem::path& dir, SpecFileCache* cache);
  std::string host_text_;
  std::map<std::string, std::pair<FileId, VmFile>> files_;  // by path
  size_t parsed_last_ = 0;
};

// Read and check DIR/host.json and every DIR/vms.d/*.json on its own.
SpecFiles read_spec_files(const std::filesystem::path& dir, SpecFileCache* cache = nullptr);

// A file whose VM is not (or no longer) what is enforced.
struct RejectedFile {
  std::string file;
  std::string name, interface;  // as far as known ("" when unreadable)
  std::vector<SpecError> errors;
  bool kept_last_good = false;  // an enforced VM: it keeps its previous policy
  bool install_failed = false;  // valid, but writing it failed (map full, no slot): every full reload retries
};

struct Admission {
  std::vector<VmSpec> in_force;        // sorted by name: accepted files + incumbents kept at their last good
  std::vector<RejectedFile> rejected;  // sorted by file
};

// Extra per-VM check (the compiler's limits), run on candidates only.
using VmCheck = std::function<std::vector<SpecError>(const VmSpec&)>;

// Decide which VMs are in force. `incumbents` are the VMs enforced now
// (their last good specs); `enforced` names VMs a previous run left in the
// kernel (a restart). Conflicts are blamed on the newcomer: an enforced VM
// keeps its name, interface, MAC and addresses; between newcomers the older
// file (mtime) wins; file names never decide. An incumbent whose file is
// broken, or whose change is refused, keeps its last good spec.
// `reserved`: claims (name, interface, addresses) of VMs that are not in
// force but whose claims no newcomer may take (a VM the previous run enforced
// whose file is broken now).
Admission admit(const SpecFiles& files, const std::vector<VmSpec>& incumbents,
                const std::set<std::string>& enforced = {}, const VmCheck& check = {},
                const std::vector<VmSpec>& reserved = {});

// Parse and validate DIR/host.json and DIR/vms.d/*.json (files starting with '.'
// or not ending in .json are ignored: writers use rename from a temp file).
// Cross-file checks: duplicate names, interfaces, MACs, overlapping addresses,
// blamed on the later file (admit() with no incumbents).
SpecLoad load_spec(const std::filesystem::path& dir);

// Parse one host.json / VM file from text (used by load_spec and the tests).
// `file` is only used in error messages. The VM's on_violation is merged with
// `host_default`.
HostSpec parse_host(const std::string& file, const std::string& json, std::vector<SpecError>& errors);
std::optional<VmSpec> parse_vm(const std::string& file, const std::string& json, const ViolationPolicy& host_default,
                               std::vector<SpecError>& errors);
// Cross-VM checks on an already parsed set: each VM against those before it.
void validate_vms(const std::vector<VmSpec>& vms, std::vector<SpecError>& errors);

// Stable 32-bit ids (FNV-1a) for VM and group names; the compiler checks collisions.
uint32_t name_id(const std::string& name);

// Why another host's VM may not hold this address (fleet records are checked
// like local specs, and link-local ranges are the local link's): nullopt = ok.
std::optional<std::string> remote_address_problem(const Cidr& c);

}  // namespace vmfence
