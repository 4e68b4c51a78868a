"""The optd Python client against the real daemon: every method, exact
vectors in both wire forms, typed errors, idempotent retries."""

import array
import itertools
import math
import sqlite3
import struct
import threading
import time
import unittest

import optd
from optd import _vec

from .daemon import SLOW, DaemonCase, LossyRelay, free_port

try:
    import numpy as np
except ImportError:
    np = None  # test_numpy_and_plain_paths_agree fails: python3-numpy is a test dependency

ADAM = {"type": "adam", "lr": 0.01}
_names = itertools.count()


def uniq(prefix):
    return "%s-%d" % (prefix, next(_names))


def bits(v, dtype):
    """The exact bytes of a vector (either type) in dtype."""
    return _vec.Codec(dtype, use_numpy=False).to_bytes(v)


def random_vector(n, dtype, seed):
    """n finite values of dtype from random bit patterns (all exponents,
    subnormals included), plus the awkward ones: -0.0, the smallest
    subnormal, the largest finite value."""
    code, size = ("<I", 4) if dtype == "float32" else ("<Q", 8)
    fmt = "<f" if dtype == "float32" else "<d"
    rnd = __import__("random").Random(seed)
    out = [-0.0, 0.0, struct.unpack(fmt, struct.pack(code, 1))[0],
           -(3.4028234663852886e38 if dtype == "float32" else 1.7976931348623157e308)]
    while len(out) < n:
        x = struct.unpack(fmt, struct.pack(code, rnd.getrandbits(8 * size)))[0]
        if math.isfinite(x):
            out.append(x)
    return array.array("f" if dtype == "float32" else "d", out[:n])


def random_grad(n, seed, scale=1.0):
    rnd = __import__("random").Random(seed)
    return [rnd.gauss(0.0, scale) for _ in range(n)]


class TestClient(DaemonCase):
    def setUp(self):
        self.c = optd.Client(self.daemon.url, retries=2, backoff=0.01)

    def tearDown(self):
        self.c.close()

    # ------------------------------------------------------------ basics

    def test_health_and_optimizers(self):
        self.assertEqual(self.c.health()["status"], "ok")
        cat = self.c.optimizers()
        types = [o["type"] for o in cat["optimizers"]]
        for t in ("sgd", "adam", "adamw", "rmsprop", "lion"):
            self.assertIn(t, types)
        self.assertIn("cosine", [s["type"] for s in cat["schedules"]])
        self.assertIn("norm", [s["type"] for s in cat["clips"]])

    def test_create_verify_conflict(self):
        name = uniq("cvc")
        s = self.c.create_session(name, ADAM, size=5, init={"type": "normal", "std": 0.1,
                                                             "seed": 3})
        self.assertTrue(s.created)
        self.assertEqual((s.name, s.dtype, s.size, s.last_step), (name, "float32", 5, 0))
        first = s.params()
        s.step([1, 1, 1, 1, 1])
        again = self.c.create_session(name, ADAM, size=5, init={"type": "normal", "std": 0.1,
                                                                 "seed": 3})
        self.assertFalse(again.created)
        self.assertEqual(again.last_step, 1)       # the existing session, untouched
        self.assertNotEqual(bits(again.params(), "float32"), bits(first, "float32"))
        with self.assertRaises(optd.Conflict) as cm:
            self.c.create_session(name, {"type": "adam", "lr": 0.02}, size=5)
        e = cm.exception
        self.assertEqual((e.status, e.type, e.title), (409, "urn:optd:problem:conflict",
                                                      "Conflict"))
        self.assertIn(name, e.detail)
        self.assertIsInstance(e, optd.OptdError)

    def test_create_with_every_option(self):
        name = uniq("opts")
        s = self.c.create_session(
            name, {"type": "sgd", "lr": 0.1, "momentum": 0.9}, params=[1.0, 2.0, 3.0],
            dtype="float64", schedule={"type": "cosine", "T_max": 10},
            clip={"type": "norm", "max_norm": 1.0},
            mode={"type": "async", "max_staleness": 3}, nonfinite="skip",
            metadata={"run": "a"})
        info = s.info()
        self.assertEqual(info["dtype"], "float64")
        self.assertEqual(info["optimizer"]["momentum"], 0.9)
        self.assertEqual(info["optimizer"]["nesterov"], False)   # defaults filled in
        self.assertEqual(info["schedule"]["type"], "cosine")
        self.assertEqual(info["clip"]["max_norm"], 1)
        self.assertEqual(info["mode"]["max_staleness"], 3)
        self.assertEqual(info["nonfinite"], "skip")
        self.assertEqual(info["metadata"], {"run": "a"})
        self.assertEqual(self.c.session(name).size, 3)
        with self.assertRaises(ValueError):
            self.c.create_session(uniq("x"), ADAM, params=[1.0], size=1)
        with self.assertRaises(ValueError):
            self.c.create_session(uniq("x"), ADAM)
        with self.assertRaises(ValueError):
            self.c.create_session("bad/name", ADAM, size=1)
        with self.assertRaises(ValueError):
            self.c.create_session(uniq("x"), ADAM, size=1, dtype="float16")

    def test_session_and_listing(self):
        prefix = uniq("list")
        made = ["%s-%d" % (prefix, i) for i in range(5)]
        for n in made:
            self.c.create_session(n, "adagrad", size=2)
        s = self.c.session(made[2])
        self.assertEqual((s.name, s.size, s.created), (made[2], 2, False))
        names = [x["name"] for x in self.c.sessions(page_size=2)]
        self.assertEqual(names, sorted(set(names)))            # pages neither repeat nor skip
        self.assertEqual([n for n in names if n.startswith(prefix + "-")], made)
        summary = next(x for x in self.c.sessions() if x["name"] == made[0])
        self.assertEqual((summary["optimizer"], summary["dtype"], summary["size"]),
                         ("adagrad", "float32", 2))

    def test_step_params_history_update_delete(self):
        name = uniq("life")
        s = self.c.create_session(name, ADAM, size=3)
        p = s.step([0.5, -0.5, 0.0], loss=2.5, worker="w1")
        self.assertEqual((s.last_step, s.last_lr, s.last_replayed, s.pending),
                         (1, 0.01, False, 0))
        self.assertEqual(len(p), 3)
        self.assertAlmostEqual(p[0], -0.01, places=6)
        self.assertIsNone(s.step([1, 1, 1], params=False))
        self.assertEqual(s.last_step, 2)
        self.assertIsNone(s.step([1, 1, 1], params=False, json=False))
        self.assertEqual(s.last_step, 3)
        s.set_params([1.0, 2.0, 3.0])
        self.assertEqual(list(s.params()), [1.0, 2.0, 3.0])
        self.assertEqual(s.last_step, 3)
        doc = s.update(lr=0.5, metadata={"note": "faster"})
        self.assertEqual(doc["optimizer"]["lr"], 0.5)
        self.assertEqual(doc["metadata"], {"note": "faster"})
        s.step([1, 1, 1], loss=1.5)
        self.assertEqual(s.last_lr, 0.5)
        s.update(optimizer={"lr": 0.25}, schedule={"type": "step", "step_size": 1,
                                                   "gamma": 0.5})
        # A schedule is a closed form of the step count (4 updates so far).
        s.step([1, 1, 1])
        self.assertEqual(s.last_lr, 0.25 * 0.5 ** 4)
        s.step([1, 1, 1])
        self.assertEqual(s.last_lr, 0.25 * 0.5 ** 5)
        self.assertEqual(s.info()["step"], 6)
        h = s.history()
        self.assertEqual([x["step"] for x in h], [1, 2, 3, 4, 5, 6])
        self.assertEqual((h[0]["loss"], h[0]["worker"], h[0]["lr"]), (2.5, "w1", 0.01))
        self.assertEqual(h[3]["loss"], 1.5)
        self.assertIsNone(h[1]["loss"])
        self.assertEqual([x["step"] for x in s.history(page_size=4)], [1, 2, 3, 4, 5, 6])
        self.assertEqual([x["step"] for x in s.history(after=2, limit=3, page_size=2)],
                         [3, 4, 5])
        s.delete()
        with self.assertRaises(optd.NotFound) as cm:
            s.info()
        self.assertEqual((cm.exception.status, cm.exception.field), (404, "name"))
        with self.assertRaises(optd.NotFound):
            s.step([1, 1, 1])
        with self.assertRaises(optd.NotFound):
            s.delete()

    def test_keep_alive(self):
        s = self.c.create_session(uniq("ka"), ADAM, size=200)
        s.step([0.0] * 200)
        sock = self.c._t._conn.sock
        self.assertIsNotNone(sock)
        for _ in range(5):
            s.step([0.1] * 200)
            s.params()
            s.info()
        self.assertIs(self.c._t._conn.sock, sock)   # one connection for every call

    # ------------------------------------------------------------ vectors

    def test_params_round_trip_bit_exact(self):
        for dtype in ("float32", "float64"):
            with self.subTest(dtype=dtype):
                v = random_vector(300, dtype, seed=7)
                s = self.c.create_session(uniq("rt"), "adam", params=v, dtype=dtype)
                want = bits(v, dtype)
                self.assertEqual(bits(s.params(json=True), dtype), want)
                self.assertEqual(bits(s.params(json=False), dtype), want)
                w = random_vector(300, dtype, seed=8)
                for send_json, read_json in itertools.product((True, False), repeat=2):
                    s.set_params(v, json=True)         # something else first
                    s.set_params(w, json=send_json)
                    got = s.params(json=read_json)
                    self.assertEqual(bits(got, dtype), bits(w, dtype),
                                     "send json=%s, read json=%s" % (send_json, read_json))

    def test_json_and_binary_steps_agree(self):
        for dtype, opt in (("float32", ADAM), ("float64", ADAM),
                           ("float32", {"type": "sgd", "lr": 0.1, "momentum": 0.9,
                                        "nesterov": True})):
            with self.subTest(dtype=dtype, opt=opt["type"]):
                init = {"type": "uniform", "low": -1, "high": 1, "seed": 5}
                sj = self.c.create_session(uniq("j"), opt, size=100, init=init, dtype=dtype)
                sb = self.c.create_session(uniq("b"), opt, size=100, init=init, dtype=dtype)
                for i in range(8):
                    g = random_grad(100, seed=i)
                    pj = sj.step(g, loss=1.0 / (i + 1), json=True)
                    pb = sb.step(g, loss=1.0 / (i + 1), json=False)
                    self.assertEqual(bits(pj, dtype), bits(pb, dtype), "step %d" % i)
                    self.assertEqual((sj.last_step, sj.last_lr), (sb.last_step, sb.last_lr))
                self.assertEqual(sj.history(), [dict(x, time=y["time"]) for x, y in
                                                zip(sb.history(), sj.history())])

    def test_numpy_and_plain_paths_agree(self):
        self.assertIsNotNone(np, "NumPy (python3-numpy) is needed for this test")
        plain = optd.Client(self.daemon.url, numpy=False)
        self.addCleanup(plain.close)
        self.assertTrue(self.c.use_numpy)
        for dtype in ("float32", "float64"):
            with self.subTest(dtype=dtype):
                init = {"type": "normal", "std": 1, "seed": 9}
                name_n, name_p = uniq("np"), uniq("plain")
                sn = self.c.create_session(name_n, ADAM, size=80, init=init, dtype=dtype)
                sp = plain.create_session(name_p, ADAM, size=80, init=init, dtype=dtype)
                for i in range(4):
                    g = random_grad(80, seed=100 + i)
                    a = sn.step(np.array(g), json=bool(i % 2))
                    b = sp.step(g, json=bool(i % 2))
                    self.assertIsInstance(a, np.ndarray)
                    self.assertEqual(a.dtype, np.dtype(dtype))
                    self.assertIsInstance(b, array.array)
                    self.assertEqual(b.typecode, "f" if dtype == "float32" else "d")
                    self.assertEqual(a.tobytes(), b.tobytes())
                for j in (True, False):
                    self.assertIsInstance(sp.params(json=j), array.array)
                    self.assertIsInstance(sn.params(json=j), np.ndarray)
                    self.assertEqual(sp.params(json=j).tobytes(), sn.params(json=j).tobytes())
                # Inputs of any type are rounded to the session dtype first.
                g64 = np.array(random_grad(80, seed=200), dtype=np.float64)
                a = sn.step(g64, json=False)
                b = sp.step(array.array("d", g64.tolist()), json=True)
                self.assertEqual(a.tobytes(), b.tobytes())
                sp.set_params(np.zeros(80), json=False)
                self.assertEqual(list(sp.params()), [0.0] * 80)

    # -------------------------------------------------------- step modes

    def test_accumulate_answers_202(self):
        s = self.c.create_session(uniq("acc"), {"type": "sgd", "lr": 1.0}, params=[0.0, 0.0],
                                  mode={"type": "async", "accumulate": 2})
        p = s.step([1.0, 2.0])
        self.assertEqual((s.pending, s.last_step, s.last_lr), (1, 0, None))
        self.assertEqual(list(p), [0.0, 0.0])
        p = s.step([3.0, 4.0], json=False)
        self.assertEqual((s.pending, s.last_step, s.last_lr), (0, 1, 1.0))
        self.assertEqual(list(p), [-2.0, -3.0])       # the mean of the two

    def test_staleness(self):
        s = self.c.create_session(uniq("stale"), {"type": "sgd", "lr": 0.1}, size=2,
                                  mode={"type": "async", "max_staleness": 1})
        s.step([1, 1], base_step=0)
        s.step([1, 1], base_step=0)                   # 1 step stale: allowed
        for j in (True, False):
            with self.assertRaises(optd.StaleGradient) as cm:
                s.step([1, 1], base_step=0, json=j)
            e = cm.exception
            self.assertEqual((e.status, e.field, e.step), (409, "base_step", 2))
            self.assertIsInstance(e, optd.Conflict)
        with self.assertRaises(optd.Conflict):
            s.step([1, 1], base_step=7)               # ahead of the session
        self.assertEqual(s.info()["counters"]["rejected_stale"], 2)

    def test_nonfinite(self):
        nan = float("nan")
        s = self.c.create_session(uniq("nf"), ADAM, size=3)
        with self.assertRaises(optd.Unprocessable) as cm:
            s.step([1.0, nan, 0.0])                   # small, so it would be JSON: goes binary
        self.assertEqual(cm.exception.field, "grad")
        with self.assertRaises(ValueError):
            s.step([1.0, nan, 0.0], json=True)
        skip = self.c.create_session(uniq("nfs"), ADAM, params=[1.0, 2.0, 3.0],
                                     nonfinite="skip")
        with self.assertRaises(ValueError):
            skip.step([1.0, 0.0, 0.0], loss=nan)
        p = skip.step([math.inf, 0.0, 0.0], loss=0.5)
        self.assertEqual(list(p), [1.0, 2.0, 3.0])
        self.assertEqual((skip.last_step, skip.last_lr), (0, None))
        self.assertEqual(skip.info()["counters"]["skipped_nonfinite"], 1)

    def test_shared_client_across_threads(self):
        s = self.c.create_session(uniq("thr"), {"type": "sgd", "lr": 1.0}, params=[0.0])
        errors = []

        def work():
            try:
                for _ in range(10):
                    s.step([1.0], params=False)
            except Exception as exc:  # noqa: BLE001 -- reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(list(s.params()), [-40.0])
        self.assertEqual(s.info()["step"], 40)

    # ------------------------------------------------------------ errors

    def test_typed_errors(self):
        with self.assertRaises(optd.NotFound) as cm:
            self.c.session(uniq("missing"))
        e = cm.exception
        self.assertEqual((e.status, e.type, e.title, e.field),
                         (404, "urn:optd:problem:not-found", "Not Found", "name"))
        self.assertIn("missing", e.detail)
        self.assertIn("404", str(e))

        with self.assertRaises(optd.InvalidRequest) as cm:
            self.c.create_session(uniq("bad"), {"type": "nosuch"}, size=2)
        e = cm.exception
        self.assertEqual((e.status, e.type, e.field),
                         (400, "urn:optd:problem:bad-request", "optimizer.type"))
        self.assertNotIsInstance(e, optd.Unprocessable)
        with self.assertRaises(optd.InvalidRequest) as cm:
            self.c.create_session(uniq("bad"), {"type": "sgd"}, size=2)
        self.assertEqual(cm.exception.field, "optimizer.lr")

        s = self.c.create_session(uniq("len"), ADAM, size=4)
        for j in (True, False):
            with self.assertRaises(optd.Unprocessable) as cm:
                s.step([1.0, 2.0, 3.0], json=j)
            e = cm.exception
            self.assertEqual((e.status, e.type, e.field),
                             (422, "urn:optd:problem:unprocessable", "grad"))
            self.assertIsInstance(e, optd.InvalidRequest)
            with self.assertRaises(optd.Unprocessable) as cm:
                s.set_params([1.0] * 5, json=j)
            self.assertEqual(cm.exception.field, "params")
        self.assertEqual(s.info()["step"], 0)         # nothing was applied

    def test_connection_refused_gives_up(self):
        c = optd.Client("http://127.0.0.1:%d" % free_port(), retries=2, backoff=0.01,
                        max_backoff=0.02, timeout=2)
        t0 = time.monotonic()
        with self.assertRaises(optd.ConnectionFailed) as cm:
            c.health()
        self.assertLess(time.monotonic() - t0, 2.0)
        e = cm.exception
        self.assertEqual(e.status, 0)
        self.assertIsInstance(e, optd.Unavailable)
        self.assertIn("3 attempts", e.detail)

    # ----------------------------------------------------- idempotency

    def test_same_key_twice_applies_once(self):
        s = self.c.create_session(uniq("idem"), {"type": "sgd", "lr": 1.0}, params=[0.0, 0.0])
        key = optd.new_idempotency_key()
        self.assertEqual(len(key), 32)
        self.assertNotEqual(key, optd.new_idempotency_key())
        p1 = s.step([1.0, 2.0], idempotency_key=key, json=True)
        self.assertFalse(s.last_replayed)
        p2 = s.step([1.0, 2.0], idempotency_key=key, json=True)
        self.assertTrue(s.last_replayed)
        self.assertEqual(s.last_step, 1)
        self.assertEqual(list(p2), list(p1))
        # The key on another request (the same gradient as a binary body)
        # is refused, and nothing is applied.
        with self.assertRaises(optd.Unprocessable) as cm:
            s.step([1.0, 2.0], idempotency_key=key, json=False)
        self.assertEqual(cm.exception.field, "Idempotency-Key")
        s.step([1.0, 2.0])                            # a new key: applied
        self.assertEqual((s.last_step, s.last_replayed), (2, False))
        self.assertEqual(list(s.params()), [-2.0, -4.0])
        self.assertEqual(s.info()["counters"]["applied"], 2)

    def test_lost_answer_is_retried_with_the_same_key(self):
        relay = LossyRelay(self.daemon.port)
        self.addCleanup(relay.close)
        direct = self.c.create_session(uniq("lost"), {"type": "sgd", "lr": 1.0},
                                       params=[0.0, 0.0, 0.0])
        c = optd.Client(relay.url, retries=3, backoff=0.01)
        self.addCleanup(c.close)
        s = c.session(direct.name)
        for j in (True, False):
            relay.drop = 1
            c.close()                                 # the step opens a new connection
            before = direct.info()["step"]
            p = s.step([1.0, 1.0, 1.0], json=j)
            self.assertEqual(relay.dropped, 1 if j else 2)
            self.assertTrue(s.last_replayed)          # the retry found the first attempt
            self.assertEqual(s.last_step, before + 1)
            self.assertEqual(list(p), [-(before + 1.0)] * 3)
        self.assertEqual(direct.info()["counters"]["applied"], 2)
        self.assertEqual(len(direct.history()), 2)


class TestTravel(DaemonCase):
    """Checkpoints, rollback, fork (and replay), export and import."""

    def setUp(self):
        self.c = optd.Client(self.daemon.url, retries=2, backoff=0.01)

    def tearDown(self):
        self.c.close()

    def test_rollback_fork_export(self):
        name = uniq("tv")
        s = self.c.create_session(name, ADAM, size=8, init={"type": "normal", "seed": 4},
                                  retain={"every_steps": 3, "keep": 3})
        grads = [random_grad(8, i) for i in range(10)]
        at = {}
        for i, g in enumerate(grads):
            s.step(g, params=False)
            at[i + 1] = bits(s.params(), "float32")
            if i == 4:
                self.assertEqual(s.checkpoint("five")["step"], 5)
        kinds = [c["kind"] for c in s.checkpoints()["checkpoints"]]
        self.assertIn("label", kinds)
        self.assertIn("periodic", kinds)
        # fork at 6 with the same config and replay = the head
        f = self.c.fork(uniq("tvf"), name, step=6, replay=True)
        self.assertEqual(bits(f.params(), "float32"), at[10])
        # fork under another lr differs
        g2 = self.c.fork(uniq("tvg"), name, step=6, replay=True, optimizer={"lr": 0.001})
        self.assertNotEqual(bits(g2.params(), "float32"), at[10])
        # export with the log, import elsewhere: the same, and the same history
        data = s.export(log=True)
        t = self.c.import_session(uniq("tvi"), data)
        self.assertEqual(bits(t.params(), "float32"), at[10])
        # rollback by step and by label
        self.assertEqual(s.rollback(step=7)["step"], 7)
        self.assertEqual(bits(s.params(), "float32"), at[7])
        self.assertEqual(s.rollback(label="five")["step"], 5)
        self.assertEqual(bits(s.params(), "float32"), at[5])
        with self.assertRaises(optd.Conflict):
            s.rollback(step=0)
        with self.assertRaises(optd.NotFound):
            self.c.fork(uniq("tvx"), "no-such-session")
        with self.assertRaises(ValueError):
            s.rollback()


class TestRestart(DaemonCase):
    def test_retry_across_restart_never_applies_twice(self):
        # Enough retries to outlast a restart (a long one under valgrind).
        c = optd.Client(self.daemon.url, retries=40 if SLOW else 8, backoff=0.05,
                        max_backoff=0.5)
        self.addCleanup(c.close)
        s = c.create_session("restart", {"type": "sgd", "lr": 1.0}, params=[0.0, 0.0],
                             dtype="float64")
        key = optd.new_idempotency_key()
        s.step([1.0, 1.0], idempotency_key=key, json=False)
        self.assertEqual(s.last_step, 1)

        # The answer "was lost": the daemon restarts, the client's
        # keep-alive connection is dead, and the step is sent again.
        self.daemon.restart()
        p = s.step([1.0, 1.0], idempotency_key=key, json=False)
        self.assertTrue(s.last_replayed)
        self.assertEqual((s.last_step, list(p)), (1, [-1.0, -1.0]))

        # The daemon is down when the step is sent; it comes back while the
        # client is backing off, and the step lands exactly once.
        port = self.daemon.port
        self.assertEqual(self.daemon.stop(), 0)
        answer = {}

        def step():
            try:
                answer["params"] = s.step([1.0, 1.0])
            except Exception as exc:  # noqa: BLE001 -- reported below
                answer["error"] = exc

        worker = threading.Thread(target=step)
        worker.start()
        time.sleep(0.3)
        self.assertTrue(worker.is_alive())            # still backing off
        self.daemon.start(port)
        worker.join()
        self.assertNotIn("error", answer)
        p = answer["params"]
        self.assertFalse(s.last_replayed)
        self.assertEqual((s.last_step, list(p)), (2, [-2.0, -2.0]))
        self.assertEqual(s.info()["counters"]["applied"], 2)
        self.assertEqual([h["step"] for h in s.history()], [1, 2])


    def test_503_is_retried(self):
        # Another SQLite connection holds the write lock: the daemon's commit
        # times out (5 s busy timeout) and it answers 503, applying nothing.
        # The client retries; once the lock is gone the step lands, once.
        c = optd.Client(self.daemon.url, retries=8, backoff=0.05, max_backoff=0.5)
        self.addCleanup(c.close)
        s = c.create_session("busy", {"type": "sgd", "lr": 1.0}, params=[0.0, 0.0])
        lock = sqlite3.connect(self.daemon.db, isolation_level=None, timeout=10)
        self.addCleanup(lock.close)
        lock.execute("BEGIN IMMEDIATE")
        answer = {}

        def step():
            try:
                answer["params"] = s.step([1.0, 1.0])
            except Exception as exc:  # noqa: BLE001 -- reported below
                answer["error"] = exc

        worker = threading.Thread(target=step)
        worker.start()
        deadline = time.monotonic() + 30
        while "committing the step" not in self.daemon.log_text():
            self.assertLess(time.monotonic(), deadline, "no 503 from the daemon")
            self.assertTrue(worker.is_alive(), answer)
            time.sleep(0.02)
        lock.execute("ROLLBACK")
        worker.join()
        self.assertNotIn("error", answer)
        self.assertIn("/v1/sessions/busy/step 503", self.daemon.log_text())
        self.assertEqual((s.last_step, list(answer["params"])), (1, [-1.0, -1.0]))
        self.assertEqual(s.info()["counters"]["applied"], 1)


class TestApiKey(DaemonCase):
    api_key = "s3cret-key"

    def test_api_key(self):
        anon = optd.Client(self.daemon.url, retries=0)
        self.addCleanup(anon.close)
        self.assertEqual(anon.health()["status"], "ok")     # no key needed
        with self.assertRaises(optd.Unauthorized) as cm:
            anon.optimizers()
        e = cm.exception
        self.assertEqual((e.status, e.type), (401, "urn:optd:problem:unauthorized"))
        wrong = optd.Client(self.daemon.url, api_key="s3cret-kez", retries=0)
        self.addCleanup(wrong.close)
        with self.assertRaises(optd.Unauthorized):
            wrong.create_session("k", ADAM, size=1)
        good = optd.Client(self.daemon.url, api_key=self.api_key)
        self.addCleanup(good.close)
        s = good.create_session("k", ADAM, size=1)
        s.step([1.0])
        self.assertEqual(s.last_step, 1)
        with self.assertRaises(optd.Unauthorized):
            anon.session("k")


if __name__ == "__main__":
    unittest.main()
