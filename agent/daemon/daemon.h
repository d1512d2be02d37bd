// `vmfence run`: apply the spec, attach to every VM interface, then follow
// interfaces, spec files and violations until SIGINT/SIGTERM. Exiting leaves
// everything in the kernel (fail closed).
#pragma once

#include <string>

namespace vmfence {

int run_daemon(const std::string& config_dir);

}  // namespace vmfence
