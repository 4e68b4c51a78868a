#!/usr/bin/python3
"""bench/engine.py -- the step engine against same-run floors (make bench-engine).

    /usr/bin/python3 bench/engine.py            the full table (bench/ENGINE.md)
    /usr/bin/python3 bench/engine.py --quick    short runs, to check the script
    options: --no-1e8 (skip the 1e8 rows), --rounds N, --seconds S (wrk runs)
    environment: OPTD_BIN (default build/optd), OPTD_STEPLOAD (build/bench/stepload),
                 OPTD_BENCH_BASELINE_BIN: a daemon built before the engine rewrite;
                 when given, its --durability full rate is measured in the same run.

Every row is measured beside its floor in the same run, on 127.0.0.1 only:

  large binary steps (1e6, 1e7, 1e8 float32 Adam, one connection): build/bench/stepload
      alternates one floor (POST 4n bytes to nginx, GET a 4n-byte file from nginx,
      one optim_step over n, a plain append of 4n bytes to a file) and one step of
      the daemon (4n bytes up, the 4n-byte params answered), on keep-alive connections.
  1k binary step, 16 sessions, JSON step: wrk + bench/http_step.lua against nginx
      serving a 4 KiB file, interleaved rounds, medians (as bench/http.sh).
  --durability full: 16 sessions x 1 connection against the raw fdatasync rate of
      the disk the database is on (4 KiB pwrite + fdatasync in a loop).
  restart: a 1M session stepped 1,000 times, kill -9, the daemon started again and
      one step sent: the time from starting the daemon to that step's answer,
      against reading the session's files + a kernel pass per replayed step + the
      1M row's live step p50.
  peak RSS: VmHWM of each daemon (one daemon per large size, so the peak is the row's).

Servers are stopped by PID on every exit path. Exits 1 when a server does not
start or a request fails; a missed target is printed, not an error.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTD = os.environ.get("OPTD_BIN", os.path.join(ROOT, "build", "optd"))
STEPLOAD = os.environ.get("OPTD_STEPLOAD", os.path.join(ROOT, "build", "bench", "stepload"))
BASELINE = os.environ.get("OPTD_BENCH_BASELINE_BIN", "")
LUA = os.path.join(ROOT, "bench", "http_step.lua")

SMALL_N = 1000
CONNS = 16
STATIC_BYTES = 4096
MIB = 1024 * 1024

started = []  # Popen objects we own, stopped by PID at exit
TMP = None


def log(msg):
    print("bench/engine: " + msg, file=sys.stderr, flush=True)


def die(msg):
    log(msg)
    cleanup()
    sys.exit(1)


def stop(p, sig=signal.SIGTERM):
    if p.poll() is not None:
        return
    try:
        os.kill(p.pid, sig)
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    except ProcessLookupError:
        pass


def cleanup():
    for p in started:
        stop(p)
    started.clear()
    if TMP:
        subprocess.run(["rm", "-rf", TMP])


def load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ------------------------------------------------------------------ servers

def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_nginx(files):
    """nginx in the foreground: /static.bin (4 KiB), /big<n>.bin, and /sink,
    which reads a POSTed body whole (the mirror module reads it before the
    content phase) and answers 200 with a 2-byte file."""
    www = os.path.join(TMP, "www")
    os.makedirs(www, exist_ok=True)
    os.makedirs(os.path.join(TMP, "nginx-tmp"), exist_ok=True)
    os.chmod(TMP, 0o755)
    os.chmod(www, 0o755)
    with open(os.path.join(www, "static.bin"), "wb") as f:
        f.write(os.urandom(STATIC_BYTES))
    for name in ("ok.txt", "sink"):
        with open(os.path.join(www, name), "wb") as f:
            f.write(b"ok")
    pat = bytes.fromhex("0ad7233c 0ad7a3bc 0ad7a33b 6f1283ba".replace(" ", ""))
    for name, size in files.items():
        with open(os.path.join(www, name), "wb") as f:
            chunk = pat * (MIB // len(pat))
            left = size
            while left > 0:
                f.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
    for name in os.listdir(www):
        os.chmod(os.path.join(www, name), 0o644)
    for _ in range(3):
        port = free_port()
        conf = os.path.join(TMP, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1;
daemon off;
pid {TMP}/nginx.pid;
error_log {TMP}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log {TMP}/nginx-access.log;
    client_body_temp_path {TMP}/nginx-tmp/body;
    proxy_temp_path {TMP}/nginx-tmp/proxy;
    fastcgi_temp_path {TMP}/nginx-tmp/fastcgi;
    uwsgi_temp_path {TMP}/nginx-tmp/uwsgi;
    scgi_temp_path {TMP}/nginx-tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000000;
    client_max_body_size 0;
    client_body_buffer_size 512m;
    server {{
        listen 127.0.0.1:{port};
        root {www};
        location = /sink {{
            mirror /mirror;
            error_page 405 =200 /ok.txt;
        }}
        location = /mirror {{ internal; return 204; }}
    }}
}}
""")
        p = subprocess.Popen(["nginx", "-p", TMP, "-c", conf, "-e", TMP + "/nginx-error.log"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(p)
        for _ in range(50):
            if p.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/static.bin", timeout=2).read()
                return p, port
            except OSError:
                time.sleep(0.1)
        stop(p)
    die("nginx did not start")


def start_optd(db, durability="normal", extra=(), binary=None):
    out = open(db + ".out", "w")
    err = open(db + ".err", "w")
    p = subprocess.Popen([binary or OPTD, "--port", "0", "--db", db, "--durability", durability]
                         + list(extra), stdout=out, stderr=err)
    started.append(p)
    for _ in range(600):
        with open(db + ".out") as f:
            m = re.search(r"optd listening on http://127\.0\.0\.1:(\d+)", f.read())
        if m:
            return p, int(m.group(1))
        if p.poll() is not None:
            break
        time.sleep(0.05)
    with open(db + ".err") as f:
        sys.stderr.write(f.read())
    die("optd did not start")


def create_session(port, name, n):
    body = json.dumps({"optimizer": {"type": "adam", "lr": 0.001}, "dtype": "float32",
                       "size": n, "init": {"type": "normal", "std": 0.1, "seed": 7}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/sessions/{name}", data=body,
                                 method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        if r.status != 201:
            die(f"creating {name} answered {r.status}")


def session_step(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/sessions/{name}", timeout=600) as r:
        return json.loads(r.read())["step"]


def peak_rss(p):
    with open(f"/proc/{p.pid}/status") as f:
        m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    return int(m.group(1)) * 1024


# ------------------------------------------------------------------ tools

def parse_results(text):
    """RESULT lines -> {what: {key: float}}"""
    res = {}
    for line in text.splitlines():
        if not line.startswith("RESULT "):
            continue
        kv = dict(x.split("=", 1) for x in line.split()[1:])
        what = kv.pop("what", "wrk")
        res[what] = {k: float(v) for k, v in kv.items()}
    return res


def stepload(*args, timeout=3600):
    r = subprocess.run([STEPLOAD] + [str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        die("stepload " + " ".join(str(a) for a in args[:1]) + " failed")
    return parse_results(r.stdout)


def wrk(mode, url, conns, secs, params="", prefix=""):
    env = dict(os.environ, BENCH_MODE=mode, BENCH_PARAMS=str(params), BENCH_PREFIX=prefix)
    r = subprocess.run(["wrk", "-t", str(conns), "-c", str(conns), "-d", f"{secs}s",
                        "--timeout", "10s", "-s", LUA, url], capture_output=True, text=True,
                       env=env, timeout=secs + 60)
    res = parse_results(r.stdout).get("wrk")
    if not res:
        sys.stderr.write(r.stdout + r.stderr)
        die(f"wrk ({mode}) gave no result")
    if res["status_errors"] or res["socket_errors"]:
        sys.stderr.write(r.stdout)
        die(f"requests failed in a wrk {mode} run")
    return res


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def med_runs(runs):
    return {k: median([r[k] for r in runs]) for k in runs[0]}


# ------------------------------------------------------------------ rows

ROWS = []      # (measure, optd, floor, ratio text, target text, verdict)
NOTES = []
PROFILE = False
PROFILES = []  # (label, perf report excerpt)


class profiled:
    """perf record of one daemon while a part runs (--profile): afterwards the
    hottest functions by self time, and by time including callees."""

    def __init__(self, p, label):
        self.p, self.label, self.perf = p, label, None

    def __enter__(self):
        if PROFILE:
            self.data = os.path.join(TMP, f"perf.{len(PROFILES)}.data")
            self.perf = subprocess.Popen(["perf", "record", "-q", "-g", "-F", "499", "-p",
                                          str(self.p.pid), "-o", self.data],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(self.perf)
            time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        if not self.perf:
            return False
        self.perf.send_signal(signal.SIGINT)
        try:
            self.perf.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop(self.perf)
        started.remove(self.perf)
        out = []
        for args in (["--no-children", "--sort", "dso,sym", "--percent-limit", "1.5"],
                     ["--children", "--sort", "sym", "--percent-limit", "4"]):
            r = subprocess.run(["perf", "report", "-i", self.data, "--stdio", "-g", "none"]
                               + args, capture_output=True, text=True, timeout=300)
            lines = [x for x in r.stdout.splitlines() if "%" in x and not x.startswith("#")]
            if "--children" in args:
                lines = [x for x in lines if "[.]" in x][:20]
            out.append("\n".join(lines[:25]))
        PROFILES.append((self.label, "self:\n" + out[0] + "\nchildren:\n" + out[1]))
        return False


def row(measure, optd, floor, ratio, target, ok):
    verdict = "-" if ok is None else ("met" if ok else "MISSED")
    ROWS.append((measure, optd, floor, ratio, target, verdict))


def gb(b):
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / MIB:.0f} MiB"


def big_row(n, iters, nginx_port, label):
    db = os.path.join(TMP, f"big{n}.db")
    state = 12 * n
    cache_mb = max(1024, 4 * state // MIB)
    p, port = start_optd(db, extra=["--cache-mb", str(cache_mb)])
    t0 = time.time()
    create_session(port, "b", n)
    create_s = time.time() - t0
    log(f"{label}: session created in {create_s:.1f} s; {iters} rounds of floor + step")
    with profiled(p, f"{label} binary steps, 1 conn"):
        res = stepload("big", "--step", f"http://127.0.0.1:{port}/v1/sessions/b/step",
                   "--sink", f"http://127.0.0.1:{nginx_port}/sink",
                   "--file", f"http://127.0.0.1:{nginx_port}/big{n}.bin", "--n", n,
                       "--iters", iters, "--warmup", 1,
                       "--append", os.path.join(TMP, "append.bin"))
    rss = peak_rss(p)
    steps = session_step(port, "b")
    if steps != iters + 1:
        die(f"{label}: the session applied {steps} steps for {iters + 1} answered")
    o, f = res["optd"], res["floor"]
    rp, rm = o["p50_ms"] / f["p50_ms"], o["mean_ms"] / f["mean_ms"]
    row(f"{label} fp32 Adam binary step, 1 conn (params answered); {iters} steps",
        f"p50 {o['p50_ms']:.1f} ms, mean {o['mean_ms']:.1f}, p99 {o['p99_ms']:.1f};"
        f" peak RSS {gb(rss)} ({rss / state:.2f}x state)",
        f"p50 {f['p50_ms']:.1f} ms, mean {f['mean_ms']:.1f} (post {res['post']['p50_ms']:.1f}"
        f" + get {res['get']['p50_ms']:.1f} + kernel {res['kernel']['p50_ms']:.1f}"
        f" + append {res['append']['p50_ms']:.1f})",
        f"p50 {rp:.2f}x, mean {rm:.2f}x", "<= 1.5x", rp <= 1.5 and rm <= 1.5)
    if n >= 100000000:
        bound = 1.3 * state + 4 * n
        row(f"{label}: create + steps: peak RSS of the daemon (state {gb(state)}, body"
            f" {gb(4 * n)}; created in {create_s:.1f} s)", gb(rss),
            f"1.3 x state + body = {gb(bound)}", f"{rss / bound:.2f}x the bound",
            "<= 1.3 x state + body", rss <= bound)
    return p, port, db, res


def restart_1e8(p, port, db, n):
    """kill -9 of the stepped 1e8 session, start again, one step: peak RSS."""
    state = 12 * n
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    started.remove(p)
    t0 = time.time()
    p, port = start_optd(db, extra=["--cache-mb", str(max(1024, 4 * state // MIB))])
    res = stepload("steps", "--step", f"http://127.0.0.1:{port}/v1/sessions/b/step",
                   "--n", n, "--count", 1)
    first = time.time() - t0
    rss = peak_rss(p)
    bound = 1.3 * state + 4 * n
    row("1e8: kill -9, restart, first step: peak RSS of the restarted daemon",
        f"{gb(rss)} (first step answered {first:.1f} s after start)",
        f"1.3 x state + body = {gb(bound)}", f"{rss / bound:.2f}x the bound",
        "<= 1.3 x state + body", rss <= bound)
    stop(p)
    started.remove(p)
    return res


def small_rows(nginx_port, rounds, secs):
    db = os.path.join(TMP, "small.db")
    p, port = start_optd(db)
    for i in range(CONNS):
        create_session(port, f"s{i}", SMALL_N)
    url = f"http://127.0.0.1:{port}"
    ng = f"http://127.0.0.1:{nginx_port}/static.bin"
    warm = [wrk("step", url, 1, 1, SMALL_N, "s"), wrk("json", url, 1, 1, SMALL_N, "s")]
    wrk("get", ng, 1, 1)
    runs = {k: [] for k in ("ng1", "op1", "js1", "ng16", "op16")}
    answered = 0
    for r in range(rounds):
        log(f"1k rows: round {r + 1} of {rounds} (load {load()})")
        runs["ng1"].append(wrk("get", ng, 1, secs))
        runs["op1"].append(wrk("step", url, 1, secs, SMALL_N, "s"))
        runs["js1"].append(wrk("json", url, 1, secs, SMALL_N, "s"))
        runs["ng16"].append(wrk("get", ng, CONNS, secs))
        runs["op16"].append(wrk("step", url, CONNS, secs, SMALL_N, "s"))
    if PROFILE:
        for mode, c, label in (("step", 1, "1k binary steps, 1 conn"),
                               ("json", 1, "JSON steps, 1k, 1 conn"),
                               ("step", CONNS, "1k binary steps, 16 conns, normal")):
            with profiled(p, label):
                warm.append(wrk(mode, url, c, secs, SMALL_N, "s"))
    rss = peak_rss(p)
    m = {k: med_runs(v) for k, v in runs.items()}
    # Every answered step is an applied step (at most one in flight per
    # connection when a run stopped).
    all_runs = warm + [x for k in ("op1", "js1", "op16") for x in runs[k]]
    answered = sum(x["requests"] for x in all_runs)
    applied = sum(session_step(port, f"s{i}") for i in range(CONNS))
    if not answered <= applied <= answered + CONNS * len(all_runs):
        die(f"the 1k sessions applied {applied} steps for {answered:.0f} answered")
    stop(p)
    started.remove(p)
    ng1, op1, js1 = m["ng1"], m["op1"], m["js1"]
    rp, rm = op1["p50_us"] / ng1["p50_us"], op1["mean_us"] / ng1["mean_us"]
    p99 = op1["p99_us"] / 1000
    row("1k binary step, 1 conn",
        f"p50 {op1['p50_us'] / 1000:.3f} ms, mean {op1['mean_us'] / 1000:.3f}, p99 {p99:.3f}"
        f" ({op1['rps']:.0f}/s)",
        f"nginx 4 KiB GET: p50 {ng1['p50_us'] / 1000:.3f} ms, mean {ng1['mean_us'] / 1000:.3f},"
        f" p99 {ng1['p99_us'] / 1000:.3f}",
        f"p50 {rp:.2f}x, mean {rm:.2f}x, p99 {p99:.2f} ms",
        "p50 <= 1.25x, mean <= 1.5x, p99 <= 3 ms", rp <= 1.25 and rm <= 1.5 and p99 <= 3)
    share = m["op16"]["rps"] / m["ng16"]["rps"]
    row("1k binary steps, 16 sessions x 1 conn, --durability normal",
        f"{m['op16']['rps']:.0f} steps/s (p50 {m['op16']['p50_us'] / 1000:.2f} ms, p99"
        f" {m['op16']['p99_us'] / 1000:.2f})",
        f"nginx {m['ng16']['rps']:.0f} req/s", f"{100 * share:.1f}%", ">= 50%", share >= 0.5)
    jp, jm = js1["p50_us"] / ng1["p50_us"], js1["mean_us"] / ng1["mean_us"]
    row("JSON step, 1k params, 1 conn",
        f"p50 {js1['p50_us'] / 1000:.3f} ms, mean {js1['mean_us'] / 1000:.3f}, p99"
        f" {js1['p99_us'] / 1000:.3f}",
        f"nginx 4 KiB GET (same rounds): p50 {ng1['p50_us'] / 1000:.3f} ms, mean"
        f" {ng1['mean_us'] / 1000:.3f}", f"p50 {jp:.2f}x, mean {jm:.2f}x", "<= 3x",
        jp <= 3 and jm <= 3)
    NOTES.append(f"1k daemon (16 sessions of 1k): peak RSS {gb(rss)}")
    return m


def full_rows(nginx_rps16, rounds, secs):
    res = stepload("fsync", "--path", os.path.join(TMP, "fsync.bin"), "--seconds", 3)
    rate = res["fsync"]["rate"]
    figures = {}
    daemons = [("optd", OPTD)]
    if BASELINE:
        daemons.append(("pre-rewrite", BASELINE))
    for name, binary in daemons:
        db = os.path.join(TMP, f"full-{name}.db")
        p, port = start_optd(db, "full", binary=binary)
        for i in range(CONNS):
            create_session(port, f"s{i}", SMALL_N)
        url = f"http://127.0.0.1:{port}"
        wrk("step", url, CONNS, 1, SMALL_N, "s")
        runs = []
        for r in range(rounds):
            log(f"full ({name}): round {r + 1} of {rounds} (load {load()})")
            runs.append(wrk("step", url, CONNS, secs, SMALL_N, "s"))
        if name == "optd":
            with profiled(p, "1k binary steps, 16 conns, full"):
                wrk("step", url, CONNS, secs, SMALL_N, "s")
        figures[name] = med_runs(runs)
        stop(p)
        started.remove(p)
    f = figures["optd"]
    text = f"{f['rps']:.0f} steps/s (p50 {f['p50_us'] / 1000:.2f} ms, p99 {f['p99_us'] / 1000:.2f})"
    ratio = f"{f['rps'] / rate:.1f} steps per fdatasync"
    if nginx_rps16:
        ratio += f"; {100 * f['rps'] / nginx_rps16:.1f}% of nginx"
    ok = None
    target = "reported; >= 3x pre-rewrite"
    if "pre-rewrite" in figures:
        b = figures["pre-rewrite"]["rps"]
        ratio += f"; {f['rps'] / b:.1f}x pre-rewrite ({b:.0f} steps/s, same run)"
        ok = f["rps"] >= 3 * b
    row("the same, --durability full", text, f"fdatasync rate of this disk: {rate:.0f}/s "
        f"(p50 {res['fsync_one']['p50_ms']:.2f} ms)", ratio, target, ok)
    return figures, rate


def restart_row(live_p50_ms, count):
    n = 1000000
    db = os.path.join(TMP, "restart.db")
    p, port = start_optd(db)
    create_session(port, "r", n)
    log(f"restart: {count} steps of a 1M session (load {load()})")
    stepload("steps", "--step", f"http://127.0.0.1:{port}/v1/sessions/r/step", "--n", n,
             "--count", count)
    steps = session_step(port, "r")
    if steps != count:
        die(f"restart: the session applied {steps} steps for {count} answered")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    started.remove(p)
    vdir = db + ".d"
    files = sorted(os.path.join(vdir, x) for x in os.listdir(vdir)
                   if x.endswith(".seg") or x.endswith(".ckpt"))
    seg = sum(os.path.getsize(x) for x in files if x.endswith(".seg"))
    replayed = seg // (4 * n)
    # The files are in the page cache either way (just written; the cache
    # cannot be dropped without root): read them now, before the restart
    # replaces them.
    rd = stepload("read", *files)["read"]
    t0 = time.monotonic()
    p, port = start_optd(db)
    up = time.monotonic() - t0
    res = stepload("steps", "--step", f"http://127.0.0.1:{port}/v1/sessions/r/step", "--n", n,
                   "--count", 1)
    # From the start of the daemon until it listens (polled every 50 ms),
    # plus the first step's round trip as the client timed it: the time the
    # client process takes to start is not the daemon's.
    wall = (time.monotonic() - t0) * 1000
    first = up * 1000 + res["optd"]["p50_ms"]
    steps = session_step(port, "r")
    if steps != count + 1:
        die(f"restart: {steps} steps after the restart's step, want {count + 1}")
    stop(p)
    started.remove(p)
    kern = stepload("kernel", "--n", n, "--iters", 20)["kernel"]["p50_ms"]
    floor = rd["ms"] + replayed * kern + live_p50_ms
    r = first / floor
    row(f"restart: first step answered after kill -9 of a 1M session stepped {count} times",
        f"{first:.1f} ms: listening {up * 1000:.0f} ms after its start + the step"
        f" {res['optd']['p50_ms']:.1f} ms (wall clock with the client's start: {wall:.0f})",
        f"{floor:.1f} ms: read {rd['bytes'] / MIB:.1f} MiB {rd['ms']:.1f} + {replayed} replayed x"
        f" kernel {kern:.2f} + live step {live_p50_ms:.1f}", f"{r:.2f}x", "<= 2x", r <= 2)


def main():
    global TMP
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-1e8", action="store_true")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0)
    ap.add_argument("--parts", default="small,full,big,restart",
                    help="which parts to run (comma-separated; restart needs big's 1M row)")
    ap.add_argument("--profile", action="store_true",
                    help="perf record each daemon during its rows; excerpts after the table")
    a = ap.parse_args()
    global PROFILE
    PROFILE = a.profile
    rounds = a.rounds or (1 if a.quick else 3)
    secs = a.seconds or (1 if a.quick else 3)
    secs = max(1, int(secs))
    sizes = [(1000000, 5 if a.quick else 30, "1M"), (10000000, 3 if a.quick else 10, "1e7")]
    if not a.no_1e8:
        sizes.append((100000000, 2 if a.quick else 4, "1e8"))
    parts = set(a.parts.split(","))
    restart_count = 100 if a.quick else 1000
    for tool in ("wrk", "nginx"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            die(f"needs {tool} (make bench-engine installs wrk and nginx-light)")
    if PROFILE and subprocess.run(["sh", "-c", "command -v perf"],
                                  capture_output=True).returncode:
        die("--profile needs perf (Debian: linux-perf)")
    for f in (OPTD, STEPLOAD):
        if not os.access(f, os.X_OK):
            die(f"no {f} (run make build)")

    TMP = tempfile.mkdtemp(prefix="optd-bench-engine.")
    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(143)))
    t_start = time.time()
    loads = [load()]
    try:
        nginx, nport = start_nginx({f"big{n}.bin": 4 * n for n, _, _ in sizes})
        log(f"nginx on {nport}; load {load()}")
        if "small" in parts:
            m = small_rows(nport, rounds, secs)
            loads.append(load())
        if "full" in parts:
            full_rows(m["ng16"]["rps"] if "small" in parts else 0, rounds, secs)
            loads.append(load())
        live = None
        for n, iters, label in sizes if "big" in parts else ():
            p, port, db, res = big_row(n, iters, nport, label)
            loads.append(load())
            if n == 1000000:
                live = res["optd"]["p50_ms"]
            if n == 100000000:
                restart_1e8(p, port, db, n)
            else:
                stop(p)
                started.remove(p)
        if "restart" in parts and live is not None:
            restart_row(live, restart_count)
            loads.append(load())
    finally:
        cleanup()

    print()
    print(f"make bench-engine: {time.time() - t_start:.0f} s; load average (1/5/15 min) at the"
          f" start and after each part: {' | '.join(loads)}")
    print()
    print("| measure | optd | floor (same run) | ratio | target | result |")
    print("|---|---|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    for n in NOTES:
        print()
        print(n)
    for label, text in PROFILES:
        print()
        print(f"--- perf: optd during {label}")
        print(text)


if __name__ == "__main__":
    main()
