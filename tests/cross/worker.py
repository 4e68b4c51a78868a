#!/usr/bin/python3
"""One cross-language worker on the Python client (tests/test_cross_language.c).

    worker.py URL SESSION DTYPE SIZE NAME W T0 T1

Sends g(t, i, w) = (((7t + 13i + 5w) mod 17) - 8) / 8 for t = T0 .. T1-1,
each with base_step t and worker NAME, and prints one line per step:
"t step hex" -- the step the answer reported and the new params as the hex
of their little-endian bytes in DTYPE, so the test compares exact bits.

The wire form rotates with (t + w) mod 3: the client's default, JSON, binary;
every run of three steps uses each.  Any error: the message on stderr, exit 1.
"""

import array
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "clients", "python"))

import optd  # noqa: E402


def grad(t, size, w):
    # Every value is k/8 with |k| <= 8: exact in float32 and float64, and
    # Python's int % is non-negative like the other languages' for t, i, w >= 0.
    return [(((7 * t + 13 * i + 5 * w) % 17) - 8) / 8.0 for i in range(size)]


def params_hex(params, dtype):
    a = array.array("d" if dtype == "float64" else "f", params)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes().hex()


def main(argv):
    if len(argv) != 9:
        sys.stderr.write("usage: worker.py URL SESSION DTYPE SIZE NAME W T0 T1\n")
        return 2
    url, name, dtype, size, worker, w, t0, t1 = argv[1:]
    size, w, t0, t1 = int(size), int(w), int(t0), int(t1)
    client = optd.Client(url)
    s = client.session(name)
    if s.dtype != dtype or s.size != size:
        sys.stderr.write("session %s is %s[%d], expected %s[%d]\n"
                         % (name, s.dtype, s.size, dtype, size))
        return 1
    forms = (None, True, False)  # default, JSON, binary
    for t in range(t0, t1):
        try:
            p = s.step(grad(t, size, w), base_step=t, worker=worker, json=forms[(t + w) % 3])
        except optd.OptdError as e:
            sys.stderr.write("step t=%d: %s\n" % (t, e))
            return 1
        sys.stdout.write("%d %d %s\n" % (t, s.last_step, params_hex(p, dtype)))
        sys.stdout.flush()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
