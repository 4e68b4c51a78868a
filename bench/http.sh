#!/bin/sh
# bench/http.sh -- the daemon's step throughput and latency against an nginx
# ceiling measured in the same run, with the same tool (wrk + bench/http_step.lua).
#
#   sh bench/http.sh            (make bench-http installs wrk and nginx, builds, runs this)
#
# Environment (all optional):
#   OPTD_BIN               daemon to measure (default build/optd)
#   OPTD_BENCH_DURATION    seconds per timed run (default 4)
#   OPTD_BENCH_REPS        rounds of the six runs; medians are reported (default 3)
#   OPTD_BENCH_BIG_SECONDS seconds of 1M-param steps (default 8)
#   OPTD_BENCH_PROFILE     1: afterwards, perf-record the daemon during one more run
#                          at 1 and at 16 connections and print where the time goes
#
# Only 127.0.0.1; both servers start on free ports from a temp dir and are stopped
# by PID on every exit path.  Exits non-zero when a server does not start or a
# request fails; a missed target is reported, not an error.  bench/HTTP.md has the
# method and the figures.

set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OPTD=${OPTD_BIN:-$ROOT/build/optd}
LUA=$ROOT/bench/http_step.lua
DUR=${OPTD_BENCH_DURATION:-4}
REPS=${OPTD_BENCH_REPS:-3}
BIG_DUR=${OPTD_BENCH_BIG_SECONDS:-8}
PROFILE=${OPTD_BENCH_PROFILE:-0}

SMALL_N=1000
BIG_N=1000000
CONNS=16
STATIC_BYTES=4096
# "A few dozen" 1M steps: fewer than this and the p50 means little.
BIG_MIN_STEPS=24
# The targets (1 connection: latency ratio at most; 16: throughput share at least).
TARGET_LAT_RATIO=1.5
TARGET_RPS_SHARE=0.30

TMP=
OPTD_PID=
NGINX_PID=
PERF_PID=

die() {
    echo "bench/http: $*" >&2
    exit 1
}

# Stops one server by PID: TERM, a bounded wait, then KILL.
stop_pid() {
    pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

cleanup() {
    [ -n "$PERF_PID" ] && kill -INT "$PERF_PID" 2>/dev/null && wait "$PERF_PID" 2>/dev/null
    PERF_PID=
    stop_pid "$OPTD_PID"
    OPTD_PID=
    stop_pid "$NGINX_PID"
    NGINX_PID=
    [ -n "$TMP" ] && rm -rf "$TMP"
    TMP=
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for tool in wrk nginx curl timeout; do
    command -v $tool >/dev/null 2>&1 || die "needs $tool (make bench-http installs wrk and nginx-light)"
done
[ -x "$OPTD" ] || die "no daemon at $OPTD (run make build)"

TMP=$(mktemp -d /tmp/optd-bench-http.XXXXXX) || die "mktemp failed"
# nginx's worker runs as nobody when the master is root: it must reach the file.
chmod 755 "$TMP"

# ------------------------------------------------------------------ optd
"$OPTD" --port 0 --db "$TMP/optd.db" --durability normal >"$TMP/optd.out" 2>"$TMP/optd.err" &
OPTD_PID=$!
OPTD_PORT=
i=0
while [ $i -lt 100 ]; do
    OPTD_PORT=$(sed -n 's|^optd listening on http://127\.0\.0\.1:\([0-9][0-9]*\)$|\1|p' "$TMP/optd.out")
    [ -n "$OPTD_PORT" ] && break
    kill -0 "$OPTD_PID" 2>/dev/null || break
    sleep 0.1
    i=$((i + 1))
done
[ -n "$OPTD_PORT" ] || { cat "$TMP/optd.err" >&2; die "optd did not start"; }
OPTD_URL=http://127.0.0.1:$OPTD_PORT

# Creates an Adam float32 session of $2 params named $1 (201 expected).
create_session() {
    code=$(curl -s -m 30 -o "$TMP/create.out" -w '%{http_code}' -X PUT \
        -H 'Content-Type: application/json' \
        --data "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.001},\"dtype\":\"float32\",\"size\":$2,\"init\":{\"type\":\"normal\",\"std\":0.1,\"seed\":7}}" \
        "$OPTD_URL/v1/sessions/$1")
    [ "$code" = 201 ] || { cat "$TMP/create.out" >&2; die "creating session $1 answered $code"; }
}

i=0
while [ $i -lt $CONNS ]; do
    create_session "s$i" $SMALL_N
    i=$((i + 1))
done
create_session big0 $BIG_N

# One binary step by hand: the route the runs hit must answer 200 with the raw
# float32 params, else wrk would be timing errors.
head -c $((SMALL_N * 4)) /dev/zero >"$TMP/zero.bin"
curl -s -m 30 -D "$TMP/step.hdr" -o "$TMP/step.out" -X POST -H 'Content-Type: application/octet-stream' \
    -H 'Accept: application/octet-stream' --data-binary "@$TMP/zero.bin" "$OPTD_URL/v1/sessions/s0/step" ||
    die "the check step failed"
grep -q '^HTTP/1.1 200' "$TMP/step.hdr" || die "the check step answered $(head -1 "$TMP/step.hdr")"
grep -qi '^Content-Type: application/octet-stream' "$TMP/step.hdr" || die "the check step did not answer binary"
grep -qi '^Optd-Step: 1' "$TMP/step.hdr" || die "the check step did not answer Optd-Step: 1"
[ "$(wc -c <"$TMP/step.out")" -eq $((SMALL_N * 4)) ] || die "the check step answered $(wc -c <"$TMP/step.out") bytes"

# ------------------------------------------------------------------ nginx
mkdir -p "$TMP/www" "$TMP/nginx-tmp"
head -c $STATIC_BYTES /dev/urandom >"$TMP/www/static.bin"
chmod 755 "$TMP/www" && chmod 644 "$TMP/www/static.bin"

free_port() {
    /usr/bin/python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null
}

# Another process may take the port between the probe and nginx's bind: retry.
NGINX_PORT=
attempt=0
while [ $attempt -lt 3 ] && [ -z "$NGINX_PORT" ]; do
    attempt=$((attempt + 1))
    port=$(free_port) || die "needs /usr/bin/python3 to find a free port"
    cat >"$TMP/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log $TMP/nginx-access.log;
    client_body_temp_path $TMP/nginx-tmp/body;
    proxy_temp_path $TMP/nginx-tmp/proxy;
    fastcgi_temp_path $TMP/nginx-tmp/fastcgi;
    uwsgi_temp_path $TMP/nginx-tmp/uwsgi;
    scgi_temp_path $TMP/nginx-tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    # MHD keeps a connection for any number of requests; so must the ceiling,
    # or wrk would reconnect every 1000 requests (nginx's default).
    keepalive_requests 100000000;
    server {
        listen 127.0.0.1:$port;
        root $TMP/www;
    }
}
EOF
    nginx -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/nginx-error.log" >"$TMP/nginx.out" 2>&1 &
    NGINX_PID=$!
    i=0
    while [ $i -lt 50 ]; do
        if ! kill -0 "$NGINX_PID" 2>/dev/null; then
            wait "$NGINX_PID" 2>/dev/null
            NGINX_PID=
            break
        fi
        if curl -s -m 2 -o /dev/null "http://127.0.0.1:$port/static.bin" 2>/dev/null; then
            NGINX_PORT=$port
            break
        fi
        sleep 0.1
        i=$((i + 1))
    done
    [ -n "$NGINX_PORT" ] || stop_pid "$NGINX_PID"
done
[ -n "$NGINX_PORT" ] || { cat "$TMP/nginx.out" "$TMP/nginx-error.log" >&2 2>/dev/null; die "nginx did not start"; }
NGINX_URL=http://127.0.0.1:$NGINX_PORT/static.bin
[ "$(curl -s -m 30 "$NGINX_URL" | wc -c)" -eq $STATIC_BYTES ] || die "nginx did not serve the $STATIC_BYTES-byte file"

# ------------------------------------------------------------------ runs
# run_wrk OUT MODE URL CONNS SECONDS [PARAMS PREFIX]: one wrk run, its RESULT
# line appended to $TMP/OUT; wrk itself is bounded by timeout.
run_wrk() {
    out=$1 mode=$2 url=$3 c=$4 secs=$5
    BENCH_MODE=$mode BENCH_PARAMS=${6:-} BENCH_PREFIX=${7:-} \
        timeout $((secs + 30)) wrk -t "$c" -c "$c" -d "${secs}s" --timeout 10s -s "$LUA" "$url" \
        >"$TMP/wrk.out" 2>&1
    line=$(grep '^RESULT ' "$TMP/wrk.out")
    [ -n "$line" ] || { cat "$TMP/wrk.out" >&2; die "wrk ($out) gave no result"; }
    case $line in
    *" status_errors=0 socket_errors=0") ;;
    *) cat "$TMP/wrk.out" >&2; die "requests failed in the $out run: $line" ;;
    esac
    echo "$line" >>"$TMP/$out"
    if [ "$mode" = step ]; then
        echo "$line" >>"$TMP/steps.all"
    fi
}

field() { # field NAME < RESULT lines -> one value per line
    sed -n "s/.* $1=\([0-9.]*\).*/\1/p"
}

median() { # median NAME FILE
    field "$1" <"$TMP/$2" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'
}

echo "bench/http: optd $OPTD_URL (pid $OPTD_PID), nginx $NGINX_URL (pid $NGINX_PID)"
echo "bench/http: $REPS rounds of 6 runs x ${DUR}s, then ${BIG_DUR}s of 1M-param steps"

# Warm-up: caches, the daemon's session registry, nginx's open file.
run_wrk warm.step step "$OPTD_URL" 1 1 $SMALL_N s
run_wrk warm.get get "$NGINX_URL" 1 1

r=1
while [ $r -le "$REPS" ]; do
    # Interleaved, so that the other load of a shared machine falls on all.
    for c in 1 $CONNS; do
        run_wrk nginx.$c get "$NGINX_URL" $c "$DUR"
        run_wrk optd.$c step "$OPTD_URL" $c "$DUR" $SMALL_N s
        run_wrk floor.$c params "$OPTD_URL" $c "$DUR" "" s
    done
    r=$((r + 1))
done

run_wrk big step "$OPTD_URL" 1 "$BIG_DUR" $BIG_N big

# Every answered step must be an applied, committed step: the sessions' step
# counters cover every completed request, plus at most one in flight per
# connection when a run stopped, plus the check step.
session_step() {
    curl -s -m 30 "$OPTD_URL/v1/sessions/$1" | sed -n 's/^{"name":"[^"]*","step":\([0-9]*\),.*/\1/p'
}
applied=0
i=0
while [ $i -lt $CONNS ]; do
    n=$(session_step "s$i")
    [ -n "$n" ] || die "cannot read session s$i"
    applied=$((applied + n))
    i=$((i + 1))
done
answered=$(field requests <"$TMP/steps.all" | awk '{s += $1} END {print s}')
big_answered=$(field requests <"$TMP/big")
runs=$(wc -l <"$TMP/steps.all")
answered=$((answered - big_answered + 1))
slack=$(( (runs - 1) * CONNS ))
if [ "$applied" -lt "$answered" ] || [ "$applied" -gt $((answered + slack)) ]; then
    die "the sessions applied $applied steps for $answered answered"
fi
big_applied=$(session_step big0)
if [ "$big_applied" -lt "$big_answered" ] || [ "$big_applied" -gt $((big_answered + 1)) ]; then
    die "the 1M session applied $big_applied steps for $big_answered answered"
fi

# ------------------------------------------------------------------ report
# row LABEL CONNS FILE: the medians over the rounds of one configuration.
row() {
    printf '%s|%s|%s|%s|%s|%s|%s|%s\n' "$1" "$2" "$(median rps "$3")" "$(median p50_us "$3")" \
        "$(median p99_us "$3")" "$(median mean_us "$3")" "$(median wrk_p50_us "$3")" \
        "$(median wrk_p99_us "$3")"
}
{
    row "nginx: GET 4 KiB static file" 1 nginx.1
    row "optd: binary step, 1k Adam" 1 optd.1
    row "optd: binary GET params (floor)" 1 floor.1
    row "nginx: GET 4 KiB static file" $CONNS nginx.$CONNS
    row "optd: binary step, 1k Adam" $CONNS optd.$CONNS
    row "optd: binary GET params (floor)" $CONNS floor.$CONNS
} >"$TMP/table"

echo
echo "Same run, 127.0.0.1, wrk keep-alive, one connection per wrk thread; medians of"
echo "$REPS runs of ${DUR}s each.  optd step: POST a ${SMALL_N}-param float32 gradient,"
echo "binary params back, one Adam session per connection, committed before the answer."
echo "Latency: round trips timed by bench/http_step.lua; wrk p50/p99: wrk's own,"
echo "corrected for coordinated omission (stalls weigh more)."
echo
awk -F'|' 'BEGIN {
    printf "%-33s %5s %11s %9s %9s %9s %17s\n", "server: request", "conns", "requests/s",
        "p50 ms", "p99 ms", "mean ms", "wrk p50/p99 ms"
}
{
    printf "%-33s %5d %11.0f %9.3f %9.3f %9.3f %8.3f/%-8.3f\n", $1, $2, $3, $4 / 1000,
        $5 / 1000, $6 / 1000, $7 / 1000, $8 / 1000
}' "$TMP/table"
echo
awk -v line="$(cat "$TMP/big")" 'BEGIN {
    n = split(line, kv, " ")
    for (i = 2; i <= n; i++) { split(kv[i], p, "="); v[p[1]] = p[2] }
    printf "optd: binary step, 1M-param float32 Adam, 1 connection: %d steps in %.1f s,\n",
        v["requests"], v["duration_us"] / 1e6
    printf "      p50 %.2f ms, p99 %.2f ms, mean %.2f ms (%.1f steps/s)\n",
        v["p50_us"] / 1000, v["p99_us"] / 1000, v["mean_us"] / 1000, v["rps"]
}'
[ "$big_answered" -ge $BIG_MIN_STEPS ] ||
    echo "(only $big_answered 1M steps: raise OPTD_BENCH_BIG_SECONDS for a steadier p50)"
echo
awk -F'|' -v tl="$TARGET_LAT_RATIO" -v tr="$TARGET_RPS_SHARE" -v c="$CONNS" '
NR == 1 { ng_p50 = $4 } NR == 2 { op_p50 = $4 } NR == 4 { ng_rps = $3 } NR == 5 { op_rps = $3 }
END {
    lr = op_p50 / ng_p50; rs = op_rps / ng_rps
    printf "%-50s %9s %9s  %s\n", "target", "measured", "bound", "result"
    printf "%-50s %8.2fx %9s  %s\n", "1 conn: optd step p50 / nginx round-trip p50",
        lr, "<= " tl "x", (lr <= tl) ? "met" : "missed"
    printf "%-50s %8.1f%% %9s  %s\n", c " conns: optd steps/s / nginx requests/s",
        100 * rs, ">= " 100 * tr "%", (rs >= tr) ? "met" : "missed"
}' "$TMP/table"
echo
echo "checked: $applied steps applied for $answered answered on the 1k sessions, $big_applied for $big_answered on the 1M one"

# ------------------------------------------------------------------ profile
# On-CPU time of the daemon, callers included: the share of a step's CPU in
# each stage, then the flat list of the hottest functions.  DWARF unwinding,
# since Debian's libsqlite3 and libc have no frame pointers.
STAGES="on_request h_step srv_session_apply srv_reply_params storage_append sqlite3WalFrames
sqlite3WalCheckpoint fdatasync __libc_pread __libc_pwrite __libc_sendmsg __libc_recv epoll_wait"
if [ "$PROFILE" = 1 ]; then
    command -v perf >/dev/null 2>&1 || die "OPTD_BENCH_PROFILE=1 needs perf"
    for c in 1 $CONNS; do
        echo
        echo "--- perf: optd during ${DUR}s of 1k steps at $c connection(s), on-CPU time"
        perf record -q --call-graph dwarf,32768 -F 499 -p "$OPTD_PID" -o "$TMP/perf.$c.data" \
            -- sleep $((DUR + 1)) >/dev/null 2>&1 &
        PERF_PID=$!
        sleep 0.5
        run_wrk profile.$c step "$OPTD_URL" $c "$DUR" $SMALL_N s
        wait $PERF_PID
        PERF_PID=
        timeout 120 perf report -i "$TMP/perf.$c.data" --stdio --children --sort sym -g none \
            2>/dev/null >"$TMP/perf.$c.children"
        echo "stage (function and its callees)      share of optd CPU"
        awk -v stages="$STAGES" '
            BEGIN { n = split(stages, st, /[ \n]+/); for (i = 1; i <= n; i++) want[st[i]] = i }
            $3 == "[.]" && ($4 in want) && !(($4) in seen) { seen[$4] = $1 }
            END {
                for (i = 1; i <= n; i++)
                    if (st[i] in seen) printf "  %-36s %8s\n", st[i], seen[st[i]]
                # What the transaction spends outside the WAL: the statements
                # (log row, checkpoint row, dropping checkpointed gradients).
                rest = seen["storage_append"] - seen["sqlite3WalFrames"] - seen["sqlite3WalCheckpoint"]
                printf "  %-36s %7.2f%%\n", "storage_append minus WAL I/O", rest
            }
        ' "$TMP/perf.$c.children"
        echo "hottest functions (self time):"
        timeout 120 perf report -i "$TMP/perf.$c.data" --stdio --no-children --sort dso,sym \
            -g none --percent-limit 2 2>/dev/null | grep '%' | head -12
    done
fi
