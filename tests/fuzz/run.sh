#!/bin/sh
# Runs every libFuzzer target of tests/fuzz/ for SECONDS each (default 5):
# first over its committed seeds (tests/fuzz/corpus/TARGET/) and the
# inputs that once failed (tests/fuzz/regressions/TARGET/), then on new
# inputs until the time is up.  New corpus entries go to a temp dir, so
# the committed corpus only changes by hand.  A crash, leak, sanitizer
# report or broken property fails the target; the input is kept as
# build-fuzz/crash-TARGET-*: add it to tests/fuzz/regressions/TARGET/
# with the fix.  Closes with "fuzz: N passed, M failed".
#   OPTD_FUZZ_BUILD  where the targets are (default build-fuzz)
set -u
secs=${1:-5}
B=${OPTD_FUZZ_BUILD:-build-fuzz}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/optd-fuzz.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' INT TERM
passed=0
failed=0
found=0
for t in "$B"/fuzz_*; do
    [ -x "$t" ] || continue
    case $t in *.d) continue ;; esac
    found=$((found + 1))
    name=$(basename "$t")
    seeds=tests/fuzz/corpus/$name
    regs=tests/fuzz/regressions/$name
    mkdir -p "$tmp/$name"
    dirs="$tmp/$name $seeds"
    [ -d "$regs" ] && dirs="$dirs $regs"
    # shellcheck disable=SC2086
    ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix="$B/crash-$name-" -print_final_stats=1 $dirs \
        >"$tmp/$name.log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$tmp/$name.log" | tail -n 1)
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' "$tmp/$name.log" | tail -n 1)
    if [ "$rc" = 0 ]; then
        passed=$((passed + 1))
        echo "ok - $name: ${runs:-?} inputs in ${secs} s, coverage ${cov:-?} edges, no failure"
    else
        failed=$((failed + 1))
        echo "not ok - $name (exit $rc); the log's end:"
        tail -n 40 "$tmp/$name.log" | sed 's/^/    /'
        ls "$B"/crash-"$name"-* 2>/dev/null | sed 's/^/    input kept: /'
    fi
done
[ "$found" -gt 0 ] || { echo "not ok - no fuzz targets in $B (make fuzz-build)"; failed=1; }
echo "fuzz: $passed passed, $failed failed"
[ "$failed" = 0 ]
