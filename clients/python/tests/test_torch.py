"""optd.torch.RemoteOptimizer against the real daemon and torch.optim."""

import json
import os
import subprocess
import sys
import unittest
import warnings

import optd

from .daemon import DaemonCase

try:
    import torch
except ImportError:
    torch = None

STEPS = 50
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(dtype=None):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return m.to(dtype) if dtype is not None else m


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)


def train_pair(client, name, remote_cfg, local_opt, closure, x, y, steps=STEPS):
    """Trains one model with RemoteOptimizer and its twin (same init) with
    the local torch optimizer; returns (remote optimizer, remote model, local
    model, the remote run's losses)."""
    from optd.torch import RemoteOptimizer
    remote_model, local_model = make_model(), make_model()
    remote = RemoteOptimizer(remote_model.parameters(), session=name, client=client,
                             optimizer=remote_cfg)
    local = local_opt(local_model.parameters())

    def loss_of(model):
        return torch.nn.functional.mse_loss(model(x), y)

    losses = []
    for _ in range(steps):
        for model, opt in ((remote_model, remote), (local_model, local)):
            if closure:
                def closure_fn(model=model, opt=opt):
                    opt.zero_grad()
                    loss = loss_of(model)
                    loss.backward()
                    return loss
                loss = opt.step(closure_fn)
            else:
                opt.zero_grad()
                loss = loss_of(model)
                loss.backward()
                opt.step()
            if opt is remote:
                losses.append(float(loss))
    return remote, remote_model, local_model, losses


@unittest.skipIf(torch is None, "torch is not importable (Debian: python3-torch)")
class TestRemoteOptimizer(DaemonCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x, cls.y = data()

    def setUp(self):
        from optd.torch import RemoteOptimizer
        self.Remote = RemoteOptimizer
        self.client = optd.Client(self.daemon.url)
        self.addCleanup(self.client.close)

    def loss(self, model):
        return torch.nn.functional.mse_loss(model(self.x), self.y)

    def assertClose(self, a, b):
        """Agreement to 1e-6, relative for entries larger than 1."""
        self.assertEqual(a.shape, b.shape)
        err = ((a - b).abs() / b.abs().clamp(min=1.0)).max().item()
        self.assertLess(err, 1e-6)

    def train_both(self, name, remote_cfg, local_opt, closure):
        remote, remote_model, local_model, losses = train_pair(
            self.client, name, remote_cfg, local_opt, closure, self.x, self.y)
        self.assertTrue(remote.session.created)
        self.assertEqual(remote.last_step, STEPS)
        self.assertGreater(losses[0], losses[-1])              # it did train
        self.assertClose(flat(remote_model), flat(local_model))
        return remote, losses

    def test_adam_matches_torch(self):
        remote, losses = self.train_both(
            "torch-adam", {"type": "adam", "lr": 0.01},
            lambda p: torch.optim.Adam(p, lr=0.01), closure=True)
        self.assertEqual(remote.last_lr, 0.01)
        history = remote.session.history()
        self.assertEqual([h["step"] for h in history], list(range(1, STEPS + 1)))
        self.assertEqual([h["loss"] for h in history], losses)  # the closure's losses

    def test_bit_for_bit_with_torch_portable_kernels(self):
        # torch's AVX2/AVX-512 kernels fuse multiply-adds, so they round
        # differently from the documented formulas optd follows (hence the
        # 1e-6 above); its portable kernels do not, and then the two agree
        # exactly.  The kernel choice is made when torch loads: a child
        # process.
        env = dict(os.environ, ATEN_CPU_CAPABILITY="default",
                   PYTHONPATH=os.pathsep.join(filter(None, [PKG_ROOT,
                                                            os.environ.get("PYTHONPATH")])))
        out = subprocess.run([sys.executable, "-m", "tests.torch_exact", self.daemon.url],
                             cwd=PKG_ROOT, env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout), {"adam": 0.0, "sgd": 0.0})

    def test_sgd_momentum_matches_torch(self):
        remote, _ = self.train_both(
            "torch-sgd", {"type": "sgd", "lr": 0.05, "momentum": 0.9},
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), closure=False)
        self.assertEqual(remote.session.info()["state"]["buffers"], ["momentum_buffer"])
        self.assertIsNone(remote.session.history()[0]["loss"])  # no closure, no loss

    def test_missing_grads_are_absent(self):
        # torch skips a parameter whose grad is None: Adam leaves it (and
        # its step count) alone.  So does the daemon.
        model, twin = make_model(), make_model()
        unused = torch.nn.Parameter(torch.full((3,), 7.0))
        unused_twin = torch.nn.Parameter(torch.full((3,), 7.0))
        opt = self.Remote(list(model.named_parameters()) + [("unused", unused)],
                          session="torch-none", client=self.client,
                          optimizer={"type": "adam", "lr": 0.1})
        local = torch.optim.Adam(list(twin.parameters()) + [unused_twin], lr=0.1)
        before = flat(model).clone()
        opt.step()                                   # no gradient at all: nothing happens
        self.assertEqual(opt.last_step, 0)
        self.assertTrue(torch.equal(flat(model), before))
        for _ in range(3):
            for m, o in ((model, opt), (twin, local)):
                o.zero_grad()
                self.loss(m).backward()
                o.step()
        self.assertIsNone(unused.grad)
        self.assertEqual(opt.last_step, 3)
        self.assertTrue(torch.equal(unused.detach(), torch.full((3,), 7.0)))
        self.assertClose(flat(model), flat(twin))
        self.assertEqual(opt.session.size, before.numel() + 3)
        self.assertEqual([t["name"] for t in opt.session.tensors],
                         ["0.weight", "0.bias", "2.weight", "2.bias", "unused"])
        sd = opt.state_dict()
        self.assertEqual(sorted(sd["state"]), [0, 1, 2, 3])   # none for "unused"
        self.assertEqual(float(sd["state"][0]["step"]), 3.0)
        # ... and it starts at step 1 with its first gradient, as in torch
        for p, q in ((unused, unused_twin),):
            for o, x in ((opt, p), (local, q)):
                o.zero_grad()
                x.grad = torch.ones(3)
                o.step()
        self.assertEqual(float(opt.state_dict()["state"][4]["step"]), 1.0)
        self.assertTrue(torch.equal(unused.detach(), unused_twin.detach()))

    def test_zero_grad(self):
        model = make_model()
        opt = self.Remote(model.parameters(), session="torch-zero", client=self.client,
                          optimizer={"type": "sgd", "lr": 0.1})
        self.loss(model).backward()
        opt.zero_grad()
        for p in model.parameters():
            self.assertTrue(p.grad is None or not p.grad.any())
        self.loss(model).backward()
        opt.zero_grad(set_to_none=True)
        self.assertTrue(all(p.grad is None for p in model.parameters()))

    def test_resume_and_conflict(self):
        cfg = {"type": "adam", "lr": 0.05}
        first = make_model()
        opt = self.Remote(first.parameters(), session="torch-resume", client=self.client,
                          optimizer=cfg)
        for _ in range(3):
            opt.zero_grad()
            self.loss(first).backward()
            opt.step()
        # A restarted run with a freshly initialised model picks up the
        # daemon's params.
        second = make_model()
        self.assertFalse(torch.equal(flat(second), flat(first)))
        again = self.Remote(second.parameters(), session="torch-resume",
                            url=self.daemon.url, optimizer=cfg)
        self.addCleanup(again.client.close)
        self.assertFalse(again.session.created)
        self.assertEqual(again.last_step, 3)
        self.assertTrue(torch.equal(flat(second), flat(first)))
        with self.assertRaises(optd.Conflict):
            self.Remote(make_model().parameters(), session="torch-resume", client=self.client,
                        optimizer={"type": "adam", "lr": 0.1})

    def test_dtype_and_torch_checks(self):
        model = make_model(torch.float64)
        opt = self.Remote(model.parameters(), session="torch-f64", client=self.client,
                          optimizer={"type": "sgd", "lr": 0.1})
        self.assertEqual(opt.session.dtype, "float64")
        self.assertTrue(torch.equal(flat(model), torch.from_numpy(opt.session.params())))
        local_model = make_model(torch.float64)
        local = torch.optim.SGD(local_model.parameters(), lr=0.1)
        for m, o in ((model, opt), (local_model, local)):
            for _ in range(3):
                o.zero_grad()
                torch.nn.functional.mse_loss(m(self.x.double()), self.y.double()).backward()
                o.step()
        self.assertEqual(model[0].weight.dtype, torch.float64)
        self.assertClose(flat(model), flat(local_model))
        with self.assertRaises(ValueError):      # torch's own check, nothing created
            self.Remote(make_model().parameters(), "sgd", lr=-0.1, session="torch-bad",
                        client=self.client)
        with self.assertRaises(TypeError):
            self.Remote(make_model().parameters(), "sgd", lr=0.1, momentun=0.9,
                        session="torch-bad", client=self.client)
        with self.assertRaises(ValueError):
            self.Remote(make_model().parameters(), "lion", session="torch-bad",
                        client=self.client)
        with self.assertRaises(optd.NotFound):
            self.client.session("torch-bad")


def _schedulers():
    """name -> (scheduler factory, takes the loss in step())."""
    S = torch.optim.lr_scheduler
    return {
        "StepLR": (lambda o: S.StepLR(o, step_size=7, gamma=0.5), False),
        "CosineAnnealingLR": (lambda o: S.CosineAnnealingLR(o, T_max=20, eta_min=0.001), False),
        "OneCycleLR": (lambda o: S.OneCycleLR(o, max_lr=[0.1, 0.3], total_steps=SCHED_STEPS),
                       False),
        "ReduceLROnPlateau": (lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=1,
                                                            threshold=0.05), True),
        "LambdaLR": (lambda o: S.LambdaLR(o, [lambda t: 1 / (1 + t), lambda t: 0.97 ** t]),
                     False),
        "SequentialLR": (lambda o: S.SequentialLR(
            o, [S.LinearLR(o, start_factor=0.1, total_iters=5), S.ExponentialLR(o, gamma=0.9)],
            milestones=[5]), False),
    }


SCHED_STEPS = 30


@unittest.skipIf(torch is None, "torch is not importable (Debian: python3-torch)")
class TestTorchAPI(DaemonCase):
    """Param groups, schedulers, state_dict, and torch's API around them."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x, cls.y = data()

    def setUp(self):
        from optd.torch import RemoteOptimizer
        self.Remote = RemoteOptimizer
        self.client = optd.Client(self.daemon.url)
        self.addCleanup(self.client.close)

    def loss(self, model):
        return torch.nn.functional.mse_loss(model(self.x), self.y)

    def groups(self, model, named=True, **head):
        """[{body: layer 0}, {head: layer 2, with head's options}], as
        (name, tensor) pairs when named."""
        pairs = list(model.named_parameters())
        body = [(n, p) for n, p in pairs if n.startswith("0.")]
        out = [(n, p) for n, p in pairs if n.startswith("2.")]
        if not named:
            body, out = [p for _, p in body], [p for _, p in out]
        return [{"params": body}, dict(head, params=out)]

    def run_both(self, name, kind, steps, sched=None, with_loss=False, **kw):
        """One model on RemoteOptimizer, its twin on torch.optim.<kind>,
        each with its own instance of sched; returns (remote opt, remote
        model, local model, lrs used at each step)."""
        m_r, m_l = make_model(), make_model()
        head = kw.pop("head", {})
        remote = self.Remote(self.groups(m_r, **head), kind, session=name, client=self.client,
                             **kw)
        local = getattr(torch.optim, remote._torch_cls.__name__)(
            self.groups(m_l, named=False, **head), **kw)
        scheds = [sched(remote), sched(local)] if sched else [None, None]
        lrs = []
        for _ in range(steps):
            lr_now = []
            for m, o, s in ((m_r, remote, scheds[0]), (m_l, local, scheds[1])):
                lr_now.append([g["lr"] for g in o.param_groups])
                o.zero_grad()
                loss = self.loss(m)
                loss.backward()
                o.step()
                if s is not None:
                    s.step(float(loss)) if with_loss else s.step()
            self.assertEqual(lr_now[0], lr_now[1])
            lrs.append(lr_now[0])
        return remote, m_r, m_l, lrs

    def assertClose(self, a, b):
        err = ((a - b).abs() / b.abs().clamp(min=1.0)).max().item()
        self.assertLess(err, 1e-6)

    def test_session_layout_and_groups(self):
        model = make_model()
        opt = self.Remote(self.groups(model, lr=0.5, weight_decay=0.1), "adamw", lr=0.01,
                          betas=(0.8, 0.99), session="api-layout", client=self.client)
        doc = opt.session.info()
        self.assertEqual([(t["name"], t["shape"], t["offset"], t["size"]) for t in doc["tensors"]],
                         [("0.weight", [8, 4], 0, 32), ("0.bias", [8], 32, 8),
                          ("2.weight", [1, 8], 40, 8), ("2.bias", [1], 48, 1)])
        self.assertEqual(doc["groups"][0]["tensors"], ["0.weight", "0.bias"])
        self.assertEqual(doc["groups"][1]["tensors"], ["2.weight", "2.bias"])
        g0, g1 = doc["groups"][0]["optimizer"], doc["groups"][1]["optimizer"]
        self.assertEqual((g0["lr"], g0["weight_decay"], g0["betas"]), (0.01, 0.01, [0.8, 0.99]))
        self.assertEqual((g1["lr"], g1["weight_decay"], g1["betas"]), (0.5, 0.1, [0.8, 0.99]))
        # torch's defaults, and torch's param_groups
        self.assertEqual(opt.defaults, torch.optim.AdamW([torch.zeros(1)], lr=0.01,
                                                         betas=(0.8, 0.99)).defaults)
        self.assertEqual(opt.param_groups[1]["lr"], 0.5)
        self.assertEqual(opt.param_groups[0]["amsgrad"], False)

    def test_schedulers_match_torch(self):
        # torch 1.13's SequentialLR steps its schedulers with an epoch
        # argument, which warns; the same for local torch.
        warnings.filterwarnings("ignore", message="The epoch parameter")
        for name, (make, with_loss) in _schedulers().items():
            with self.subTest(scheduler=name):
                remote, m_r, m_l, lrs = self.run_both(
                    "sched-" + name, "sgd", SCHED_STEPS, make, with_loss,
                    lr=0.1, momentum=0.9, head={"lr": 0.3})
                self.assertGreater(len({tuple(x) for x in lrs}), 2, lrs)   # the lr moved
                self.assertClose(flat(m_r), flat(m_l))
                # the daemon used (and logged) each step's lr
                hist = remote.session.history()
                self.assertEqual([h["lr"] for h in hist], [x[0] for x in lrs])
                self.assertEqual(remote.session.info()["groups"][1]["lr"], lrs[-1][1])

    def test_onecycle_cycles_beta1(self):
        S = torch.optim.lr_scheduler
        remote, m_r, m_l, lrs = self.run_both(
            "sched-beta1", "adam", SCHED_STEPS,
            lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=SCHED_STEPS), lr=0.01)
        self.assertClose(flat(m_r), flat(m_l))
        remote.step()                           # sends the betas the scheduler set last
        betas = [g["optimizer"]["betas"] for g in remote.session.info()["groups"]]
        self.assertEqual(betas, [list(g["betas"]) for g in remote.param_groups])
        self.assertNotEqual(betas[0][0], 0.9)

    def test_other_hyperparameters_are_patched(self):
        remote, m_r, m_l, _ = self.run_both("api-wd", "adamw", 3, lr=0.01)
        local = torch.optim.AdamW(self.groups(m_l, named=False), lr=0.01)
        local.load_state_dict(remote.state_dict())
        for o in (remote, local):
            o.param_groups[1]["weight_decay"] = 0.5
            o.param_groups[0]["betas"] = (0.9, 0.9)
        for m, o in ((m_r, remote), (m_l, local)):
            for _ in range(3):
                o.zero_grad()
                self.loss(m).backward()
                o.step()
        self.assertClose(flat(m_r), flat(m_l))
        g = remote.session.info()["groups"]
        self.assertEqual((g[1]["optimizer"]["weight_decay"], g[0]["optimizer"]["betas"]),
                         (0.5, [0.9, 0.9]))

    def test_state_dict_loads_into_torch_and_back(self):
        for kind, kw in (("adam", {"lr": 0.01, "amsgrad": True}),
                         ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
                         ("adagrad", {"lr": 0.05}), ("rmsprop", {"lr": 0.01, "centered": True}),
                         ("nadam", {"lr": 0.01}), ("asgd", {"lr": 0.01, "t0": 2})):
            with self.subTest(optimizer=kind):
                remote, m_r, m_l, _ = self.run_both("sd-" + kind, kind, 5, **kw)
                mine = remote.state_dict()
                # same groups, keys, types and values as torch's own after 5 steps
                ref = self._reference_state(kind, kw)
                self.assertEqual(mine["param_groups"], ref["sd"]["param_groups"])
                self.assertEqual(sorted(mine["state"]), sorted(ref["state"]))
                for i, st in ref["state"].items():
                    self.assertEqual(sorted(mine["state"][i]), sorted(st))
                    for k, v in st.items():
                        if isinstance(v, torch.Tensor):
                            self.assertEqual(mine["state"][i][k].dtype, v.dtype, k)
                            self.assertClose(mine["state"][i][k].reshape(-1), v.reshape(-1))
                        else:
                            self.assertEqual(type(mine["state"][i][k]), type(v), k)
                # and back: torch's state into a fresh session, then steps
                # agree with torch continuing
                m2 = make_model()
                with torch.no_grad():
                    for a, b in zip(m2.parameters(), m_l.parameters()):
                        a.copy_(b)
                again = self.Remote(self.groups(m2), kind, session="sd2-" + kind,
                                    client=self.client, **kw)
                again.load_state_dict(ref["sd"])
                for m, o in ((m2, again), (ref["model"], ref["opt"])):
                    for _ in range(3):
                        o.zero_grad()
                        self.loss(m).backward()
                        o.step()
                self.assertClose(flat(m2), flat(ref["model"]))

    def _reference_state(self, kind, kw):
        """torch's own optimizer after the 5 steps run_both takes."""
        m = make_model()
        opt = getattr(torch.optim, {"adam": "Adam", "sgd": "SGD", "adagrad": "Adagrad",
                                    "rmsprop": "RMSprop", "nadam": "NAdam",
                                    "asgd": "ASGD"}[kind])(self.groups(m, named=False), **kw)
        for _ in range(5):
            opt.zero_grad()
            self.loss(m).backward()
            opt.step()
        sd = opt.state_dict()
        return {"state": sd["state"], "sd": sd, "model": m, "opt": opt}

    def test_state_property_and_add_param_group(self):
        remote, _, _, _ = self.run_both("api-state", "adam", 2, lr=0.01)
        p = remote.param_groups[0]["params"][0]
        self.assertEqual(float(remote.state[p]["step"]), 2.0)
        self.assertEqual(remote.state[p]["exp_avg"].shape, p.shape)
        with self.assertRaisesRegex(RuntimeError, "fixed tensor layout"):
            remote.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
        self.assertEqual(len(remote.param_groups), 2)
        self.assertEqual(remote.session.info()["size"], 49)

    def test_server_schedule_excludes_torch_scheduler(self):
        # optd's own schedule runs while group["lr"] is left alone; changing
        # it (as a torch scheduler would) then gets the daemon's 409.
        model = make_model()
        opt = self.Remote(model.parameters(), "sgd", lr=0.1, session="api-sched409",
                          client=self.client, schedule={"type": "step", "step_size": 1,
                                                        "gamma": 0.5})
        for _ in range(2):
            opt.zero_grad()
            self.loss(model).backward()
            opt.step()
        self.assertEqual([h["lr"] for h in opt.session.history()], [0.1, 0.05])
        opt.param_groups[0]["lr"] = 0.025          # what a torch scheduler does
        with self.assertRaises(optd.Conflict) as cm:
            opt.step()
        self.assertEqual(cm.exception.status, 409)
        self.assertEqual(opt.session.info()["step"], 2)

    def test_load_state_dict_refuses_other_layouts(self):
        remote, _, _, _ = self.run_both("api-refuse", "adam", 1, lr=0.01)
        sd = remote.state_dict()
        bad = dict(sd, param_groups=sd["param_groups"][:1])
        with self.assertRaisesRegex(ValueError, "number of parameter groups"):
            remote.load_state_dict(bad)
        bad = dict(sd, param_groups=[dict(sd["param_groups"][0], params=[0]),
                                     sd["param_groups"][1]])
        with self.assertRaisesRegex(ValueError, "size of optimizer's group"):
            remote.load_state_dict(bad)
        self.assertEqual(remote.session.info()["step"], 1)


if __name__ == "__main__":
    unittest.main()
