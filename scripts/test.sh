#!/bin/sh
# The whole test suite: unit tests, BPF program tests (BPF_PROG_TEST_RUN) and
# end-to-end tests in network namespaces. Needs root (BPF, namespaces, nft).
# With CI set (anything but "", "0", "false") a test that cannot run fails
# instead of skipping.
#
# The suite leaves nothing running: when no journald answers, one is started
# here for the whole run (own session, none of this script's or ctest's file
# descriptors; the tests then use it instead of starting their own) and stopped
# by its pid when ctest ends, however it ends.
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: needs root (BPF programs, network namespaces, nftables)" >&2
  exit 1
fi
./scripts/build.sh
REPO=$(pwd)
JOURNALD_STATE=$(mktemp /tmp/vmfence-test-journald.XXXXXX)
cleanup() {
  bash "$REPO/tests/e2e/journald.sh" stop "$JOURNALD_STATE"
  rm -f "$JOURNALD_STATE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if ! bash tests/e2e/journald.sh start "$JOURNALD_STATE"; then
  echo "scripts/test.sh: no journald (the journal tests will say why)" >&2
elif [ -s "$JOURNALD_STATE" ]; then
  echo "scripts/test.sh: started /lib/systemd/systemd-journald (pid $(cat "$JOURNALD_STATE")) for this run"
fi
cd build
set +e
ctest --output-on-failure "$@"
rc=$?
set -e
exit "$rc"
