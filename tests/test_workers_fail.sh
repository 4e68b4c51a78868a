#!/bin/sh
# test_workers keeps running after a failure: five of its tests fail on
# purpose at their most delicate point (a request parked on the suite's
# daemon, a forked child waiting, a daemon of the test's own with a parked
# request, threads running), and the suite must still run and pass the
# other fifteen, report all five, and exit with their number (no crash, no
# abort).  Closes with "workers-after-failure: N passed, M failed".
set -u
BUILD=${OPTD_BUILD:-build}
T="$BUILD/tests/test_workers"
planted="test_sync_reduce_sum_and_worker_id test_sync_killed_waiter \
test_sync_round_survives_cache_pressure test_sync_shutdown_late_arrival \
test_async_staleness_concurrent"
out=$(mktemp "${TMPDIR:-/tmp}/optd-workers-fail.XXXXXX")
trap 'rm -f "$out"' EXIT

passed=0
failed=0
check() {
    d=$1
    shift
    if "$@"; then
        passed=$((passed + 1)); echo "ok - $d"
    else
        failed=$((failed + 1)); echo "not ok - $d"
    fi
}

OPTD_WORKERS_FAIL=$(echo $planted | tr ' ' ',') "$T" >"$out" 2>&1
rc=$?
check "test_workers exits with the number of failed tests, 5 (rc $rc)" test "$rc" = 5
check "all 20 tests ran" grep -q '^\[==========\] 20 test(s) run\.$' "$out"
check "the other 15 passed" grep -q '^\[  PASSED  \] 15 test(s)\.$' "$out"
for t in $planted; do
    check "$t failed where planted" grep -q "^ERROR: $t: planted failure" "$out"
done
if [ "$failed" != 0 ]; then
    echo "test_workers said:"
    sed 's/^/    /' "$out"
fi
echo "workers-after-failure: $passed passed, $failed failed"
[ "$failed" = 0 ]
