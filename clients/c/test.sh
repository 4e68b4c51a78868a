#!/bin/sh
# The C client as a user installs it: `make install` into a temporary
# DESTDIR, the README's example program compiled with the README's compile
# line as written (pkg-config finds optd-client.pc under the DESTDIR), run
# against a real daemon; then `make uninstall` must leave no file behind.
# (The client's behaviour is tested by tests/test_client_c.c.)
#
# Run from the repository root: sh clients/c/test.sh   (OPTD_BIN: the daemon)
set -u
root=$(pwd)
OPTD_BIN=${OPTD_BIN:-$root/build/optd}
BUILD=${OPTD_BUILD:-build}
tmp=$(mktemp -d /tmp/optd-c-install.XXXXXX)
pid=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok - $*"; }
not_ok() { failed=$((failed + 1)); echo "not ok - $*"; }
check() {
    d=$1
    shift
    if "$@"; then ok "$d"; else not_ok "$d"; fi
}

dest="$tmp/dest"
if make -s --no-print-directory BUILD="$BUILD" PREFIX=/usr/local DESTDIR="$dest" install >"$tmp/install.log" 2>&1; then
    ok "make install DESTDIR=$dest"
else
    not_ok "make install: $(cat "$tmp/install.log")"
fi
for f in bin/optd include/optd/optd_client.h include/optd/optim.h lib/liboptdclient.a lib/liboptim.a \
    lib/pkgconfig/optd-client.pc lib/pkgconfig/optim.pc; do
    check "installed /usr/local/$f" test -f "$dest/usr/local/$f"
done
check "no header lands directly in include/" sh -c "! ls '$dest/usr/local/include/'*.h 2>/dev/null | grep -q ."

# The README's example and compile line, as written.
awk '/^```c$/ { on = 1; next } on && /^```$/ { exit } on { print }' clients/c/README.md >"$tmp/trainer.c"
line=$(awk '/<!-- compile line/ { f = 1; next } f && /^cc / { print; exit }' clients/c/README.md)
check "README has an example program" grep -q 'int main' "$tmp/trainer.c"
check "README has a compile line ($line)" test -n "$line"
export PKG_CONFIG_PATH="$dest/usr/local/lib/pkgconfig"
export PKG_CONFIG_SYSROOT_DIR="$dest"
if (cd "$tmp" && sh -c "$line") >"$tmp/cc.log" 2>&1; then
    ok "the README's compile line builds trainer.c"
else
    not_ok "the README's compile line: $(cat "$tmp/cc.log")"
fi
check "optim.pc gives the kernels' flags" sh -c "pkg-config --cflags --libs optim | grep -q -- '-loptim'"
printf '#include <optd/optim.h>\nint main(void) { return optim_find("adam") ? 0 : 1; }\n' >"$tmp/kern.c"
check "a program of the kernels alone builds and runs with optim.pc" \
    sh -c "cd '$tmp' && cc kern.c \$(pkg-config --cflags --libs optim) -o kern && ./kern"

if [ -x "$tmp/trainer" ]; then
    "$OPTD_BIN" --port 0 --db "$tmp/optd.db" --log-level warn >"$tmp/out" 2>"$tmp/err" &
    pid=$!
    url=""
    i=0
    while [ $i -lt 100 ] && [ -z "$url" ]; do
        url=$(sed -n 's/^optd listening on //p' "$tmp/out")
        i=$((i + 1))
        [ -z "$url" ] && sleep 0.1
    done
    if [ -n "$url" ]; then
        out=$("$tmp/trainer" "$url" 2>&1)
        check "the README's program runs ten steps against optd ($out)" test "$out" = "step 10"
        st=$(curl -sS "$url/v1/sessions/mlp" | sed -n 's/.*"step":\([0-9]*\).*/\1/p')
        check "the daemon has session mlp at step 10 ($st)" test "$st" = 10
    else
        not_ok "optd did not start: $(cat "$tmp/err")"
    fi
    kill "$pid"
    wait "$pid" 2>/dev/null
    pid=""
fi

if make -s --no-print-directory BUILD="$BUILD" PREFIX=/usr/local DESTDIR="$dest" uninstall >"$tmp/un.log" 2>&1; then
    ok "make uninstall"
else
    not_ok "make uninstall: $(cat "$tmp/un.log")"
fi
left=$(find "$dest" -type f | sed "s#^$dest##")
check "make uninstall leaves no file (${left:-none})" test -z "$left"

echo "c-install: $passed passed, $failed failed"
[ "$failed" = 0 ]
