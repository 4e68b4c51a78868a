#!/usr/bin/python3
"""The source documents' experiment, with optd as the optimizer.

Trains two small models on the handwritten-digits data set that scikit-learn
ships (1 797 8x8 images, 20% held out) -- a 64-32-10 MLP and a small CNN (8
3x3 filters, ReLU, 2x2 max-pool, a dense layer to 10 classes), both with
NumPy forward/backward -- once per optimizer (SGD, momentum, Nesterov,
Adagrad, RMSprop, Adam, AdamW) and per seed, each session shared by 2 worker
processes in optd's `sync` mode with a cosine schedule.  Every round, each
worker sends the gradient of its half of the mini-batch; optd averages the
two, applies one update, and both workers get the same new parameters.

Writes demo/out/compare.png (training loss and test accuracy per step, per
model: the mean over seeds), demo/out/compare_seeds.png (every seed's loss
trajectory) and demo/out/compare.md (final loss, test accuracy, steps/s).

usage: compare.py [--url URL] [--steps N] [--seeds K] [--models mlp,cnn]
(without --url a daemon is started)
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


def softmax_xent(z, y):
    """Mean cross-entropy of logits z for labels y, and d loss / d z."""
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y] + 1e-12).mean()
    p[np.arange(n), y] -= 1
    return loss, p / n


class Model:
    """Parameters as one flat float64 vector, split by `shapes`."""
    name = ""
    title = ""
    shapes = ()

    def size(self):
        return sum(int(np.prod(s)) for s in self.shapes)

    def unflatten(self, theta):
        parts, off = [], 0
        for s in self.shapes:
            k = int(np.prod(s))
            parts.append(theta[off:off + k].reshape(s))
            off += k
        return parts

    def init(self, seed):
        """He-normal weights (fan-in from the first dimension), zero biases."""
        rng = np.random.default_rng(seed)
        parts = [rng.normal(0, np.sqrt(2.0 / s[0]), size=s) if len(s) > 1 else np.zeros(s)
                 for s in self.shapes]
        return np.concatenate([p.ravel() for p in parts])

    def accuracy(self, theta, x, y):
        return float((self.logits(theta, x).argmax(axis=1) == y).mean())


class MLP(Model):
    """64-32-10, tanh hidden layer."""
    name = "mlp"
    title = "MLP 64-32-10"
    shapes = ((64, 32), (32,), (32, 10), (10,))

    def logits(self, theta, x):
        w1, b1, w2, b2 = self.unflatten(theta)
        return np.tanh(x @ w1 + b1) @ w2 + b2

    def loss_grad(self, theta, x, y):
        w1, b1, w2, b2 = self.unflatten(theta)
        h = np.tanh(x @ w1 + b1)
        loss, dz = softmax_xent(h @ w2 + b2, y)
        dh = (dz @ w2.T) * (1 - h * h)
        grads = (x.T @ dh, dh.sum(axis=0), h.T @ dz, dz.sum(axis=0))
        return loss, np.concatenate([g.ravel() for g in grads])


class CNN(Model):
    """8 filters of 3x3 (valid: 6x6x8), ReLU, 2x2 max-pool (3x3x8 = 72), dense
    72 -> 10."""
    name = "cnn"
    title = "CNN conv 8x3x3, pool, 72-10"
    shapes = ((9, 8), (8,), (72, 10), (10,))

    @staticmethod
    def patches(x):
        img = x.reshape(-1, 8, 8)
        win = np.lib.stride_tricks.sliding_window_view(img, (3, 3), axis=(1, 2))
        return win.reshape(len(img), 6, 6, 9)

    def _forward(self, theta, x):
        wc, bc, w, b = self.unflatten(theta)
        pat = self.patches(x)
        pre = pat @ wc + bc                                  # n, 6, 6, 8
        act = np.maximum(pre, 0)
        blocks = act.reshape(len(x), 3, 2, 3, 2, 8)
        pooled = blocks.max(axis=(2, 4))                     # n, 3, 3, 8
        flat = pooled.reshape(len(x), 72)
        return pat, pre, blocks, pooled, flat, flat @ w + b

    def logits(self, theta, x):
        return self._forward(theta, x)[-1]

    def loss_grad(self, theta, x, y):
        wc, bc, w, b = self.unflatten(theta)
        pat, pre, blocks, pooled, flat, z = self._forward(theta, x)
        loss, dz = softmax_xent(z, y)
        gw, gb = flat.T @ dz, dz.sum(axis=0)
        dpool = (dz @ w.T).reshape(pooled.shape)
        # The gradient goes to the window's maximum; ties only happen at 0,
        # where the ReLU's gradient is 0 anyway.
        mask = blocks == pooled[:, :, None, :, None, :]
        dact = (mask * dpool[:, :, None, :, None, :]).reshape(pre.shape)
        dpre = dact * (pre > 0)
        gwc = pat.reshape(-1, 9).T @ dpre.reshape(-1, 8)
        gbc = dpre.sum(axis=(0, 1, 2))
        return loss, np.concatenate([g.ravel() for g in (gwc, gbc, gw, gb)])


MODELS = {m.name: m for m in (MLP(), CNN())}


def worker(url, session, model_name, seed, rank, steps, out_q):
    """One data-parallel worker: its half of every mini-batch."""
    model = MODELS[model_name]
    xtr, ytr, xte, yte = load_data()
    client = optd.Client(url)
    s = client.session(session)
    theta = np.asarray(s.params(), dtype=np.float64)
    step = s.info()["step"]
    rng = np.random.default_rng(100 + seed)  # the same batches in both workers
    losses, accs = [], []
    t0 = time.monotonic()
    for t in range(steps):
        idx = rng.choice(len(xtr), BATCH, replace=False)
        half = idx[rank::WORKERS]
        loss, grad = model.loss_grad(theta, xtr[half], ytr[half])
        theta = np.asarray(s.step(grad, loss=float(loss), base_step=step,
                                  worker=f"w{rank}"), dtype=np.float64)
        step += 1
        losses.append(float(loss))
        if rank == 0 and (t % 10 == 9 or t == steps - 1):
            accs.append((t + 1, model.accuracy(theta, xte, yte)))
            if (t + 1) % 100 == 0:
                print(f"  {session} step {t + 1:4d}  worker 0's loss (its half-batch, "
                      f"10-step mean) {np.mean(losses[-10:]):.4f}  "
                      f"test accuracy {accs[-1][1]:.3f}", flush=True)
    rate = steps / (time.monotonic() - t0)
    out_q.put((rank, losses, accs, model.accuracy(theta, xte, yte), rate))


def run(url, model, name, opt, seed, steps):
    client = optd.Client(url)
    session = f"demo-{model.name}-{name}-s{seed}"
    try:
        client.session(session).delete()
    except optd.OptdError:
        pass
    client.create_session(
        session, opt, params=model.init(seed), dtype="float64",
        schedule={"type": "cosine", "T_max": steps},
        mode={"type": "sync", "workers": WORKERS, "timeout_ms": 60000})
    q = mp.Queue()
    procs = [mp.Process(target=worker, args=(url, session, model.name, seed, r, steps, q))
             for r in range(WORKERS)]
    for p in procs:
        p.start()
    results = sorted(q.get() for _ in procs)
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"{session}: a worker failed")
    # The training loss of a step: the mean of the two workers' halves,
    # i.e. the loss of the whole mini-batch.
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
    ap.add_argument("--seeds", type=int, default=2, help="runs per optimizer and model")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args()
    models = [MODELS[m] for m in args.models.split(",")]
    os.makedirs(args.out, exist_ok=True)
    daemon = None
    tmp = tempfile.TemporaryDirectory()
    url = args.url
    if not url:
        daemon, url = start_daemon(tmp.name)
    results = {}
    try:
        for model in models:
            for name, opt in OPTIMIZERS:
                print(f"{model.name} {name}: {opt}", flush=True)
                runs = [run(url, model, name, opt, seed, args.steps)
                        for seed in range(1, args.seeds + 1)]
                results[(model.name, name)] = runs
                final = [r["loss"][-10:].mean() for r in runs]
                acc = [r["final_acc"] for r in runs]
                print(f"{model.name} {name:9s} whole-batch loss (mean of both workers, last 10 "
                      f"steps, mean of {len(runs)} seeds) {np.mean(final):.4f}  "
                      f"test accuracy {np.mean(acc):.3f}  "
                      f"{min(r['steps_per_s'] for r in runs):.0f} steps/s", flush=True)
    finally:
        if daemon:
            daemon.terminate()
            daemon.wait()
    write_report(results, models, args)


STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "v", "D", "x", "*"]


def lr_label(name, opt):
    extra = "".join(f", {k} {v}" for k, v in opt.items() if k not in ("type", "lr", "nesterov"))
    return f"{name} (lr {opt['lr']:g}{extra})"


def log_axis(ax):
    """Readable log-scale ticks: 0.05, 0.1, 0.2, 0.5, 1, 2 rather than 10^-1."""
    from matplotlib import ticker
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(True, which="major", alpha=0.3)


def write_report(results, models, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 10
    opts = dict(OPTIMIZERS)
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.6 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        ax1, ax2 = row
        lows = []
        for i, (name, _) in enumerate(OPTIMIZERS):
            runs = results[(model.name, name)]
            style = dict(linestyle=STYLES[i % len(STYLES)], marker=MARKERS[i % len(MARKERS)],
                         markevery=0.1, markersize=4, color=f"C{i}", label=lr_label(name, opts[name]))
            loss = np.mean([r["loss"] for r in runs], axis=0)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax1.plot(np.arange(k, len(loss) + 1), smooth, **style)
            steps = [s for s, _ in runs[0]["acc"]]
            accs = np.mean([[a for _, a in r["acc"]] for r in runs], axis=0)
            ax2.plot(steps, accs, **style)
            # Zoom to where the curves spend their time: from 10% of the run on.
            lows += [a for s, a in zip(steps, accs) if s >= args.steps // 10]
        log_axis(ax1)
        ax1.set(title=f"{model.title}: training loss, mean of {args.seeds} seeds",
                xlabel="step", ylabel="whole-batch cross-entropy, 10-step mean")
        low = max(0.0, min(lows) - 0.02) if lows else 0.0
        ax2.set(title=f"{model.title}: test accuracy, mean of {args.seeds} seeds",
                xlabel="step", ylabel="accuracy", ylim=(low, 1.0))
        ax2.grid(True, alpha=0.3)
        ax1.legend(fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"digits, batch {BATCH} over {WORKERS} sync workers per optimizer, cosine "
                 f"schedule, {args.steps} steps")
    fig.tight_layout()
    png = os.path.join(args.out, "compare.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)

    # Every seed's trajectory: how much of a gap between optimizers is the
    # optimizer and how much the draw.
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, (name, _) in enumerate(OPTIMIZERS):
            for j, r in enumerate(results[(model.name, name)]):
                smooth = np.convolve(r["loss"], np.ones(k) / k, mode="valid")
                ax.plot(np.arange(k, len(r["loss"]) + 1), smooth, color=f"C{i}",
                        linestyle=STYLES[i % len(STYLES)], linewidth=1, alpha=0.8,
                        label=lr_label(name, opts[name]) if j == 0 else None)
        log_axis(ax)
        ax.set(title=f"{model.title}: training loss of each seed",
               xlabel="step", ylabel="whole-batch cross-entropy, 10-step mean")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png2 = os.path.join(args.out, "compare_seeds.png")
    fig.savefig(png2, dpi=110)
    plt.close(fig)

    md = os.path.join(args.out, "compare.md")
    with open(md, "w") as f:
        f.write("# Optimizer comparison through optd\n\n")
        f.write(f"Digits data set (80/20 split), batch {BATCH} split over {WORKERS} sync "
                f"workers, cosine schedule over {args.steps} steps, {args.seeds} seeds. Loss: "
                f"the whole mini-batch's (the mean of both workers' halves) over the last 10 "
                f"steps; min-max over seeds in brackets.\n\n")
        f.write("| model | optimizer | final training loss | test accuracy | steps/s |\n")
        f.write("|---|---|---|---|---|\n")
        for model in models:
            for name, _ in OPTIMIZERS:
                runs = results[(model.name, name)]
                fl = [r["loss"][-10:].mean() for r in runs]
                ac = [r["final_acc"] for r in runs]
                f.write(f"| {model.name} | {lr_label(name, opts[name])} | {np.mean(fl):.4f} "
                        f"[{min(fl):.4f}-{max(fl):.4f}] | {np.mean(ac):.3f} "
                        f"[{min(ac):.3f}-{max(ac):.3f}] | "
                        f"{min(r['steps_per_s'] for r in runs):.0f} |\n")
    print(f"wrote {png}, {png2} and {md}")


if __name__ == "__main__":
    main()
