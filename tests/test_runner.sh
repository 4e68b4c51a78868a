#!/bin/sh
# Self-test of tests/run.sh: fake suites in a temporary directory, one case
# per way a suite can shrink or skip without failing.  Each case runs the
# real runner against a fake list and checks its exit status and what it
# says.  Closes with "runner: N passed, M failed".
set -u
RUN="$PWD/tests/run.sh"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/optd-runner-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' INT TERM

passed=0
failed=0

# fake_cmocka NAME PASSED [FAILED] [SKIPPED]: a test binary that prints
# cmocka's summary (on stderr, as cmocka does) and exits like cmocka.
fake_cmocka() {
    f="$tmp/case/build/tests/$1"
    {
        echo '#!/bin/sh'
        echo "echo '[==========] Running $(($2 + ${3:-0} + ${4:-0})) test(s).'"
        echo "echo '[  PASSED  ] $2 test(s).' >&2"
        [ "${4:-0}" = 0 ] || echo "echo '[  SKIPPED ] $4 test(s), listed below:' >&2"
        [ "${3:-0}" = 0 ] || echo "echo '[  FAILED  ] $3 test(s), listed below:' >&2; exit $3"
        echo 'exit 0'
    } >"$f"
    chmod +x "$f"
    : >"$tmp/case/tests/$1.c" # a suite is a source of tests/
}

# fake_client DIR BODY: clients/DIR/test.sh running BODY.
fake_client() {
    mkdir -p "$tmp/case/clients/$1"
    printf '#!/bin/sh\n%s\n' "$2" >"$tmp/case/clients/$1/test.sh"
}

# A fresh case: two good C suites and one client suite of each format,
# all listed with their true counts.
new_case() {
    rm -rf "$tmp/case"
    mkdir -p "$tmp/case/build/tests" "$tmp/case/tests"
    fake_cmocka test_a 3
    fake_cmocka test_b 2
    fake_client py 'echo "Ran 4 tests in 0.1s"; echo; echo OK'
    fake_client js 'printf "# tests 2\n# pass 2\n# fail 0\n# skipped 0\n# todo 0\n"'
    fake_client go 'printf -- "--- PASS: TestA (0.01s)\n    --- PASS: TestA/sub (0.00s)\n--- PASS: TestB (0.01s)\nPASS\n"'
    fake_client sh 'echo "ok - one"; echo "sh: 1 passed, 0 failed"'
    cat >"$tmp/case/tests/expected.txt" <<'EOF'
# fake list
test_a        3  cmocka
test_b        2  cmocka
clients/py    4  unittest  sh clients/py/test.sh
clients/js    2  node      sh clients/js/test.sh
clients/go    3  gotest    sh clients/go/test.sh
clients/sh    1  tap       sh clients/sh/test.sh
EOF
}

# run_case: the runner in the case directory; sets rc and leaves its output
# in $tmp/out.
run_case() {
    (cd "$tmp/case" && env "$@" OPTD_BUILD=build OPTD_BIN=/bin/true sh "$RUN") >"$tmp/out" 2>&1
    rc=$?
}

# expect DESCRIPTION WANT_RC PATTERN: the last run exited WANT_RC (0 or
# "nonzero") and printed a line matching PATTERN.
expect() {
    ok=1
    case $2 in
        0) [ "$rc" = 0 ] || ok=0 ;;
        *) [ "$rc" != 0 ] || ok=0 ;;
    esac
    grep -qE -- "$3" "$tmp/out" || ok=0
    if [ $ok = 1 ]; then
        passed=$((passed + 1))
        echo "ok - $1"
    else
        failed=$((failed + 1))
        echo "not ok - $1 (rc $rc, wanted $2 and /$3/); runner said:"
        sed 's/^/    /' "$tmp/out"
    fi
}

new_case; run_case
expect "every suite at its count passes; the closing line counts tests" 0 \
    '^tests: 15 passed, 0 failed$'

new_case; rm "$tmp/case/build/tests/test_b"; run_case
expect "a listed C suite that is not built fails the run" nonzero \
    '^>>> test_b: MISSING'
new_case; rm -r "$tmp/case/clients/js"; run_case
expect "a deleted client suite fails the run" nonzero '^tests: 13 passed, 2 failed$'

new_case; printf '#!/bin/sh\nexit 0\n' >"$tmp/case/build/tests/test_a"; run_case
expect "a C suite whose main returns early fails the run" nonzero \
    'test_a: FAILED: reported 0 test\(s\), 3 expected'
new_case; fake_client py 'exit 0'; run_case
expect "a client script that exits 0 at once fails the run" nonzero \
    'clients/py: FAILED: reported 0 test\(s\), 4 expected'
new_case; fake_cmocka test_a 2; run_case
expect "a C suite with one test fewer fails the run" nonzero \
    '^tests: 14 passed, 1 failed$'

new_case; fake_client py 'echo "Ran 4 tests in 0.1s"; echo; echo "OK (skipped=3)"'; run_case
expect "unittest OK (skipped=3) fails the run (torch missing)" nonzero \
    'clients/py: FAILED: 3 skipped'
new_case; fake_client js 'printf "# pass 1\n# fail 0\n# skipped 1\n# todo 0\n"'; run_case
expect "node --test with a skipped test fails the run" nonzero 'clients/js: FAILED: 1 skipped'
new_case
fake_client go 'printf -- "--- PASS: TestA (0.01s)\n    --- PASS: TestA/sub (0.00s)\n--- SKIP: TestB (0.00s)\nPASS\n"'
run_case
expect "go test with a skipped test fails the run" nonzero 'clients/go: FAILED: 1 skipped'
new_case; fake_cmocka test_a 2 0 1; run_case
expect "a cmocka skip fails the run" nonzero 'test_a: FAILED: 1 skipped'

new_case; fake_cmocka test_b 1 1; run_case
expect "a failing test is counted and fails the run" nonzero '^tests: 14 passed, 1 failed$'
new_case; printf '#!/bin/sh\necho "[  PASSED  ] 3 test(s)." >&2\nkill -ABRT $$\n' \
    >"$tmp/case/build/tests/test_a"; run_case
expect "a suite that crashes after printing its count fails the run" nonzero \
    'test_a: FAILED: exit [1-9]'
new_case; printf '#!/bin/sh\necho "[  PASSED  ] 3 test(s)." >&2\necho "[  FAILED  ] GROUP TEARDOWN" >&2\nexit 0\n' \
    >"$tmp/case/build/tests/test_a"; run_case
expect "a failed group teardown (cmocka exits 0) fails the run" nonzero \
    'test_a: FAILED: 1 failed'
new_case; fake_client sh 'echo "sh: 0 passed, 1 failed"; exit 1'; run_case
expect "a shell suite with a failed check fails the run" nonzero '^tests: 14 passed, 1 failed$'

new_case; fake_cmocka test_c 1; run_case
expect "a built C suite that is not listed fails the run" nonzero \
    'test_c: FAILED: not listed'
new_case; fake_client rust 'echo "rust: 1 passed, 0 failed"'; run_case
expect "a client suite that is not listed fails the run" nonzero \
    'clients/rust: FAILED: not listed'
new_case; echo 'test_c 1 cmocka' >>"$tmp/case/tests/expected.txt"; fake_cmocka test_c 1; run_case
expect "adding a suite is one line in the list" 0 '^tests: 16 passed, 0 failed$'

new_case; fake_cmocka test_a 4; run_case
expect "more tests than listed passes with a note" 0 'note: test_a reports 4 tests'
new_case; fake_client py 'exit 1'; run_case OPTD_ONLY_C=1
expect "OPTD_ONLY_C=1 runs the C suites only" 0 '^tests: 5 passed, 0 failed$'
new_case; fake_cmocka test_a 0 1; run_case OPTD_ONLY=test_b
expect "OPTD_ONLY runs the named suites only" 0 '^tests: 2 passed, 0 failed$'
mkdir -p "$tmp/bin"
printf '#!/bin/sh\nfor a; do last=$a; done\necho valgrind-ran >&2\nexec "$last"\n' >"$tmp/bin/valgrind"
chmod +x "$tmp/bin/valgrind"
new_case; run_case OPTD_VALGRIND=1 PATH="$tmp/bin:$PATH"
expect "OPTD_VALGRIND=1 runs the C suites under valgrind and counts them" 0 \
    '^tests: 15 passed, 0 failed$'
expect "... through the valgrind command" 0 '^valgrind-ran$'
new_case; run_case OPTD_EXPECTED=nowhere.txt
expect "no list, no success" nonzero 'no list of suites'

echo "runner: $passed passed, $failed failed"
[ "$failed" = 0 ]
