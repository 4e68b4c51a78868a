#!/usr/bin/python3
"""Writes the reference vectors of optd's learning-rate schedules.

For every configuration in CONFIGS it evaluates the schedule at t = 0..T_LAST
(t = optimizer steps already applied, torch's last_epoch) with plain Python
floats, following torch.optim.lr_scheduler 1.13's closed forms (and get_lr
where torch has no closed form), plus optd's warmup and its rule for
one_cycle past total_steps, and writes tests/fixtures/sched/<name>.txt with
every float as a hex float.  tests/test_optim_sched.c compares the C
implementation with these files.

Run from the repository root:  /usr/bin/python3 tests/ref/gen_sched.py
It needs nothing beyond the standard library; the fixtures are committed and
the tests never run this script.

Fixture format, one item per line:
    type NAME                       schedule name
    hp NAME VALUE                   a hyperparameter set explicitly (others
                                    keep optd's defaults, which must be
                                    torch's); floats in hex, ints in decimal,
                                    bools true/false, enums by name, lists
                                    comma-separated
    base_lr HEX
    loss HEX                        reduce_on_plateau: the loss reported after
                                    step t+1, in order
    lr T HEX MOMENTUM               MOMENTUM is a hex float or "-"
"""

import math
import os
import random
import sys
from bisect import bisect_right

T_LAST = 300
OUT_DIR = os.path.join("tests", "fixtures", "sched")

# torch 1.13's defaults (plus optd's warmup pair), per schedule.
DEFAULTS = {
    "none": {},
    "constant": {"factor": 1.0 / 3, "total_iters": 5},
    "step": {"gamma": 0.1},
    "multistep": {"gamma": 0.1},
    "exponential": {},
    "cosine": {"eta_min": 0.0},
    "cosine_warm_restarts": {"T_mult": 1, "eta_min": 0.0},
    "linear": {"start_factor": 1.0 / 3, "end_factor": 1.0, "total_iters": 5},
    "polynomial": {"total_iters": 5, "power": 1.0},
    "one_cycle": {"pct_start": 0.3, "anneal_strategy": "cos", "div_factor": 25.0,
                  "final_div_factor": 1e4, "three_phase": False, "cycle_momentum": True,
                  "base_momentum": 0.85, "max_momentum": 0.95},
    "reduce_on_plateau": {"mode": "min", "factor": 0.1, "patience": 10, "threshold": 1e-4,
                          "threshold_mode": "rel", "cooldown": 0, "min_lr": 0.0,
                          "eps": 1e-8},
}
for _d in DEFAULTS.values():
    _d.update({"warmup_steps": 0, "warmup_start_factor": 0.0})


# ---------------------------------------------------------------- schedules
# Each returns (lr, momentum or None) at t, without warmup.

def constant(c, base_lr, t):
    return base_lr * (c["factor"] + (t >= c["total_iters"]) * (1 - c["factor"])), None


def step(c, base_lr, t):
    return base_lr * c["gamma"] ** (t // c["step_size"]), None


def multistep(c, base_lr, t):
    return base_lr * c["gamma"] ** bisect_right(sorted(c["milestones"]), t), None


def exponential(c, base_lr, t):
    return base_lr * c["gamma"] ** t, None


def cosine(c, base_lr, t):
    eta_min = c["eta_min"]
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t / c["T_max"])) / 2, None


def cosine_warm_restarts(c, base_lr, t):
    # CosineAnnealingWarmRestarts.step() without an epoch, t times.
    t_cur, t_i = 0, c["T_0"]
    for _ in range(t):
        t_cur += 1
        if t_cur >= t_i:
            t_cur -= t_i
            t_i *= c["T_mult"]
    eta_min = c["eta_min"]
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2, None


def linear(c, base_lr, t):
    s, e, n = c["start_factor"], c["end_factor"], c["total_iters"]
    return base_lr * (s + (e - s) * min(n, t) / n), None


def polynomial(c, base_lr, t):
    n = c["total_iters"]
    return base_lr * (1.0 - min(n, t) / n) ** c["power"], None


def one_cycle(c, base_lr, t):
    # OneCycleLR.get_lr; optd holds step total_steps - 1 from there on.
    del base_lr  # one_cycle starts from max_lr / div_factor, as torch does
    total = c["total_steps"]
    step_num = min(t, total - 1)
    pct_start = c["pct_start"]
    initial_lr = c["max_lr"] / c["div_factor"]
    max_lr = c["max_lr"]
    min_lr = initial_lr / c["final_div_factor"]
    base_m, max_m = c["base_momentum"], c["max_momentum"]
    if c["three_phase"]:
        phases = [
            (float(pct_start * total) - 1, initial_lr, max_lr, max_m, base_m),
            (float(2 * pct_start * total) - 2, max_lr, initial_lr, base_m, max_m),
            (total - 1, initial_lr, min_lr, max_m, max_m),
        ]
    else:
        phases = [
            (float(pct_start * total) - 1, initial_lr, max_lr, max_m, base_m),
            (total - 1, max_lr, min_lr, base_m, max_m),
        ]
    if c["anneal_strategy"] == "cos":
        def anneal(start, end, pct):
            cos_out = math.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
    else:
        def anneal(start, end, pct):
            return (end - start) * pct + start
    start_step = 0
    for i, (end_step, s_lr, e_lr, s_m, e_m) in enumerate(phases):
        if step_num <= end_step or i == len(phases) - 1:
            pct = (step_num - start_step) / (end_step - start_step)
            lr = anneal(s_lr, e_lr, pct)
            m = anneal(s_m, e_m, pct) if c["cycle_momentum"] else None
            return lr, m
        start_step = end_step
    raise AssertionError("unreachable")


class Plateau:
    """ReduceLROnPlateau.step(metrics), one parameter group."""

    def __init__(self, c, base_lr):
        self.c = c
        self.lr = base_lr
        self.best = math.inf if c["mode"] == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def is_better(self, a, best):
        c = self.c
        if c["mode"] == "min" and c["threshold_mode"] == "rel":
            return a < best * (1. - c["threshold"])
        if c["mode"] == "min":
            return a < best - c["threshold"]
        if c["threshold_mode"] == "rel":
            return a > best * (c["threshold"] + 1.)
        return a > best + c["threshold"]

    def observe(self, loss):
        c = self.c
        if self.is_better(loss, self.best):
            self.best = loss
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > c["patience"]:
            old_lr = self.lr
            new_lr = max(old_lr * c["factor"], c["min_lr"])
            if old_lr - new_lr > c["eps"]:
                self.lr = new_lr
            self.cooldown_counter = c["cooldown"]
            self.num_bad_epochs = 0


SCHEDULES = {
    "none": lambda c, base_lr, t: (base_lr, None),
    "constant": constant,
    "step": step,
    "multistep": multistep,
    "exponential": exponential,
    "cosine": cosine,
    "cosine_warm_restarts": cosine_warm_restarts,
    "linear": linear,
    "polynomial": polynomial,
    "one_cycle": one_cycle,
}


def warmed(c, value_at, t):
    """optd's warmup: the schedule's value at 0 times a factor rising
    linearly from warmup_start_factor to 1 over warmup_steps, then the
    schedule with t counted from the end of warmup."""
    w = c["warmup_steps"]
    if t >= w:
        return value_at(t - w)
    lr, m = value_at(0)
    wsf = c["warmup_start_factor"]
    return lr * (wsf + (1 - wsf) * t / w), m


def evaluate(kind, given, base_lr, losses=None):
    """[(lr, momentum)] for t = 0..T_LAST."""
    c = dict(DEFAULTS[kind])
    c.update(given)
    if kind != "reduce_on_plateau":
        f = SCHEDULES[kind]
        return [warmed(c, lambda u: f(c, base_lr, u), t) for t in range(T_LAST + 1)]
    # The value for the update after t steps has seen t losses.
    p = Plateau(c, base_lr)
    out = []
    for t in range(T_LAST + 1):
        out.append(warmed(c, lambda u: (p.lr, None), t))
        p.observe(losses[t])
    return out


# ---------------------------------------------------------------- losses

def loss_falling(seed, nan_at=None):
    """A loss that falls and then wanders on a floor, so that plateaus
    trigger several reductions."""
    rng = random.Random(seed)
    out = []
    for t in range(T_LAST + 1):
        v = 0.5 + math.exp(-t / 25.0) + 0.02 * rng.random()
        if 120 <= t < 140:
            v = 0.4 - 0.001 * (t - 120)  # a late improvement, then a plateau
        out.append(v)
    if nan_at is not None:
        out[nan_at] = math.nan
    return out


def metric_rising(seed):
    """An accuracy-like metric for mode "max"."""
    rng = random.Random(seed)
    return [0.9 - 0.5 * math.exp(-t / 40.0) + 0.01 * rng.random() for t in range(T_LAST + 1)]


# ---------------------------------------------------------------- configs
# (fixture name, schedule, explicitly given hyperparameters, base_lr, losses)

CONFIGS = [
    ("none_plain", "none", {}, 0.1, None),
    ("none_warmup", "none", {"warmup_steps": 10, "warmup_start_factor": 0.1}, 0.1, None),
    ("constant_default", "constant", {}, 0.05, None),
    ("constant_half_40", "constant", {"factor": 0.5, "total_iters": 40}, 0.3, None),
    ("constant_one_iter", "constant", {"factor": 0.1, "total_iters": 1}, 0.3, None),
    ("constant_warmup", "constant", {"warmup_steps": 7, "warmup_start_factor": 0.5}, 0.05,
     None),
    ("step_30", "step", {"step_size": 30}, 0.05, None),
    ("step_7_half", "step", {"step_size": 7, "gamma": 0.5}, 1.0, None),
    ("step_1_warmup", "step", {"step_size": 1, "gamma": 0.99, "warmup_steps": 25}, 0.01,
     None),
    ("multistep_30_80", "multistep", {"milestones": [30, 80]}, 0.05, None),
    ("multistep_many", "multistep", {"milestones": [1, 2, 3, 100, 250], "gamma": 0.5}, 0.2,
     None),
    ("multistep_zero", "multistep", {"milestones": [0, 10, 300], "gamma": 0.3}, 0.7, None),
    ("exponential_099", "exponential", {"gamma": 0.99}, 0.1, None),
    ("exponential_up", "exponential", {"gamma": 1.01}, 0.001, None),
    ("exponential_warmup", "exponential",
     {"gamma": 0.9, "warmup_steps": 5, "warmup_start_factor": 0.2}, 0.1, None),
    ("cosine_100", "cosine", {"T_max": 100}, 0.1, None),
    ("cosine_50_etamin", "cosine", {"T_max": 50, "eta_min": 1e-3}, 0.05, None),
    ("cosine_1", "cosine", {"T_max": 1}, 0.1, None),
    ("cosine_warmup", "cosine", {"T_max": 200, "warmup_steps": 20}, 0.3, None),
    ("cwr_10", "cosine_warm_restarts", {"T_0": 10}, 0.1, None),
    ("cwr_7_mult2", "cosine_warm_restarts", {"T_0": 7, "T_mult": 2, "eta_min": 1e-4}, 0.05,
     None),
    ("cwr_1_mult3", "cosine_warm_restarts", {"T_0": 1, "T_mult": 3}, 0.1, None),
    ("cwr_warmup", "cosine_warm_restarts",
     {"T_0": 30, "T_mult": 2, "warmup_steps": 15, "warmup_start_factor": 0.01}, 0.2, None),
    ("linear_default", "linear", {}, 0.05, None),
    ("linear_quarter", "linear",
     {"start_factor": 0.25, "end_factor": 0.75, "total_iters": 100}, 0.1, None),
    ("linear_decay_300", "linear",
     {"start_factor": 1.0, "end_factor": 0.0, "total_iters": 300}, 0.1, None),
    ("linear_warmup", "linear",
     {"start_factor": 0.5, "total_iters": 40, "warmup_steps": 10}, 0.1, None),
    ("polynomial_default", "polynomial", {}, 0.1, None),
    ("polynomial_sq_200", "polynomial", {"total_iters": 200, "power": 2.0}, 0.1, None),
    ("polynomial_sqrt_100", "polynomial", {"total_iters": 100, "power": 0.5}, 0.1, None),
    ("polynomial_warmup", "polynomial",
     {"total_iters": 250, "power": 1.5, "warmup_steps": 50, "warmup_start_factor": 0.1},
     0.1, None),
    ("one_cycle_default", "one_cycle", {"max_lr": 0.1, "total_steps": 250}, 0.123, None),
    ("one_cycle_exact", "one_cycle", {"max_lr": 0.01, "total_steps": 301}, 0.5, None),
    ("one_cycle_three_phase", "one_cycle",
     {"max_lr": 0.2, "total_steps": 200, "three_phase": True}, 0.1, None),
    ("one_cycle_linear", "one_cycle",
     {"max_lr": 0.1, "total_steps": 280, "anneal_strategy": "linear"}, 0.1, None),
    ("one_cycle_linear_three", "one_cycle",
     {"max_lr": 0.3, "total_steps": 150, "anneal_strategy": "linear", "three_phase": True,
      "pct_start": 0.4}, 0.1, None),
    ("one_cycle_no_momentum", "one_cycle",
     {"max_lr": 0.05, "total_steps": 290, "pct_start": 0.25, "div_factor": 10.0,
      "final_div_factor": 100.0, "cycle_momentum": False}, 0.1, None),
    ("one_cycle_momentum", "one_cycle",
     {"max_lr": 1.0, "total_steps": 120, "base_momentum": 0.8, "max_momentum": 0.99,
      "pct_start": 0.5}, 0.1, None),
    ("one_cycle_short", "one_cycle", {"max_lr": 0.1, "total_steps": 2}, 0.1, None),
    ("one_cycle_warmup", "one_cycle",
     {"max_lr": 0.1, "total_steps": 200, "warmup_steps": 30, "warmup_start_factor": 0.2},
     0.1, None),
    ("plateau_min_rel", "reduce_on_plateau", {"patience": 5}, 0.1, loss_falling(1)),
    ("plateau_min_abs_cooldown", "reduce_on_plateau",
     {"threshold_mode": "abs", "threshold": 0.01, "patience": 3, "cooldown": 2}, 0.1,
     loss_falling(2)),
    ("plateau_max_rel", "reduce_on_plateau",
     {"mode": "max", "patience": 4, "cooldown": 5, "min_lr": 1e-4, "factor": 0.3}, 0.1,
     metric_rising(3)),
    ("plateau_max_abs", "reduce_on_plateau",
     {"mode": "max", "threshold_mode": "abs", "threshold": 0.002, "factor": 0.5,
      "patience": 2}, 0.05, metric_rising(4)),
    ("plateau_eps_nan", "reduce_on_plateau",
     {"patience": 2, "factor": 0.5, "min_lr": 0.01, "eps": 1e-3}, 0.1,
     loss_falling(5, nan_at=150)),
    ("plateau_default_warmup", "reduce_on_plateau",
     {"warmup_steps": 12, "warmup_start_factor": 0.25}, 0.1, loss_falling(6)),
]


def hp_text(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return v.hex()
    if isinstance(v, str):
        return v
    return ",".join(str(x) for x in v)


def write(name, kind, given, base_lr, losses):
    rows = evaluate(kind, given, base_lr, losses)
    lines = ["# optd schedule fixture, written by tests/ref/gen_sched.py; do not edit",
             "type " + kind]
    lines += ["hp %s %s" % (k, hp_text(v)) for k, v in given.items()]
    lines.append("base_lr " + float(base_lr).hex())
    if losses is not None:
        lines += ["loss " + float(x).hex() for x in losses]
    for t, (lr, m) in enumerate(rows):
        lines.append("lr %d %s %s" % (t, float(lr).hex(), "-" if m is None else m.hex()))
    with open(os.path.join(OUT_DIR, name + ".txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    if not os.path.isdir(OUT_DIR):
        sys.exit("run from the repository root (no %s)" % OUT_DIR)
    names = []
    for name, kind, given, base_lr, losses in CONFIGS:
        write(name, kind, given, base_lr, losses)
        names.append(name + ".txt")
    with open(os.path.join(OUT_DIR, "INDEX"), "w") as f:
        f.write("\n".join(names) + "\n")
    print("wrote %d fixtures to %s" % (len(names), OUT_DIR))


if __name__ == "__main__":
    main()
