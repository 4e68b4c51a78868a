#!/bin/sh
# Runs the Go client's tests against a real daemon: OPTD_BIN (default
# build/optd of this repo).  Offline: standard library only, no module proxy.
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
# -count=1: the daemon binary is outside what the test cache tracks.
# -v: one "--- PASS" line per test, which tests/run.sh counts.
exec go test -count=1 -v ./...
