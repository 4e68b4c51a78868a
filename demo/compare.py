#!/usr/bin/python3
"""The source documents' experiment, with optd as the optimizer.

Trains a 64-32-10 MLP (NumPy forward/backward) on the handwritten-digits data
set that scikit-learn ships (1 797 8x8 images, 20% held out), once per
optimizer -- SGD, momentum, Nesterov, Adagrad, RMSprop, Adam, AdamW -- each
session shared by 2 worker processes in optd's `sync` mode with a cosine
schedule.  Every round, each worker sends the gradient of its half of the
mini-batch; optd averages the two, applies one update, and both workers get
the same new parameters.

Writes demo/out/compare.png (training loss and test accuracy per step) and
demo/out/compare.md (final loss, test accuracy, steps/s).

usage: compare.py [--url URL] [--steps N]   (without --url a daemon is started)
"""
import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import optd  # noqa: E402

SIZES = (64, 32, 10)
BATCH = 64
WORKERS = 2

OPTIMIZERS = [
    ("sgd", {"type": "sgd", "lr": 0.1}),
    ("momentum", {"type": "sgd", "lr": 0.05, "momentum": 0.9}),
    ("nesterov", {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("adagrad", {"type": "adagrad", "lr": 0.05}),
    ("rmsprop", {"type": "rmsprop", "lr": 0.002}),
    ("adam", {"type": "adam", "lr": 0.005}),
    ("adamw", {"type": "adamw", "lr": 0.005, "weight_decay": 0.01}),
]


def load_data(seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float64)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    cut = int(len(x) * 0.8)
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def shapes():
    out = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        out += [(a, b), (b,)]
    return out


def n_params():
    return sum(int(np.prod(s)) for s in shapes())


def unflatten(theta):
    parts, off = [], 0
    for s in shapes():
        k = int(np.prod(s))
        parts.append(theta[off:off + k].reshape(s))
        off += k
    return parts


def init_params(seed=1):
    rng = np.random.default_rng(seed)
    parts = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        parts.append(rng.normal(0, np.sqrt(2.0 / a), size=(a, b)))
        parts.append(np.zeros(b))
    return np.concatenate([p.ravel() for p in parts])


def forward_backward(theta, x, y):
    """Cross-entropy loss and its gradient (flat), tanh hidden layer."""
    w1, b1, w2, b2 = unflatten(theta)
    h = np.tanh(x @ w1 + b1)
    z = h @ w2 + b2
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(x)
    loss = -np.log(p[np.arange(n), y] + 1e-12).mean()
    dz = p
    dz[np.arange(n), y] -= 1
    dz /= n
    gw2 = h.T @ dz
    gb2 = dz.sum(axis=0)
    dh = (dz @ w2.T) * (1 - h * h)
    gw1 = x.T @ dh
    gb1 = dh.sum(axis=0)
    return loss, np.concatenate([g.ravel() for g in (gw1, gb1, gw2, gb2)])


def accuracy(theta, x, y):
    w1, b1, w2, b2 = unflatten(theta)
    return float(((np.tanh(x @ w1 + b1) @ w2 + b2).argmax(axis=1) == y).mean())


def worker(url, session, rank, steps, out_q):
    """One data-parallel worker: its half of every mini-batch."""
    xtr, ytr, xte, yte = load_data()
    client = optd.Client(url)
    s = client.session(session)
    theta = np.asarray(s.params(), dtype=np.float64)
    step = s.info()["step"]
    rng = np.random.default_rng(100)  # the same batches in both workers
    losses, accs = [], []
    t0 = time.monotonic()
    for t in range(steps):
        idx = rng.choice(len(xtr), BATCH, replace=False)
        half = idx[rank::WORKERS]
        loss, grad = forward_backward(theta, xtr[half], ytr[half])
        theta = np.asarray(s.step(grad, loss=float(loss), base_step=step,
                                  worker=f"w{rank}"), dtype=np.float64)
        step += 1
        losses.append(float(loss))
        if rank == 0 and (t % 10 == 9 or t == steps - 1):
            accs.append((t + 1, accuracy(theta, xte, yte)))
            if (t + 1) % 100 == 0:
                print(f"  {session} step {t + 1:4d}  loss {np.mean(losses[-10:]):.4f}  "
                      f"test accuracy {accs[-1][1]:.3f}", flush=True)
    rate = steps / (time.monotonic() - t0)
    out_q.put((rank, losses, accs, accuracy(theta, xte, yte), rate))


def run(url, name, opt, steps):
    client = optd.Client(url)
    session = f"demo-{name}"
    try:
        client.session(session).delete()
    except optd.OptdError:
        pass
    client.create_session(
        session, opt, params=init_params(), dtype="float64",
        schedule={"type": "cosine", "T_max": steps},
        mode={"type": "sync", "workers": WORKERS, "timeout_ms": 60000})
    q = mp.Queue()
    procs = [mp.Process(target=worker, args=(url, session, r, steps, q))
             for r in range(WORKERS)]
    for p in procs:
        p.start()
    results = sorted(q.get() for _ in procs)
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"{name}: a worker failed")
    # training loss per step: the mean of the two halves
    loss = np.mean([r[1] for r in results], axis=0)
    return {"loss": loss, "acc": results[0][2], "final_acc": results[0][3],
            "steps_per_s": min(r[4] for r in results)}


def start_daemon(tmp):
    exe = os.environ.get("OPTD_BIN", os.path.join(ROOT, "build", "optd"))
    p = subprocess.Popen([exe, "--port", "0", "--db", os.path.join(tmp, "demo.db"),
                          "--log-level", "warn"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("optd listening on "):
        p.kill()
        raise SystemExit("optd did not start")
    return p, line.split()[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    daemon = None
    tmp = tempfile.TemporaryDirectory()
    url = args.url
    if not url:
        daemon, url = start_daemon(tmp.name)
    try:
        results = {}
        for name, opt in OPTIMIZERS:
            print(f"{name}: {opt}", flush=True)
            r = run(url, name, opt, args.steps)
            results[name] = r
            print(f"{name:9s} final loss {r['loss'][-10:].mean():.4f}  "
                  f"test accuracy {r['final_acc']:.3f}  {r['steps_per_s']:.0f} steps/s",
                  flush=True)
    finally:
        if daemon:
            daemon.terminate()
            daemon.wait()
    write_report(results, args)


def write_report(results, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        k = 10
        smooth = np.convolve(r["loss"], np.ones(k) / k, mode="valid")
        ax1.plot(np.arange(k, len(r["loss"]) + 1), smooth, label=name)
        steps, accs = zip(*r["acc"])
        ax2.plot(steps, accs, label=name)
    ax1.set(title="training loss (10-step mean)", xlabel="step", ylabel="cross-entropy",
            yscale="log")
    ax2.set(title="test accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    ax1.legend()
    ax2.legend(loc="lower right")
    fig.suptitle(f"64-32-10 MLP on digits, 2 sync workers per optimizer, cosine schedule, "
                 f"{args.steps} steps")
    fig.tight_layout()
    png = os.path.join(args.out, "compare.png")
    fig.savefig(png, dpi=110)
    md = os.path.join(args.out, "compare.md")
    with open(md, "w") as f:
        f.write("# Optimizer comparison through optd\n\n")
        f.write(f"64-32-10 MLP on the digits data set (80/20 split), batch {BATCH} split over "
                f"{WORKERS} sync workers, cosine schedule over {args.steps} steps.\n\n")
        f.write("| optimizer | final training loss (last 10 steps) | test accuracy | steps/s |\n")
        f.write("|---|---|---|---|\n")
        for name, r in results.items():
            f.write(f"| {name} | {r['loss'][-10:].mean():.4f} | {r['final_acc']:.3f} | "
                    f"{r['steps_per_s']:.0f} |\n")
    print(f"wrote {png} and {md}")


if __name__ == "__main__":
    main()
