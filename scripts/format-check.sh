#!/bin/sh
# clang-format check on every C++ file of the agent, maps, tests and
# benchmarks (bpf/ and include/ keep the kernel's style: their .clang-format
# turns formatting off). --fix rewrites the files instead.
set -eu
cd "$(dirname "$0")/.."
CF=$(command -v clang-format-14 || command -v clang-format || true)
if [ -z "$CF" ]; then
  echo "format-check: clang-format not found (scripts/install-deps.sh installs it)" >&2
  exit 1
fi
files=$(git ls-files 'agent/*.cpp' 'agent/*.h' 'maps/*.cpp' 'maps/*.h' 'tests/*.cpp' 'tests/*.h' 'bench/*.cpp' 'bench/*.h')
if [ "${1:-}" = --fix ]; then
  # shellcheck disable=SC2086
  "$CF" -i $files
  exit 0
fi
# shellcheck disable=SC2086
if ! "$CF" --dry-run -Werror $files; then
  echo "format-check: run scripts/format-check.sh --fix" >&2
  exit 1
fi
echo "format-check: $(echo "$files" | wc -w) files formatted"
