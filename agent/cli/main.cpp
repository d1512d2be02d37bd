// vmfence: one binary, subcommands (see README / DESIGN.md "Public contract").
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "agent/cli/commands.h"
#include "agent/daemon/daemon.h"

namespace {

constexpr const char* kUsage =
    "usage: vmfence <command> [options]\n"
    "  run     --config DIR          apply DIR/host.json + DIR/vms.d/*.json and enforce (daemon)\n"
    "  check   --config DIR          validate the configuration; exit 0 or print every error\n"
    "  down    --config DIR          remove everything vmfence installed (programs, maps, nft table)\n"
    "  status  [--vm NAME] [--rules] [--json]   attached interfaces, each VM's mode and counters\n"
    "                                (--rules: the VM's egress/ingress rules as the kernel holds them)\n"
    "  explain --config DIR --vm NAME --to IP[:PORT/PROTO]   the verdict and the rule\n"
    "  wait    --vm NAME [--timeout S]   block until NAME's enforcement is live\n"
    "  monitor [--vm NAME] [--reason R] [--json]   stream drops from the running daemon as they happen\n";

struct Args {
  std::string config, vm, to, reason;
  double timeout = 30;
  bool json = false;
  bool rules = false;
};

bool parse(int argc, char** argv, Args& a, std::string& err) {
  for (int i = 2; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&](std::string& out) {
      if (i + 1 >= argc) {
        err = k + " needs a value";
        return false;
      }
      out = argv[++i];
      return true;
    };
    std::string v;
    if (k == "--config") {
      if (!value(a.config)) return false;
    } else if (k.rfind("--config=", 0) == 0) {
      a.config = k.substr(9);
    } else if (k == "--vm") {
      if (!value(a.vm)) return false;
    } else if (k == "--to") {
      if (!value(a.to)) return false;
    } else if (k == "--reason") {
      if (!value(a.reason)) return false;
    } else if (k == "--timeout") {
      if (!value(v)) return false;
      char* end = nullptr;
      a.timeout = std::strtod(v.c_str(), &end);
      if (!end || *end || a.timeout < 0) {
        err = "--timeout: '" + v + "' is not a number of seconds";
        return false;
      }
    } else if (k == "--json") {
      a.json = true;
    } else if (k == "--rules") {
      a.rules = true;
    } else {
      err = "unknown option '" + k + "'";
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  auto logger = spdlog::stderr_color_mt("vmfence");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");
  if (const char* lvl = std::getenv("VMFENCE_LOG_LEVEL")) spdlog::set_level(spdlog::level::from_str(lvl));

  if (argc < 2 || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "--help")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  Args a;
  std::string err;
  if (!parse(argc, argv, a, err)) {
    std::fprintf(stderr, "vmfence %s: %s\n%s", cmd.c_str(), err.c_str(), kUsage);
    return 2;
  }
  auto need = [&](const std::string& v, const char* flag) {
    if (!v.empty()) return true;
    std::fprintf(stderr, "vmfence %s: %s is required\n%s", cmd.c_str(), flag, kUsage);
    return false;
  };
  if (cmd == "run") return need(a.config, "--config") ? vmfence::run_daemon(a.config) : 2;
  if (cmd == "check") return need(a.config, "--config") ? vmfence::cmd_check(a.config) : 2;
  if (cmd == "down") return need(a.config, "--config") ? vmfence::cmd_down(a.config) : 2;
  if (cmd == "status") return vmfence::cmd_status({a.json, a.vm, a.rules});
  if (cmd == "monitor") return vmfence::cmd_monitor({a.vm, a.reason, a.json});
  if (cmd == "wait") return need(a.vm, "--vm") ? vmfence::cmd_wait(a.vm, a.timeout) : 2;
  if (cmd == "explain")
    return need(a.config, "--config") && need(a.vm, "--vm") && need(a.to, "--to")
               ? vmfence::cmd_explain(a.config, a.vm, a.to)
               : 2;
  std::fprintf(stderr, "vmfence: unknown command '%s'\n%s", cmd.c_str(), kUsage);
  return 2;
}
