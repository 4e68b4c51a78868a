#!/usr/bin/python3
"""Optimizer trajectories on two 2-D test functions, each optimizer an optd session.

The figure of the source documents: SGD, momentum, Nesterov, Adagrad,
Adadelta, RMSprop, Adam, Adamax, NAdam, RAdam and Lion each descend the
Rosenbrock function (minimum at (1, 1)) and the Beale function (minimum at
(3, 0.5)) from the same start.  Every optimizer is a float64 optd session of
two parameters: each step sends the exact gradient (and the function's
value as the loss) and gets the new point back.  Drawn over the contour
plot (log-spaced levels), with a legend giving the steps each took to come
within TOL of the minimum.

Writes demo/out/trajectories.png and demo/out/trajectories.md.

usage: trajectories.py [--url URL] [--steps N] [--out DIR]
(without --url a daemon is started)
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import optd  # noqa: E402

TOL = 1e-2  # distance to the minimum that counts as reached


def rosenbrock(p):
    x, y = p
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def rosenbrock_grad(p):
    x, y = p
    return np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


def beale(p):
    x, y = p
    return ((1.5 - x + x * y) ** 2 + (2.25 - x + x * y * y) ** 2
            + (2.625 - x + x * y ** 3) ** 2)


def beale_grad(p):
    x, y = p
    a = 1.5 - x + x * y
    b = 2.25 - x + x * y * y
    c = 2.625 - x + x * y ** 3
    return np.array([2 * a * (y - 1) + 2 * b * (y * y - 1) + 2 * c * (y ** 3 - 1),
                     2 * a * x + 2 * b * 2 * x * y + 2 * c * 3 * x * y * y])


# name, f, grad, start, minimum, plot window (x0, x1, y0, y1)
FUNCTIONS = [
    ("Rosenbrock", rosenbrock, rosenbrock_grad, (-1.5, 2.0), (1.0, 1.0), (-2.0, 2.0, -1.0, 3.0)),
    ("Beale", beale, beale_grad, (1.0, 1.5), (3.0, 0.5), (-0.5, 4.0, -1.5, 2.0)),
]

# Per function: the optimizer's hyperparameters (torch.optim's names).
# The learning rates are each optimizer's usual order of magnitude for
# these scales, the same for every start; nothing is tuned per run.
OPTIMIZERS = [
    ("SGD", {"type": "sgd", "lr": 1e-3}, {"type": "sgd", "lr": 1e-2}),
    ("momentum", {"type": "sgd", "lr": 2e-4, "momentum": 0.9},
     {"type": "sgd", "lr": 2e-3, "momentum": 0.9}),
    ("Nesterov", {"type": "sgd", "lr": 2e-4, "momentum": 0.9, "nesterov": True},
     {"type": "sgd", "lr": 2e-3, "momentum": 0.9, "nesterov": True}),
    ("Adagrad", {"type": "adagrad", "lr": 0.5}, {"type": "adagrad", "lr": 0.5}),
    ("Adadelta", {"type": "adadelta", "lr": 1.0}, {"type": "adadelta", "lr": 1.0}),
    ("RMSprop", {"type": "rmsprop", "lr": 0.01}, {"type": "rmsprop", "lr": 0.01}),
    ("Adam", {"type": "adam", "lr": 0.05}, {"type": "adam", "lr": 0.05}),
    ("Adamax", {"type": "adamax", "lr": 0.05}, {"type": "adamax", "lr": 0.05}),
    ("NAdam", {"type": "nadam", "lr": 0.05}, {"type": "nadam", "lr": 0.05}),
    ("RAdam", {"type": "radam", "lr": 0.01}, {"type": "radam", "lr": 0.02}),
    ("Lion", {"type": "lion", "lr": 0.005}, {"type": "lion", "lr": 0.005}),
]


def descend(client, fname, f, grad, start, minimum, label, opt, steps):
    """One optimizer as one optd session; returns the path (steps+1 points)
    and the first step within TOL of the minimum (None when never)."""
    name = "traj-%s-%s" % (fname.lower(), label.lower())
    try:
        client.session(name).delete()
    except optd.OptdError:
        pass
    s = client.create_session(name, opt, params=list(start), dtype="float64")
    p = np.array(start, dtype=np.float64)
    path = [p.copy()]
    reached = None
    for t in range(1, steps + 1):
        g = grad(p)
        if not np.all(np.isfinite(g)):
            break
        p = np.asarray(s.step(g, loss=float(f(p)), worker="traj"), dtype=np.float64)
        path.append(p.copy())
        if not np.all(np.isfinite(p)) or np.abs(p).max() > 1e6:
            break
        if reached is None and np.linalg.norm(p - np.asarray(minimum)) < TOL:
            reached = t
        # Well inside the tolerance: the rest of the path is a dot.
        if reached is not None and np.linalg.norm(p - np.asarray(minimum)) < TOL / 100:
            break
    return np.array(path), reached


def start_daemon(tmp):
    exe = os.environ.get("OPTD_BIN", os.path.join(ROOT, "build", "optd"))
    p = subprocess.Popen([exe, "--port", "0", "--db", os.path.join(tmp, "traj.db"),
                          "--log-level", "warn"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("optd listening on "):
        p.kill()
        raise SystemExit("optd did not start")
    return p, line.split()[-1]


def plot(results, steps, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FUNCTIONS), figsize=(8 * len(FUNCTIONS), 7.2))
    # tab10's ten colours, then dashed lines in the same colours.
    colors = plt.get_cmap("tab10").colors
    for ax, (fname, f, _, start, minimum, win) in zip(axes, FUNCTIONS):
        xs = np.linspace(win[0], win[1], 400)
        ys = np.linspace(win[2], win[3], 400)
        X, Y = np.meshgrid(xs, ys)
        Z = f((X, Y))
        levels = np.logspace(np.log10(max(Z.min(), 1e-3)), np.log10(Z.max()), 30)
        ax.contourf(X, Y, Z, levels=levels, cmap="Blues_r", alpha=0.35,
                    norm=matplotlib.colors.LogNorm())
        ax.contour(X, Y, Z, levels=levels, colors="0.55", linewidths=0.4)
        for k, (label, _, _) in enumerate(OPTIMIZERS):
            path, reached = results[(fname, label)]
            steps_txt = "%d steps" % reached if reached is not None else "not within %d" % steps
            color = colors[k % 10]
            ax.plot(path[:, 0], path[:, 1], "-" if k < 10 else "--", color=color, lw=1.6,
                    label="%s (%s)" % (label, steps_txt))
            ax.plot(path[-1, 0], path[-1, 1], "o", color=color, ms=4)
        ax.plot(*start, "ks", ms=8, label="start (%g, %g)" % start)
        ax.plot(*minimum, "r*", ms=16, label="minimum (%g, %g)" % minimum)
        ax.set_xlim(win[0], win[1])
        ax.set_ylim(win[2], win[3])
        ax.set_title("%s: steps to come within %g of the minimum" % (fname, TOL))
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend(loc="upper right" if fname == "Rosenbrock" else "upper right", fontsize=8,
                  framealpha=0.9)
    fig.suptitle("Each optimizer is an optd session (float64); the same start for all")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    daemon = None
    tmp = tempfile.TemporaryDirectory()
    url = args.url
    if not url:
        daemon, url = start_daemon(tmp.name)
    results = {}
    try:
        client = optd.Client(url)
        for k, (fname, f, grad, start, minimum, _) in enumerate(FUNCTIONS):
            for label, *opts in OPTIMIZERS:
                path, reached = descend(client, fname, f, grad, start, minimum, label, opts[k],
                                        args.steps)
                results[(fname, label)] = (path, reached)
                print("%-10s %-9s %s, ends at (%.4f, %.4f) f=%.3g" % (
                    fname, label, "%5d steps" % reached if reached else "not reached",
                    path[-1, 0], path[-1, 1], f(path[-1])), flush=True)
    finally:
        if daemon:
            daemon.terminate()
            daemon.wait()
        tmp.cleanup()
    png = os.path.join(args.out, "trajectories.png")
    plot(results, args.steps, png)
    with open(os.path.join(args.out, "trajectories.md"), "w") as md:
        md.write("| optimizer | %s |\n|---|%s\n" % (
            " | ".join("%s: steps to within %g" % (f[0], TOL) for f in FUNCTIONS),
            "---|" * len(FUNCTIONS)))
        for label, *opts in OPTIMIZERS:
            cells = []
            for fname, *_ in FUNCTIONS:
                r = results[(fname, label)][1]
                cells.append(str(r) if r is not None else "not within %d" % args.steps)
            md.write("| %s (%s) | %s |\n" % (label, ", ".join(
                "%s" % o for o in opts), " | ".join(cells)))
    print("wrote", png)


if __name__ == "__main__":
    main()
