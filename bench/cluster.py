#!/usr/bin/python3
"""bench/cluster.py -- optd nodes behind HAProxy, and HAProxy's own cost (make bench-cluster).

    /usr/bin/python3 bench/cluster.py            the table of bench/CLUSTER.md
    /usr/bin/python3 bench/cluster.py --quick    short runs, to check the script
    options: --seconds S (per wrk run, default 4), --rounds N (default 3),
             --conns C (connections = sessions of the many-connection runs, default 32)
    environment: OPTD_BIN (default build/optd)

One run, on 127.0.0.1 only, with wrk and bench/http_step.lua (one session
per wrk thread and connection, closed-loop round trips as bench/HTTP.md):

  steps:  binary 1k-param Adam steps (4 KB up, 4 KB down)
          - through HAProxy to 3 nodes (deploy/cluster/haproxy-cfg's
            configuration, sessions placed by their names' hash)
          - to 1 node directly (the same sessions, on one daemon)
          at C connections (C sessions) and at 1.
  proxy cost: GET of a 4 KiB static file from nginx
          - directly (the machine's HTTP ceiling in this run)
          - through HAProxy (1 thread, keep-alive to nginx)
          - through an nginx reverse proxy (1 worker, keep-alive upstream)
          at C connections and at 1.
Rounds are interleaved and each figure is the median of its rounds.
Peak RSS is each process's VmHWM at the end.  Every server is stopped by
PID on every exit path.  Exits 1 when a server does not start or a request
fails.
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTD = os.environ.get("OPTD_BIN", os.path.join(ROOT, "build", "optd"))
LUA = os.path.join(ROOT, "bench", "http_step.lua")
GEN = os.path.join(ROOT, "deploy", "cluster", "haproxy-cfg")
N = 1000
STATIC_BYTES = 4096

started = []
TMP = None


def log(msg):
    print("bench/cluster: " + msg, file=sys.stderr, flush=True)


def stop(p):
    if p.poll() is not None:
        return
    try:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    except ProcessLookupError:
        pass


def cleanup():
    for p in reversed(started):
        stop(p)


def die(msg):
    log(msg)
    cleanup()
    sys.exit(1)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, p, what):
    deadline = time.time() + 10
    while time.time() < deadline:
        if p.poll() is not None:
            die("%s exited at start" % what)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    die("%s did not listen on %d" % (what, port))


def start_optd(name):
    logname = os.path.join(TMP, name + ".log")
    with open(logname, "wb") as f:
        p = subprocess.Popen([OPTD, "--port", "0", "--db", os.path.join(TMP, name + ".db"),
                              "--log-level", "warn"], stdout=f, stderr=subprocess.STDOUT)
    started.append(p)
    deadline = time.time() + 10
    while time.time() < deadline:
        with open(logname) as f:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", f.read())
        if m:
            return p, int(m.group(1))
        if p.poll() is not None:
            break
        time.sleep(0.02)
    die("optd %s did not start: %s" % (name, open(logname).read()))


def start_haproxy(name, cfg_text, port):
    cfg = os.path.join(TMP, name + ".cfg")
    with open(cfg, "w") as f:
        f.write(cfg_text)
    with open(os.path.join(TMP, name + ".log"), "wb") as f:
        p = subprocess.Popen(["haproxy", "-db", "-f", cfg], stdout=f, stderr=subprocess.STDOUT)
    started.append(p)
    wait_port(port, p, name)
    return p


def start_nginx(name, server_block):
    """One nginx, one worker, in the foreground."""
    os.makedirs(os.path.join(TMP, name + "-tmp"), exist_ok=True)
    conf = os.path.join(TMP, name + ".conf")
    t = os.path.join(TMP, name + "-tmp")
    with open(conf, "w") as f:
        f.write("""worker_processes 1;
daemon off;
pid %(t)s/nginx.pid;
error_log %(t)s/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(t)s/body;
    proxy_temp_path %(t)s/proxy;
    fastcgi_temp_path %(t)s/fastcgi;
    uwsgi_temp_path %(t)s/uwsgi;
    scgi_temp_path %(t)s/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000000;
%(server)s
}
""" % {"t": t, "server": server_block})
    p = subprocess.Popen(["nginx", "-p", TMP, "-c", conf, "-e", t + "/error.log"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started.append(p)
    return p


def create(port, name):
    body = json.dumps({"optimizer": {"type": "adam", "lr": 0.001}, "size": N,
                       "init": {"type": "normal", "std": 0.1, "seed": 7}}).encode()
    req = urllib.request.Request("http://127.0.0.1:%d/v1/sessions/%s" % (port, name), data=body,
                                 method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        if r.status != 201:
            die("creating %s answered %d" % (name, r.status))
        return r.headers.get("Optd-Node")


def session_step(port, name):
    with urllib.request.urlopen("http://127.0.0.1:%d/v1/sessions/%s" % (port, name), timeout=30) as r:
        return json.loads(r.read())["step"]


def wrk(url, conns, secs, mode, prefix=""):
    env = dict(os.environ, BENCH_MODE=mode, BENCH_PARAMS=str(N), BENCH_PREFIX=prefix)
    r = subprocess.run(["wrk", "-t", str(conns), "-c", str(conns), "-d", "%ds" % secs, "--timeout", "10s",
                        "-s", LUA, url], env=env, capture_output=True, text=True, timeout=secs + 60)
    m = re.search(r"^RESULT (.*)$", r.stdout, re.M)
    if not m:
        die("wrk gave no result for %s: %s %s" % (url, r.stdout, r.stderr))
    res = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    if res["status_errors"] or res["socket_errors"]:
        die("requests failed against %s: %s" % (url, m.group(1)))
    return res


def rss_kib(pid):
    """VmHWM of a process and of its children (nginx's worker), in KiB."""
    pids = [pid]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/status" % p) as f:
                m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
            total = max(total, int(m.group(1)))
        except (OSError, AttributeError):
            pass
    return total


def main():
    global TMP
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=32)
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.rounds = 1, 1
    for tool in ("wrk", "nginx", "haproxy"):
        if subprocess.run(["sh", "-c", "command -v " + tool], capture_output=True).returncode:
            die("needs %s (make deps-bench)" % tool)
    TMP = tempfile.mkdtemp(prefix="optd-bench-cluster-")
    os.chmod(TMP, 0o755)
    try:
        run(a)
    finally:
        cleanup()
        subprocess.run(["rm", "-rf", TMP])


def run(a):
    C = a.conns
    # ---- the cluster: 3 nodes behind HAProxy, and 1 node alone
    nodes = {}
    for k in (1, 2, 3):
        nodes["node%d" % k] = start_optd("node%d" % k)
    single, single_port = start_optd("single")
    proxy_port = free_port()
    cfg = subprocess.run(["sh", GEN, "--bind", "127.0.0.1:%d" % proxy_port] +
                         ["%s=127.0.0.1:%d" % (n, port) for n, (_, port) in sorted(nodes.items())],
                         check=True, capture_output=True, text=True).stdout
    hx = start_haproxy("haproxy-cluster", cfg, proxy_port)
    time.sleep(1.2)  # the first health checks
    placed = {}
    for i in range(C):
        n = create(proxy_port, "s%d" % i)
        placed[n] = placed.get(n, 0) + 1
        create(single_port, "s%d" % i)
    log("%d sessions of %d params; through HAProxy they are on %s" % (C, N, placed))

    # ---- nginx: static, proxied by HAProxy, proxied by nginx
    www = os.path.join(TMP, "www")
    os.makedirs(www)
    with open(os.path.join(www, "static.bin"), "wb") as f:
        f.write(os.urandom(STATIC_BYTES))
    os.chmod(www, 0o755)
    os.chmod(os.path.join(www, "static.bin"), 0o644)
    ng_port = free_port()
    ng = start_nginx("nginx-static", "    server { listen 127.0.0.1:%d; root %s; }" % (ng_port, www))
    wait_port(ng_port, ng, "nginx")
    np_port = free_port()
    npx = start_nginx("nginx-proxy", """    upstream static { server 127.0.0.1:%d; keepalive 64; }
    server {
        listen 127.0.0.1:%d;
        location / {
            proxy_pass http://static;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }
    }""" % (ng_port, np_port))
    wait_port(np_port, npx, "nginx proxy")
    hp_port = free_port()
    hxn = start_haproxy("haproxy-nginx", """global
    maxconn 4096
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:%d
    default_backend static
backend static
    http-reuse always
    server nginx 127.0.0.1:%d
""" % (hp_port, ng_port), hp_port)

    static = "/static.bin"
    runs = [
        ("step, 3 nodes via HAProxy", C, "http://127.0.0.1:%d" % proxy_port, "step"),
        ("step, 1 node direct", C, "http://127.0.0.1:%d" % single_port, "step"),
        ("step, 3 nodes via HAProxy", 1, "http://127.0.0.1:%d" % proxy_port, "step"),
        ("step, 1 node direct", 1, "http://127.0.0.1:%d" % single_port, "step"),
        ("4 KiB static, nginx direct", C, "http://127.0.0.1:%d%s" % (ng_port, static), "get"),
        ("4 KiB static, via HAProxy", C, "http://127.0.0.1:%d%s" % (hp_port, static), "get"),
        ("4 KiB static, via nginx proxy", C, "http://127.0.0.1:%d%s" % (np_port, static), "get"),
        ("4 KiB static, nginx direct", 1, "http://127.0.0.1:%d%s" % (ng_port, static), "get"),
        ("4 KiB static, via HAProxy", 1, "http://127.0.0.1:%d%s" % (hp_port, static), "get"),
        ("4 KiB static, via nginx proxy", 1, "http://127.0.0.1:%d%s" % (np_port, static), "get"),
    ]
    answered = {"cluster": 0, "single": 0}
    for label, _, url, mode in runs[2:4]:  # warm-up, one connection
        answered["cluster" if "HAProxy" in label else "single"] += int(wrk(url, 1, 1, mode, "s")["requests"])
    results = {}
    for r in range(a.rounds):
        log("round %d of %d (%d runs x %d s)" % (r + 1, a.rounds, len(runs), a.seconds))
        for label, c, url, mode in runs:
            res = wrk(url, c, a.seconds, mode, "s")
            results.setdefault((label, c), []).append(res)
            if mode == "step":
                answered["cluster" if "HAProxy" in label else "single"] += int(res["requests"])

    # every answered step was applied (wrk may leave one unanswered per connection)
    applied_cluster = sum(session_step(proxy_port, "s%d" % i) for i in range(C))
    applied_single = sum(session_step(single_port, "s%d" % i) for i in range(C))
    slack = (a.rounds * 2 + 1) * C
    for what, applied in (("cluster", applied_cluster), ("single", applied_single)):
        if not answered[what] <= applied <= answered[what] + slack:
            die("%s: %d steps applied for %d answered" % (what, applied, answered[what]))

    def med(key, c, field):
        return statistics.median(x[field] for x in results[(key, c)])

    ceiling = med("4 KiB static, nginx direct", C, "rps")
    print("\n%d connections = %d sessions; %d s per run, median of %d interleaved rounds; "
          "%d cores, load average %s at the end" % (C, C, a.seconds, a.rounds, os.cpu_count(),
                                                    " ".join(open("/proc/loadavg").read().split()[:3])))
    print("\n| run | conns | req/s | share of ceiling | p50 us | mean us | p99 us |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, c, _, _ in runs:
        print("| %s | %d | %.0f | %.2f | %.0f | %.0f | %.0f |" % (
            label, c, med(label, c, "rps"), med(label, c, "rps") / ceiling,
            med(label, c, "p50_us"), med(label, c, "mean_us"), med(label, c, "p99_us")))
    print("\nceiling: nginx serving the 4 KiB file directly at %d connections, %.0f req/s" % (C, ceiling))
    for c in (1, C):
        d = med("4 KiB static, nginx direct", c, "p50_us")
        print("added p50 per request at %d conn(s): HAProxy %+.0f us, nginx proxy %+.0f us; "
              "a step through HAProxy vs direct %+.0f us" % (
                  c, med("4 KiB static, via HAProxy", c, "p50_us") - d,
                  med("4 KiB static, via nginx proxy", c, "p50_us") - d,
                  med("step, 3 nodes via HAProxy", c, "p50_us") - med("step, 1 node direct", c, "p50_us")))
    print("\npeak RSS (VmHWM, MiB): " + ", ".join(
        "%s %.1f" % (n, rss_kib(p.pid) / 1024) for n, p in
        [(n, p) for n, (p, _) in sorted(nodes.items())] +
        [("single", single), ("haproxy (cluster)", hx), ("haproxy (nginx)", hxn),
         ("nginx static", ng), ("nginx proxy", npx)]))
    print("steps applied: %d through HAProxy, %d direct; every answered step was applied"
          % (applied_cluster, applied_single))


if __name__ == "__main__":
    main()
