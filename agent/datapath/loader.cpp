#include "agent/datapath/loader.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdarg>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <set>
#include <string_view>
#include <utility>

#include "agent/datapath/qdisc.h"
#include "vmfence_tc.skel.h"

namespace vmfence {

namespace {

// tcx attach types and link type (kernel >= 6.6); libbpf 1.1 and the
// installed uapi headers predate them.
constexpr uint32_t kTcxIngress = 46;
constexpr uint32_t kTcxEgress = 47;
constexpr uint32_t kLinkTypeTcx = 11;
constexpr uint32_t kLinkTypeXdp = 6;

// struct bpf_link_info as the kernel fills it for a tcx link: the common
// header, then the union (8-byte aligned) whose tcx member is {ifindex,
// attach_type}. A defunct link (its device is gone) reports ifindex 0.
struct TcxLinkInfo {
  uint32_t type;
  uint32_t id;
  uint32_t prog_id;
  uint32_t pad;
  uint32_t ifindex;
  uint32_t attach_type;
  uint8_t rest[64];  // the rest of the union; the kernel wants it zero
};
static_assert(offsetof(TcxLinkInfo, ifindex) == offsetof(bpf_link_info, xdp.ifindex));

uint32_t tcx_type(bool from_vm) { return from_vm ? kTcxIngress : kTcxEgress; }

enum class PinKind { kNone, kLink, kProg, kOther };

// A pinned object, opened. kind kNone: err says why (ENOENT: no pin).
struct Pin {
  Fd fd;
  PinKind kind = PinKind::kNone;
  int err = 0;
};

Pin open_pin(const std::string& path) {
  Pin p;
  int fd = bpf_obj_get(path.c_str());
  if (fd < 0) {
    p.err = -fd;
    return p;
  }
  p.fd.reset(fd);
  // Link and program fds are anonymous inodes named after their kind.
  char link[64];
  std::string self = "/proc/self/fd/" + std::to_string(fd);
  ssize_t n = ::readlink(self.c_str(), link, sizeof(link) - 1);
  if (n < 0) {
    p.err = errno;
    p.kind = PinKind::kOther;
    return p;
  }
  link[n] = '\0';
  if (std::strcmp(link, "anon_inode:bpf-link") == 0)
    p.kind = PinKind::kLink;
  else if (std::strcmp(link, "anon_inode:bpf-prog") == 0)
    p.kind = PinKind::kProg;
  else
    p.kind = PinKind::kOther;
  return p;
}

bool link_info(int fd, TcxLinkInfo& info) {
  std::memset(&info, 0, sizeof(info));
  uint32_t len = sizeof(info);
  return bpf_obj_get_info_by_fd(fd, &info, &len) == 0;
}

// An XDP link on ifindex (not defunct: the kernel reports ifindex 0 then).
bool xdp_live(const TcxLinkInfo& info, uint32_t ifindex) {
  return info.type == kLinkTypeXdp && info.ifindex == ifindex;
}

// A tcx link attached to ifindex in that direction (not defunct).
bool tcx_live(const TcxLinkInfo& info, uint32_t ifindex, bool from_vm) {
  return info.type == kLinkTypeTcx && info.ifindex == ifindex && info.attach_type == tcx_type(from_vm);
}

uint32_t prog_id(int fd) {
  bpf_prog_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) return 0;
  return info.id;
}

std::string prog_name(uint32_t id) {
  int fd = bpf_prog_get_fd_by_id(id);
  if (fd < 0) return {};
  Fd owned(fd);
  bpf_prog_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(owned.get(), &info, &len) != 0) return {};
  return info.name;
}

// The temporary pin next to path (bpffs refuses names with a '.').
std::string tmp_path(const std::string& path) { return path + "_tmp"; }

// Pin fd at path, replacing what is pinned there in one step: pin under a
// temporary name, then rename() it over path.
Status pin_replace(int fd, const std::string& path) {
  std::string tmp = tmp_path(path);
  if (::unlink(tmp.c_str()) != 0 && errno != ENOENT) return Status::error(errno, "remove stale pin " + tmp);
  if (int err = bpf_obj_pin(fd, tmp.c_str()); err) return Status::error(err, "pin " + tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    if (::unlink(tmp.c_str()) != 0) spdlog::warn("remove pin {}: {}", tmp, std::strerror(errno));
    return Status::error(e, "rename pin " + tmp + " to " + path);
  }
  return {};
}

// libbpf's log held back around tc (netlink) calls whose failure is often
// expected (no clsact qdisc yet, no filter, a qdisc that exists): the caller
// puts what it said into its Status when the failure matters.
thread_local std::string* g_held = nullptr;

int hold_libbpf_log(enum libbpf_print_level level, const char* fmt, va_list ap) {
  if (level == LIBBPF_DEBUG || !g_held) return 0;
  char buf[512];
  int n = vsnprintf(buf, sizeof(buf), fmt, ap);
  std::string_view s(buf, n > 0 ? std::min<size_t>(n, sizeof(buf) - 1) : 0);
  while (!s.empty() && s.back() == '\n') s.remove_suffix(1);
  if (!g_held->empty()) *g_held += "; ";
  *g_held += s;
  return 0;
}

template <typename F>
int libbpf_quiet(std::string* said, F&& call) {
  std::string held;
  std::string* outer = std::exchange(g_held, &held);
  libbpf_print_fn_t prev = libbpf_set_print(hold_libbpf_log);
  int ret = call();
  libbpf_set_print(prev);
  g_held = outer;
  if (said) *said = held.empty() ? "" : " (" + held + ")";
  return ret;
}

bpf_tc_hook tc_hook(uint32_t ifindex, bool from_vm) {
  LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = static_cast<int>(ifindex),
              .attach_point = from_vm ? BPF_TC_INGRESS : BPF_TC_EGRESS);
  return hook;
}

// The program id of the filter at our handle and priority on ifindex's hook.
// 0 and the error (ENOENT: no such filter; EINVAL: no clsact qdisc; ENODEV).
int tc_query(uint32_t ifindex, bool from_vm, uint32_t* id) {
  bpf_tc_hook hook = tc_hook(ifindex, from_vm);
  LIBBPF_OPTS(bpf_tc_opts, opts, .handle = Datapath::kTcHandle, .priority = Datapath::kTcPriority);
  *id = 0;
  if (int err = libbpf_quiet(nullptr, [&] { return bpf_tc_query(&hook, &opts); }); err) return -err;
  *id = opts.prog_id;
  return 0;
}

// Remove the filter at our handle and priority if it runs program `expect`
// (0: any vmfence program, by name). Absent is success.
Status tc_detach_ours(uint32_t ifindex, bool from_vm, uint32_t expect) {
  uint32_t id = 0;
  if (int err = tc_query(ifindex, from_vm, &id); err) {
    if (err == ENOENT || err == EINVAL || err == ENODEV) return {};
    return Status::error(err, "query cls_bpf filter on ifindex " + std::to_string(ifindex));
  }
  if (expect ? id != expect : prog_name(id).rfind("vmfence_", 0) != 0) return {};  // not ours
  bpf_tc_hook hook = tc_hook(ifindex, from_vm);
  LIBBPF_OPTS(bpf_tc_opts, opts, .handle = Datapath::kTcHandle, .priority = Datapath::kTcPriority);
  std::string said;
  if (int err = libbpf_quiet(&said, [&] { return bpf_tc_detach(&hook, &opts); }); err && err != -ENOENT)
    return Status::error(err, std::string("remove cls_bpf filter (") + (from_vm ? "ingress" : "egress") +
                                  ") from ifindex " + std::to_string(ifindex) + said);
  return {};
}

// Remove one direction's attachment of either kind, and its pin.
void detach_one(const std::string& dir, uint32_t ifindex, bool from_vm) {
  std::string path = Datapath::link_path(dir, ifindex, from_vm);
  Pin p = open_pin(path);
  if (p.kind == PinKind::kNone && p.err != ENOENT) spdlog::warn("open pin {}: {}", path, std::strerror(p.err));
  if (p.kind == PinKind::kLink) {
    // A defunct link (interface gone) detaches without error too.
    if (int err = bpf_link_detach(p.fd.get()); err && err != -ENOLINK)
      spdlog::warn("detach link {}: {}", path, std::strerror(-err));
  }
  uint32_t expect = p.kind == PinKind::kProg ? prog_id(p.fd.get()) : 0;
  if (auto s = tc_detach_ours(ifindex, from_vm, expect); !s) spdlog::warn("{}", s.message);
  for (const std::string& f : {path, tmp_path(path)})
    if (::unlink(f.c_str()) != 0 && errno != ENOENT) spdlog::warn("remove pin {}: {}", f, std::strerror(errno));
}

// One direction is attached: a live tcx link on ifindex, or the cls_bpf
// filter at our handle running the pinned program. expect: that program id
// (0: any).
bool attached_one(const std::string& dir, uint32_t ifindex, bool from_vm, uint32_t expect) {
  Pin p = open_pin(Datapath::link_path(dir, ifindex, from_vm));
  if (p.kind == PinKind::kLink) {
    TcxLinkInfo info;
    return link_info(p.fd.get(), info) && tcx_live(info, ifindex, from_vm) && (!expect || info.prog_id == expect);
  }
  if (p.kind == PinKind::kProg) {
    uint32_t pinned = prog_id(p.fd.get()), id = 0;
    return pinned && tc_query(ifindex, from_vm, &id) == 0 && id == pinned && (!expect || id == expect);
  }
  return false;
}

int libbpf_to_spdlog(enum libbpf_print_level level, const char* fmt, va_list ap) {
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

}  // namespace

void route_libbpf_log() { libbpf_set_print(libbpf_to_spdlog); }

const char* attach_mode_name(AttachMode mode) { return mode == AttachMode::kTcx ? "tcx" : "cls_bpf"; }

Datapath::~Datapath() {
  if (skel_) vmfence_tc__destroy(skel_);
}

Status Datapath::load(const std::string& dir, std::unique_ptr<Datapath>& out) {
  if (auto s = ensure_bpffs(dir); !s) return s;
  std::unique_ptr<Datapath> dp(new Datapath());
  dp->dir_ = dir;
  if (const char* m = std::getenv("VMFENCE_ATTACH"); m && std::strcmp(m, "cls_bpf") == 0)
    dp->mode_ = AttachMode::kClsBpf;
  LIBBPF_OPTS(bpf_object_open_opts, opts, .pin_root_path = dir.c_str());
  dp->skel_ = vmfence_tc__open_opts(&opts);
  if (!dp->skel_) return Status::error(errno, "open BPF object");
  if (int err = vmfence_tc__load(dp->skel_); err)
    return Status::error(err, "load BPF programs (maps pinned under " + dir + ")");
  auto& m = dp->skel_->maps;
  struct Dup {
    struct bpf_map* map;
    Fd* out;
  };
  const Dup dups[] = {
// Every map of the ABI list, skeleton field to MapSet member.
#define VMFENCE_SKEL_MAP(ID, name) {m.VMFENCE_MAP_ID(ID, name), &dp->maps_.name},
      VMFENCE_MAPS(VMFENCE_SKEL_MAP)
#undef VMFENCE_SKEL_MAP
  };
  for (const auto& d : dups) {
    int fd = bpf_map__fd(d.map);
    if (fd < 0) return Status::error(fd, std::string("fd of map ") + bpf_map__name(d.map));
    d.out->reset(::dup(fd));
    if (!d.out->valid()) return Status::error(errno, std::string("dup fd of map ") + bpf_map__name(d.map));
  }
  if (dp->from_vm_prog_fd() < 0 || dp->to_vm_prog_fd() < 0) return Status::error(EBADF, "fd of the TC programs");
  dp->from_vm_prog_id_ = prog_id(dp->from_vm_prog_fd());
  dp->to_vm_prog_id_ = prog_id(dp->to_vm_prog_fd());
  dp->xdp_prog_id_ = prog_id(dp->xdp_prog_fd());
  if (!dp->from_vm_prog_id_ || !dp->to_vm_prog_id_ || !dp->xdp_prog_id_)
    return Status::error(errno, "id of the programs");
  out = std::move(dp);
  return {};
}

int Datapath::xdp_prog_fd() const { return bpf_program__fd(skel_->progs.vmfence_xdp_from_vm); }
int Datapath::from_vm_prog_fd() const { return bpf_program__fd(skel_->progs.vmfence_from_vm); }
int Datapath::to_vm_prog_fd() const { return bpf_program__fd(skel_->progs.vmfence_to_vm); }

std::string Datapath::link_path(const std::string& dir, uint32_t ifindex, bool from_vm) {
  return dir + "/links/if" + std::to_string(ifindex) + (from_vm ? "_from_vm" : "_to_vm");
}

// ifindexes with a pin named if<N><suffix> under dir/links.
static std::vector<uint32_t> pinned_ifindexes(const std::string& dir,
                                              std::initializer_list<std::string_view> suffixes) {
  std::set<uint32_t> found;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir + "/links", ec)) {
    std::string n = e.path().filename();
    if (n.rfind("if", 0) != 0) continue;
    for (std::string_view suffix : suffixes) {
      if (n.size() <= 2 + suffix.size() || n.compare(n.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
      uint32_t ifindex = 0;
      const char* first = n.data() + 2;
      const char* last = n.data() + n.size() - suffix.size();
      auto [ptr, err] = std::from_chars(first, last, ifindex);
      if (err == std::errc() && ptr == last && ifindex) found.insert(ifindex);
    }
  }
  return {found.begin(), found.end()};
}

std::vector<uint32_t> Datapath::linked_ifindexes(const std::string& dir) {
  return pinned_ifindexes(dir, {"_from_vm", "_to_vm"});
}

std::vector<uint32_t> Datapath::prefiltered_ifindexes(const std::string& dir) {
  return pinned_ifindexes(dir, {"_xdp"});
}

Status Datapath::attach_tcx(uint32_t ifindex, bool from_vm, bool* created, bool* tcx_unsupported) {
  std::string path = link_path(dir_, ifindex, from_vm);
  int prog = from_vm ? from_vm_prog_fd() : to_vm_prog_fd();
  Pin old = open_pin(path);
  if (old.kind == PinKind::kNone && old.err != ENOENT) return Status::error(old.err, "open pin " + path);
  bool old_live = false;
  uint32_t old_cls_prog = 0;
  if (old.kind == PinKind::kLink) {
    TcxLinkInfo info;
    if (link_info(old.fd.get(), info) && tcx_live(info, ifindex, from_vm)) {
      old_live = true;
      // A previous run's link: swap the program under it atomically.
      int err = bpf_link_update(old.fd.get(), prog, nullptr);
      if (err == 0) {
        *created = false;
        return {};
      }
      spdlog::warn("{}: switching the program in place failed ({}); replacing the link", path, std::strerror(-err));
    } else {
      spdlog::info("{}: defunct link (interface re-created); replacing it", path);
    }
  } else if (old.kind == PinKind::kProg) {
    // Attached as a cls_bpf filter before (an earlier cls_bpf run).
    uint32_t pinned = prog_id(old.fd.get()), id = 0;
    if (pinned && tc_query(ifindex, from_vm, &id) == 0 && id == pinned) {
      old_live = true;
      old_cls_prog = pinned;
    }
  }
  *created = !old_live;
  int link = bpf_link_create(prog, static_cast<int>(ifindex), static_cast<bpf_attach_type>(tcx_type(from_vm)), nullptr);
  if (link < 0) {
    if (link == -EINVAL || link == -EOPNOTSUPP) *tcx_unsupported = true;
    return Status::error(link, std::string("tcx attach (") + (from_vm ? "ingress" : "egress") + ") to ifindex " +
                                   std::to_string(ifindex));
  }
  Fd new_link(link);  // the pin keeps the link (and the program) alive
  if (auto s = pin_replace(new_link.get(), path); !s) {
    if (int err = bpf_link_detach(new_link.get()); err)
      spdlog::error("detach unpinned link on ifindex {}: {}", ifindex, std::strerror(-err));
    return s;
  }
  // The new link is in place: now the old attachment goes.
  if (old.kind == PinKind::kLink) {
    if (int err = bpf_link_detach(old.fd.get()); err && err != -ENOLINK)
      spdlog::warn("detach replaced link of {}: {}", path, std::strerror(-err));
  }
  if (old_cls_prog)
    if (auto s = tc_detach_ours(ifindex, from_vm, old_cls_prog); !s) spdlog::warn("{}", s.message);
  return {};
}

Status Datapath::attach_cls(uint32_t ifindex, bool from_vm, bool* created) {
  std::string path = link_path(dir_, ifindex, from_vm);
  int prog = from_vm ? from_vm_prog_fd() : to_vm_prog_fd();
  Pin old = open_pin(path);
  if (old.kind == PinKind::kNone && old.err != ENOENT) return Status::error(old.err, "open pin " + path);
  bool old_link_live = false;
  if (old.kind == PinKind::kLink) {
    TcxLinkInfo info;
    old_link_live = link_info(old.fd.get(), info) && tcx_live(info, ifindex, from_vm);
  }
  bpf_tc_hook hook = tc_hook(ifindex, from_vm);
  std::string said;
  if (int err = libbpf_quiet(&said, [&] { return bpf_tc_hook_create(&hook); }); err && err != -EEXIST)
    return Status::error(err, "create clsact qdisc on ifindex " + std::to_string(ifindex) + said);
  uint32_t prev = 0;
  bool existed = tc_query(ifindex, from_vm, &prev) == 0;
  // Same handle and priority: the kernel swaps the program of the existing
  // filter in place.
  LIBBPF_OPTS(bpf_tc_opts, opts, .prog_fd = prog, .flags = BPF_TC_F_REPLACE, .handle = kTcHandle,
              .priority = kTcPriority);
  if (int err = libbpf_quiet(&said, [&] { return bpf_tc_attach(&hook, &opts); }); err)
    return Status::error(err, std::string("cls_bpf attach (") + (from_vm ? "ingress" : "egress") + ") to ifindex " +
                                  std::to_string(ifindex) + said);
  *created = !existed && !old_link_live;
  if (auto s = pin_replace(prog, path); !s) {
    if (!existed) {
      LIBBPF_OPTS(bpf_tc_opts, del, .handle = kTcHandle, .priority = kTcPriority);
      if (int err = libbpf_quiet(&said, [&] { return bpf_tc_detach(&hook, &del); }); err)
        spdlog::error("remove unpinned cls_bpf filter from ifindex {}: {}{}", ifindex, std::strerror(-err), said);
    }
    return s;
  }
  if (old.kind == PinKind::kLink) {
    if (int err = bpf_link_detach(old.fd.get()); err && err != -ENOLINK)
      spdlog::warn("detach replaced link of {}: {}", path, std::strerror(-err));
  }
  return {};
}

Status Datapath::attach_both(uint32_t ifindex, AttachMode mode, bool* tcx_unsupported) {
  bool created_from = false, created_to = false;
  Status s = mode == AttachMode::kTcx ? attach_tcx(ifindex, true, &created_from, tcx_unsupported)
                                      : attach_cls(ifindex, true, &created_from);
  if (!s) return s;
  s = mode == AttachMode::kTcx ? attach_tcx(ifindex, false, &created_to, tcx_unsupported)
                               : attach_cls(ifindex, false, &created_to);
  if (!s && created_from) {
    // Never half attached: take back what this call added.
    spdlog::warn("attach to ifindex {} failed half-way; removing the from_vm attachment again", ifindex);
    detach_one(dir_, ifindex, true);
  }
  return s;
}

Status Datapath::attach(uint32_t ifindex) {
  if (!ifindex) return Status::error(EINVAL, "attach to ifindex 0");
  bool tcx_unsupported = false;
  Status s = attach_both(ifindex, mode_, &tcx_unsupported);
  if (!s && mode_ == AttachMode::kTcx && tcx_unsupported) {
    spdlog::warn("{}; this kernel has no tcx: attaching as cls_bpf filters on clsact from now on", s.message);
    mode_ = AttachMode::kClsBpf;
    s = attach_both(ifindex, mode_, &tcx_unsupported);
  }
  return s;
}

bool Datapath::attached(uint32_t ifindex) const {
  return ifindex && attached_one(dir_, ifindex, true, from_vm_prog_id_) &&
         attached_one(dir_, ifindex, false, to_vm_prog_id_);
}

bool Datapath::attached(const std::string& dir, uint32_t ifindex) {
  return ifindex && attached_one(dir, ifindex, true, 0) && attached_one(dir, ifindex, false, 0);
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
    if (::unlink(e.path().c_str()) != 0) spdlog::warn("remove {}: {}", e.path().string(), std::strerror(errno));
  }
}

void Datapath::detach(const std::string& dir, uint32_t ifindex) {
  detach_xdp(dir, ifindex);
  if (auto s = remove_pacing_qdisc(ifindex); !s) spdlog::warn("{}", s.message);
  for (bool from_vm : {true, false}) detach_one(dir, ifindex, from_vm);
}

std::string Datapath::xdp_path(const std::string& dir, uint32_t ifindex) {
  return dir + "/links/if" + std::to_string(ifindex) + "_xdp";
}

Status Datapath::attach_xdp(uint32_t ifindex) {
  std::string path = xdp_path(dir_, ifindex);
  Pin old = open_pin(path);
  if (old.kind == PinKind::kNone && old.err != ENOENT) return Status::error(old.err, "open pin " + path);
  if (old.kind == PinKind::kLink) {
    TcxLinkInfo info;
    if (link_info(old.fd.get(), info) && xdp_live(info, ifindex)) {
      if (info.prog_id == xdp_prog_id_) return {};
      if (int err = bpf_link_update(old.fd.get(), xdp_prog_fd(), nullptr); err == 0) return {};
      spdlog::warn("{}: switching the XDP program in place failed; replacing the link", path);
      if (int err = bpf_link_detach(old.fd.get()); err && err != -ENOLINK)
        return Status::error(err, "detach XDP link " + path);
    }
  }
  // Native where the driver has XDP (tun, veth), generic otherwise. Fails
  // with EBUSY/EEXIST when another XDP program holds the device.
  int link = bpf_link_create(xdp_prog_fd(), static_cast<int>(ifindex), BPF_XDP, nullptr);
  if (link < 0) return Status::error(link, "XDP attach to ifindex " + std::to_string(ifindex));
  Fd new_link(link);
  if (auto s = pin_replace(new_link.get(), path); !s) {
    if (int err = bpf_link_detach(new_link.get()); err)
      spdlog::error("detach unpinned XDP link on ifindex {}: {}", ifindex, std::strerror(-err));
    return s;
  }
  return {};
}

void Datapath::detach_xdp(const std::string& dir, uint32_t ifindex) {
  std::string path = xdp_path(dir, ifindex);
  Pin p = open_pin(path);
  if (p.kind == PinKind::kLink)
    if (int err = bpf_link_detach(p.fd.get()); err && err != -ENOLINK)
      spdlog::warn("detach XDP link {}: {}", path, std::strerror(-err));
  for (const std::string& f : {path, tmp_path(path)})
    if (::unlink(f.c_str()) != 0 && errno != ENOENT) spdlog::warn("remove pin {}: {}", f, std::strerror(errno));
}

bool Datapath::xdp_attached(uint32_t ifindex) const {
  Pin p = open_pin(xdp_path(dir_, ifindex));
  TcxLinkInfo info;
  return p.kind == PinKind::kLink && link_info(p.fd.get(), info) && xdp_live(info, ifindex) &&
         info.prog_id == xdp_prog_id_;
}

}  // namespace vmfence
