"""The Python client's constants against api/client_constants.json, the one
set every optd client shares."""

import inspect
import json
import os
import re
import unittest

import optd
from optd import _constants, _http, errors
from optd import client as client_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
with open(os.path.join(ROOT, "api", "client_constants.json"), encoding="utf-8") as f:
    WANT = json.load(f)


def default_of(fn, name):
    return inspect.signature(fn).parameters[name].default


class Constants(unittest.TestCase):
    def test_retry_policy(self):
        for fn in (optd.Client.__init__, _http.Transport.__init__):
            self.assertEqual(default_of(fn, "retries"), WANT["retries"])
            self.assertEqual(default_of(fn, "backoff") * 1000, WANT["backoff_initial_ms"])
            self.assertEqual(default_of(fn, "max_backoff") * 1000, WANT["backoff_max_ms"])
        self.assertEqual(_http.MAX_RETRY_AFTER, WANT["retry_after_max_s"])

    def test_binary_threshold(self):
        self.assertEqual(default_of(optd.Client.__init__, "binary_threshold"),
                         WANT["binary_threshold"])
        self.assertEqual(optd.Client("http://127.0.0.1:1").binary_threshold,
                         WANT["binary_threshold"])

    def test_name_pattern(self):
        self.assertEqual(_constants.NAME_PATTERN, WANT["name_pattern"])
        pat = re.compile(WANT["name_pattern"])
        s = client_module._check_name
        for name in ("a", "run-1.v2_x", "x" * 128):
            self.assertTrue(pat.match(name))
            s(name)
        for name in ("", "x" * 129, "a b", "a/b"):
            self.assertFalse(pat.match(name))
            with self.assertRaises(ValueError):
                s(name)

    def test_headers(self):
        self.assertEqual(_constants.HEADERS, WANT["headers"])

    def test_problem_kinds(self):
        for p in WANT["problems"]:
            doc = {"type": p["type"], "title": "t", "detail": "d"}
            if "field" in p:
                doc["field"] = p["field"]
            e = errors.from_problem(p["status"], doc)
            self.assertEqual(e.kind, p["kind"], p)
            self.assertIsInstance(e, optd.OptdError)
        self.assertEqual(errors.ConnectionFailed(0, "no answer").kind, "connection_failed")


if __name__ == "__main__":
    unittest.main()
