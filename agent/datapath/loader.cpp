#include "agent/datapath/loader.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstdarg>
#include <filesystem>
#include <set>

#include "vmfence_tc.skel.h"

namespace vmfence {

// tcx attach types (kernel >= 6.6); libbpf 1.1 predates them.
constexpr int kTcxIngress = 46;
constexpr int kTcxEgress = 47;

static int libbpf_to_spdlog(enum libbpf_print_level level, const char* fmt, va_list ap) {
  if (level == LIBBPF_DEBUG) return 0;
  char buf[1024];
  int n = vsnprintf(buf, sizeof(buf), fmt, ap);
  std::string_view s(buf, n > 0 ? std::min<size_t>(n, sizeof(buf) - 1) : 0);
  while (!s.empty() && s.back() == '\n') s.remove_suffix(1);
  if (level == LIBBPF_WARN)
    spdlog::warn("libbpf: {}", s);
  else
    spdlog::info("libbpf: {}", s);
  return 0;
}

void route_libbpf_log() { libbpf_set_print(libbpf_to_spdlog); }

Datapath::~Datapath() {
  if (skel_) vmfence_tc__destroy(skel_);
}

Status Datapath::load(const std::string& dir, std::unique_ptr<Datapath>& out) {
  if (auto s = ensure_bpffs(dir); !s) return s;
  std::unique_ptr<Datapath> dp(new Datapath());
  dp->dir_ = dir;
  LIBBPF_OPTS(bpf_object_open_opts, opts, .pin_root_path = dir.c_str());
  dp->skel_ = vmfence_tc__open_opts(&opts);
  if (!dp->skel_) return Status::error(errno, "open BPF object");
  if (int err = vmfence_tc__load(dp->skel_); err)
    return Status::error(err, "load BPF programs (maps pinned under " + dir + ")");
  auto& m = dp->skel_->maps;
  auto dupfd = [](struct bpf_map* map) { return Fd(::dup(bpf_map__fd(map))); };
  dp->maps_.vms = dupfd(m.vmfence_vms_v1);
  dp->maps_.owners = dupfd(m.vmfence_owners_v1);
  dp->maps_.owner_nets = dupfd(m.vmfence_owner_nets_v1);
  dp->maps_.egress = dupfd(m.vmfence_egress_v1);
  dp->maps_.ingress = dupfd(m.vmfence_ingress_v1);
  dp->maps_.gateways = dupfd(m.vmfence_gateways_v1);
  dp->maps_.flows = dupfd(m.vmfence_flows_v2);
  dp->maps_.frags = dupfd(m.vmfence_frags_v2);
  dp->maps_.counters = dupfd(m.vmfence_counters_v2);
  dp->maps_.state = dupfd(m.vmfence_state_v1);
  dp->maps_.config = dupfd(m.vmfence_config_v2);
  dp->maps_.events = dupfd(m.vmfence_events_v1);
  out = std::move(dp);
  return {};
}

int Datapath::from_vm_prog_fd() const { return bpf_program__fd(skel_->progs.vmfence_from_vm); }
int Datapath::to_vm_prog_fd() const { return bpf_program__fd(skel_->progs.vmfence_to_vm); }

std::string Datapath::link_path(const std::string& dir, uint32_t ifindex, bool from_vm) {
  return dir + "/links/if" + std::to_string(ifindex) + (from_vm ? "_from_vm" : "_to_vm");
}

std::vector<uint32_t> Datapath::linked_ifindexes(const std::string& dir) {
  std::vector<uint32_t> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir + "/links", ec)) {
    std::string n = e.path().filename();
    if (n.rfind("if", 0) == 0 && n.size() > 8 && n.compare(n.size() - 8, 8, "_from_vm") == 0)
      out.push_back(static_cast<uint32_t>(std::stoul(n.substr(2, n.size() - 10))));
  }
  return out;
}

Status Datapath::attach(uint32_t ifindex) {
  for (bool from_vm : {true, false}) {
    std::string path = link_path(dir_, ifindex, from_vm);
    int prog = from_vm ? from_vm_prog_fd() : to_vm_prog_fd();
    int old = bpf_obj_get(path.c_str());
    if (old >= 0) {
      // A previous run's link: swap the program under it atomically.
      int err = bpf_link_update(old, prog, nullptr);
      ::close(old);
      if (err == 0) continue;
      // Defunct (the interface was re-created): replace the pin.
      ::unlink(path.c_str());
    }
    int link = bpf_link_create(prog, static_cast<int>(ifindex),
                               static_cast<bpf_attach_type>(from_vm ? kTcxIngress : kTcxEgress), nullptr);
    if (link < 0) return Status::error(errno, "tcx attach to ifindex " + std::to_string(ifindex));
    int err = bpf_obj_pin(link, path.c_str());
    int e = errno;
    ::close(link);  // the pin keeps the link (and the program) alive
    if (err) return Status::error(e, "pin link " + path);
  }
  return {};
}

bool Datapath::attached(uint32_t ifindex) const {
  for (bool from_vm : {true, false}) {
    int fd = bpf_obj_get(link_path(dir_, ifindex, from_vm).c_str());
    if (fd < 0) return false;
    ::close(fd);
  }
  return true;
}

void Datapath::remove_stale_pins(const std::string& dir) {
  MapSet current;
  std::set<std::string> names;
  current.for_each([&](const char* name, int) { names.insert(name); });
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    std::string n = e.path().filename();
    if (e.is_directory() || n.rfind("vmfence_", 0) != 0 || names.count(n)) continue;
    spdlog::info("removing stale pinned map {} (other layout version)", n);
    ::unlink(e.path().c_str());
  }
}

void Datapath::detach(const std::string& dir, uint32_t ifindex) {
  for (bool from_vm : {true, false}) {
    std::string path = link_path(dir, ifindex, from_vm);
    int fd = bpf_obj_get(path.c_str());
    if (fd >= 0) {
      bpf_link_detach(fd);
      ::close(fd);
    }
    ::unlink(path.c_str());
  }
}

}  // namespace vmfence
