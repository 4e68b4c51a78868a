"""ShardedSession against real daemons: a model split over three daemons
equals the same model in one session on a fourth, bit for bit at every
step (Adam, clipping by norm, a schedule), through a kill -9 of one shard's
daemon and an answer lost on the way back from another; with a layout the
cuts fall on tensor boundaries and each shard gets its groups.  optd.grad_norm
equals the daemon's own norm."""

import threading
import time
import unittest

import numpy as np

import optd
from optd import sharded as sharded_module

from .daemon import SLOW, Daemon, LossyRelay

STEPS = 100
SIZE = 3 * 8192 + 777  # several blocks; shard ranges cut blocks anywhere


def grads(seed, n, dtype):
    rng = np.random.default_rng(seed)
    while True:
        g = rng.standard_normal(n) * 10.0 ** rng.integers(-2, 2, n)
        yield (g * 10.0 ** rng.uniform(-4.5, -1.0)).astype(dtype)  # norms ~0.03 to ~90


class ShardCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemons = [Daemon().start() for _ in range(4)]
        cls.relay = LossyRelay(cls.daemons[2].port)

    @classmethod
    def tearDownClass(cls):
        cls.relay.close()
        bad = []
        for d in cls.daemons:
            log = d.log_text()
            rc = d.close()
            if rc != 0:
                bad.append("daemon exited with %r:\n%s" % (rc, log))
        if bad:
            raise AssertionError("\n".join(bad))

    def clients(self, retries=4):
        # shard 2 goes through the relay that can lose an answer
        urls = [self.daemons[0].url, self.daemons[1].url, self.relay.url]
        cs = [optd.Client(u, retries=retries, backoff=0.05, max_backoff=0.5) for u in urls]
        single = optd.Client(self.daemons[3].url)
        for c in cs + [single]:
            self.addCleanup(c.close)
        return cs, single

    def applied(self, session):
        return session.info()["counters"]["applied"]


class TestSharded(ShardCase):
    def test_adam_clip_norm_equals_one_session_through_crash(self):
        cs, single_c = self.clients()
        rng = np.random.default_rng(5)
        p0 = rng.standard_normal(SIZE).astype(np.float32)
        cfg = dict(clip={"type": "norm", "max_norm": 2.0},
                   schedule={"type": "cosine", "T_max": STEPS})
        opt = {"type": "adam", "lr": 0.01, "weight_decay": 0.01}
        sh = optd.ShardedSession.create(cs, "m", opt, params=p0, retry_for=60, **cfg)
        self.addCleanup(sh.close)
        one = single_c.create_session("m", opt, params=p0, **cfg)
        self.assertEqual([s.name for s in sh.shards], ["m.shard0", "m.shard1", "m.shard2"])
        self.assertEqual(sh.offsets, [0, SIZE // 3, 2 * SIZE // 3, SIZE])
        self.assertEqual([s.size for s in sh.shards],
                         [SIZE // 3, 2 * SIZE // 3 - SIZE // 3, SIZE - 2 * SIZE // 3])
        np.testing.assert_array_equal(sh.params(), one.params())

        gen = grads(9, SIZE, np.float32)
        clipped = 0
        for t in range(STEPS):
            g = next(gen)
            if t == 40:
                # kill -9 shard 1's daemon; the step is sent while it is
                # down: shard 1's request fails, the others apply.  The
                # daemon comes back on its database while the client
                # retries shard 1 alone with its key.
                victim = self.daemons[1]
                port = victim.port
                victim.kill()
                out = {}

                def run():
                    try:
                        out["p"] = sh.step(g, loss=1.0 / (t + 1))
                    except Exception as e:  # noqa: BLE001 -- checked below
                        out["e"] = e

                th = threading.Thread(target=run)
                th.start()
                time.sleep(1.5 if not SLOW else 5)
                self.assertTrue(th.is_alive(), out)  # still retrying shard 1
                self.assertEqual(self.applied(sh.shards[0]), t + 1)
                victim.start(port)
                th.join()
                self.assertNotIn("e", out)
                p = out["p"]
            elif t == 70:
                # shard 2's answer is lost after its daemon committed: the
                # client resends with the same key and gets the replay
                self.relay.drop = 1
                sh.shards[2].client.close()  # the relay loses a new connection's answer
                p = sh.step(g, loss=1.0 / (t + 1))
                self.assertEqual(self.relay.dropped, 1)
                self.assertTrue(sh.shards[2].last_replayed)
            else:
                p = sh.step(g, loss=1.0 / (t + 1))
            q = one.step(g, loss=1.0 / (t + 1), json=False)
            self.assertEqual(p.dtype, np.float32)
            np.testing.assert_array_equal(p, q, "step %d" % (t + 1))
            self.assertEqual(sh.last_step, one.last_step)
            self.assertEqual(sh.last_lr, one.last_lr)
            norm = optd.grad_norm(g)
            clipped += norm > 2.0
            if t % 10 == 0:
                # the norm the client sent is the one the single daemon took
                h = one.history(after=t, limit=1)[0]
                self.assertEqual(h["grad_norm"], norm)
                self.assertEqual(sh.shards[0].history(after=t, limit=1)[0]["grad_norm"], norm)
        self.assertGreater(clipped, 10)
        self.assertLess(clipped, STEPS)  # both sides of the clip happened
        # nothing applied twice, nothing missing
        self.assertEqual(sh.steps(), [STEPS] * 3)
        self.assertEqual([self.applied(s) for s in sh.shards], [STEPS] * 3)
        self.assertEqual(self.applied(one), STEPS)
        np.testing.assert_array_equal(sh.params(), one.params())

        # the shards found again by name, and a step with a given key twice
        again = optd.ShardedSession.open([c.url for c in cs], "m")
        self.addCleanup(again.close)
        np.testing.assert_array_equal(again.params(), one.params())
        g = next(gen)
        a = again.step(g, idempotency_key="k-last")
        b = again.step(g, idempotency_key="k-last")
        np.testing.assert_array_equal(a, b)
        self.assertTrue(all(s.last_replayed for s in again.shards))
        np.testing.assert_array_equal(a, one.step(g, json=False))

    def test_layout_tensor_aligned(self):
        cs, single_c = self.clients()
        shapes = [[64, 100], [100], [300, 40], [40], [17, 33], [33], [5000], [10, 10]]
        tensors = [("t%d" % i, s) for i, s in enumerate(shapes)]
        groups = [{"tensors": ["t0", "t2", "t4", "t6"]},
                  {"tensors": ["t1", "t3", "t5", "t7"], "lr": 0.05, "weight_decay": 0.0}]
        sizes = [int(np.prod(s)) for s in shapes]
        n = sum(sizes)
        p0 = np.random.default_rng(2).standard_normal(n)
        opt = {"type": "adamw", "lr": 0.01}
        clip = {"type": "norm", "max_norm": 3.0, "norm_type": 1}
        sh = optd.ShardedSession.create(cs, "lay", opt, params=p0, dtype="float64",
                                        tensors=tensors, groups=groups, clip=clip)
        self.addCleanup(sh.close)
        one = single_c.create_session("lay", opt, params=p0, dtype="float64", tensors=tensors,
                                      groups=groups, clip=clip)
        # cuts on tensor boundaries, every tensor whole in one shard
        bounds = np.cumsum([0] + sizes).tolist()
        self.assertTrue(all(o in bounds for o in sh.offsets))
        held = [[t["name"] for t in s.tensors] for s in sh.shards]
        self.assertEqual(sum(held, []), ["t%d" % i for i in range(len(shapes))])
        self.assertTrue(all(held))
        for s, names in zip(sh.shards, held):
            for g in s.groups:  # groups restricted to the shard's tensors
                self.assertTrue(set(g["tensors"]) <= set(names))
        gen = grads(3, n, np.float64)
        for t in range(30):
            g = next(gen)
            lrs = [{"lr": 0.01 * (1 - t / 40)}, {"lr": 0.05 * (1 - t / 60)}]
            p = sh.step(g, groups=lrs)
            q = one.step(g, groups=lrs, json=False)
            np.testing.assert_array_equal(p, q, "step %d" % (t + 1))
        self.assertEqual(sh.steps(), [30] * 3)
        np.testing.assert_array_equal(sh.params(), one.params())
        # the per-tensor norm (blocks cut per tensor) is what the daemon
        # took: the whole-vector blocking would have been a different one
        doc = one.history(after=29, limit=1)[0]
        self.assertEqual(doc["grad_norm"], optd.grad_norm(g, "float64", sizes, 1))

    def test_refusals_send_nothing(self):
        cs, _ = self.clients()
        sh = optd.ShardedSession.create(cs, "r", {"type": "sgd", "lr": 0.1}, size=100, dtype="float32",
                                        clip={"type": "norm", "max_norm": 1.0})
        self.addCleanup(sh.close)
        g = np.ones(100, dtype=np.float32)
        g[77] = np.nan
        with self.assertRaises(ValueError):
            sh.step(g)
        with self.assertRaises(ValueError):
            sh.step(np.ones(99, dtype=np.float32))
        self.assertEqual(sh.steps(), [0, 0, 0])
        self.assertEqual([len(s.history()) for s in sh.shards], [0, 0, 0])
        with self.assertRaises(ValueError):  # a seeded init cannot be split
            optd.ShardedSession.create(cs, "r2", {"type": "sgd", "lr": 0.1}, size=100,
                                       init={"type": "normal", "seed": 1})
        with self.assertRaises(ValueError):  # more shards than tensors
            optd.ShardedSession.create(cs, "r3", {"type": "sgd", "lr": 0.1}, tensors=[("a", [3]), ("b", [3])])
        with self.assertRaises(ValueError):  # the norm of a round is not the client's
            optd.ShardedSession.create(cs, "r4", {"type": "sgd", "lr": 0.1}, size=10,
                                       clip={"type": "norm", "max_norm": 1.0},
                                       mode={"type": "async", "accumulate": 2})


class TestGradNorm(unittest.TestCase):
    def test_numpy_equals_the_plain_loop(self):
        rng = np.random.default_rng(4)
        sizes = [8192 * 2 + 5, 3, 16, 8191, 9000]
        g = (rng.standard_normal(sum(sizes)) * 1e3).astype(np.float32)
        for p in (1, 2, float("inf")):
            for absent in (None, [1, 3]):
                a = optd.grad_norm(g, "float32", sizes, p, absent=absent)
                b = optd.grad_norm(g, "float32", sizes, p, absent=absent, use_numpy=False)
                self.assertEqual(a, b, (p, absent))
        # another order of the same additions is another double
        x = np.full(8192 * 4, 0.1, dtype=np.float64) * rng.random(8192 * 4)
        exact = optd.grad_norm(x, "float64")
        self.assertEqual(exact, optd.grad_norm(x, "float64", use_numpy=False))
        self.assertNotEqual(exact, float(np.sqrt(np.dot(x, x))))
        with self.assertRaises(ValueError):
            optd.grad_norm(np.array([1.0, np.inf]))
        with self.assertRaises(ValueError):
            optd.grad_norm([1.0], norm_type=3)

    def test_cuts(self):
        self.assertEqual(sharded_module._cuts_by_tensors([10, 10, 10, 10, 10, 10], 3), [2, 4])
        self.assertEqual(sharded_module._cuts_by_tensors([100, 1, 1, 1], 3), [1, 2])
        self.assertEqual(sharded_module._cuts_by_tensors([1, 1, 100], 2), [2])


if __name__ == "__main__":
    unittest.main()
