"""The real optd daemon for the tests: started on a port the kernel picks
(or a given one, for a restart), with its own temporary database, stopped
by PID.  Also a TCP relay that loses answers on purpose, to make the
client's retries happen against the real daemon."""

import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", "..", ".."))
OPTD_BIN = os.environ.get("OPTD_BIN") or os.path.join(REPO, "build", "optd")
LISTEN_PREFIX = "optd listening on http://127.0.0.1:"
LISTEN_PREFIX_TLS = "optd listening on https://127.0.0.1:"

# tests/run.sh may ask for the daemon under valgrind: ten times slower.
_WRAP = shlex.split(os.environ.get("OPTD_VALGRIND_DAEMON", ""))
SLOW = bool(_WRAP)
START_TIMEOUT = 120.0 if _WRAP else 20.0
STOP_TIMEOUT = 120.0 if _WRAP else 20.0


def _die_with_parent():
    # PR_SET_PDEATHSIG: if the test process dies, the daemon gets SIGTERM
    # instead of living on as an orphan holding a port.  The signal comes
    # when the *thread* that forked exits, hence Daemon.start's main-thread
    # rule.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Daemon:
    def __init__(self, api_key=None, args=()):
        if not os.access(OPTD_BIN, os.X_OK):
            raise RuntimeError("no daemon at %s: run make build, or set OPTD_BIN" % OPTD_BIN)
        self.dir = tempfile.mkdtemp(prefix="optd-py-")
        self.db = os.path.join(self.dir, "optd.db")
        self.log = os.path.join(self.dir, "daemon.log")
        self.api_key = api_key
        self.args = list(args)  # more flags (--tls-cert ...)
        self.proc = None
        self.port = 0
        self.url = None
        self._starts = 0

    def start(self, port=0):
        """Starts the daemon on port (0: any free one) and waits for its
        listening line."""
        assert self.proc is None, "daemon already running"
        assert threading.current_thread() is threading.main_thread(), \
            "start the daemon from the main thread (see _die_with_parent)"
        self._starts += 1
        out_path = os.path.join(self.dir, "stdout.%d" % self._starts)
        cmd = _WRAP + [OPTD_BIN, "--port", str(port), "--db", self.db, "--threads", "2",
                       "--log-level", "warn"]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        cmd += self.args
        with open(out_path, "wb") as out, open(self.log, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with open(out_path, "rb") as f:
                line = f.readline().decode()
            if line.endswith("\n"):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("daemon did not start:\n" + self.log_text())
            time.sleep(0.005)
        tls = line.startswith(LISTEN_PREFIX_TLS)
        if not tls and not line.startswith(LISTEN_PREFIX):
            self.kill()
            raise RuntimeError("unexpected first line %r" % line)
        self.port = int(line[len(LISTEN_PREFIX_TLS if tls else LISTEN_PREFIX):])
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port)
        return self

    def stop(self):
        """SIGTERM by PID; returns the exit status (0 for a clean stop)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError("daemon ignored SIGTERM:\n" + self.log_text())

    def kill(self):
        if self.proc is not None:
            proc, self.proc = self.proc, None
            proc.kill()
            proc.wait()

    def restart(self):
        """Stops the daemon and starts it again on the same port and db."""
        port = self.port
        rc = self.stop()
        if rc != 0:
            raise RuntimeError("daemon exited with %r:\n%s" % (rc, self.log_text()))
        return self.start(port)

    def close(self):
        try:
            rc = self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        return rc

    def log_text(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def free_port():
    """A port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _read_message(sock, buf):
    """Reads one HTTP/1.1 message (headers, then a Content-Length body) from
    sock; buf holds bytes already read.  Returns (message, leftover), or
    (None, b"") when the peer closed first."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        rest += chunk
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


class LossyRelay:
    """A TCP relay in front of the daemon.  While ``drop`` > 0, a connection
    has its first request delivered to the daemon and the daemon's whole
    answer read -- so the request took effect -- and then the client's
    connection is closed without the answer: exactly what a client sees when
    a network fails after the server committed.  Other connections are
    relayed unchanged."""

    def __init__(self, upstream_port):
        self.upstream = ("127.0.0.1", upstream_port)
        self.drop = 0
        self.dropped = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(16)
        self.url = "http://127.0.0.1:%d" % self._srv.getsockname()[1]
        self._socks = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self):
        # close() alone does not wake a thread blocked in accept(); shutdown does.
        try:
            self._srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._srv.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
        self._thread.join(5)

    def _accept(self):
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            self._socks += [client, up]
            with self._lock:
                self.connections += 1
                lose = self.drop > 0
                if lose:
                    self.drop -= 1
            if lose:
                threading.Thread(target=self._lose_answer, args=(client, up), daemon=True).start()
            else:
                for a, b in ((client, up), (up, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _lose_answer(self, client, up):
        try:
            req, _ = _read_message(client, b"")
            if req is not None:
                up.sendall(req)
                _read_message(up, b"")
                with self._lock:
                    self.dropped += 1
        finally:
            client.close()
            up.close()

    @staticmethod
    def _pipe(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def make_test_ca(directory):
    """The test certificates of tests/support/make_test_ca.sh in directory
    (ca, server, client, other-ca, other-client: NAME.pem and NAME.key)."""
    subprocess.run(["sh", os.path.join(REPO, "tests", "support", "make_test_ca.sh"), directory],
                   check=True)
    return lambda name: os.path.join(directory, name)


class DaemonCase(unittest.TestCase):
    """One real daemon per test class, on its own temporary database."""

    api_key = None
    daemon_args = ()

    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon(api_key=cls.api_key, args=cls.daemon_args).start()

    @classmethod
    def tearDownClass(cls):
        d = cls.daemon
        if d.proc is None:
            shutil.rmtree(d.dir, ignore_errors=True)
            return
        log = d.log_text()
        rc = d.close()
        if rc != 0:
            raise AssertionError("daemon exited with %r on SIGTERM:\n%s" % (rc, log))
