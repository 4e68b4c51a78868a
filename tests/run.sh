#!/bin/sh
# Runs the suites listed in tests/expected.txt and checks that each one ran
# the tests it must: a suite that is missing, reports fewer tests than its
# line says, or skips any test fails the run, even when it exits 0.  Test
# binaries or client suites that exist but are not listed fail too.
# The closing line counts tests: "tests: N passed, N failed".
#   OPTD_BUILD      build directory (default build)
#   OPTD_EXPECTED   the list of suites (default tests/expected.txt)
#   OPTD_ONLY_C=1   only the C suites (asan, valgrind)
#   OPTD_ONLY="a b" only the named suites (make tsan)
#   OPTD_VALGRIND=1 run the C suites under valgrind
set -u
BUILD=${OPTD_BUILD:-build}
LIST=${OPTD_EXPECTED:-tests/expected.txt}
export OPTD_BIN="${OPTD_BIN:-$PWD/$BUILD/optd}"
# cmocka's other output formats (TAP, XML) would hide the counts read below.
unset CMOCKA_MESSAGE_OUTPUT CMOCKA_XML_FILE CMOCKA_TEST_ABORT
ONLY_C=${OPTD_ONLY_C:-0}
ONLY=${OPTD_ONLY:-}

suites_passed=0
suites_failed=0
tests_passed=0
tests_failed=0
failures=""
notes=""
tmp=$(mktemp -d "${TMPDIR:-/tmp}/optd-run.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' INT TERM

if [ ! -r "$LIST" ]; then
    echo "tests/run.sh: no list of suites at $LIST"
    echo "tests: 0 passed, 1 failed"
    exit 1
fi

VG=""
if [ "${OPTD_VALGRIND:-0}" = 1 ]; then
    VG="valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite"
    export OPTD_VALGRIND_DAEMON="$VG"
fi

# count FORMAT FILE: sets p, f, s (tests passed, failed, skipped) from the
# suite's own output, with one awk per suite.
count() {
    set -- $(awk -v fmt="$1" '
        fmt == "cmocka" {
            # "[  PASSED  ] N test(s)." and, when there are any,
            # "[  FAILED  ] N test(s), listed below:" / "[  SKIPPED ] ...";
            # a failed group setup or teardown (e.g. the suite daemon
            # exited badly) is in neither, nor in cmocka exit status.
            if ($0 ~ /^\[  PASSED  \] [0-9]+ test\(s\)\./) { split($0, w, " "); p = w[4] + 0 }
            else if ($0 ~ /^\[  FAILED  \] [0-9]+ test\(s\),/) { split($0, w, " "); f = w[4] + 0 }
            else if ($0 ~ /^\[  SKIPPED \] [0-9]+ test\(s\),/) { split($0, w, " "); s = w[4] + 0 }
            else if ($0 ~ /^\[  FAILED  \] GROUP /) g++
        }
        fmt == "unittest" {
            # "Ran N tests", then "OK", "OK (skipped=K)" or
            # "FAILED (failures=A, errors=B, skipped=K, ...)".
            if ($0 ~ /^Ran [0-9]+ tests? in /) ran = $2 + 0
            if ($0 ~ /^(OK|FAILED)( \(|$)/) status = $0
        }
        fmt == "node" {
            # node --test TAP summary: "# pass N", "# fail N", ...
            if ($0 ~ /^(#|ℹ) (pass|fail|cancelled|skipped|todo) [0-9]+$/) {
                n = $3 + 0
                if ($2 == "pass") p = n; else if ($2 == "fail" || $2 == "cancelled") f += n; else s += n
            }
        }
        fmt == "gotest" {
            # go test -v: one "--- PASS: Name" line per test and subtest.
            if ($0 ~ /^ *--- (PASS|FAIL|SKIP): /) { k = $2; seen[k, $3]++; if (seen[k, $3] == 1) { if (k == "PASS:") p++; else if (k == "FAIL:") f++; else s++ } }
        }
        fmt == "tap" {
            # our shell suites close with "NAME: N passed, M failed".
            if ($0 ~ /^[A-Za-z0-9_.\/-]+: [0-9]+ passed, [0-9]+ failed$/) { p = $2 + 0; f = $4 + 0 }
        }
        END {
            if (fmt == "unittest") {
                n = split(status, parts, /[(), =]+/)
                for (i = 1; i < n; i++) {
                    if (parts[i] ~ /^(failures|errors|unexpected_successes)$/) f += parts[i + 1]
                    if (parts[i] ~ /^(skipped|expected_failures)$/) s += parts[i + 1]
                }
                p = ran - f - s
                if (p < 0) p = 0
            }
            if (fmt !~ /^(cmocka|unittest|node|gotest|tap)$/) { print "unknown format " fmt > "/dev/stderr"; f = 1 }
            print p + 0, f + g, s + 0
        }' "$2")
    p=$1 f=$2 s=$3
}

fail_suite() {
    suites_failed=$((suites_failed + 1))
    failures="$failures $1"
}

# run_one NAME EXPECTED FORMAT FILE COMMAND...: FILE is the suite's binary
# or script, which must exist.
run_one() {
    name=$1 want=$2 fmt=$3 exe=$4
    shift 4
    echo "=== $name"
    if [ ! -e "$exe" ]; then
        echo ">>> $name: MISSING ($exe does not exist); $want test(s) not run"
        tests_failed=$((tests_failed + want))
        fail_suite "$name(missing)"
        return
    fi
    out="$tmp/out"
    t0=$(date +%s)
    { "$@" </dev/null 2>&1; echo $? >"$tmp/rc"; } | tee "$out"
    rc=$(cat "$tmp/rc")
    secs=$(($(date +%s) - t0))
    count "$fmt" "$out"
    got=$((p + f + s))
    why=""
    [ "$rc" = 0 ] || why="$why exit $rc;"
    [ "$f" = 0 ] || why="$why $f failed;"
    [ "$s" = 0 ] || why="$why $s skipped (no test may skip);"
    short=0
    if [ "$got" -lt "$want" ]; then
        short=$((want - got))
        why="$why reported $got test(s), $want expected ($LIST);"
    elif [ "$got" -gt "$want" ]; then
        notes="$notes
note: $name reports $got tests, $LIST says $want: raise its count"
    fi
    # A failure that no test reported (a crash, a bad exit) costs at least one.
    bad=$((f + s + short))
    [ -z "$why" ] || [ "$bad" -gt 0 ] || bad=1
    tests_passed=$((tests_passed + p))
    tests_failed=$((tests_failed + bad))
    if [ -z "$why" ]; then
        suites_passed=$((suites_passed + 1))
        echo ">>> $name: $p passed ($secs s)"
    else
        echo ">>> $name: FAILED:$why ($secs s)"
        fail_suite "$name"
    fi
}

listed=""
# Each line: NAME COUNT FORMAT [COMMAND...]; a cmocka suite without a
# command is $BUILD/tests/NAME.
while read -r name want fmt cmd; do
    case $name in ''|'#'*) continue ;; esac
    listed="$listed $name "
    if [ -n "$ONLY" ]; then
        case " $ONLY " in *" $name "*) ;; *) continue ;; esac
    fi
    [ "$ONLY_C" = 1 ] && [ "$fmt" != cmocka ] && continue
    if [ -z "$cmd" ]; then
        # shellcheck disable=SC2086
        run_one "$name" "$want" "$fmt" "$BUILD/tests/$name" $VG "$BUILD/tests/$name"
    else
        exe=${cmd%% *}
        [ "$exe" = sh ] && exe=$(echo "$cmd" | awk '{ print $2 }')
        # shellcheck disable=SC2086
        run_one "$name" "$want" "$fmt" "$exe" $cmd
    fi
done <"$LIST"

# Suites that exist but are not listed would otherwise never be counted.
if [ -z "$ONLY" ]; then
    unlisted=""
    # The suites of the sources (a binary left from a removed source is no suite).
    for src in tests/test_*.c tests/test_*.py; do
        [ -f "$src" ] || continue
        n=$(basename "$src"); n=${n%.c}; n=${n%.py}
        case $listed in *" $n "*) ;; *) unlisted="$unlisted $n" ;; esac
    done
    if [ "$ONLY_C" != 1 ]; then
        for t in clients/*/test.sh; do
            [ -f "$t" ] || continue
            n=$(dirname "$t")
            case $listed in *" $n "*) ;; *) unlisted="$unlisted $n" ;; esac
        done
    fi
    for n in $unlisted; do
        echo ">>> $n: FAILED: not listed in $LIST (add one line: name, test count, format)"
        tests_failed=$((tests_failed + 1))
        fail_suite "$n(unlisted)"
    done
fi

echo "$notes"
[ -n "$failures" ] && echo "failed suites:$failures"
echo "suites: $suites_passed passed, $suites_failed failed"
echo "tests: $tests_passed passed, $tests_failed failed"
[ "$suites_failed" = 0 ] && [ "$tests_failed" = 0 ]
