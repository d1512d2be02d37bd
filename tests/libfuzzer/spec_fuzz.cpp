// libFuzzer target for the spec parser (agent/spec/spec.cpp): arbitrary bytes go to
// parse_host, parse_vm and validate_vms, all in memory (no files).
//
// Input format: documents separated by a line "%%" ("\n%%\n"). The first is
// host.json, the rest are vms.d/*.json files (the seed corpus has one of each
// example directory in this form, plus every file on its own). A single
// document is tried both as host.json and as a VM file. Inputs with several
// documents are also written to a scratch directory (in /dev/shm when there is
// one) and loaded with load_spec, which adds the host-vs-VM checks; its result
// must agree with the in-memory parse.
//
// Besides "no crash, no ASan/UBSan report", it checks the parser's contract:
//   - parse_vm returns a VM exactly when it reported no error for that file;
//   - every error is one line (user text is quoted, see quote() in spec.cpp);
//   - what parsed is valid: canonical addresses round-trip through str()/
//     parse_cidr, MACs through mac_str/parse_mac, port ranges are ordered,
//     sample_rate is in (0, 1], names and interfaces are not empty.
//
// Build and run: scripts/spec-fuzz.sh [SECONDS].
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "agent/spec/spec.h"

namespace {

[[noreturn]] void fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "spec_fuzz: contract violated: %s: %s\n", what, detail.c_str());
  std::abort();
}

void check(bool ok, const char* what, const std::string& detail = "") {
  if (!ok) fail(what, detail);
}

void check_errors(const std::vector<vmfence::SpecError>& errors, size_t from) {
  for (size_t i = from; i < errors.size(); ++i) {
    std::string s = errors[i].str();
    check(s.find('\n') == std::string::npos && s.find('\r') == std::string::npos, "error message spans lines", s);
    check(!errors[i].message.empty(), "empty error message", s);
  }
}

void check_cidr(const vmfence::Cidr& c) {
  check(c.family == 4 || c.family == 6, "bad family", std::to_string(c.family));
  check(c.prefix_len <= (c.family == 4 ? 32 : 128), "prefix too long", c.str());
  auto again = vmfence::parse_cidr(c.str());
  check(again && *again == c, "address does not round-trip", c.str());
  check(c.contains(c) && c.overlaps(c), "address does not contain itself", c.str());
}

void check_policy(const vmfence::ViolationPolicy& p) {
  check(p.threshold >= 1 && p.window_ms >= 1, "threshold/window_ms below 1");
  (void)vmfence::action_name(p.action);
  if (!p.command.empty()) check(!p.command[0].empty(), "empty program in command");
}

void check_vm(const vmfence::VmSpec& vm) {
  check(!vm.name.empty() && vm.name.size() <= 64, "bad VM name", vm.name);
  check(!vm.group.empty(), "empty group", vm.name);
  check(!vm.interface.empty() && vm.interface.size() <= 15, "bad interface", vm.interface);
  check(!(vm.mac[0] & 1), "multicast MAC accepted", vmfence::mac_str(vm.mac));
  auto mac = vmfence::parse_mac(vmfence::mac_str(vm.mac));
  check(mac && *mac == vm.mac, "MAC does not round-trip", vmfence::mac_str(vm.mac));
  check(!vm.addresses.empty(), "VM without addresses", vm.name);
  for (const auto& a : vm.addresses) check_cidr(a);
  for (size_t i = 0; i < vm.addresses.size(); ++i)
    for (size_t j = i + 1; j < vm.addresses.size(); ++j)
      check(!vm.addresses[i].overlaps(vm.addresses[j]), "overlapping addresses accepted",
            vm.addresses[i].str() + " " + vm.addresses[j].str());
  for (const auto& g : vm.gateway) {
    check_cidr(g);
    check(g.prefix_len == (g.family == 4 ? 32 : 128), "gateway is a prefix", g.str());
  }
  check(vm.sample_rate > 0 && vm.sample_rate <= 1, "sample_rate out of range");
  for (const auto* rules : {&vm.egress, &vm.ingress})
    for (const auto& r : *rules) {
      check_cidr(r.peer);
      if (!r.ports.empty())
        check(r.proto == vmfence::Proto::tcp || r.proto == vmfence::Proto::udp, "ports without tcp/udp");
      for (const auto& p : r.ports) check(p.lo <= p.hi, "reversed port range accepted");
      (void)vmfence::proto_name(r.proto);
    }
  (void)vmfence::mode_name(vm.mode);
  (void)vmfence::name_id(vm.name);
  check_policy(vm.on_violation);
}

std::vector<std::string> split(std::string_view in) {
  static constexpr std::string_view kSep = "\n%%\n";
  std::vector<std::string> docs;
  for (;;) {
    size_t at = in.find(kSep);
    docs.emplace_back(in.substr(0, at));
    if (at == std::string_view::npos) break;
    in.remove_prefix(at + kSep.size());
  }
  return docs;
}

// A per-process scratch spec directory, removed at exit.
// (Never destroyed, so the atexit handler can still use it.)
const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path* dir = [] {
    std::filesystem::path base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : "/tmp";
    auto* d = new std::filesystem::path(base / ("vmfence-spec-fuzz." + std::to_string(::getpid())));
    std::filesystem::create_directories(*d / "vms.d");
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir(), ec);
    });
    return d;
  }();
  return *dir;
}

void write_file(const std::filesystem::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  check(static_cast<bool>(out), "cannot write scratch file", p.string());
}

// load_spec on the same documents: at most the VMs that parse are admitted,
// they never conflict, and a clean load means every document was clean.
void check_load_spec(const std::vector<std::string>& docs, size_t parsed_vms, bool all_clean) {
  const auto& dir = scratch_dir();
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir / "vms.d", ec)) std::filesystem::remove(e.path(), ec);
  write_file(dir / "host.json", docs[0]);
  for (size_t i = 1; i < docs.size(); ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "%04zu.json", i);
    write_file(dir / "vms.d" / name, docs[i]);
  }
  vmfence::SpecLoad load = vmfence::load_spec(dir);
  check_errors(load.errors, 0);
  // Admission keeps a subset: the VMs that parse and do not conflict with a
  // VM admitted before them; a clean load admits every parsed VM.
  check(load.spec.vms.size() <= parsed_vms, "load_spec admitted more VMs than parse",
        std::to_string(load.spec.vms.size()) + " vs " + std::to_string(parsed_vms));
  if (load.ok()) {
    check(all_clean, "load_spec is clean but the documents were not");
    check(load.spec.vms.size() == parsed_vms, "load_spec is clean but left VMs out");
  }
  std::vector<vmfence::SpecError> among;
  vmfence::validate_vms(load.spec.vms, among);
  check(among.empty(), "admitted VMs conflict", among.empty() ? "" : among.front().str());
  for (size_t i = 0; i < load.spec.vms.size(); ++i) {
    check_vm(load.spec.vms[i]);
    if (i > 0) check(load.spec.vms[i - 1].name <= load.spec.vms[i].name, "VMs not sorted by name");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);

  // The address and MAC parsers on the raw bytes (short inputs only: they are
  // reached through JSON strings too, this just gets there faster).
  if (size <= 64) {
    std::string s(in);
    std::string why;
    if (auto c = vmfence::parse_cidr(s, &why)) check_cidr(*c);
    if (auto c = vmfence::parse_ip(s)) check_cidr(*c);
    if (auto m = vmfence::parse_mac(s)) (void)vmfence::mac_str(*m);
  }

  std::vector<std::string> docs = split(in);
  std::vector<vmfence::SpecError> errors;

  vmfence::HostSpec host = vmfence::parse_host("host.json", docs[0], errors);
  check_errors(errors, 0);
  for (const auto& c : host.masquerade) check_cidr(c);
  if (host.imds) check_cidr(host.imds->address);
  for (const auto& w : host.wan_interfaces) check(!w.empty() && w.size() <= 15, "bad WAN interface", w);
  if (errors.empty()) check_policy(host.on_violation);

  std::vector<vmfence::VmSpec> vms;
  auto vm_doc = [&](const std::string& file, const std::string& json, const vmfence::ViolationPolicy& dflt) {
    size_t before = errors.size();
    auto vm = vmfence::parse_vm(file, json, dflt, errors);
    check_errors(errors, before);
    check(vm.has_value() == (errors.size() == before), "parse_vm result disagrees with its errors", file);
    if (!vm) return;
    check(vm->file == file, "VmSpec.file not set", file);
    check_vm(*vm);
    vms.push_back(std::move(*vm));
  };
  if (docs.size() == 1) vm_doc("vm.json", docs[0], vmfence::ViolationPolicy{});
  for (size_t i = 1; i < docs.size(); ++i) vm_doc("vms.d/" + std::to_string(i) + ".json", docs[i], host.on_violation);

  size_t before = errors.size();
  vmfence::validate_vms(vms, errors);
  check_errors(errors, before);

  if (docs.size() > 1) check_load_spec(docs, vms.size(), errors.empty());
  return 0;
}
