"""Optd-Params-Crc32: the client checks the params of every answer against
the daemon's digest, and raises ParamsDigestMismatch when they differ."""

import http.client
import http.server
import threading
import zlib

import optd

from .daemon import DaemonCase


class DigestRelay:
    """An HTTP relay in front of the daemon that replaces the value of the
    answers' Optd-Params-Crc32 header with ``digest`` (when set): params
    that are not the ones the daemon sent, as far as the client can tell."""

    def __init__(self, upstream_port):
        relay = self
        self.digest = None

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _relay(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                up = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                hdrs = {k: v for k, v in self.headers.items()
                        if k.lower() not in ("host", "connection")}
                up.request(self.command, self.path, body=body, headers=hdrs)
                r = up.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() in ("connection", "content-length", "date", "server"):
                        continue
                    if k.lower() == "optd-params-crc32" and relay.digest is not None:
                        v = relay.digest
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                up.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

        self._srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self._srv.server_address[1]
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self._srv.shutdown()
        self._srv.server_close()
        self._thread.join(5)


class TestParamsDigest(DaemonCase):
    def setUp(self):
        self.relay = DigestRelay(self.daemon.port)
        self.addCleanup(self.relay.close)

    def test_digest_verified_in_every_form(self):
        for dtype in ("float32", "float64"):
            for numpy in (True, False):
                c = optd.Client(self.relay.url, retries=1, numpy=numpy)
                name = "dg-%s-%d" % (dtype, numpy)
                s = c.create_session(name, {"type": "sgd", "lr": 0.1}, dtype=dtype,
                                     params=[0.5, -1.25, 3.0, 1e-3])
                for json in (True, False):
                    p = s.step([0.1, 0.2, -0.3, 4.0], json=json)
                    self.assertEqual(len(p), 4)
                    self.assertEqual(len(s.params(json=json)), 4)
                # the header is the CRC-32 of the params' bytes in the dtype
                raw = http.client.HTTPConnection("127.0.0.1", self.daemon.port)
                raw.request("GET", "/v1/sessions/%s/params" % name,
                            headers={"Accept": "application/octet-stream"})
                r = raw.getresponse()
                body = r.read()
                self.assertEqual(r.getheader("Optd-Params-Crc32"),
                                 "%08x" % (zlib.crc32(body) & 0xFFFFFFFF))
                raw.close()
                c.close()

    def test_mismatch_raises_typed_error(self):
        c = optd.Client(self.relay.url, retries=1)
        s = c.create_session("dg-bad", {"type": "sgd", "lr": 0.1}, params=[1.0, 2.0])
        self.relay.digest = "0badf00d"
        for json in (True, False):
            with self.assertRaises(optd.ParamsDigestMismatch) as cm:
                s.params(json=json)
            self.assertEqual(cm.exception.expected, "0badf00d")
            self.assertEqual(cm.exception.kind, "digest_mismatch")
            self.assertIsInstance(cm.exception, optd.OptdError)
            with self.assertRaises(optd.ParamsDigestMismatch):
                s.step([0.5, 0.5], json=json)
        # turned off: the params are handed back unchecked
        off = optd.Client(self.relay.url, retries=1, verify_params=False)
        for json in (True, False):
            self.assertEqual(len(off.session("dg-bad").params(json=json)), 2)
        self.relay.digest = None
        self.assertEqual(len(c.session("dg-bad").params()), 2)
        off.close()
        c.close()
