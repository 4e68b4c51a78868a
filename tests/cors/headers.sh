#!/bin/sh
# CORS over real HTTP: preflights and the headers of every kind of answer
# (tests/cors/headers.test.js, node --test), against live daemons.
set -eu
BUILD=${OPTD_BUILD:-build}
export OPTD_BIN="${OPTD_BIN:-$PWD/$BUILD/optd}"
exec node --test --test-reporter=tap tests/cors/headers.test.js
