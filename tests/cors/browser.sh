#!/bin/sh
# clients/js/optd.js in Debian's headless Chromium, from a page of another
# origin, against daemons with and without --cors-origin
# (tests/cors/browser.test.js, node --test, chrome-remote-interface from
# npm).  npm packages go to a cache directory, never into the tree:
#   OPTD_NPM_DIR     where (default ~/.cache/optd-test-npm)
set -eu
BUILD=${OPTD_BUILD:-build}
export OPTD_BIN="${OPTD_BIN:-$PWD/$BUILD/optd}"
export OPTD_NPM_DIR="${OPTD_NPM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/optd-test-npm}"
CRI=chrome-remote-interface@0.34.0
if [ ! -f "$OPTD_NPM_DIR/node_modules/chrome-remote-interface/package.json" ]; then
    mkdir -p "$OPTD_NPM_DIR"
    npm install --prefix "$OPTD_NPM_DIR" "$CRI" --no-audit --no-fund --loglevel=error >&2
fi
exec node --test --test-reporter=tap tests/cors/browser.test.js
