"""Token management from the Python client against a real daemon with an
admin key: mint, list (never a secret), get, revoke; a token's scope and
prefix (403), its quotas and step rate (429 with retry_after), and the
transport waiting out a short Retry-After."""

import time
import unittest

import optd

from .daemon import DaemonCase

SGD = {"type": "sgd", "lr": 0.1}


class TestTokens(DaemonCase):
    api_key = "py-admin-key"

    def setUp(self):
        self.admin = optd.Client(self.daemon.url, api_key=self.api_key, retries=0)
        self.addCleanup(self.admin.close)

    def client(self, token, **kw):
        c = optd.Client(self.daemon.url, api_key=token, **kw)
        self.addCleanup(c.close)
        return c

    def test_mint_list_get_revoke(self):
        t = self.admin.create_token(["step"], prefix="py-", label="py workers",
                                    expires_in=3600)
        secret = t["token"]
        self.assertRegex(secret, r"^optd_[0-9a-f]{16}_[0-9a-f]{64}$")
        self.assertEqual(t["scopes"], ["read", "step"])
        self.assertEqual(t["prefix"], "py-")
        listed = {x["id"]: x for x in self.admin.list_tokens()}
        self.assertIn(t["id"], listed)
        self.assertNotIn("token", listed[t["id"]])
        got = self.admin.get_token(t["id"])
        self.assertNotIn("token", got)
        self.assertEqual(got["label"], "py workers")
        self.assertIn("expires_at", got)
        # The secret is nowhere in the database file.
        with open(self.daemon.db, "rb") as f:
            self.assertNotIn(secret[22:].encode(), f.read())

        worker = self.client(secret, retries=0)
        self.admin.create_session("py-a", SGD, params=[1.0, 2.0])
        s = worker.session("py-a")
        s.step([1.0, 1.0])
        self.assertEqual(s.last_step, 1)
        # A token never manages tokens.
        with self.assertRaises(optd.Forbidden) as cm:
            worker.list_tokens()
        self.assertEqual((cm.exception.status, cm.exception.field), (403, "scope"))
        # Scope: a step token cannot delete; prefix: nor touch other names.
        with self.assertRaises(optd.Forbidden) as cm:
            s.delete()
        self.assertEqual(cm.exception.field, "scope")
        with self.assertRaises(optd.Forbidden) as cm:
            worker.session("elsewhere")
        self.assertEqual(cm.exception.field, "prefix")

        self.admin.revoke_token(t["id"])
        with self.assertRaises(optd.Unauthorized):
            s.step([1.0, 1.0])
        self.assertIn("revoked_at", self.admin.get_token(t["id"]))
        with self.assertRaises(optd.NotFound):
            self.admin.revoke_token("0123456789abcdef")

    def test_created_by_and_quota(self):
        t = self.admin.create_token(["admin"], prefix="pq-", quotas={"max_sessions": 1})
        c = self.client(t["token"], retries=0)
        s = c.create_session("pq-1", SGD, params=[1.0])
        self.assertEqual(s.info()["created_by"], t["id"])
        with self.assertRaises(optd.TooManyRequests) as cm:
            c.create_session("pq-2", SGD, params=[1.0])
        e = cm.exception
        self.assertEqual((e.status, e.field), (429, "max_sessions"))
        self.assertGreaterEqual(e.retry_after, 1)
        with self.assertRaises(optd.NotFound):
            self.admin.session("pq-2")
        self.assertEqual(self.admin.get_token(t["id"])["usage"]["sessions"], 1)

    def test_step_rate(self):
        t = self.admin.create_token(["step"], prefix="pr-",
                                    quotas={"steps_per_second": 2, "burst": 1})
        s_admin = self.admin.create_session("pr-a", SGD, params=[0.0])
        no_retry = self.client(t["token"], retries=0)
        s = no_retry.session("pr-a")
        s.step([1.0])
        with self.assertRaises(optd.TooManyRequests) as cm:
            s.step([1.0])
        self.assertGreaterEqual(cm.exception.retry_after, 1)
        self.assertEqual(s_admin.info()["step"], 1)
        # With retries the client waits Retry-After out and the step lands.
        patient = self.client(t["token"], retries=2)
        p = patient.session("pr-a")
        t0 = time.monotonic()
        p.step([1.0])
        p.step([1.0])
        self.assertEqual(p.last_step, 3)
        self.assertGreater(time.monotonic() - t0, 0.4)


if __name__ == "__main__":
    unittest.main()
