"""One persistent HTTP/1.1 connection to optd, with bounded retries.

Transient failures -- connection refused or reset, the peer closing a
keep-alive connection, timeouts, 503 answers, and 429 answers whose
Retry-After is at most MAX_RETRY_AFTER (a token's step rate) -- are retried
with exponential backoff and jitter (or after Retry-After when given).  Every request optd serves is safe to repeat
(PUT/PATCH/DELETE are idempotent, and a step carries an Idempotency-Key that
the caller keeps the same across attempts), so the transport retries them all.
"""

import http.client
import random
import ssl
import threading
import time
import urllib.parse

from ._constants import BACKOFF, MAX_BACKOFF, MAX_RETRY_AFTER, RETRIES
from .errors import ConnectionFailed

USER_AGENT = "optd-python/0.1"


class Response:
    __slots__ = ("status", "headers", "body", "attempts")

    def __init__(self, status, headers, body, attempts):
        self.status = status
        self.headers = headers      # lower-cased names
        self.body = body
        self.attempts = attempts    # 1 when the first attempt answered

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)


def _transient(exc):
    """True for failures a later attempt may not see."""
    if isinstance(exc, ssl.CertificateError):
        return False
    # OSError covers refused/reset/aborted connections, broken pipes and
    # socket timeouts; HTTPException covers a peer that closed a keep-alive
    # connection before answering (RemoteDisconnected) or mid-body.
    return isinstance(exc, (OSError, http.client.HTTPException))


def tls_context(ca_file=None, cert_file=None, key_file=None, ssl_context=None):
    """The ssl.SSLContext of an https:// client: ssl_context as given, or a
    default one (the daemon's certificate and host name verified) trusting
    ca_file (a PEM bundle; None: the system's CAs) and presenting cert_file
    with key_file (PEM) to a daemon that requires client certificates."""
    if ssl_context is not None:
        if ca_file or cert_file or key_file:
            raise ValueError("give ssl_context or ca_file/cert_file/key_file, not both")
        return ssl_context
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together")
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class Transport:
    def __init__(self, url, api_key=None, timeout=60.0, retries=RETRIES, backoff=BACKOFF,
                 max_backoff=MAX_BACKOFF, ca_file=None, cert_file=None, key_file=None,
                 ssl_context=None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must look like http://host:port, not %r" % (url,))
        self.url = url
        self._https = parts.scheme == "https"
        self._ssl = tls_context(ca_file, cert_file, key_file, ssl_context) if self._https else None
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max(self.backoff, float(max_backoff))
        self._auth = "Bearer " + api_key if api_key else None
        self._conn = None
        # One connection carries one request at a time; the lock lets
        # threads share a client (their requests take turns).
        self._lock = threading.Lock()

    def close(self):
        with self._lock:
            self._drop()

    def _drop(self):
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _connection(self):
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(self._host, self._port,
                                                         timeout=self.timeout, context=self._ssl)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port,
                                                        timeout=self.timeout)
        return self._conn

    def _delay(self, attempt, retry_after=None):
        """Backoff before retry number attempt (0-based): doubling, capped,
        with jitter so that many clients do not retry in lockstep."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER)
        cap = min(self.max_backoff, self.backoff * (2 ** attempt))
        return random.uniform(cap / 2, cap)

    def _once(self, method, path, body, headers):
        conn = self._connection()
        conn.request(method, self._prefix + path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        if resp.will_close:
            self._drop()
        return resp.status, hdrs, data

    def request(self, method, path, body=None, headers=None):
        """Sends one request, retrying transient failures.  Returns the
        Response (whatever its status, including a 503 after the last
        retry); raises ConnectionFailed when no answer came at all."""
        hdrs = {"User-Agent": USER_AGENT}
        if self._auth:
            hdrs["Authorization"] = self._auth
        if headers:
            hdrs.update(headers)
        attempt = 0
        with self._lock:
            while True:
                try:
                    status, rh, data = self._once(method, path, body, hdrs)
                except BaseException as exc:
                    # Whatever stopped it (even KeyboardInterrupt), the
                    # connection is mid-exchange: never reuse it.
                    self._drop()
                    if not isinstance(exc, Exception) or not _transient(exc):
                        raise
                    if attempt >= self.retries:
                        raise ConnectionFailed(
                            0, title="no answer",
                            detail="%s %s%s failed after %d attempts: %s: %s"
                            % (method, self.url, path, attempt + 1, type(exc).__name__, exc),
                        ) from exc
                    time.sleep(self._delay(attempt))
                    attempt += 1
                    continue
                if status in (503, 429) and attempt < self.retries:
                    ra = rh.get("retry-after")
                    try:
                        ra = float(ra) if ra is not None else None
                    except ValueError:
                        ra = None
                    # A 429 is waited out only when it names a short wait
                    # (a token's step rate); a quota that waiting cannot
                    # lift (Retry-After past MAX_RETRY_AFTER) is answered.
                    if status == 429 and (ra is None or ra > MAX_RETRY_AFTER):
                        return Response(status, rh, data, attempt + 1)
                    time.sleep(self._delay(attempt, ra))
                    attempt += 1
                    continue
                return Response(status, rh, data, attempt + 1)
