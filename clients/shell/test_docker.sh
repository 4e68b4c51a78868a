#!/bin/sh
# Checks the Dockerfile against the real build/optd, without a Docker engine:
#
#  (a) every shared library `ldd build/optd` resolves comes from a package
#      the runtime stage installs (or from their dependencies), or from the
#      base image's essential set; the runtime stage lists nothing that optd
#      does not load, and no build tools; the build stage installs the -dev
#      packages of every pkg-config module the Makefile links.
#  (b) the image's start command works when run directly: optd with the
#      image's ENV (bind 127.0.0.1, a temp db, port 0) and the API key that
#      docker-compose.yml sets, then the HEALTHCHECK command -> exit 0, and
#      after the daemon stops -> non-zero.  The same daemon is also run as
#      PID 1 of a new PID namespace (as in a container) and must stop
#      cleanly on SIGTERM sent from outside, as `docker stop` does.
#  (c) docker-compose.yml is parsed and interpolated by Debian's
#      docker-compose (`docker-compose config`, no engine needed).
#
# hadolint is packaged neither by Debian 12 nor on npm (the npm package of
# that name is a wrapper, not the linter), so the Dockerfile checks are the
# ones above and below: a fixed base image, apt lists removed in the same RUN,
# --no-install-recommends, a non-root USER, JSON-form ENTRYPOINT and
# HEALTHCHECK, and nothing installed that optd does not load.
#
# Run from the repository root: sh clients/shell/test_docker.sh
# OPTD_BIN: the daemon (default build/optd).
set -u
OPTD_BIN=${OPTD_BIN:-$PWD/build/optd}
PY=/usr/bin/python3
tmp=$(mktemp -d /tmp/optd-docker-test.XXXXXX)
pid=""
upid=""

cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
    [ -n "$upid" ] && kill -KILL "$upid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok - $*"; }
not_ok() { failed=$((failed + 1)); echo "not ok - $*"; }
# check DESCRIPTION COMMAND...: passes when the command exits 0.
check() {
    d=$1
    shift
    if "$@"; then ok "$d"; else not_ok "$d"; fi
}

if [ ! -x "$OPTD_BIN" ]; then
    echo "not ok - $OPTD_BIN is not built (make build)"
    exit 1
fi

APT_DEPENDS="apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances"

# ------------------------------------------------------------ parse
# The Dockerfile as simple "kind value" lines: one per package of each
# stage's apt-get install, per ENV pair, per HEALTHCHECK/ENTRYPOINT argument.
$PY - Dockerfile >"$tmp/df" <<'EOF' || { echo "not ok - cannot parse Dockerfile"; exit 1; }
import json, shlex, sys

lines, cur = [], ""
for raw in open(sys.argv[1], encoding="utf-8"):
    s = raw.strip()
    if s.startswith("#") or (not cur and not s):
        continue
    if s.endswith("\\"):
        cur += s[:-1] + " "
        continue
    lines.append(cur + s)
    cur = ""
if cur:
    lines.append(cur)

stages = []
for line in lines:
    instr, _, rest = line.partition(" ")
    instr, rest = instr.upper(), rest.strip()
    if instr == "FROM":
        stages.append({"from": rest.split()[0], "i": []})
    elif stages:
        stages[-1]["i"].append((instr, rest))
if len(stages) < 2:
    sys.exit("need a build stage and a runtime stage")

def apt_packages(stage):
    pkgs = []
    for instr, rest in stage["i"]:
        if instr != "RUN":
            continue
        for seg in rest.replace(";", "&&").split("&&"):
            words = shlex.split(seg)
            if "apt-get" in words:
                w = words[words.index("apt-get") + 1:]
                if w and w[0] == "install" or "install" in w[:3]:
                    w = w[w.index("install") + 1:]
                    pkgs += [p for p in w if not p.startswith("-")]
    return pkgs

# hadolint's apt rules (DL3009, DL3015, DL3027 and update-with-install):
# every RUN that installs with apt-get updates, installs without
# recommends and removes the lists in the same layer.
for st in stages:
    for instr, rest in st["i"]:
        if instr == "RUN" and "apt-get" in rest and " install" in rest:
            print("apt_update", "yes" if "apt-get update" in rest else "no")
            print("apt_norec", "yes" if "--no-install-recommends" in rest else "no")
            print("apt_lists", "yes" if "rm -rf /var/lib/apt/lists/*" in rest else "no")
        if instr == "RUN" and rest.split()[:1] == ["apt"]:
            print("apt_norec", "no")

build, run = stages[0], stages[-1]
print("build_from", build["from"])
print("run_from", run["from"])
for p in apt_packages(build):
    print("build_pkg", p)
for p in apt_packages(run):
    print("run_pkg", p)
for instr, rest in run["i"]:
    if instr == "ENV":
        words = shlex.split(rest)
        if words and "=" not in words[0]:
            words = [words[0] + "=" + " ".join(words[1:])]
        for w in words:
            k, _, v = w.partition("=")
            print("env", k, v)
    elif instr == "HEALTHCHECK":
        cmd = rest[rest.index("CMD") + 3:].strip()
        for a in json.loads(cmd):
            print("health_arg", a)
    elif instr == "ENTRYPOINT":
        for a in json.loads(rest):
            print("entry_arg", a)
    elif instr == "COPY" and "--from=" in rest:
        print("copy_to", rest.split()[-1])
    elif instr in ("EXPOSE", "VOLUME", "USER"):
        print(instr.lower(), rest)
EOF

field() { sed -n "s/^$1 //p" "$tmp/df"; }
run_pkgs=$(field run_pkg)
build_pkgs=$(field build_pkg)
in_list() { printf '%s\n' "$2" | grep -qx "$1"; }

# ------------------------------------------------------- (a) packages
check "both stages start from debian:bookworm-slim" \
    test "$(field build_from)" = "debian:bookworm-slim" -a "$(field run_from)" = "debian:bookworm-slim"
check "the runtime stage installs packages with apt-get" test -n "$run_pkgs"
for k in apt_update apt_norec apt_lists; do
    check "every apt-get install RUN passes $k" sh -c "! sed -n 's/^$k //p' '$tmp/df' | grep -qv yes"
done

# What the runtime stage's packages bring, dependencies included.
# shellcheck disable=SC2086 # word lists
if $APT_DEPENDS $run_pkgs >"$tmp/run_closure.raw" 2>"$tmp/apt.err"; then
    grep -v '^ ' "$tmp/run_closure.raw" | grep -v '^<' | sort -u >"$tmp/run_closure"
    ok "apt-cache knows every runtime package ($(echo "$run_pkgs" | tr '\n' ' '))"
else
    not_ok "apt-cache depends on the runtime packages: $(cat "$tmp/apt.err")"
    : >"$tmp/run_closure"
fi
# The base image: Debian's essential packages and what they depend on.
essential=$(dpkg-query -W -f='${Package} ${Essential}\n' | awk '$2 == "yes" { print $1 }')
# shellcheck disable=SC2086
$APT_DEPENDS $essential 2>/dev/null | grep -v '^ ' | grep -v '^<' | sort -u >"$tmp/base"
check "the essential set includes libc6" grep -qx libc6 "$tmp/base"

# Resolved libraries -> owning packages.
ldd "$OPTD_BIN" >"$tmp/ldd" 2>&1
check "ldd resolves every library of optd" sh -c "! grep -q 'not found' '$tmp/ldd'"
awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' "$tmp/ldd" >"$tmp/libs"
check "ldd lists optd's libraries" test -s "$tmp/libs"

# The owning package of each file (as given, /usr-merged twin, symlink
# target), in one dpkg call since each call reads the whole file database.
# Prints "package path" lines for the files of stdin.
owners() {
    cat >"$tmp/files"
    while read -r f; do
        for g in "$f" "$(readlink -f "$f")"; do
            echo "$g"
            case $g in /usr/*) echo "${g#/usr}" ;; *) echo "/usr$g" ;; esac
        done
    done <"$tmp/files" | sort -u >"$tmp/candidates"
    # shellcheck disable=SC2046 # one argument per candidate path
    dpkg -S $(cat "$tmp/candidates") 2>/dev/null | grep -v '^diversion' |
        sed -n 's/^\([^:]*\):[^:]*: \(.*\)$/\1 \2/p' >"$tmp/owned"
    while read -r f; do
        r=$(readlink -f "$f")
        p=$(awk -v a="$f" -v b="/usr$f" -v c="${f#/usr}" -v d="$r" -v e="/usr$r" -v g="${r#/usr}" \
            '$2 == a || $2 == b || $2 == c || $2 == d || $2 == e || $2 == g { print $1; exit }' "$tmp/owned")
        echo "${p:-?} $f"
    done <"$tmp/files"
}
owner() { echo "$1" | owners | cut -d' ' -f1 | grep -v '^?$'; }

: >"$tmp/used_pkgs"
owners <"$tmp/libs" >"$tmp/lib_owners"
check "every library has an owner line" test "$(wc -l <"$tmp/lib_owners")" = "$(wc -l <"$tmp/libs")"
while read -r pkg lib; do
    if [ "$pkg" = "?" ]; then
        not_ok "no package owns $lib"
        continue
    fi
    echo "$pkg" >>"$tmp/used_pkgs"
    if grep -qx "$pkg" "$tmp/base"; then
        ok "$lib ($pkg) is in the base image's essential set"
    elif grep -qx "$pkg" "$tmp/run_closure"; then
        ok "$lib ($pkg) comes with the runtime stage's packages"
    else
        not_ok "$lib ($pkg) is neither installed by the runtime stage nor in the base image"
    fi
done <"$tmp/lib_owners"

# Nothing extra: each listed package is loaded by optd, no build tools.
for p in $run_pkgs; do
    check "runtime package $p provides a library optd loads" grep -qx "$p" "$tmp/used_pkgs"
    case $p in
    *-dev | gcc* | make | pkg-config | curl | ca-certificates) not_ok "runtime stage installs build or network tool $p" ;;
    esac
done

# Build stage: the compiler, and the -dev package of every pkg-config module
# the Makefile links (plus cmocka, which `make build` needs for the tests).
for p in gcc libc6-dev make pkg-config; do
    check "build stage installs $p" in_list "$p" "$build_pkgs"
done
modules="$(sed -n 's/^PKGS *:= *//p' Makefile) cmocka"
for m in $modules; do
    pc="$(pkg-config --variable=pcfiledir "$m" 2>/dev/null)/$m.pc"
    dev=$(owner "$pc")
    if [ -z "$dev" ]; then
        not_ok "pkg-config module $m is not installed here"
    else
        check "build stage installs $dev (pkg-config $m)" in_list "$dev" "$build_pkgs"
    fi
done

# The runtime stage's shape.
user=$(field user)
check "runtime runs as a non-root user ($user)" sh -c "test -n '$user' && ! echo '$user' | grep -Eq '^(root|0)(:|$)'"
check "runtime declares VOLUME /var/lib/optd" test "$(field volume)" = "/var/lib/optd"
check "runtime declares EXPOSE 8080" test "$(field expose)" = "8080"
check "ENV OPTD_BIND=0.0.0.0" grep -qx "env OPTD_BIND 0.0.0.0" "$tmp/df"
check "ENV OPTD_DB is in the volume" grep -qx "env OPTD_DB /var/lib/optd/.*" "$tmp/df"
check "ENTRYPOINT is [\"optd\"]" test "$(field entry_arg)" = "optd"
check "the binary is copied onto PATH as optd" test "$(field copy_to)" = "/usr/local/bin/optd"
check "HEALTHCHECK runs optd --check-health" test "$(field health_arg | head -n 2 | tr '\n' ' ')" = "optd --check-health "

# docker-compose.yml, read by Debian's docker-compose (`config` parses,
# validates and interpolates the file; it needs no engine).
if command -v docker-compose >/dev/null 2>&1; then
    if (unset OPTD_API_KEY; docker-compose -f docker-compose.yml config) >"$tmp/compose.out" 2>&1; then
        not_ok "docker-compose config without OPTD_API_KEY must fail"
    else
        check "docker-compose config without OPTD_API_KEY names the variable" \
            grep -q "set OPTD_API_KEY" "$tmp/compose.out"
    fi
    if OPTD_API_KEY=compose-key docker-compose -f docker-compose.yml config >"$tmp/compose.yml" 2>"$tmp/compose.err"; then
        ok "docker-compose config accepts docker-compose.yml"
        $PY - "$tmp/compose.yml" >"$tmp/compose" <<'EOF2' || not_ok "docker-compose config output: $(cat "$tmp/compose")"
import sys, yaml
c = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
s = c["services"]["optd"]
env = s.get("environment") or {}
print("key", env.get("OPTD_API_KEY", ""))
for p in s.get("ports", []):
    print("port", p)
for v in s.get("volumes", []):
    src, _, rest = v.partition(":")
    print("volume", src, rest.split(":")[0])
for name in (c.get("volumes") or {}):
    print("declared", name)
print("build", "yes" if s.get("build") else "no")
EOF2
        cfield() { sed -n "s/^$1 //p" "$tmp/compose"; }
        check "compose passes OPTD_API_KEY through" test "$(cfield key)" = compose-key
        vol=$(cfield volume | awk '$2 == "/var/lib/optd" { print $1 }')
        check "compose mounts a named volume on /var/lib/optd ($vol)" test -n "$vol"
        check "compose declares the volume $vol" in_list "$vol" "$(cfield declared)"
        check "compose publishes 8080 on the host's loopback only" \
            sh -c "printf '%s\n' \"$(cfield port)\" | grep -Eq '^127\.0\.0\.1:8080:8080(/tcp)?$'"
        check "compose builds the image from this Dockerfile" test "$(cfield build)" = yes
    else
        not_ok "docker-compose config rejects docker-compose.yml: $(cat "$tmp/compose.err")"
    fi
else
    not_ok "docker-compose is not installed (make deps-test)"
fi
check ".dockerignore keeps the host's build/ out of the image" grep -qx build .dockerignore

# ------------------------------------------------- (b) start command
# Every OPTD_* variable optd reads, from its own --help.
twins=$("$OPTD_BIN" --help | awk '$2 ~ /^OPTD_/ { print $2 }')
for k in $(field env | cut -d' ' -f1); do
    check "ENV $k is one of optd's variables" in_list "$k" "$twins"
done

# The container's environment, in the calling (sub)shell: the image's ENV
# with the address, database and port a test can use, plus the compose
# file's API key.  Callers run it inside ( ... ) so the test's own
# environment stays clean.
container_env() {
    for t in $twins; do unset "$t"; done
    field env >"$tmp/env"
    while read -r k v; do export "$k=$v"; done <"$tmp/env"
    export OPTD_BIND=127.0.0.1 OPTD_DB="$tmp/volume/optd.db" OPTD_PORT=0 OPTD_API_KEY=test-key
}

wait_listening() { # FILE -> prints the URL, or fails after 10 s
    i=0
    while [ $i -lt 100 ]; do
        u=$(sed -n 's/^optd listening on //p' "$1")
        if [ -n "$u" ]; then
            echo "$u"
            return 0
        fi
        i=$((i + 1))
        sleep 0.1
    done
    return 1
}

# The HEALTHCHECK's argv with this build's path and the test's port.
health() { # PORT
    set --
    first=1
    for a in $(field health_arg); do
        if [ $first = 1 ]; then
            set -- "$OPTD_BIN"
            first=0
        else
            set -- "$@" "$(echo "$a" | sed "s#^http://127.0.0.1:8080#http://127.0.0.1:$port#")"
        fi
    done
    (container_env && exec "$@")
}

entry_args=$(field entry_arg | tail -n +2)
# shellcheck disable=SC2086 # the entrypoint's extra arguments, word-split
(container_env && exec "$OPTD_BIN" $entry_args) >"$tmp/out" 2>"$tmp/err" &
pid=$!
if url=$(wait_listening "$tmp/out"); then
    ok "optd starts with the image's ENV: $url"
    port=${url##*:}
    check "optd created its database at OPTD_DB" test -f "$tmp/volume/optd.db"
    code=$(curl -sS -o /dev/null -w '%{http_code}' "$url/v1/optimizers")
    check "without the compose file's API key: 401 (got $code)" test "$code" = 401
    code=$(curl -sS -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer test-key' "$url/v1/optimizers")
    check "with the API key: 200 (got $code)" test "$code" = 200
    health "$port" >"$tmp/health" 2>&1
    rc=$?
    check "HEALTHCHECK command exits 0 while optd runs (rc $rc: $(cat "$tmp/health"))" test $rc = 0
    kill -TERM "$pid"
    wait "$pid"
    rc=$?
    pid=""
    check "optd exits 0 on SIGTERM (rc $rc)" test $rc = 0
    check "optd logged a clean stop" grep -q ' stopped$' "$tmp/err"
    health "$port" >"$tmp/health" 2>&1
    rc=$?
    check "HEALTHCHECK command fails once optd has stopped (rc $rc)" test $rc != 0
else
    not_ok "optd did not start with the image's ENV: $(cat "$tmp/err")"
fi

# As PID 1 of its own PID namespace, like the container's init process:
# SIGTERM from the parent namespace (docker stop) must still stop it.
rm -f "$tmp/out" "$tmp/err"
(container_env && exec unshare --user --map-root-user --pid --fork "$OPTD_BIN") >"$tmp/out" 2>"$tmp/err" &
upid=$!
if url=$(wait_listening "$tmp/out"); then
    child=$(awk '{ print $1 }' "/proc/$upid/task/$upid/children" 2>/dev/null)
    nspid=$(awk '/^NSpid:/ { print $NF }' "/proc/$child/status" 2>/dev/null)
    check "optd runs as PID 1 of its namespace (NSpid $nspid)" test "$nspid" = 1
    kill -TERM "$child"
    wait "$upid"
    rc=$?
    upid=""
    check "optd as PID 1 exits 0 on SIGTERM (rc $rc)" test $rc = 0
    check "optd as PID 1 logged a clean stop" grep -q ' stopped$' "$tmp/err"
else
    not_ok "optd did not start under unshare --pid: $(cat "$tmp/err")"
fi

echo "docker: $passed passed, $failed failed"
[ "$failed" = 0 ]
