#!/usr/bin/env bash
# End-to-end: `vmfence check --config DIR` accepts every shipped example
# (config/example, config/examples/*, and the per-host dirs of a several-host
# example such as config/examples/fleet/hv1). The unit test loads the same
# dirs through load_spec; this runs the binary users run.
#
# The CLI runs in a namespace with nothing but lo, so an example's etcd
# endpoints (fleet) cannot be reached: check must then check the local files
# alone, exit 0, and say on stderr that the cluster could not be asked
# (DESIGN.md, fleet) — without hanging on the unreachable endpoints.
# Needs root (a network namespace). NO_VMFENCE=1: nothing to run.
set -u
. "$(dirname "$0")/lib.sh"
e2e_init examples_check

if ! enforced; then
	say "NO_VMFENCE: this test runs the vmfence binary only"
	e2e_finish
fi

ns_add nonet
n=0
for dir in "$REPO"/config/example "$REPO"/config/examples/*/ "$REPO"/config/examples/*/*/; do
	dir=${dir%/}
	[ -f "$dir/host.json" ] || continue
	n=$((n + 1))
	rel=${dir#"$REPO"/}
	t0=${EPOCHREALTIME/./}
	nsx nonet env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" \
		timeout 30 "$VMFENCE" check --config "$dir" </dev/null >"$WORK/out" 2>"$WORK/err"
	rc=$?
	ms=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
	if [ "$rc" = 0 ]; then
		_pass "vmfence check accepts $rel (${ms} ms)"
	else
		_fail "vmfence check accepts $rel (rc=$rc)"
		sed 's/^/    | /' "$WORK/out" "$WORK/err" | head -n 20
	fi
	if grep -q '"fleet"' "$dir/host.json"; then
		expect_ok "... $rel: says on stderr that the cluster (etcd) could not be asked" \
			grep -Eiq 'etcd|cluster' "$WORK/err"
		expect_ok "... $rel: without waiting on the unreachable endpoints (${ms} ms < 15 s)" test "$ms" -lt 15000
	fi
done
expect_ok "found the examples ($n config dirs, config/examples/fleet/hv1 and hv2 among them)" \
	test "$n" -ge 7 -a -f "$REPO/config/examples/fleet/hv1/host.json" -a -f "$REPO/config/examples/fleet/hv2/host.json"
e2e_finish
