#!/bin/sh
# scripts/spec-fuzz.sh [SECONDS] [LIBFUZZER_ARGS...]: build the libFuzzer target
# on the spec parser (tests/libfuzzer/) with clang -fsanitize=fuzzer,address,
# undefined into build-libfuzzer/ and run it for SECONDS (default 60).
#
# Corpus: build-libfuzzer/corpus (kept between runs, new inputs go there), seeded
# from config/example and config/examples/*: each JSON file on its own and each
# directory as one input (host.json, then vms.d/*.json, separated by "\n%%\n").
# Dictionary: tests/libfuzzer/spec.dict plus the string literals of agent/spec/spec.cpp.
# A crash leaves build-libfuzzer/artifacts/crash-* (replay: build-libfuzzer/spec_fuzz FILE)
# and exits non-zero. Without clang/libFuzzer: a skip (77), a failure with CI=true.
set -eu
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-60}
[ $# -gt 0 ] && shift
B=build-libfuzzer

cannot() {
  if [ "${CI:-}" = true ]; then
    echo "FAIL: spec-fuzz: $* (CI=true)" >&2
    exit 1
  fi
  echo "SKIP: spec-fuzz: $*" >&2
  exit 77
}
CLANGXX=$(command -v clang++ || command -v clang++-14 || true)
CLANGC=$(command -v clang || command -v clang-14 || true)
[ -n "$CLANGXX" ] || cannot "clang++ not found (scripts/install-deps.sh)"
echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }' |
  "$CLANGXX" -x c++ -fsanitize=fuzzer,address,undefined -o /dev/null - 2>/dev/null ||
  cannot "clang cannot link -fsanitize=fuzzer,address,undefined (libclang-rt-14-dev missing?)"

CC=$CLANGC CXX=$CLANGXX cmake -S tests/libfuzzer -B $B -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build $B -j2

# Seeds: rebuilt each run from the examples (cheap), the corpus proper is kept.
rm -rf $B/seeds
mkdir -p $B/seeds $B/corpus $B/artifacts
n=0
for dir in config/example config/examples/*/ config/examples/*/*/; do
  dir=${dir%/}
  [ -f "$dir/host.json" ] || continue
  n=$((n + 1))
  out=$B/seeds/dir-$n-$(basename "$dir")
  cat "$dir/host.json" >"$out"
  for vm in "$dir"/vms.d/*.json; do
    [ -f "$vm" ] || continue
    printf '\n%%%%\n' >>"$out"
    cat "$vm" >>"$out"
  done
done
find config/example config/examples -name '*.json' | sort | while read -r f; do
  cp "$f" "$B/seeds/file-$(echo "$f" | tr '/' '_')"
done

# Dictionary: the static one plus every short identifier-like literal in spec.cpp.
{
  cat tests/libfuzzer/spec.dict
  echo "# from agent/spec/spec.cpp"
  grep -o '"[A-Za-z_][A-Za-z0-9_]\{1,31\}"' agent/spec/spec.cpp | sort -u | sed 's/^"\(.*\)"$/"\\"\1\\""/'
} >$B/spec.dict

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1:suppressions=$PWD/tests/libfuzzer/ubsan.supp}"
echo "spec-fuzz: ${SECONDS_TO_RUN}s, corpus $B/corpus ($(ls $B/corpus | wc -l) inputs) + $(ls $B/seeds | wc -l) seeds"
# -error_exitcode=1: libFuzzer's default for a crash is 77, which ctest reads
# as "skipped".
exec $B/spec_fuzz $B/corpus $B/seeds -dict=$B/spec.dict -max_len=16384 -timeout=10 -rss_limit_mb=2048 -error_exitcode=1 \
  -max_total_time="$SECONDS_TO_RUN" -print_final_stats=1 -artifact_prefix=$B/artifacts/ "$@"
