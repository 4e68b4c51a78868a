#!/usr/bin/python3
"""bench/shard.py -- one model across daemons (make bench-shard, bench/SHARD.md).

    /usr/bin/python3 bench/shard.py [--n 10000000] [--rounds 20] [--shards 3]
    environment: OPTD_BIN (default build/optd)

A float32 Adam session of n params with clipping by norm, once split over
K daemons by optd.ShardedSession (the client computes the exact whole-vector
norm, then one binary step per shard, concurrently) and once whole on one
more daemon, in the same run: the rounds alternate one sharded step and one
single-session step with the same gradient, so both see the same machine
load.  Reported: time per step (client side, from the gradient in memory to
the joined params in memory) p50 / mean / p99, the client's norm computation
alone, and the peak RSS (VmHWM) of every daemon.  The params of both runs
are compared bit for bit at the end.  Daemons listen on 127.0.0.1, each on
its own temporary database, and are stopped by PID.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
sys.path.insert(0, os.path.join(ROOT, "clients", "python", "tests"))

import numpy as np  # noqa: E402

import optd  # noqa: E402
from daemon import Daemon  # noqa: E402  (the test harness: port 0, stop by PID)


def vm_hwm_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def pct(xs, q):
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))
    return xs[k]


def row(name, xs):
    ms = [x * 1000 for x in xs]
    return "| %s | %.0f | %.0f | %.0f | %d |" % (name, pct(ms, 50), statistics.mean(ms),
                                               pct(ms, 99), len(ms))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shards", type=int, default=3)
    a = ap.parse_args()

    daemons = []
    try:
        for _ in range(a.shards + 1):
            daemons.append(Daemon().start())
        opt = {"type": "adam", "lr": 1e-3}
        clip = {"type": "norm", "max_norm": 1.0}
        rng = np.random.default_rng(1)
        p0 = rng.standard_normal(a.n).astype(np.float32)
        timeout = dict(timeout=600.0)
        sh = optd.ShardedSession.create([d.url for d in daemons[:a.shards]], "bench", opt,
                                        params=p0, clip=clip, client_args=timeout)
        single_client = optd.Client(daemons[-1].url, **timeout)
        one = single_client.create_session("bench", opt, size=a.n, clip=clip)
        one.set_params(p0, json=False)

        t_shard, t_one, t_norm = [], [], []
        for r in range(a.warmup + a.rounds):
            g = (rng.standard_normal(a.n) * (0.5 if r % 2 else 1e-4)).astype(np.float32)
            t0 = time.perf_counter()
            optd.grad_norm(g)
            t1 = time.perf_counter()
            p_sh = sh.step(g)
            t2 = time.perf_counter()
            p_one = one.step(g, json=False)
            t3 = time.perf_counter()
            if r >= a.warmup:
                t_norm.append(t1 - t0)
                t_shard.append(t2 - t1)
                t_one.append(t3 - t2)
            print("round %d: sharded %.0f ms, one %.0f ms" % (r, (t2 - t1) * 1e3,
                                                              (t3 - t2) * 1e3),
                  file=sys.stderr, flush=True)
        same = bool(np.array_equal(p_sh, p_one))
        hwm = [vm_hwm_mib(d.proc.pid) for d in daemons]
        sh.close()
        single_client.close()
    finally:
        for d in daemons:
            d.close()

    print("n = %d float32 params, Adam + clip by norm, %d shards vs 1 daemon, %d rounds "
          "(after %d warm-up), %d CPUs (shared)" % (a.n, a.shards, a.rounds, a.warmup,
                                                    os.cpu_count() or 0))
    print()
    print("| step | p50 ms | mean ms | p99 ms | samples |")
    print("|---|---|---|---|---|")
    print(row("%d shards (ShardedSession.step)" % a.shards, t_shard))
    print(row("1 daemon (Session.step)", t_one))
    print(row("client norm alone (optd.grad_norm)", t_norm))
    print()
    print("| daemon | peak RSS (VmHWM) MiB |")
    print("|---|---|")
    for i in range(a.shards):
        print("| shard %d | %.0f |" % (i, hwm[i]))
    print("| shards, sum | %.0f |" % sum(hwm[:a.shards]))
    print("| single | %.0f |" % hwm[-1])
    print()
    print("final params equal bit for bit: %s" % same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
