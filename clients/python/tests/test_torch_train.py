"""A real training run, unchanged but for the optimizer: RemoteOptimizer
against torch.optim on scikit-learn's digits (see train_digits), with param
groups, OneCycleLR, a frozen layer, clip_grad_norm_, switching local ->
optd -> local through state_dict(), and a daemon killed mid-run."""

import json
import os
import subprocess
import sys
import unittest

import optd

from . import train_digits as td
from .daemon import DaemonCase

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402  (Debian: python3-torch; sklearn: python3-sklearn)


class TestTrainDigits(DaemonCase):
    def setUp(self):
        self.client = optd.Client(self.daemon.url)
        self.addCleanup(self.client.close)

    def assertClose(self, a, b, tol=1e-6):
        self.assertEqual(a.shape, b.shape)
        err = ((a - b).abs() / b.abs().clamp(min=1.0)).max().item()
        self.assertLess(err, tol)

    def check(self, key):
        local, remote, switch, (lrs_l, lrs_r, lrs_s) = td.three_runs(
            key, self.client, "digits-" + key)
        # The same schedule drove all three, and it did move.
        self.assertEqual(lrs_r, lrs_l)
        self.assertEqual(lrs_s, lrs_l)
        self.assertGreater(len({tuple(x) for x in lrs_l}), 100)
        self.assertClose(td.flat(remote), td.flat(local))
        self.assertClose(td.flat(switch), td.flat(local))
        # The daemon applied exactly the lrs torch's scheduler chose.
        s = self.client.session("digits-%s-remote" % key)
        hist = s.history()
        self.assertEqual(len(hist), td.STEPS)
        head = s.info()["groups"][2]
        self.assertEqual(head["tensors"], ["head.weight", "head.bias"])
        return local, hist, lrs_l

    def test_adamw(self):
        local, hist, lrs = self.check("adamw")
        # it trains: the loss on the whole set falls well below chance
        x, y = td.digits()
        with torch.no_grad():
            self.assertLess(float(torch.nn.functional.cross_entropy(local(x), y)), 0.5)

    def test_sgd_nesterov_per_group_momentum(self):
        self.check("sgd")
        groups = self.client.session("digits-sgd-remote").info()["groups"]
        self.assertTrue(all(g["optimizer"]["nesterov"] for g in groups))

    def test_adagrad(self):
        self.check("adagrad")

    def test_frozen_layer_untouched_while_frozen(self):
        # After FROZEN - 1 steps the first layer is exactly the initial one,
        # and the daemon has no step count for it, as torch has no state.
        model = td.make_model()
        init = model.fc1.weight.detach().clone()
        opt = td.make_opt("remote", model, td.CONFIGS["adamw"], self.client, "digits-frozen")
        x, y = td.digits()
        model.fc1.requires_grad_(False)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
            opt.step()
        self.assertTrue(torch.equal(model.fc1.weight.detach(), init))
        sd = opt.state_dict()
        self.assertEqual(sorted(sd["state"]), [2, 3, 4, 5])   # fc1.weight is 0, fc1.bias 1
        self.assertEqual(float(sd["state"][2]["step"]), 3.0)
        self.assertNotIn(0, opt.state_dict()["state"])

    def test_bit_exact_with_portable_kernels(self):
        # torch's portable kernels round like optd's: the three runs agree
        # bit for bit.  The kernel choice is made when torch loads: a child.
        env = dict(os.environ, ATEN_CPU_CAPABILITY="default",
                   PYTHONPATH=os.pathsep.join(filter(None, [PKG_ROOT,
                                                            os.environ.get("PYTHONPATH")])))
        out = subprocess.run([sys.executable, "-m", "tests.train_digits", self.daemon.url],
                             cwd=PKG_ROOT, env=env, capture_output=True, text=True, timeout=600)
        self.assertEqual(out.returncode, 0, out.stderr)
        want = {k: {"remote": 0.0, "switch": 0.0} for k in td.CONFIGS}
        self.assertEqual(json.loads(out.stdout), want)

    def test_kill_9_mid_run(self):
        local, _, _ = td.train("adamw", [(0, "local")])
        with optd.Client(self.daemon.url, retries=12) as client:
            remote, _, _ = td.train("adamw", [(0, "remote")], client, "digits-crash",
                                    around_step=td.crash_step(self.daemon, 120))
            self.assertEqual(client.session("digits-crash").info()["step"], td.STEPS)
        self.assertClose(td.flat(remote), td.flat(local))


if __name__ == "__main__":
    unittest.main()
