#!/bin/sh
# The JavaScript client's suite, run from the repo root by tests/run.sh with
# OPTD_BIN set to the daemon binary.  Each test file starts its own daemon.
set -eu
: "${OPTD_BIN:?set OPTD_BIN to the optd binary (tests/run.sh does)}"
cd "$(dirname "$0")"
exec node --test --test-reporter=tap test/*.test.js
