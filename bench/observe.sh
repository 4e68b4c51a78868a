#!/bin/sh
# bench/observe.sh -- what looking costs: the binary 1k-param step throughput
# at 16 connections (wrk + bench/http_step.lua, as in bench/http.sh), with
# /metrics scraped every second and 10 event-stream watchers attached (each
# to a session being stepped, reading every event), against the same run
# without them.  Runs alternate plain / observed on one daemon; the medians'
# ratio is reported (target: observed >= 0.95 x plain).
#
#   sh bench/observe.sh          (make bench-observe)
#
# Environment: OPTD_BIN (default build/optd), OPTD_BENCH_DURATION seconds per
# run (default 5), OPTD_BENCH_REPS pairs of runs (default 3).
# Only 127.0.0.1; everything started here is stopped by PID on every exit.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OPTD=${OPTD_BIN:-$ROOT/build/optd}
LUA=$ROOT/bench/http_step.lua
DUR=${OPTD_BENCH_DURATION:-5}
REPS=${OPTD_BENCH_REPS:-3}
N=1000
CONNS=16
WATCHERS=10
TARGET=0.95

TMP=
OPTD_PID=
SIDE_PIDS=
die() {
    echo "bench/observe: $*" >&2
    exit 1
}
stop_side() {
    for p in $SIDE_PIDS; do kill "$p" 2>/dev/null; done
    for p in $SIDE_PIDS; do wait "$p" 2>/dev/null; done
    SIDE_PIDS=
}
cleanup() {
    stop_side
    [ -n "$OPTD_PID" ] && kill "$OPTD_PID" 2>/dev/null && wait "$OPTD_PID" 2>/dev/null
    OPTD_PID=
    [ -n "$TMP" ] && rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for tool in wrk curl timeout; do
    command -v $tool >/dev/null 2>&1 || die "needs $tool (make deps-bench installs wrk)"
done
[ -x "$OPTD" ] || die "no daemon at $OPTD (run make build)"
TMP=$(mktemp -d /tmp/optd-bench-observe.XXXXXX) || die "mktemp failed"

"$OPTD" --port 0 --db "$TMP/optd.db" >"$TMP/optd.out" 2>"$TMP/optd.err" &
OPTD_PID=$!
PORT=
for _ in $(seq 100); do
    PORT=$(sed -n 's|^optd listening on http://127\.0\.0\.1:\([0-9][0-9]*\)$|\1|p' "$TMP/optd.out")
    [ -n "$PORT" ] && break
    sleep 0.1
done
[ -n "$PORT" ] || { cat "$TMP/optd.err" >&2; die "optd did not start"; }
URL=http://127.0.0.1:$PORT

i=0
while [ $i -lt $CONNS ]; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H 'Content-Type: application/json' \
        --data "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.001},\"size\":$N,\"init\":{\"type\":\"normal\",\"std\":0.1,\"seed\":7}}" \
        "$URL/v1/sessions/s$i")
    [ "$code" = 201 ] || die "creating s$i answered $code"
    i=$((i + 1))
done

run() { # run LABEL: one wrk run, its rps appended to $TMP/LABEL
    BENCH_MODE=step BENCH_PARAMS=$N BENCH_PREFIX=s \
        timeout $((DUR + 30)) wrk -t $CONNS -c $CONNS -d "${DUR}s" --timeout 10s -s "$LUA" "$URL" \
        >"$TMP/wrk.out" 2>&1
    line=$(grep '^RESULT ' "$TMP/wrk.out")
    case $line in
    *" status_errors=0 socket_errors=0") ;;
    *) cat "$TMP/wrk.out" >&2; die "requests failed in the $1 run: $line" ;;
    esac
    echo "$line" | sed -n 's/.* rps=\([0-9.]*\).*/\1/p' >>"$TMP/$1"
}

observers_on() {
    # 10 watchers, each on a stepped session, reading everything.
    w=0
    while [ $w -lt $WATCHERS ]; do
        curl -sN -o "$TMP/watch$w.out" "$URL/v1/sessions/s$w/events" &
        SIDE_PIDS="$SIDE_PIDS $!"
        w=$((w + 1))
    done
    # /metrics every second.
    (while :; do curl -s -o "$TMP/metrics.out" "$URL/metrics"; sleep 1; done) &
    SIDE_PIDS="$SIDE_PIDS $!"
    sleep 0.5
}

run warm
r=0
while [ $r -lt "$REPS" ]; do
    run plain
    observers_on
    run observed
    # The watchers did read events: their streams hold step events.
    grep -q '^event: step' "$TMP/watch0.out" || die "watcher 0 got no step event"
    stop_side
    r=$((r + 1))
done
grep -q '^optd_steps_total{kind="step"}' "$TMP/metrics.out" || die "/metrics was not scraped"

median() { sort -n "$1" | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
plain=$(median "$TMP/plain")
observed=$(median "$TMP/observed")
ratio=$(awk -v a="$observed" -v b="$plain" 'BEGIN {printf "%.3f", a / b}')
echo "binary 1k-param Adam steps, $CONNS connections, ${DUR}s runs, $REPS pairs (medians):"
echo "  plain:                                   $plain steps/s   (runs: $(tr '\n' ' ' <"$TMP/plain"))"
echo "  /metrics every 1 s + $WATCHERS event watchers:   $observed steps/s   (runs: $(tr '\n' ' ' <"$TMP/observed"))"
echo "  ratio observed/plain: $ratio (target >= $TARGET)"
awk -v r="$ratio" -v t="$TARGET" 'BEGIN {exit !(r >= t)}' && echo "  target met" || echo "  target MISSED"
