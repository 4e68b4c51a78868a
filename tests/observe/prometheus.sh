#!/bin/sh
# A real Prometheus server (Debian's prometheus) scrapes a real optd on
# loopback every second with --metrics-token, and the test reads series
# back through Prometheus's HTTP API: the step counter equals the steps
# made, a histogram quantile of the kernel phase is a number, the target
# is up, and a second job with a wrong token is down (the token bites).
# Closes with "observe/prometheus: N passed, M failed".
set -u
BUILD=${OPTD_BUILD:-build}
OPTD=${OPTD_BIN:-$PWD/$BUILD/optd}
dir=$(mktemp -d "${TMPDIR:-/tmp}/optd-prom.XXXXXX")
optd_pid=""
prom_pid=""
cleanup() {
    [ -n "$prom_pid" ] && kill "$prom_pid" 2>/dev/null && wait "$prom_pid" 2>/dev/null
    [ -n "$optd_pid" ] && kill "$optd_pid" 2>/dev/null && wait "$optd_pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

passed=0
failed=0
check() {
    d=$1
    shift
    if "$@"; then
        passed=$((passed + 1)); echo "ok - $d"
    else
        failed=$((failed + 1)); echo "not ok - $d"
    fi
}
finish() {
    if [ "$failed" != 0 ]; then
        echo "optd log:"; sed 's/^/    /' "$dir/optd.log" | tail -20
        echo "prometheus log:"; sed 's/^/    /' "$dir/prom.log" | tail -20
    fi
    echo "observe/prometheus: $passed passed, $failed failed"
    [ "$failed" = 0 ]
    exit $?
}

"$OPTD" --bind 127.0.0.1 --port 0 --db "$dir/optd.db" --api-key k3y --metrics-token m3tr1cs \
    >"$dir/optd.out" 2>"$dir/optd.log" &
optd_pid=$!
port=""
for _ in $(seq 100); do
    port=$(sed -n 's/^optd listening on http:\/\/127\.0\.0\.1:\([0-9]*\)$/\1/p' "$dir/optd.out")
    [ -n "$port" ] && break
    sleep 0.1
done
check "optd listens" test -n "$port"
[ -n "$port" ] || finish
base="http://127.0.0.1:$port"
auth="Authorization: Bearer k3y"
curl -fsS -X PUT "$base/v1/sessions/prom" -H "$auth" -H 'Content-Type: application/json' \
    -d '{"optimizer":{"type":"adam","lr":0.01},"params":[1,2,3,4]}' >/dev/null
steps=0
for i in $(seq 25); do
    curl -fsS -X POST "$base/v1/sessions/prom/step" -H "$auth" -H 'Content-Type: application/json' \
        -d "{\"grad\":[0.1,0.2,0.3,0.$i],\"loss\":$i}" >/dev/null && steps=$((steps + 1))
done
check "25 steps made" test "$steps" = 25

# A free port for Prometheus: bind 0, read it, let go.
pport=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$dir/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: optd
    static_configs:
      - targets: ['127.0.0.1:$port']
    authorization:
      type: Bearer
      credentials: m3tr1cs
  - job_name: optd-wrong-token
    static_configs:
      - targets: ['127.0.0.1:$port']
    authorization:
      type: Bearer
      credentials: k3y
YML
check "promtool check config" sh -c "promtool check config \"$dir/prometheus.yml\" >/dev/null"
prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/tsdb" \
    --web.listen-address="127.0.0.1:$pport" >"$dir/prom.log" 2>&1 &
prom_pid=$!

# query EXPR: the first result's value ("" when none).
query() {
    curl -fsS --get "http://127.0.0.1:$pport/api/v1/query" --data-urlencode "query=$1" 2>/dev/null |
        /usr/bin/python3 -c 'import json,sys
d=json.load(sys.stdin)
r=d["data"]["result"]
print(r[0]["value"][1] if d["status"]=="success" and r else "")' 2>/dev/null
}
# wait_for EXPR WANT: polls until the value is WANT (30 s at most).
wait_for() {
    for _ in $(seq 150); do
        [ "$(query "$1")" = "$2" ] && return 0
        sleep 0.2
    done
    echo "# $1 = '$(query "$1")', wanted $2"
    return 1
}
check "up{job=optd} is 1" wait_for 'up{job="optd"}' 1
check "the step counter read back is 25" wait_for 'optd_steps_total{job="optd",kind="step"}' 25
check "step requests answered 200: 25" \
    wait_for 'sum(optd_http_requests_total{job="optd",route="/v1/sessions/{name}/step",status="200"})' 25
q=$(query 'histogram_quantile(0.5, sum by (le) (optd_step_phase_seconds_bucket{job="optd",phase="kernel"}))')
check "the kernel phase's median is a number ($q)" \
    /usr/bin/python3 -c "import sys,math; v=float(sys.argv[1]); sys.exit(0 if v>0 and math.isfinite(v) else 1)" "$q"
check "a scrape with the API key instead of the metrics token is down" \
    wait_for 'up{job="optd-wrong-token"}' 0
check "Prometheus stores optd's series (optd_sessions_hot = 1)" wait_for 'optd_sessions_hot{job="optd"}' 1
finish
