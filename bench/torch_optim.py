"""Times torch.optim on one thread for the rows of bench/kernels.c.

    /usr/bin/python3 bench/torch_optim.py [--sizes 1e3,1e5,1e6,1e7] [--min-time 0.2]
                                          [--rows adam,sgd_momentum] [--modes foreach,single]
    /usr/bin/python3 bench/torch_optim.py --serve

One float32 parameter tensor of the given size with a fixed random gradient;
optimizer.step() is timed as bench/kernels.c times optim_step: a warm-up
(the first step also creates the optimizer state), then the median of
batches of >= 2 ms that together last at least --min-time seconds.

Modes: foreach (foreach=True, which torch 1.13 accepts for every optimizer
here) and single (foreach=False).  On the CPU the multi-tensor path is not
always the faster one (Adamax is about twice as slow at 1e5), so
build/bench/kernels asks for both when it wants torch's best figure.  The
allocator environment (GLIBC_TUNABLES) is the caller's.

Standalone, one line per cell:
    R <row key> <size> <params per second> <ns per step> <mode>

A batch during which the thread got less than 90% of the wall time on the
CPU was preempted by a neighbour; it counts only when fewer than three
batches ran undisturbed.

--serve is how build/bench/kernels drives it, so that torch is timed right
after optd on each cell, in the same few seconds of a shared machine.  It
prints "# torch <version>, <n> thread(s)", then answers each request line
"<row key> <size> <seconds> <mode>" on stdin with
    S <row key> <size> <mode> <undisturbed batches> ; <preempted batches>
(seconds per step of each batch) or "E <message>", until end of input.

Exit status 3 when torch cannot be imported.
"""

import argparse
import math
import statistics
import sys
import time

try:
    import torch
except Exception as exc:  # any import failure means "no torch here"
    print(f"# torch unavailable: {exc}", file=sys.stderr)
    sys.exit(3)

BATCH_SEC = 0.002
WARMUP_SEC = 0.01
MAX_SAMPLES = 201
ON_CPU_SHARE = 0.9
POOL_ENOUGH = 3
# Fewest batches per cell standalone, and per round when served unless a
# step takes SLOW_STEP_SEC or more.  A step at 1e7 can take 0.4 s when every
# temporary tensor is a fresh mmap, so this stays small.
MIN_SAMPLES = 3
SLOW_STEP_SEC = 0.05

# key -> optimizer factory.  Defaults are torch's, which optd shares; SGD's
# lr has no default in torch, and 0.01 is the value optd's C default fills in.
# Lion is not in torch 1.13, so it has no row here.
ROWS = {
    "sgd": lambda p, fe: torch.optim.SGD([p], lr=0.01, foreach=fe),
    "sgd_momentum": lambda p, fe: torch.optim.SGD([p], lr=0.01, momentum=0.9, foreach=fe),
    "adagrad": lambda p, fe: torch.optim.Adagrad([p], foreach=fe),
    "rmsprop": lambda p, fe: torch.optim.RMSprop([p], foreach=fe),
    "adam": lambda p, fe: torch.optim.Adam([p], foreach=fe),
    "adam_amsgrad": lambda p, fe: torch.optim.Adam([p], amsgrad=True, foreach=fe),
    "adamw": lambda p, fe: torch.optim.AdamW([p], foreach=fe),
    "adamax": lambda p, fe: torch.optim.Adamax([p], foreach=fe),
    "adadelta": lambda p, fe: torch.optim.Adadelta([p], foreach=fe),
    "nadam": lambda p, fe: torch.optim.NAdam([p], foreach=fe),
    "radam": lambda p, fe: torch.optim.RAdam([p], foreach=fe),
    "asgd": lambda p, fe: torch.optim.ASGD([p], foreach=fe),
    "rprop": lambda p, fe: torch.optim.Rprop([p], foreach=fe),
}
MODES = {"foreach": True, "single": False}


class Vectors:
    """The initial parameters and the gradient of the current size."""

    def __init__(self):
        self.n = None

    def get(self, n):
        if n != self.n:
            self.init = self.grad = None  # free the old pair first
            gen = torch.Generator().manual_seed(n)
            self.grad = torch.empty(n, dtype=torch.float32).uniform_(-1, 1, generator=gen)
            self.init = torch.empty(n, dtype=torch.float32).uniform_(-1, 1, generator=gen)
            self.n = n
        return self.init, self.grad


def batches(key, mode, vectors, n, min_time, min_samples):
    """Seconds per step of each timed batch, on a fresh optimizer: the
    batches that kept the CPU, and those the scheduler cut into (as
    bench/kernels.c tells them apart)."""
    init, grad = vectors.get(n)
    p = torch.nn.Parameter(init.clone())
    p.grad = grad
    opt = ROWS[key](p, MODES[mode])
    # The first step creates the state.  When it alone outlasts the warm-up
    # (a 1e7 step as shipped takes ~0.4 s) it is the whole warm-up, and its
    # pace, a little slow, only sizes the batches.
    calls = 0
    t0 = time.perf_counter_ns()  # CLOCK_MONOTONIC on Linux
    while True:
        opt.step()
        calls += 1
        el = (time.perf_counter_ns() - t0) * 1e-9
        if el >= WARMUP_SEC and (calls >= 2 or el >= 10 * BATCH_SEC):
            break
    per = el / calls
    k = 1 if per >= BATCH_SEC else math.ceil(BATCH_SEC / per)
    # Served requests are one round of several: a single batch is enough
    # when a step is slow (0.4 s as shipped at 1e7), but a few 10 ms steps
    # are cheap insurance against one bad batch.
    if per < SLOW_STEP_SEC:
        min_samples = max(min_samples, MIN_SAMPLES)
    ns = min(MAX_SAMPLES, max(min_samples, math.ceil(min_time / (per * k))))
    good, cut = [], []
    tries = 0
    while len(good) < ns and tries < 2 * ns:
        tries += 1
        c = time.thread_time_ns()
        a = time.perf_counter_ns()
        for _ in range(k):
            opt.step()
        wall = time.perf_counter_ns() - a
        on_cpu = time.thread_time_ns() - c
        (good if on_cpu >= ON_CPU_SHARE * wall else cut).append(wall * 1e-9 / k)
    return good, cut


def median_of(good, cut):
    return statistics.median(good if len(good) >= POOL_ENOUGH else good + cut)


def setup_threads():
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # only settable before any parallel work; intra-op is what counts
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)


def serve():
    vectors = Vectors()
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        try:
            key, n, min_time, mode = parts[0], int(parts[1]), float(parts[2]), parts[3]
            if key not in ROWS or mode not in MODES:
                raise ValueError(f"unknown row or mode: {key} {mode}")
            good, cut = batches(key, mode, vectors, n, min_time, 1)
            print(f"S {key} {n} {mode} " + " ".join(f"{s:.9g}" for s in good) + " ; "
                  + " ".join(f"{s:.9g}" for s in cut), flush=True)
        except Exception as exc:  # report, keep serving
            print(f"E {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e3,1e5,1e6,1e7")
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row keys")
    ap.add_argument("--modes", default="foreach,single", help="foreach and/or single")
    ap.add_argument("--serve", action="store_true", help="answer requests on stdin")
    args = ap.parse_args()

    setup_threads()
    if args.serve:
        serve()
        return
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    keys = [k for k in args.rows.split(",") if k]
    modes = [m for m in args.modes.split(",") if m]
    for k in keys:
        if k not in ROWS:
            ap.error(f"unknown row {k}")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m}")
    vectors = Vectors()
    for n in sizes:
        for key in keys:
            for mode in modes:
                sec = median_of(*batches(key, mode, vectors, n, args.min_time, MIN_SAMPLES))
                print(f"R {key} {n} {n / sec:.6g} {sec * 1e9:.6g} {mode}", flush=True)


if __name__ == "__main__":
    main()
