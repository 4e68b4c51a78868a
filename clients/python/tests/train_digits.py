"""A real training run for test_torch_train: a small MLP on scikit-learn's
digits, trained with local torch.optim, with RemoteOptimizer, and switching
between them through state_dict().

The run uses what real scripts use: param groups (no weight decay on the
biases and the norm weights, 10x lr on the head), OneCycleLR (cycling
momentum or beta1 where the optimizer has one), the first layer frozen for
the first FROZEN steps (its grads are None) and clip_grad_norm_ in torch.
"""

import threading
import time

import torch

STEPS = 200
FROZEN = 50
SWITCH = (70, 140)
BATCH = 64
MAX_NORM = 1.0

# Per optimizer: the torch class, the arguments every group shares, each
# group's own (decay, no_decay, head), and OneCycleLR's arguments.
CONFIGS = {
    "adamw": {
        "cls": "AdamW", "type": "adamw",
        "common": {"lr": 0.01, "weight_decay": 0.01},
        "groups": [{}, {"weight_decay": 0.0}, {"lr": 0.1}],
        "onecycle": {"max_lr": [0.01, 0.01, 0.1], "cycle_momentum": True,
                     "base_momentum": 0.85, "max_momentum": 0.95},
    },
    "sgd": {
        "cls": "SGD", "type": "sgd",
        "common": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
        "groups": [{}, {"weight_decay": 0.0, "momentum": 0.8}, {"lr": 0.5, "momentum": 0.95}],
        "onecycle": {"max_lr": [0.05, 0.05, 0.5], "cycle_momentum": True,
                     "base_momentum": [0.8, 0.7, 0.85], "max_momentum": [0.9, 0.8, 0.95]},
    },
    "adagrad": {
        "cls": "Adagrad", "type": "adagrad",
        "common": {"lr": 0.05, "lr_decay": 1e-3, "weight_decay": 1e-4},
        "groups": [{}, {"weight_decay": 0.0}, {"lr": 0.5}],
        "onecycle": {"max_lr": [0.05, 0.05, 0.5], "cycle_momentum": False},
    },
}


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.fc1(x))))


def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    return x[order], y[order]


def make_model():
    torch.manual_seed(0)
    return MLP()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def param_groups(model, cfg, named):
    """decay (fc1.weight, head.weight... except the head), no_decay (biases
    and the norm's weights), head: as (name, tensor) pairs when named."""
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        item = (name, p) if named else p
        if name.startswith("head."):
            head.append(item)
        elif name.endswith(".bias") or name.startswith("norm."):
            no_decay.append(item)
        else:
            decay.append(item)
    return [dict(cfg["groups"][i], params=ps) for i, ps in enumerate((decay, no_decay, head))]


def make_opt(where, model, cfg, client=None, session=None):
    if where == "local":
        cls = getattr(torch.optim, cfg["cls"])
        return cls(param_groups(model, cfg, named=False), **cfg["common"])
    from optd.torch import RemoteOptimizer
    return RemoteOptimizer(param_groups(model, cfg, named=True), cfg["type"],
                           client=client, session=session, **cfg["common"])


def make_sched(opt, cfg, steps):
    return torch.optim.lr_scheduler.OneCycleLR(opt, total_steps=steps, **cfg["onecycle"])


def train(key, plan, client=None, session=None, steps=STEPS, around_step=None):
    """Trains a fresh model with optimizer key.  plan: [(first step,
    "local" | "remote"), ...]; at each later entry the run moves to a new
    optimizer and scheduler through their state_dicts.  around_step(t,
    do_step) may wrap a step (the crash test).  Returns (model, the groups'
    lrs at every step, losses)."""
    cfg = CONFIGS[key]
    model = make_model()
    x, y = digits()
    starts = dict(plan)
    opt = make_opt(starts[0], model, cfg, client, session)
    sched = make_sched(opt, cfg, steps)
    lrs, losses = [], []
    for t in range(steps):
        if t in starts and t > 0:
            new_opt = make_opt(starts[t], model, cfg, client, "%s-%d" % (session, t))
            new_sched = make_sched(new_opt, cfg, steps)
            new_opt.load_state_dict(opt.state_dict())
            new_sched.load_state_dict(sched.state_dict())
            opt, sched = new_opt, new_sched
        model.fc1.requires_grad_(t >= FROZEN)
        i = (t * BATCH) % (len(y) - BATCH)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x[i:i + BATCH]), y[i:i + BATCH])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        lrs.append([g["lr"] for g in opt.param_groups])
        if around_step is None:
            opt.step()
        else:
            around_step(t, opt.step)
        sched.step()
        losses.append(float(loss))
    return model, lrs, losses


def three_runs(key, client, name):
    """(local model, remote model, switching model, their lrs)."""
    local, lrs_l, _ = train(key, [(0, "local")])
    remote, lrs_r, _ = train(key, [(0, "remote")], client, name + "-remote")
    switch, lrs_s, _ = train(key, [(0, "local"), (SWITCH[0], "remote"), (SWITCH[1], "local")],
                             client, name + "-switch")
    return local, remote, switch, (lrs_l, lrs_r, lrs_s)


def crash_step(daemon, at):
    """around_step for train: at step `at`, kill -9 the daemon, run the step
    in a thread (its client retries with the same Idempotency-Key) while the
    daemon restarts on the same port and database."""
    def around(t, do_step):
        if t != at:
            do_step()
            return
        port = daemon.port
        daemon.kill()
        err = []

        def run():
            try:
                do_step()
            except BaseException as exc:    # reported by the test
                err.append(exc)
        th = threading.Thread(target=run)
        th.start()
        time.sleep(0.3)                     # its first attempts find no daemon
        daemon.start(port)
        th.join(120)
        if err:
            raise err[0]
    return around

