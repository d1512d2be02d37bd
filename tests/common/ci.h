// The one CI gate of the test suites (unit tests, BPF program tests): a test
// that cannot run here skips, except in CI where it fails. CI is on when the
// environment variable CI is set to anything but "", "0" or "false" (any
// case): CI systems set CI=true, some CI=1, some other values.
//
// No gtest here: tests/bpf/harness.h is also built into the benchmark.
#pragma once

#include <strings.h>

#include <cstdlib>
#include <cstring>

namespace vmfence::testing {

inline bool in_ci() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && ci[0] != '\0' && std::strcmp(ci, "0") != 0 && ::strcasecmp(ci, "false") != 0;
}

}  // namespace vmfence::testing
