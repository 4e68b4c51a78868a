"""A real training run, unchanged but for the optimizer: RemoteOptimizer
against torch.optim on scikit-learn's digits (see train_digits), with param
groups, OneCycleLR, a frozen layer, clip_grad_norm_, switching local ->
optd -> local through state_dict(), and a daemon killed mid-run.

The runs agree bit for bit when torch uses its portable kernels, which
ATEN_CPU_CAPABILITY=default selects when torch loads.  So each test runs
in a child process with that environment (its own daemon too), unless this
process already has it.  (With torch's AVX2 kernels, whose fused
multiply-adds round differently, 200 steps of this run drift apart by up to
1.4e-5.)"""

import os
import subprocess
import sys
import unittest

import torch  # Debian: python3-torch; the data set needs python3-sklearn

import optd

from . import train_digits as td
from .daemon import DaemonCase

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORTABLE = os.environ.get("ATEN_CPU_CAPABILITY") == "default"


def portable(test):
    """Runs the test in a child with ATEN_CPU_CAPABILITY=default unless this
    process has it; the child's unittest result decides."""
    def run(self):
        if PORTABLE:
            return test(self)
        env = dict(os.environ, ATEN_CPU_CAPABILITY="default",
                   PYTHONPATH=os.pathsep.join(filter(None, [PKG_ROOT,
                                                            os.environ.get("PYTHONPATH")])))
        name = "tests.test_torch_train.TestTrainDigits." + test.__name__
        out = subprocess.run([sys.executable, "-m", "unittest", "-v", name], cwd=PKG_ROOT,
                             env=env, capture_output=True, text=True, timeout=900)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("Ran 1 test", out.stderr)
        self.assertTrue(out.stderr.rstrip().endswith("OK"), out.stderr)
    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


class TestTrainDigits(DaemonCase):
    @classmethod
    def setUpClass(cls):
        if PORTABLE:                # the parent needs no daemon of its own
            super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        if PORTABLE:
            super().tearDownClass()

    def setUp(self):
        if PORTABLE:
            self.client = optd.Client(self.daemon.url)
            self.addCleanup(self.client.close)

    def assertSame(self, a, b):
        self.assertEqual(a.shape, b.shape)
        self.assertEqual((a - b).abs().max().item(), 0.0)
        self.assertTrue(torch.equal(a, b))

    def check(self, key):
        local, remote, switch, (lrs_l, lrs_r, lrs_s) = td.three_runs(
            key, self.client, "digits-" + key)
        # The same schedule drove all three, and it did move.
        self.assertEqual(lrs_r, lrs_l)
        self.assertEqual(lrs_s, lrs_l)
        self.assertGreater(len({tuple(x) for x in lrs_l}), 100)
        self.assertSame(td.flat(remote), td.flat(local))
        self.assertSame(td.flat(switch), td.flat(local))
        # The daemon applied exactly the lrs torch's scheduler chose.
        s = self.client.session("digits-%s-remote" % key)
        hist = s.history()
        self.assertEqual([h["lr"] for h in hist], [x[0] for x in lrs_l])
        info = s.info()
        self.assertEqual(info["groups"][2]["tensors"], ["head.weight", "head.bias"])
        # torch's per-tensor step: the frozen layer missed FROZEN steps
        self.assertEqual({t["name"]: t["step"] for t in info["tensors"]},
                         {"fc1.weight": td.STEPS - td.FROZEN, "fc1.bias": td.STEPS - td.FROZEN,
                          "norm.weight": td.STEPS, "norm.bias": td.STEPS,
                          "head.weight": td.STEPS, "head.bias": td.STEPS})
        return local, hist, lrs_l

    @portable
    def test_adamw(self):
        local, hist, lrs = self.check("adamw")
        # it trains: the loss on the whole set falls well below chance
        x, y = td.digits()
        with torch.no_grad():
            self.assertLess(float(torch.nn.functional.cross_entropy(local(x), y)), 0.5)

    @portable
    def test_sgd_nesterov_per_group_momentum(self):
        self.check("sgd")
        groups = self.client.session("digits-sgd-remote").info()["groups"]
        self.assertTrue(all(g["optimizer"]["nesterov"] for g in groups))

    @portable
    def test_adagrad(self):
        self.check("adagrad")

    @portable
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

    @portable
    def test_kill_9_mid_run(self):
        local, _, _ = td.train("adamw", [(0, "local")])
        with optd.Client(self.daemon.url, retries=12) as client:
            remote, _, _ = td.train("adamw", [(0, "remote")], client, "digits-crash",
                                    around_step=td.crash_step(self.daemon, 120))
            self.assertEqual(client.session("digits-crash").info()["step"], td.STEPS)
        self.assertSame(td.flat(remote), td.flat(local))


if __name__ == "__main__":
    unittest.main()
