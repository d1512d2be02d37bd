#!/usr/bin/env bash
# Differential fuzzer soak: builds vmfence_fuzz, then runs it.
#   sudo scripts/fuzz.sh --frames N --seed S [--world W] [--world-frames M] [--out DIR]
#                        [--allow-pending] [--examples K] [--trace]
# Needs root (a private netns, bpffs, BPF_PROG_TEST_RUN). BUILD_DIR selects
# the build tree (default: build-fuzz next to the source tree).
#
# Loading a world's datapath costs ~1.5 s while frames run at ~60,000/s, so
# long soaks give each world more frames: without --world-frames, runs of at
# least 1,000,000 frames use 100,000 frames per world (10M frames: 100 worlds,
# a few minutes), shorter runs the binary's default (10,000, as in CI).
# --allow-pending: reported, not yet fixed datapath bugs (kPendingDatapath in
# tests/fuzz/differential.cpp) do not fail the run; only new classes do.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$src/build-fuzz}"

frames=0
world_frames_given=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --frames) frames="${args[i + 1]:-0}" ;;
    --world-frames) world_frames_given=1 ;;
  esac
done
extra=()
if [[ $world_frames_given == 0 && $frames =~ ^[0-9]+$ && $frames -ge 1000000 ]]; then
  extra=(--world-frames 100000)
fi

cmake -S "$src" -B "$build" >/dev/null
make -C "$build" -j"$(nproc)" vmfence_fuzz >/dev/null
exec "$build/tests/fuzz/vmfence_fuzz" "${extra[@]}" "$@"
