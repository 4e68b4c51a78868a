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

# num TEXT: TEXT if it is a decimal number, else 0.
num() {
    case ${1:-x} in
        *[!0-9]*|"") echo 0 ;;
        *) echo "$1" ;;
    esac
}

# count FORMAT FILE: sets p, f, s (tests passed, failed, skipped) from the
# suite's own output.
count() {
    fmt=$1
    out=$2
    p=0 f=0 s=0
    case $fmt in
    cmocka)
        # cmocka prints "[  PASSED  ] N test(s)." and, when there are any,
        # "[  FAILED  ] N test(s), listed below:" / "[  SKIPPED ] ...".
        p=$(num "$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test(s)\..*/\1/p' "$out" | tail -n 1)")
        f=$(num "$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test(s),.*/\1/p' "$out" | tail -n 1)")
        s=$(num "$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test(s),.*/\1/p' "$out" | tail -n 1)")
        ;;
    unittest)
        # "Ran N tests", then "OK", "OK (skipped=K)" or
        # "FAILED (failures=A, errors=B, skipped=K, ...)".
        ran=$(num "$(sed -n 's/^Ran \([0-9]*\) tests\{0,1\} in .*/\1/p' "$out" | tail -n 1)")
        last=$(grep -E '^(OK|FAILED)( \(|$)' "$out" | tail -n 1)
        for k in failures errors unexpected_successes; do
            n=$(num "$(echo "$last" | sed -n "s/.*[(, ]$k=\([0-9]*\).*/\1/p")")
            f=$((f + n))
        done
        s=$(num "$(echo "$last" | sed -n 's/.*[(, ]skipped=\([0-9]*\).*/\1/p')")
        xf=$(num "$(echo "$last" | sed -n 's/.*[(, ]expected_failures=\([0-9]*\).*/\1/p')")
        s=$((s + xf))
        p=$((ran - f - s))
        [ "$p" -ge 0 ] || p=0
        ;;
    node)
        # node --test's TAP summary: "# pass N", "# fail N", "# skipped N",
        # "# todo N", "# cancelled N".
        for k in pass fail skipped todo cancelled; do
            n=$(num "$(sed -n "s/^\(#\|ℹ\) $k \([0-9]*\)\$/\2/p" "$out" | tail -n 1)")
            case $k in
                pass) p=$n ;;
                fail|cancelled) f=$((f + n)) ;;
                *) s=$((s + n)) ;;
            esac
        done
        ;;
    gotest)
        # go test -v: one "--- PASS: Name" line per test and subtest.
        p=$(sed -n 's/^ *--- PASS: \([^ ]*\).*/\1/p' "$out" | sort -u | wc -l)
        f=$(sed -n 's/^ *--- FAIL: \([^ ]*\).*/\1/p' "$out" | sort -u | wc -l)
        s=$(sed -n 's/^ *--- SKIP: \([^ ]*\).*/\1/p' "$out" | sort -u | wc -l)
        ;;
    tap)
        # Our shell suites close with "NAME: N passed, M failed".
        line=$(grep -E '^[A-Za-z0-9_./-]+: [0-9]+ passed, [0-9]+ failed$' "$out" | tail -n 1)
        p=$(num "$(echo "$line" | sed -n 's/.*: \([0-9]*\) passed, .*/\1/p')")
        f=$(num "$(echo "$line" | sed -n 's/.*passed, \([0-9]*\) failed$/\1/p')")
        ;;
    *)
        echo "tests/run.sh: unknown format $fmt in $LIST"
        f=1
        ;;
    esac
}

fail_suite() {
    suites_failed=$((suites_failed + 1))
    failures="$failures $1"
}

# run_one NAME EXPECTED FORMAT COMMAND...
run_one() {
    name=$1 want=$2 fmt=$3
    shift 3
    echo "=== $name"
    exe=$1
    [ "$exe" = sh ] && exe=${2:-}
    if [ ! -e "$exe" ]; then
        echo ">>> $name: MISSING ($exe does not exist); $want test(s) not run"
        tests_failed=$((tests_failed + want))
        fail_suite "$name(missing)"
        return
    fi
    out="$tmp/out"
    { "$@" </dev/null 2>&1; echo $? >"$tmp/rc"; } | tee "$out"
    rc=$(cat "$tmp/rc")
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
        echo ">>> $name: $p passed"
    else
        echo ">>> $name: FAILED:$why"
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
        run_one "$name" "$want" "$fmt" $VG "$BUILD/tests/$name"
    else
        # shellcheck disable=SC2086
        run_one "$name" "$want" "$fmt" $cmd
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
