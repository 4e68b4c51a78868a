"""The 16-bit wire forms: the conversions on hand-computed bit patterns
(plain and NumPy paths), and steps / params in bfloat16 and float16 against
the real daemon."""

import array
import itertools
import random
import struct
import unittest

import optd
from optd import _wire

from .daemon import DaemonCase

try:
    import numpy as np
except ImportError:
    np = None  # the NumPy cases fail: python3-numpy is a test dependency

_names = itertools.count()


def f32(bits):
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def u16s(data):
    return list(struct.unpack("<%dH" % (len(data) // 2), data))


# (float32 bits, bfloat16 bits)
BF16 = [
    (0x3F800000, 0x3F80),   # 1.0
    (0x80000000, 0x8000),   # -0.0
    (0x3F808000, 0x3F80),   # tie, lower half even: down
    (0x3F818000, 0x3F82),   # tie, lower half odd: up
    (0x3F808001, 0x3F81),   # just past the tie: up
    (0x3F807FFF, 0x3F80),   # just below the tie: down
    (0xC0490FDB, 0xC049),   # -pi
    (0x7F7FFFFF, 0x7F80),   # largest float32 rounds to Inf
    (0x7F800000, 0x7F80),   # Inf
    (0xFF800000, 0xFF80),   # -Inf
    (0x7FC00000, 0x7FC0),   # quiet NaN
    (0x7F800001, 0x7FC0),   # signalling NaN becomes quiet
    (0xFF812345, 0xFFC1),   # sign and top payload bits kept
    (0x00000001, 0x0000),   # smallest float32 subnormal
    (0x00008000, 0x0000),   # tie at the bottom: to even (0)
    (0x00018000, 0x0002),   # tie to even upward
]

# (float32 bits, float16 bits)
F16 = [
    (0x3F800000, 0x3C00),   # 1.0
    (0xC0000000, 0xC000),   # -2.0
    (0x80000000, 0x8000),   # -0.0
    (0x3DCCCCCD, 0x2E66),   # 0.1
    (0x3F801000, 0x3C00),   # 1 + 2^-11: tie, even is down
    (0x3F803000, 0x3C02),   # 1 + 3*2^-11: tie, even is up
    (0x3F801001, 0x3C01),   # just past the tie
    (0x477FE000, 0x7BFF),   # 65504, the largest float16
    (0x477FEFFF, 0x7BFF),   # just below 65520: 65504
    (0x477FF000, 0x7C00),   # 65520: Inf
    (0xC77FF000, 0xFC00),   # -65520: -Inf
    (0x7F7FFFFF, 0x7C00),   # largest float32: Inf
    (0x7F800000, 0x7C00),   # Inf
    (0x38800000, 0x0400),   # 2^-14, the smallest normal
    (0x387FF000, 0x0400),   # 1023.75 * 2^-24: up to the smallest normal
    (0x387FE000, 0x0400),   # 1023.5 * 2^-24: tie between 0x3ff and 0x400, even is up
    (0x387FC000, 0x03FF),   # 1023 * 2^-24, the largest subnormal
    (0x387FD000, 0x03FF),   # 1023.25 * 2^-24: down
    (0x33800000, 0x0001),   # 2^-24, the smallest subnormal
    (0x33000000, 0x0000),   # 2^-25: tie, even is 0
    (0x33000001, 0x0001),   # just past 2^-25
    (0xB3000001, 0x8001),
    (0x33C00000, 0x0002),   # 1.5 * 2^-24: tie, even is up
    (0x34200000, 0x0002),   # 2.5 * 2^-24: tie, even is down
    (0x32ABCDEF, 0x0000),   # below 2^-25
    (0x00000001, 0x0000),   # float32 subnormal
    (0x7FC00000, 0x7E00),   # quiet NaN
    (0x7F800001, 0x7E00),   # signalling NaN becomes quiet
    (0xFFC02000, 0xFE01),   # sign and top payload bits kept
]

# (float16 bits, float32 bits): widening is exact
F16_UP = [
    (0x3C00, 0x3F800000), (0x0001, 0x33800000), (0x03FF, 0x387FC000),
    (0x0400, 0x38800000), (0x7BFF, 0x477FE000), (0x7C00, 0x7F800000),
    (0xFC00, 0xFF800000), (0x7E00, 0x7FC00000), (0xFE01, 0xFFC02000),
    (0x3555, 0x3EAAA000), (0x8000, 0x80000000), (0x8200, 0xB8000000),
]


class Conversions(unittest.TestCase):
    def check_narrow(self, table, fn, wire):
        for u, want in table:
            self.assertEqual(fn(u), want, "%s of 0x%08x" % (wire, u))
        words = array.array("f", [f32(u) for u, _ in table])
        want = [w for _, w in table]
        self.assertEqual(u16s(_wire.narrow(words, wire)), want)
        self.assertEqual(u16s(_wire.narrow(np.array(words, dtype=np.float32), wire)), want)

    def test_bfloat16_narrowing(self):
        self.check_narrow(BF16, _wire.f32_to_bf16, "bfloat16")

    def test_float16_narrowing(self):
        self.check_narrow(F16, _wire.f32_to_f16, "float16")

    def test_widening(self):
        for h, want in F16_UP:
            self.assertEqual(_wire.f16_to_f32(h), want, "float16 0x%04x" % h)
        self.assertEqual(_wire.bf16_to_f32(0xC049), 0xC0490000)
        body = struct.pack("<%dH" % len(F16_UP), *[h for h, _ in F16_UP])
        want = [w for _, w in F16_UP]
        for use_numpy in (False, True):
            got = _wire.widen(body, "float16", "float32", use_numpy)
            self.assertEqual(list(struct.unpack("<%dI" % len(want),
                                                array.array("f", got).tobytes())), want)

    def test_float64_rounds_to_float32_first(self):
        # 1 + 2^-11 + 2^-40: to float16 directly it would round up, but
        # float32 drops the 2^-40 and leaves a tie that goes to even (down).
        x = 1.0 + 2.0 ** -11 + 2.0 ** -40
        self.assertEqual(u16s(_wire.narrow(array.array("d", [x]), "float16")), [0x3C00])
        self.assertEqual(u16s(_wire.narrow(np.array([x]), "float16")), [0x3C00])
        self.assertEqual(u16s(_wire.narrow([1e300, -1e300], "bfloat16")), [0x7F80, 0xFF80])

    def test_plain_and_numpy_agree_on_every_pattern(self):
        # Every float16 / bfloat16 pattern widened, and 20000 random float32
        # patterns (NaNs included) narrowed, give the same bits both ways.
        every = struct.pack("<65536H", *range(65536))
        for wire in _wire.WIRES:
            a = array.array("f", _wire.widen(every, wire, "float32", False)).tobytes()
            b = _wire.widen(every, wire, "float32", True).astype("<f4").tobytes()
            self.assertEqual(a, b, wire)
        rnd = random.Random(9)
        pats = [rnd.getrandbits(32) for _ in range(20000)]
        words = array.array("f", struct.unpack("<%df" % len(pats),
                                               struct.pack("<%dI" % len(pats), *pats)))
        for wire, fn in (("bfloat16", _wire.f32_to_bf16), ("float16", _wire.f32_to_f16)):
            want = [fn(u) for u in pats]
            self.assertEqual(u16s(_wire.narrow(words, wire, use_numpy=False)), want)
            self.assertEqual(u16s(_wire.narrow(np.frombuffer(words.tobytes(), np.float32),
                                               wire)), want)
            # and each narrowed value widens back to itself
            back = _wire.widen(struct.pack("<%dH" % len(want), *want), wire, "float32", True)
            self.assertEqual(u16s(_wire.narrow(back, wire)), want)

    def test_bad_wire_is_refused(self):
        with self.assertRaises(ValueError):
            optd.Client("http://127.0.0.1:1", wire="float8")


class WireSteps(DaemonCase):
    def setUp(self):
        self.c = optd.Client(self.daemon.url, retries=2, backoff=0.01)

    def tearDown(self):
        self.c.close()

    def pair(self, dtype, n=300):
        rnd = random.Random(n)
        init = [rnd.uniform(-2, 2) for _ in range(n)]
        a = self.c.create_session("w16-%d" % next(_names), {"type": "adam", "lr": 0.01},
                                  params=init, dtype=dtype)
        b = self.c.create_session("w32-%d" % next(_names), {"type": "adam", "lr": 0.01},
                                  params=init, dtype=dtype)
        return a, b

    def test_16bit_step_is_the_step_of_the_widened_values(self):
        rnd = random.Random(4)
        for dtype in ("float32", "float64"):
            for wire in _wire.WIRES:
                a, b = self.pair(dtype)
                for k in range(3):
                    grad = np.array([rnd.gauss(0, 1) * 10 ** rnd.randint(-9, 3)
                                     for _ in range(a.size)], dtype=np.float64)
                    got = a.step(grad, wire=wire)
                    self.assertEqual(a.last_step, k + 1)
                    b.step(_wire.round_trip(grad, wire, dtype), json=False)
                    full_a = a.params(wire=None)
                    full_b = b.params(json=False)
                    self.assertEqual(full_a.tobytes(), full_b.tobytes(), (dtype, wire, k))
                    # the answer is the client's own narrowing of the params
                    self.assertEqual(got.dtype, np.dtype(dtype))
                    self.assertEqual(got.tobytes(),
                                     _wire.round_trip(full_a, wire, dtype).tobytes())
                    self.assertNotEqual(got.tobytes(), full_a.tobytes())

    def test_client_default_and_per_call_override(self):
        wc = optd.Client(self.daemon.url, wire="bfloat16", numpy=False)
        try:
            a, b = self.pair("float32", n=8)
            s = wc.session(a.name)
            grad = [0.1 * (i + 1) for i in range(8)]
            got = s.step(grad)  # 8 values: binary anyway, in bfloat16
            self.assertIsInstance(got, array.array)
            b.step(_wire.round_trip(grad, "bfloat16", use_numpy=False), json=False)
            full = s.params(wire=None)
            self.assertEqual(full.tobytes(), b.params(json=False).tobytes())
            self.assertEqual(got.tobytes(), _wire.round_trip(full, "bfloat16",
                                                             use_numpy=False).tobytes())
            self.assertEqual(s.params().tobytes(), got.tobytes())
            half = s.params(wire="float16")
            self.assertEqual(half.tobytes(), _wire.round_trip(full, "float16",
                                                              use_numpy=False).tobytes())
            with self.assertRaises(ValueError):
                s.step(grad, json=True)
            with self.assertRaises(ValueError):
                s.params(wire="int8")
        finally:
            wc.close()

    def test_absent_tensors_and_group_lrs_in_16_bits(self):
        # w is 2x3, b is 3: the vector is w then b
        w, b = [0.5, -1, 2, 0.25, 3, -0.75], [1.0, 2.0, 3.0]
        s = self.c.create_session("w16-layout-%d" % next(_names), {"type": "sgd", "lr": 0.1},
                                  params=w + b, dtype="float64",
                                  tensors=[("layer.w", [2, 3]), ("layer.b", [3])],
                                  groups=[{"tensors": ["layer.w"]},
                                          {"tensors": ["layer.b"], "lr": 0.5}])
        # bfloat16: layer.b absent, grad holds layer.w's six values (exact
        # in 16 bits), each group with its own lr; all nine params answered
        g = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        got = s.step(g, absent=[1], groups=[{"lr": 0.2}, {"lr": 0.3}], wire="bfloat16")
        full = s.params(wire=None)
        self.assertEqual(list(full), [x + -0.2 * d for x, d in zip(w, g)] + b)
        self.assertEqual(got.tobytes(), _wire.round_trip(full, "bfloat16", "float64").tobytes())
        # float16: layer.w absent; group 1 keeps the lr 0.3 of the last step
        gb = [0.5, -0.25, 1.0]
        got = s.step(gb, absent=["layer.w"], wire="float16")
        full2 = s.params(wire=None)
        self.assertEqual(list(full2[:6]), list(full[:6]))
        self.assertEqual(list(full2[6:]), [x + -0.3 * d for x, d in zip(b, gb)])
        self.assertEqual(got.tobytes(), _wire.round_trip(full2, "float16", "float64").tobytes())
        self.assertEqual(s.last_step, 2)

    def test_set_params_in_16_bits(self):
        a, _ = self.pair("float64", n=5)
        values = [1.0, 65519.0, 2.0 ** -24, -0.1, 1.0 + 2.0 ** -11]
        a.set_params(values, wire="float16")
        got = a.params(json=False)
        self.assertEqual(list(got), [1.0, 65504.0, 2.0 ** -24, -0.0999755859375, 1.0])
        self.assertEqual(a.last_step, 0)
        # 65520 narrows to Inf, which params may not hold: refused, nothing changed
        with self.assertRaises(optd.Unprocessable):
            a.set_params([65520.0] * 5, wire="float16")
        self.assertEqual(a.params(json=False).tobytes(), got.tobytes())
