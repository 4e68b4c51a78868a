#!/bin/sh
# Runs the Go client's tests against a real daemon: OPTD_BIN (default
# build/optd of this repo).  Offline: standard library only, no module proxy.
# The sharded-session tests also run /usr/bin/python3 with ../python (the
# Python client, python3-numpy) to check that both make the same sessions.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
: "${OPTD_BIN:=$here/../../build/optd}"
export OPTD_BIN
if [ ! -x "$OPTD_BIN" ]; then
    echo "clients/go/test.sh: no daemon at $OPTD_BIN (run make build)" >&2
    exit 1
fi
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOPROXY=off GOSUMDB=off GO111MODULE=on
# The Go tool writes a build cache (and wants GOPATH for its module cache);
# HOME may be read-only, so both default to a per-user temp dir.
tmp="${TMPDIR:-/tmp}/optd-go-$(id -u)"
: "${GOCACHE:=$tmp/cache}"
: "${GOPATH:=$tmp/gopath}"
export GOCACHE GOPATH
mkdir -p "$GOCACHE" "$GOPATH"
go vet ./...
# staticcheck is Debian's go-staticcheck (installed as go-staticcheck).
if command -v go-staticcheck >/dev/null 2>&1; then
    go-staticcheck ./...
elif command -v staticcheck >/dev/null 2>&1; then
    staticcheck ./...
else
    echo "clients/go/test.sh: staticcheck is not installed (make deps-test)" >&2
    exit 1
fi
# A module of its own that depends on this one as README.md says (require +
# replace), built and run offline.
user=$(mktemp -d "$tmp/user.XXXXXX")
trap 'rm -rf "$user"' EXIT
printf 'module example.com/trainer\n\ngo 1.19\n\nrequire optd.dev/client/go v0.0.0\n\nreplace optd.dev/client/go => %s\n' "$here" >"$user/go.mod"
cat >"$user/main.go" <<'EOF'
package main

import (
	"fmt"

	optd "optd.dev/client/go"
)

func main() {
	c := optd.NewClient("http://127.0.0.1:8080")
	fmt.Println(c != nil, optd.ValidName("mlp"))
}
EOF
(cd "$user" && go build -o trainer . && ./trainer) | grep -qx "true true" ||
    { echo "clients/go/test.sh: a module depending on this one does not build" >&2; exit 1; }
# -count=1: the daemon binary is outside what the test cache tracks.
# -v: one "--- PASS" line per test, which tests/run.sh counts.
exec go test -count=1 -v ./...
