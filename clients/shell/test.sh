#!/bin/sh
# The shell suite (tests/run.sh runs it from the repository root):
#   1. clients/shell/walkthrough.sh against a real daemon (port 0, temp db),
#      every answer checked, the parameters against an Adam reference;
#   2. the walkthrough fails loudly when no daemon answers;
#   3. README.md carries the walkthrough's commands verbatim, and README.md
#      and docs/optd.8 name every flag and variable of `optd --help`;
#      docs/optd.service only sets variables optd reads;
#   4. clients/shell/test_docker.sh: the Dockerfile against build/optd;
#   5. `make run` builds only the daemon and says where it listens.
# OPTD_BIN: the daemon (default build/optd).  Exits non-zero on any failure.
set -u
OPTD_BIN=${OPTD_BIN:-$PWD/build/optd}
PY=/usr/bin/python3
tmp=$(mktemp -d /tmp/optd-shell-test.XXXXXX)
pid=""

cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok - $*"; }
not_ok() { failed=$((failed + 1)); echo "not ok - $*"; }
check() {
    d=$1
    shift
    if "$@"; then ok "$d"; else not_ok "$d"; fi
}

if [ ! -x "$OPTD_BIN" ]; then
    echo "not ok - $OPTD_BIN is not built (make build)"
    exit 1
fi

# The daemon must see only the flags given here, not the caller's OPTD_*.
twins=$("$OPTD_BIN" --help | awk '$2 ~ /^OPTD_/ { print $2 }')
for t in $twins; do unset "$t"; done

# ------------------------------------------------------ 1. walkthrough
"$OPTD_BIN" --port 0 --db "$tmp/db/optd.db" >"$tmp/out" 2>"$tmp/err" &
pid=$!
url=""
i=0
while [ $i -lt 100 ] && [ -z "$url" ]; do
    url=$(sed -n 's/^optd listening on //p' "$tmp/out")
    [ -n "$url" ] || sleep 0.1
    i=$((i + 1))
done
if [ -z "$url" ]; then
    echo "not ok - optd did not start: $(cat "$tmp/err")"
    exit 1
fi
ok "optd listening on $url"

mkdir "$tmp/answers"
WALKTHROUGH_OUT="$tmp/answers" sh clients/shell/walkthrough.sh "$url" >"$tmp/walk.txt" 2>&1
rc=$?
check "walkthrough.sh exits 0 (rc $rc)" test $rc = 0

# Every answer, by number, and what the walkthrough printed.
if $PY - "$tmp/answers" "$tmp/walk.txt" <<'EOF'; then
import json, math, os, sys

d, printed = sys.argv[1], open(sys.argv[2]).read()
fails = []

def check(cond, what):
    print(("ok - " if cond else "not ok - ") + what)
    if not cond:
        fails.append(what)

def answer(i):
    """(status or None, headers dict, body text) of answer i."""
    path = os.path.join(d, "%02d" % i)
    if not os.path.exists(path):
        return None, {}, ""
    raw = open(path, "rb").read().decode()
    if raw.startswith("HTTP/"):
        head, _, body = raw.partition("\r\n\r\n")
        lines = head.split("\r\n")
        hdrs = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        return int(lines[0].split()[1]), hdrs, body
    return None, {}, raw

def js(i):
    try:
        return json.loads(answer(i)[2])
    except ValueError:
        return {}

def close(a, b, tol):
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))

# Adam (torch defaults, betas 0.9/0.999, eps 1e-8) in double: the reference.
def adam(p, steps):
    m = [0.0] * len(p); v = [0.0] * len(p); p = list(p); out = []
    for t, (g, lr) in enumerate(steps, 1):
        bc1, bc2 = 1 - 0.9 ** t, 1 - 0.999 ** t
        for i, gi in enumerate(g):
            m[i] = 0.9 * m[i] + 0.1 * gi
            v[i] = 0.999 * v[i] + 0.001 * gi * gi
            p[i] -= lr / bc1 * m[i] / (math.sqrt(v[i]) / math.sqrt(bc2) + 1e-8)
        out.append(list(p))
    return out

g1, g2, g3 = [0.5, -0.5, 1.0], [0.4, -0.6, 0.9], [0.3, -0.4, 0.8]
ref = adam([1.0, -2.0, 3.0], [(g1, 0.1), (g2, 0.1), (g3, 0.01)])

check(len(os.listdir(d)) == 11, "11 answers saved (got %d)" % len(os.listdir(d)))
check(js(1).get("status") == "ok", "01 /healthz answers status ok")

st, h, _ = answer(2); s = js(2)
check(st == 201, "02 PUT creates the session: 201 (got %s)" % st)
check(h.get("location") == "/v1/sessions/demo", "02 Location: /v1/sessions/demo")
check(s.get("step") == 0 and s.get("size") == 3 and s.get("dtype") == "float32",
      "02 new session: step 0, size 3, float32")
check(s.get("optimizer") == {"type": "adam", "lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-08,
                             "weight_decay": 0, "amsgrad": False, "maximize": False},
      "02 optimizer has torch's defaults filled in")
check(s.get("state", {}).get("buffers") == ["exp_avg", "exp_avg_sq"], "02 buffers exp_avg, exp_avg_sq")

s = js(3)
check(s.get("step") == 1 and s.get("lr") == 0.1, "03 first step: step 1, lr 0.1")
check(close(s.get("params", []), ref[0], 1e-6), "03 params match Adam: %s" % s.get("params"))

s4 = js(4)
check(s4.get("step") == 2 and close(s4.get("params", []), ref[1], 1e-6),
      "04 keyed step: step 2, params match Adam")

st, h, _ = answer(5); s = js(5)
check(st == 200 and h.get("optd-replayed") == "true", "05 retry with the same key: 200, Optd-Replayed: true")
check(s.get("step") == 2 and s.get("replayed") is True and s.get("params") == s4.get("params"),
      "05 retry answers step 2 and applies nothing")

s = js(6)
check(s.get("step") == 2 and s.get("params") == s4.get("params"), "06 GET params: step 2, same params")

s = js(7)
check(s.get("optimizer", {}).get("lr") == 0.01 and s.get("lr") == 0.01 and s.get("step") == 2,
      "07 PATCH: optimizer.lr and next lr are 0.01")

s = js(8)
check(s.get("step") == 3 and s.get("lr") == 0.01 and close(s.get("params", []), ref[2], 1e-6),
      "08 step after PATCH: step 3, lr 0.01, params match Adam")

s = js(9)
check(s.get("status") == 422 and s.get("field") == "grad" and
      str(s.get("type", "")).startswith("urn:optd:problem:"),
      "09 wrong gradient length: problem+json 422, field grad")

s = js(10); rows = s.get("steps", [])
check([r.get("step") for r in rows] == [1, 2, 3] and s.get("next") is None, "10 history: steps 1, 2, 3")
check([r.get("lr") for r in rows] == [0.1, 0.1, 0.01], "10 history: lr 0.1, 0.1, 0.01")
check([r.get("loss") for r in rows] == [2.5, 2.1, 1.8], "10 history: the reported losses")
norms = [math.sqrt(sum(x * x for x in g)) for g in (g1, g2, g3)]
check(close([r.get("grad_norm", 0) for r in rows], norms, 1e-6), "10 history: gradient norms")

st, _, _ = answer(11)
check(st == 204, "11 DELETE: 204 (got %s)" % st)

check('$ curl -sS "$OPTD/healthz"' in printed,
      "walkthrough prints each command before its answer")
sys.exit(1 if fails else 0)
EOF
    ok "walkthrough answers"
else
    not_ok "walkthrough answers (see above)"
fi

code=$(curl -sS -o /dev/null -w '%{http_code}' "$url/v1/sessions/demo")
check "the walkthrough's session is gone: 404 (got $code)" test "$code" = 404

kill -TERM "$pid"
wait "$pid"
rc=$?
pid=""
check "optd exits 0 on SIGTERM (rc $rc)" test $rc = 0

# ------------------------------------------- 2. no daemon, no success
sh clients/shell/walkthrough.sh "$url" >"$tmp/walk2.txt" 2>&1
rc=$?
check "walkthrough.sh fails when optd is not there (rc $rc)" test $rc != 0

# ------------------------------------------------- 2b. https and mTLS
# The walkthrough against a daemon started with --tls-cert, --tls-key and
# --tls-client-ca: OPTD_CACERT, OPTD_CERT and OPTD_KEY reach curl.
if sh tests/support/make_test_ca.sh "$tmp/ca" 2>"$tmp/ca.err"; then
    "$OPTD_BIN" --port 0 --db "$tmp/tls/optd.db" --tls-cert "$tmp/ca/server.pem" \
        --tls-key "$tmp/ca/server.key" --tls-client-ca "$tmp/ca/ca.pem" >"$tmp/tls.out" 2>"$tmp/tls.err" &
    pid=$!
    turl=""
    i=0
    while [ $i -lt 100 ] && [ -z "$turl" ]; do
        turl=$(sed -n 's/^optd listening on //p' "$tmp/tls.out")
        [ -n "$turl" ] || sleep 0.1
        i=$((i + 1))
    done
    case $turl in https://*) ;; *) turl="" ;; esac
    OPTD_CACERT="$tmp/ca/ca.pem" OPTD_CERT="$tmp/ca/client.pem" OPTD_KEY="$tmp/ca/client.key" \
        sh clients/shell/walkthrough.sh "$turl" >"$tmp/walk-tls.txt" 2>&1
    rc=$?
    check "walkthrough.sh over https with a client certificate exits 0 (rc $rc, $turl)" \
        sh -c "test $rc = 0 && test -n '$turl' && grep -q '\"status\":\"ok\"' '$tmp/walk-tls.txt'"
    OPTD_CACERT="$tmp/ca/ca.pem" sh clients/shell/walkthrough.sh "$turl" >/dev/null 2>&1
    rc=$?
    check "walkthrough.sh without the client certificate fails (rc $rc)" test $rc != 0
    OPTD_CACERT="$tmp/ca/other-ca.pem" OPTD_CERT="$tmp/ca/client.pem" OPTD_KEY="$tmp/ca/client.key" \
        sh clients/shell/walkthrough.sh "$turl" >/dev/null 2>&1
    rc=$?
    check "walkthrough.sh with the wrong CA fails (rc $rc)" test $rc != 0
    kill -TERM "$pid"
    wait "$pid"
    pid=""
else
    not_ok "make_test_ca.sh: $(cat "$tmp/ca.err")"
fi

# ------------------------------------------------------------ 3. docs
"$OPTD_BIN" --help >"$tmp/help"
if $PY - "$tmp/help" <<'EOF'; then
import re, sys

fails = []
def check(cond, what):
    print(("ok - " if cond else "not ok - ") + what)
    if not cond:
        fails.append(what)

script = open("clients/shell/walkthrough.sh").read()
readme = open("README.md").read()
blocks = re.findall(r"^run <<'EOF' \|\| fail\n(.*?)\nEOF$", script, re.S | re.M)
check(len(blocks) == 11, "walkthrough.sh has 11 commands (found %d)" % len(blocks))
for b in blocks:
    check(b in readme, "README.md has the command: " + b.splitlines()[0])

help_text = open(sys.argv[1]).read()
rows = re.findall(r"^  (--[a-z-]+) +(OPTD_[A-Z_]+)", help_text, re.M)
check(len(rows) >= 10, "optd --help lists flags with variables (%d)" % len(rows))
# troff source: \- is a hyphen; font escapes do not matter here.
man = re.sub(r"\\f[BIRP]", "", open("docs/optd.8").read()).replace("\\-", "-")
for flag, env in rows:
    check("`%s`" % flag in readme and "`%s`" % env in readme, "README.md documents %s / %s" % (flag, env))
    check(flag in man and env in man, "docs/optd.8 documents %s / %s" % (flag, env))

unit = open("docs/optd.service").read()
names = re.findall(r"\b(OPTD_[A-Z_]+)=", unit)
check(len(names) > 0, "docs/optd.service sets OPTD_* variables")
known = {e for _, e in rows}
for n in names:
    check(n in known, "docs/optd.service: %s is a variable optd reads" % n)
sys.exit(1 if fails else 0)
EOF
    ok "docs agree with the walkthrough and optd --help"
else
    not_ok "docs agree with the walkthrough and optd --help (see above)"
fi

# ---------------------------------------------------------- 4. docker
# ------------------------------------------------------- 5. make run
# What `make run` would do (make -n), in a build directory of its own: it
# compiles the daemon's sources only, and prints its banner.
make -n --no-print-directory run BUILD="$tmp/runbuild" OPTD_PORT=9123 >"$tmp/run.n" 2>&1
check "make run -n: compiles server/*.c" grep -q 'server/main.c' "$tmp/run.n"
check "make run -n: builds no test or benchmark" sh -c "! grep -E '^(cc|ar|rm) ' '$tmp/run.n' | grep -Eq 'tests/|bench/|cmocka'"
check "make run -n: needs no test package (cmocka)" sh -c "! grep -q 'libcmocka-dev' '$tmp/run.n'"
check "make run -n: ends by starting optd on the port" \
    sh -c "tail -n 1 '$tmp/run.n' | grep -q 'optd --port 9123 --db var/optd.db'"
check "make run -n: says where it serves and what to try next" \
    sh -c "grep -q 'serving http://127.0.0.1:9123' '$tmp/run.n' && grep -q 'second terminal' '$tmp/run.n'"

if sh clients/shell/test_docker.sh; then
    ok "test_docker.sh"
else
    not_ok "test_docker.sh (see above)"
fi

echo "shell: $passed passed, $failed failed"
[ "$failed" = 0 ]
