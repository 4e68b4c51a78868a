#!/usr/bin/python3
"""A short soak of optd: mixed load for a bounded time, then a report.

    make soak                        # 60 s against build/optd
    /usr/bin/python3 bench/soak.py --seconds 300 --clients 6

Starts the daemon (OPTD_BIN, default build/optd) on 127.0.0.1, port 0, with
a fresh database in a temporary directory, and runs --clients threads, each
looping over a random mix of

    create   PUT a session (Adam/SGD/AdamW, float32/float64, 16-4096 params)
    step     POST a gradient, JSON or binary, sometimes with an
             Idempotency-Key and a retry of it
    read     GET the session, its params or its history
    patch    PATCH the learning rate
    delete   DELETE a session
    sync     a synchronous round: a 3-worker session stepped by 3 threads

while the main thread restarts the daemon every --restart-every seconds
(SIGTERM, and every second time SIGKILL: a crash) on the same database.
Every --sample seconds it records the daemon's RSS and open file
descriptors (from /proc).  At the end it prints requests served, answers
by status, errors by class, the samples, and checks that every session
that was acknowledged and never deleted is still there at its last
acknowledged step.

Errors are classified: "expected" are 4xx the mix provokes on purpose
(a step on a session another client deleted: 404) and refused connections
or 503s while the daemon restarts; anything else (5xx outside restarts,
other 4xx, lost steps) is "unexpected" and makes the exit status 1.
Standard library only.
"""
import argparse
import http.client
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Daemon:
    def __init__(self, binary, db, log):
        self.binary, self.db, self.log = binary, db, log
        self.proc = None
        self.port = None
        self.down = threading.Event()  # set while restarting
        self.restarts = 0
        self.crashes = 0

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTD_")}
        port = self.port or 0
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(port), "--db", self.db],
            stdout=subprocess.PIPE, stderr=open(self.log, "ab"), env=env)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("optd listening on "):
            raise SystemExit("optd did not start: %r (see %s)" % (line, self.log))
        self.port = int(line.rsplit(":", 1)[1])
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self, crash=False):
        if crash:
            self.proc.send_signal(signal.SIGKILL)
            self.crashes += 1
        else:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        return rc

    def restart(self, crash):
        self.down.set()
        rc = self.stop(crash)
        time.sleep(0.2)
        self.start()
        self.restarts += 1
        self.down.clear()
        return rc

    def sample(self):
        pid = self.proc.pid
        rss = 0
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
            fds = len(os.listdir("/proc/%d/fd" % pid))
        except OSError:
            return None
        return rss, fds


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.by_status = {}
        self.by_op = {}
        self.expected = {}
        self.unexpected = {}
        self.examples = []

    def answer(self, op, status):
        with self.lock:
            self.requests += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1
            self.by_op[op] = self.by_op.get(op, 0) + 1

    def error(self, kind, expected, example=None):
        with self.lock:
            d = self.expected if expected else self.unexpected
            d[kind] = d.get(kind, 0) + 1
            if not expected and example and len(self.examples) < 10:
                self.examples.append(example)


class Client:
    """One keep-alive connection; reconnects after errors and restarts."""

    def __init__(self, daemon, stats):
        self.d, self.stats = daemon, stats
        self.conn = None

    def request(self, op, method, path, body=None, headers=None, ok=(200,), tolerate=()):
        """Returns (status, body bytes) or (None, None) on a connection error."""
        hdrs = {"Accept": "application/json"}
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        restarting = self.d.down.is_set()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=30)
            self.conn.request(method, path, body=body, headers=hdrs)
            r = self.conn.getresponse()
            data = r.read()
            status = r.status
        except (OSError, http.client.HTTPException) as e:
            if self.conn:
                self.conn.close()
            self.conn = None
            during = restarting or self.d.down.is_set()
            self.stats.error("connection", during, "%s %s: %r" % (method, path, e))
            if not during:
                time.sleep(0.05)
            return None, None
        self.stats.answer(op, status)
        if status in ok:
            return status, data
        during = restarting or self.d.down.is_set()
        if status in tolerate or (status == 503 and during):
            self.stats.error("%d %s" % (status, op), True)
        else:
            self.stats.error("%d %s" % (status, op), False,
                             "%s %s -> %d %s" % (method, path, status, data[:200]))
        return status, data


class World:
    """What the clients know was acknowledged: name -> (size, dtype, step)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sessions = {}
        self.deleted = set()
        self.counter = 0

    def new_name(self, prefix):
        with self.lock:
            self.counter += 1
            return "%s-%d" % (prefix, self.counter)


def grad_body(size, dtype, binary, rng):
    g = [rng.uniform(-1, 1) for _ in range(size)]
    if binary:
        return struct.pack("<%d%s" % (size, "f" if dtype == "float32" else "d"), *g), {
            "Content-Type": "application/octet-stream", "Accept": "application/octet-stream"}
    return {"grad": g, "loss": rng.random()}, {}


def worker(cid, daemon, stats, world, stop_at, rng):
    c = Client(daemon, stats)
    mine = []
    while time.time() < stop_at:
        r = rng.random()
        if r < 0.08 or not mine:
            name = world.new_name("c%d" % cid)
            size = rng.choice([16, 256, 4096])
            dtype = rng.choice(["float32", "float64"])
            opt = rng.choice([{"type": "adam", "lr": 0.001}, {"type": "sgd", "lr": 0.01,
                              "momentum": 0.9}, {"type": "adamw", "lr": 0.001}])
            st, _ = c.request("create", "PUT", "/v1/sessions/" + name,
                              {"optimizer": opt, "size": size, "dtype": dtype,
                               "init": {"type": "normal", "std": 0.1, "seed": cid}},
                              ok=(201,))
            if st == 201:
                with world.lock:
                    world.sessions[name] = [size, dtype, 0]
                mine.append(name)
        elif r < 0.75:
            name = rng.choice(mine)
            size, dtype, _ = world.sessions[name]
            binary = rng.random() < 0.5
            body, hdrs = grad_body(size, dtype, binary, rng)
            if rng.random() < 0.2:
                hdrs["Idempotency-Key"] = "k-%s-%d" % (name, rng.getrandbits(48))
            path = "/v1/sessions/%s/step" % name
            st, data = c.request("step", "POST", path, body, hdrs, ok=(200,), tolerate=(404,))
            if st is None and "Idempotency-Key" in hdrs:
                # Lost answer: retry with the same key until it is known.
                for _ in range(50):
                    if time.time() > stop_at + 30:
                        break
                    time.sleep(0.1)
                    st, data = c.request("step-retry", "POST", path, body, hdrs, ok=(200,),
                                         tolerate=(404,))
                    if st is not None and not (st == 503 and daemon.down.is_set()):
                        break
            if st == 200:
                step = None
                if binary:
                    pass  # the step number is in a header the simple client does not keep
                else:
                    step = json.loads(data).get("step")
                with world.lock:
                    if step is not None and name in world.sessions:
                        world.sessions[name][2] = max(world.sessions[name][2], step)
        elif r < 0.88:
            name = rng.choice(mine)
            what = rng.choice(["", "/params", "/history?limit=5"])
            c.request("read", "GET", "/v1/sessions/%s%s" % (name, what), ok=(200,),
                      tolerate=(404,))
        elif r < 0.94:
            name = rng.choice(mine)
            c.request("patch", "PATCH", "/v1/sessions/" + name,
                      {"optimizer": {"lr": rng.choice([0.001, 0.0005, 0.01])}}, ok=(200,),
                      tolerate=(404,))
        else:
            name = mine.pop(rng.randrange(len(mine)))
            st, _ = c.request("delete", "DELETE", "/v1/sessions/" + name, ok=(204,),
                              tolerate=(404,))
            if st in (204, 404):
                with world.lock:
                    world.sessions.pop(name, None)
                    world.deleted.add(name)


def sync_rounds(daemon, stats, world, stop_at, rng):
    """A 3-worker synchronous session, one thread per worker."""
    c = Client(daemon, stats)
    name = world.new_name("sync")
    st, _ = c.request("create", "PUT", "/v1/sessions/" + name,
                      {"optimizer": {"type": "sgd", "lr": 0.01}, "size": 64,
                       "mode": {"type": "sync", "workers": 3, "timeout_ms": 5000,
                                "on_timeout": "apply"}}, ok=(201,))
    if st != 201:
        return

    def one(w):
        cw = Client(daemon, stats)
        while time.time() < stop_at:
            st, data = cw.request("sync-get", "GET", "/v1/sessions/%s/params" % name, ok=(200,))
            if st != 200:
                time.sleep(0.1)
                continue
            base = json.loads(data)["step"]
            body = {"grad": [rng.uniform(-1, 1) for _ in range(64)], "worker": "w%d" % w,
                    "base_step": base}
            # 409: another worker's round moved on (a timed-out round closed
            # without this worker); 504 cannot happen with on_timeout apply.
            cw.request("sync-step", "POST", "/v1/sessions/%s/step" % name, body, ok=(200,),
                       tolerate=(409,))

    ts = [threading.Thread(target=one, args=(w,)) for w in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--restart-every", type=float, default=15)
    ap.add_argument("--sample", type=float, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    binary = os.environ.get("OPTD_BIN", os.path.join(ROOT, "build", "optd"))
    tmp = tempfile.mkdtemp(prefix="optd-soak.")
    d = Daemon(binary, os.path.join(tmp, "optd.db"), os.path.join(tmp, "optd.log"))
    d.start()
    stats, world = Stats(), World()
    t0 = time.time()
    stop_at = t0 + args.seconds
    threads = [threading.Thread(target=worker,
                                args=(i, d, stats, world, stop_at, random.Random(args.seed + i)))
               for i in range(args.clients)]
    threads.append(threading.Thread(target=sync_rounds,
                                    args=(d, stats, world, stop_at, random.Random(args.seed))))
    for t in threads:
        t.start()
    samples = []
    next_restart = t0 + args.restart_every
    next_sample = t0
    bad_exits = []
    while any(t.is_alive() for t in threads):
        now = time.time()
        if now >= next_sample:
            s = d.sample()
            if s:
                samples.append((now - t0, s[0], s[1], stats.requests))
            next_sample += args.sample
        if now >= next_restart and now < stop_at - 2:
            crash = d.restarts % 2 == 1
            rc = d.restart(crash)
            if not crash and rc != 0:
                bad_exits.append(rc)
            next_restart += args.restart_every
        time.sleep(0.05)
    elapsed = time.time() - t0
    s = d.sample()
    if s:
        samples.append((elapsed, s[0], s[1], stats.requests))

    # Every acknowledged, undeleted session is there, at least at its last
    # acknowledged step (JSON answers carry it; binary ones are not tracked).
    c = Client(d, stats)
    lost = []
    for name, (size, dtype, step) in sorted(world.sessions.items()):
        st, data = c.request("verify", "GET", "/v1/sessions/" + name, ok=(200,))
        if st != 200:
            lost.append("%s: %s" % (name, st))
        elif json.loads(data)["step"] < step:
            lost.append("%s: step %d < acknowledged %d" % (name, json.loads(data)["step"], step))
    rc = d.stop()
    if rc != 0:
        bad_exits.append(rc)

    print("optd soak: %.0f s, %d clients + one 3-worker sync session, %s" %
          (elapsed, args.clients, binary))
    print("restarts: %d (%d of them kill -9); daemon exits not 0 on SIGTERM: %s" %
          (d.restarts, d.crashes, bad_exits or "none"))
    print("requests answered: %d (%.0f/s)" % (stats.requests, stats.requests / elapsed))
    print("by operation: " + ", ".join("%s %d" % kv for kv in sorted(stats.by_op.items())))
    print("by status:    " + ", ".join("%s %d" % kv for kv in sorted(stats.by_status.items())))
    print("expected errors:   " + (", ".join("%s %d" % kv for kv in sorted(stats.expected.items()))
                                   or "none"))
    print("unexpected errors: " + (", ".join("%s %d" % kv
                                             for kv in sorted(stats.unexpected.items()))
                                   or "none"))
    for e in stats.examples:
        print("    " + e)
    print("sessions at the end: %d live, %d deleted; lost or behind: %s" %
          (len(world.sessions), len(world.deleted), lost or "none"))
    print()
    print("    time s   RSS MiB   fds   requests")
    for t, rss, fds, n in samples:
        print("    %6.1f   %7.1f   %3d   %8d" % (t, rss / 1024.0, fds, n))
    ok = not stats.unexpected and not lost and not bad_exits
    print()
    print("soak: %s (log: %s)" % ("ok" if ok else "FAILED", d.log))
    if ok:
        subprocess.run(["rm", "-rf", tmp])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
