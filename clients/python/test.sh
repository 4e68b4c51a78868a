#!/bin/sh
# The Python client's suite (unittest).  Builds nothing: tests/run.sh calls it
# after `make build`, with OPTD_BIN set to the daemon (default: build/optd).
# Each test class starts its own daemon on a free port with a temporary db.
# Debian's interpreter on purpose: it is the one with python3-numpy and
# python3-torch.
set -eu
cd "$(dirname "$0")"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH PYTHONDONTWRITEBYTECODE
exec /usr/bin/python3 -m unittest discover -s tests -t . "$@"
