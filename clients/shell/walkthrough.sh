#!/bin/sh
# The README's curl walkthrough as a script: create an Adam session, send
# gradients (one with a retry-safe Idempotency-Key), read the parameters,
# change the learning rate, show the history, delete the session.  Each
# command is printed before its answer.
#
#   sh clients/shell/walkthrough.sh [URL]      (default http://127.0.0.1:8080)
#
# With WALKTHROUGH_OUT=DIR every answer is also saved as DIR/01, DIR/02, ...
# (clients/shell/test.sh checks them).  The commands between "run <<'EOF'"
# and "EOF" are copied verbatim into README.md; test.sh checks that too.
# An https:// daemon: OPTD_CACERT (a PEM CA bundle) and, for one started
# with --tls-client-ca, OPTD_CERT and OPTD_KEY (a PEM client certificate and
# its key) become curl's --cacert, --cert and --key.
set -u
OPTD=${1:-http://127.0.0.1:8080}
n=0

curl() {
    if [ -n "${OPTD_CERT:-}" ]; then
        set -- --cert "$OPTD_CERT" --key "${OPTD_KEY:-$OPTD_CERT}" "$@"
    fi
    if [ -n "${OPTD_CACERT:-}" ]; then
        set -- --cacert "$OPTD_CACERT" "$@"
    fi
    command curl "$@"
}

# Reads one command from standard input, prints it, runs it.
run() {
    cmd=$(cat)
    n=$((n + 1))
    printf '\n$ %s\n' "$cmd"
    if [ -n "${WALKTHROUGH_OUT:-}" ]; then
        out=$(printf '%s/%02d' "$WALKTHROUGH_OUT" "$n")
        eval "$cmd" >"$out" || return 1
        cat "$out"
    else
        eval "$cmd" || return 1
    fi
    printf '\n'
}

fail() {
    echo "walkthrough: step $n failed (is optd running at $OPTD?)" >&2
    exit 1
}

run <<'EOF' || fail
curl -sS "$OPTD/healthz"
EOF

run <<'EOF' || fail
curl -sS -i -X PUT "$OPTD/v1/sessions/demo" \
  -H 'Content-Type: application/json' \
  -d '{"optimizer": {"type": "adam", "lr": 0.1}, "params": [1.0, -2.0, 3.0]}'
EOF

run <<'EOF' || fail
curl -sS -X POST "$OPTD/v1/sessions/demo/step" \
  -H 'Content-Type: application/json' \
  -d '{"grad": [0.5, -0.5, 1.0], "loss": 2.5}'
EOF

run <<'EOF' || fail
curl -sS -X POST "$OPTD/v1/sessions/demo/step" \
  -H 'Content-Type: application/json' -H 'Idempotency-Key: demo-step-2' \
  -d '{"grad": [0.4, -0.6, 0.9], "loss": 2.1}'
EOF

run <<'EOF' || fail
curl -sS -i -X POST "$OPTD/v1/sessions/demo/step" \
  -H 'Content-Type: application/json' -H 'Idempotency-Key: demo-step-2' \
  -d '{"grad": [0.4, -0.6, 0.9], "loss": 2.1}'
EOF

run <<'EOF' || fail
curl -sS "$OPTD/v1/sessions/demo/params"
EOF

run <<'EOF' || fail
curl -sS -X PATCH "$OPTD/v1/sessions/demo" \
  -H 'Content-Type: application/json' \
  -d '{"optimizer": {"lr": 0.01}}'
EOF

run <<'EOF' || fail
curl -sS -X POST "$OPTD/v1/sessions/demo/step" \
  -H 'Content-Type: application/json' \
  -d '{"grad": [0.3, -0.4, 0.8], "loss": 1.8}'
EOF

run <<'EOF' || fail
curl -sS -X POST "$OPTD/v1/sessions/demo/step" \
  -H 'Content-Type: application/json' \
  -d '{"grad": [1.0]}'
EOF

run <<'EOF' || fail
curl -sS "$OPTD/v1/sessions/demo/history"
EOF

run <<'EOF' || fail
curl -sS -i -X DELETE "$OPTD/v1/sessions/demo"
EOF
