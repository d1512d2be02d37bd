#!/bin/sh
# scripts/sanitize.sh [GTEST_ARGS...]: build the unit tests (vmfence_unit_tests
# and the vmfence_core library they link) with AddressSanitizer + UBSan into
# build-asan/ and run them once. Any ASan/UBSan report, leak or test failure
# fails the script. The latency tests (*Latency.*: p99 budgets of a few ms on
# fork/exec) are left out by default: under ASan every fork copies a huge
# shadow mapping, so they measure the sanitizer, not the code (the plain
# "unit" test runs them). GTEST_ARGS replace that default filter.
# Registered as the ctest "unit_asan" (CMakeLists.txt), so scripts/test.sh and
# CI run it. Compiler: $CXX, else CMake's default (g++).
set -eu
cd "$(dirname "$0")/.."
B=build-asan
FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer"

cmake -S . -B $B -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build $B -j2 --target vmfence_unit_tests

# UBSan is recoverable at compile time so that the suppression file works;
# halt_on_error=1 makes every other report fatal.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1:suppressions=$PWD/tests/libfuzzer/ubsan.supp}"
[ $# -gt 0 ] || set -- --gtest_filter='-*Latency.*'
exec $B/vmfence_unit_tests "$@"
