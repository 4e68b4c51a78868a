#!/bin/sh
# Runs every test suite and prints one closing line: "N passed, N failed".
#   OPTD_BUILD     build directory (default build)
#   OPTD_ONLY_C=1  only the C suites (asan, valgrind)
#   OPTD_VALGRIND=1 run the C suites under valgrind
# Each suite counts as one: a cmocka binary, a Python suite of tests/, the
# Python, JS, Go, C and shell client suites.
set -u
BUILD=${OPTD_BUILD:-build}
export OPTD_BIN="$PWD/$BUILD/optd"
passed=0
failed=0
failures=""

run_suite() {
    name=$1; shift
    echo "=== $name"
    if "$@"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures="$failures $name"
    fi
}

VG=""
if [ "${OPTD_VALGRIND:-0}" = 1 ]; then
    VG="valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite"
    export OPTD_VALGRIND_DAEMON="valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite"
fi

for src in tests/test_*.c; do
    t="$BUILD/tests/$(basename "$src" .c)"
    [ -x "$t" ] || continue
    run_suite "$(basename "$t")" $VG "$t"
done

# Python suites of the daemon (the contract test): unittest, Debian's
# python3-yaml and python3-jsonschema, against $OPTD_BIN.
if [ "${OPTD_VALGRIND:-0}" != 1 ]; then
    for py in tests/test_*.py; do
        [ -f "$py" ] || continue
        run_suite "$(basename "$py")" /usr/bin/python3 -m unittest "$py"
    done
fi

if [ "${OPTD_ONLY_C:-0}" != 1 ]; then
    for s in clients/*/test.sh; do
        [ -f "$s" ] || continue
        run_suite "$(dirname "$s")" sh "$s"
    done
fi

echo
[ -n "$failures" ] && echo "failed suites:$failures"
echo "suites: $passed passed, $failed failed"
[ "$failed" = 0 ]
