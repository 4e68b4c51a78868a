"""HTTPS: the client against a real daemon started with --tls-cert,
--tls-key and --tls-client-ca (mutual TLS), with certificates made for the
run by tests/support/make_test_ca.sh."""

import shutil
import ssl
import tempfile
import unittest

import optd

from .daemon import Daemon, make_test_ca


class TestTls(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="optd-py-tls-")
        cls.pem = staticmethod(make_test_ca(cls.dir))
        pem = cls.pem
        cls.daemon = Daemon(args=["--tls-cert", pem("server.pem"), "--tls-key", pem("server.key"),
                                  "--tls-client-ca", pem("ca.pem")]).start()

    @classmethod
    def tearDownClass(cls):
        try:
            log = cls.daemon.log_text()
            rc = cls.daemon.close()
            if rc != 0:
                raise AssertionError("daemon exited with %r on SIGTERM:\n%s" % (rc, log))
        finally:
            shutil.rmtree(cls.dir, ignore_errors=True)

    def client(self, **kw):
        c = optd.Client(self.daemon.url, retries=0, **kw)
        self.addCleanup(c.close)
        return c

    def good(self):
        return self.client(ca_file=self.pem("ca.pem"), cert_file=self.pem("client.pem"),
                           key_file=self.pem("client.key"))

    def test_url_is_https(self):
        self.assertTrue(self.daemon.url.startswith("https://127.0.0.1:"))

    def test_verified_server_and_client_certificate(self):
        c = self.good()
        s = c.create_session("tls-py", optimizer={"type": "sgd", "lr": 0.5}, params=[1.0, 2.0],
                             dtype="float64")
        params = s.step([1.0, 1.0])
        self.assertEqual(list(params), [0.5, 1.5])
        self.assertEqual(c.session("tls-py").last_step, 1)

    def test_ssl_context_of_ones_own(self):
        ctx = ssl.create_default_context(cafile=self.pem("ca.pem"))
        ctx.load_cert_chain(self.pem("client.pem"), self.pem("client.key"))
        self.assertEqual(self.client(ssl_context=ctx).health()["status"], "ok")

    def test_wrong_ca_fails(self):
        c = self.client(ca_file=self.pem("other-ca.pem"), cert_file=self.pem("client.pem"),
                        key_file=self.pem("client.key"))
        with self.assertRaises(ssl.SSLCertVerificationError):
            c.health()

    def test_system_cas_do_not_know_the_test_ca(self):
        c = self.client(cert_file=self.pem("client.pem"), key_file=self.pem("client.key"))
        with self.assertRaises(ssl.SSLCertVerificationError):
            c.health()

    def test_no_client_certificate_refused(self):
        c = self.client(ca_file=self.pem("ca.pem"))
        with self.assertRaises((optd.ConnectionFailed, ssl.SSLError)):
            c.health()

    def test_client_certificate_of_another_ca_refused(self):
        c = self.client(ca_file=self.pem("ca.pem"), cert_file=self.pem("other-client.pem"),
                        key_file=self.pem("other-client.key"))
        with self.assertRaises((optd.ConnectionFailed, ssl.SSLError)):
            c.health()

    def test_cert_without_key_is_refused_at_once(self):
        with self.assertRaises(ValueError):
            optd.Client(self.daemon.url, ca_file=self.pem("ca.pem"),
                        cert_file=self.pem("client.pem"))
        with self.assertRaises(ValueError):
            optd.Client(self.daemon.url, ssl_context=ssl.create_default_context(),
                        ca_file=self.pem("ca.pem"))


if __name__ == "__main__":
    unittest.main()
