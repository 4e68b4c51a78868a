#!/bin/sh
# Runs every test suite and prints one closing line: "N passed, N failed".
#   OPTD_BUILD     build directory (default build)
#   OPTD_ONLY_C=1  only the C suites (asan, valgrind)
#   OPTD_VALGRIND=1 run the C suites under valgrind
# Each suite counts as one: a cmocka binary, the Python, JS, Go and shell
# client suites.
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

for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    run_suite "$(basename "$t")" $VG "$t"
done

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
