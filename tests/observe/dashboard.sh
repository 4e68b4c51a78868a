#!/bin/sh
# The dashboard in a real browser: Debian's headless Chromium, driven over
# the DevTools protocol by tests/observe/dashboard.test.js (node --test,
# chrome-remote-interface from npm), against a live daemon running a small
# training.  npm packages go to a cache directory, never into the tree:
#   OPTD_NPM_DIR     where (default ~/.cache/optd-test-npm)
#   OPTD_SCREENSHOTS where the screenshots go (default $OPTD_BUILD/screenshots)
set -eu
BUILD=${OPTD_BUILD:-build}
export OPTD_BIN="${OPTD_BIN:-$PWD/$BUILD/optd}"
export OPTD_NPM_DIR="${OPTD_NPM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/optd-test-npm}"
export OPTD_SCREENSHOTS="${OPTD_SCREENSHOTS:-$PWD/$BUILD/screenshots}"
CRI=chrome-remote-interface@0.34.0
if [ ! -f "$OPTD_NPM_DIR/node_modules/chrome-remote-interface/package.json" ]; then
    mkdir -p "$OPTD_NPM_DIR"
    npm install --prefix "$OPTD_NPM_DIR" "$CRI" --no-audit --no-fund --loglevel=error >&2
fi
mkdir -p "$OPTD_SCREENSHOTS"
exec node --test tests/observe/dashboard.test.js
