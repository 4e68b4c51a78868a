"""Time per opt.step(): optd.torch.RemoteOptimizer against local torch.optim,
in the same run, for a 17k-parameter and a 1M-parameter model.

    /usr/bin/python3 bench/remote_torch.py [--url URL] [--steps 400,100]
                                           [--optimizer adamw]

Without --url it starts build/optd (OPTD_BIN) on a free port of 127.0.0.1
with a temporary database, and stops it by PID at the end.

Each model gets one fixed random gradient per parameter.  Steps alternate:
a local torch.optim step on one copy of the model, then a RemoteOptimizer
step on the other, so a neighbour's load hits both alike.  The first
WARMUP steps of each are not timed (they create the state).  One line per
model and optimizer, in milliseconds:

    R <params> <local|remote> p50 <ms> mean <ms> p99 <ms>

and a summary line per model: the RemoteOptimizer's overhead over local
torch (difference of the p50s, and of the means) and its ratio.  Targets
(issue 11): overhead <= 1 ms at 17k params, <= 1.5x local at 1M.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "clients", "python"))

import torch  # noqa: E402

import optd  # noqa: E402
from optd.torch import RemoteOptimizer  # noqa: E402

WARMUP = 10
LISTEN = "optd listening on http://127.0.0.1:"


def models():
    """(label, factory): about 17k and 1M parameters."""
    torch.manual_seed(0)
    return [
        ("17k", lambda: torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                            torch.nn.Linear(128, 4))),
        ("1M", lambda: torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.ReLU(),
                                           torch.nn.Linear(1000, 10))),
    ]


def start_daemon():
    binary = os.environ.get("OPTD_BIN") or os.path.join(REPO, "build", "optd")
    tmp = tempfile.mkdtemp(prefix="optd-bench-torch-")
    out = open(os.path.join(tmp, "stdout"), "wb+")
    proc = subprocess.Popen([binary, "--port", "0", "--db", os.path.join(tmp, "optd.db"),
                             "--log-level", "warn"], stdout=out,
                            stderr=open(os.path.join(tmp, "stderr"), "wb"))
    deadline = time.monotonic() + 20
    while True:
        out.seek(0)
        line = out.readline().decode()
        if line.endswith("\n") and line.startswith(LISTEN):
            return proc, tmp, "http://127.0.0.1:%d" % int(line[len(LISTEN):])
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit("optd did not start: see %s" % tmp)
        time.sleep(0.01)


def stats(seconds):
    ms = sorted(s * 1e3 for s in seconds)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return statistics.median(ms), statistics.fmean(ms), p99


def bench(label, factory, steps, url, kind):
    local_model, remote_model = factory(), factory()
    remote_model.load_state_dict(local_model.state_dict())
    n = sum(p.numel() for p in local_model.parameters())
    g = torch.Generator().manual_seed(1)
    for a, b in zip(local_model.parameters(), remote_model.parameters()):
        a.grad = torch.randn(a.shape, generator=g) * 1e-3
        b.grad = a.grad.clone()
    local = getattr(torch.optim, {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}[kind])(
        local_model.parameters(), lr=1e-3)
    with optd.Client(url) as client:
        remote = RemoteOptimizer(remote_model.named_parameters(), kind, lr=1e-3,
                                 session="bench-torch-%s-%s" % (kind, label), client=client)
        times = {"local": [], "remote": []}
        for i in range(WARMUP + steps):
            for name, opt in (("local", local), ("remote", remote)):
                t0 = time.perf_counter()
                opt.step()
                dt = time.perf_counter() - t0
                if i >= WARMUP:
                    times[name].append(dt)
        remote.session.delete()
    out = {}
    for name in ("local", "remote"):
        p50, mean, p99 = stats(times[name])
        out[name] = (p50, mean)
        print("R %d %s p50 %.3f mean %.3f p99 %.3f" % (n, name, p50, mean, p99), flush=True)
    (lp, lm), (rp, rm) = out["local"], out["remote"]
    print("# load average %.2f" % os.getloadavg()[0])
    print("# %s (%d params, %s, %d steps): overhead p50 %+.3f ms, mean %+.3f ms; "
          "remote/local p50 %.2fx, mean %.2fx"
          % (label, n, kind, steps, rp - lp, rm - lm, rp / lp, rm / lm), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--steps", default="400,100", help="timed steps for 17k,1M")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"])
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    proc = tmp = None
    url = args.url
    if url is None:
        proc, tmp, url = start_daemon()
    try:
        print("# torch %s, %d thread(s); optd at %s; load average %.2f %.2f %.2f on %d cores"
              % ((torch.__version__, torch.get_num_threads(), url) + os.getloadavg()
                 + (os.cpu_count(),)))
        for (label, factory), n in zip(models(), steps):
            bench(label, factory, n, url, args.optimizer)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
