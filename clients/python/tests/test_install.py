"""The Python client installed as a user installs it: the README's install
lines run as written (make wheel, a fresh venv with --system-site-packages,
pip install of the wheel, offline), then the README's example run by the
venv's interpreter, from outside the repository, against a real daemon; and
mypy (Debian's python3-mypy) type-checks a use of the installed package."""

import os
import re
import shutil
import subprocess
import tempfile
import unittest

from .daemon import OPTD_BIN, REPO, Daemon

README = os.path.join(REPO, "clients", "python", "README.md")


def readme_block(marker, lang):
    """The first ```lang block after the line containing marker ("" for the
    first one in the file)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index(marker) if marker else 0
    m = re.compile(r"^```%s\n(.*?)^```$" % lang, re.S | re.M).search(text, start)
    if not m:
        raise AssertionError("README.md has no ```%s block after %r" % (lang, marker))
    return m.group(1)


class Install(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.home = tempfile.mkdtemp(prefix="optd-py-install-")
        cls.daemon = Daemon()
        cls.daemon.start()

    @classmethod
    def tearDownClass(cls):
        cls.daemon.close()
        shutil.rmtree(cls.home, ignore_errors=True)

    def test_wheel_in_a_fresh_venv_runs_the_readme_example(self):
        lines = readme_block("<!-- install:", "sh")
        self.assertIn("make wheel", lines)
        self.assertIn("--no-index", lines)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["HOME"] = self.home
        # The build directory tests/run.sh uses (make's BUILD).
        build = os.environ.get("OPTD_BUILD", "build")
        script = lines.replace("build/python/", build + "/python/")
        script = script.replace("make wheel", "make -s --no-print-directory wheel BUILD=" + build)
        r = subprocess.run(["sh", "-e", "-c", script], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        self.assertEqual(r.returncode, 0, r.stdout.decode(errors="replace"))

        py = os.path.join(self.home, ".venvs", "optd", "bin", "python")
        self.assertTrue(os.access(py, os.X_OK), "the venv has no python")
        # Imported from the venv, not from the source tree; typed.
        where = subprocess.run(
            [py, "-c", "import optd, os; print(optd.__file__); "
                       "print(os.path.exists(os.path.join(os.path.dirname(optd.__file__), 'py.typed')))"],
            cwd=self.home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        out = where.stdout.decode().split()
        self.assertEqual(where.returncode, 0, out)
        self.assertTrue(out[0].startswith(os.path.join(self.home, ".venvs", "optd")), out)
        self.assertEqual(out[1], "True", "py.typed is installed")
        # The source tree stays clean.
        for junk in ("build", "optd.egg-info"):
            self.assertFalse(os.path.exists(os.path.join(REPO, "clients", "python", junk)), junk)

        example = os.path.join(self.home, "example.py")
        with open(example, "w", encoding="utf-8") as f:
            f.write(readme_block("", "python"))
        env["OPTD_URL"] = self.daemon.url
        r = subprocess.run([py, example], cwd=self.home, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=120)
        out = r.stdout.decode(errors="replace")
        self.assertEqual(r.returncode, 0, out)
        step, lr, loss = out.split()
        self.assertEqual(step, "100")
        self.assertEqual(float(lr), 1e-3)
        self.assertLess(float(loss), 0.1 ** 2 * 1000 / 2, "Adam lowered the loss")

        # The installed package is typed (py.typed): mypy, run for the venv's
        # interpreter, accepts a typed use and refuses a wrong one.
        good = os.path.join(self.home, "typed_use.py")
        with open(good, "w", encoding="utf-8") as f:
            f.write(TYPED_USE)
        bad = os.path.join(self.home, "wrong_use.py")
        with open(bad, "w", encoding="utf-8") as f:
            f.write(WRONG_USE)
        # One run for both files; mypy's cache outlives the test (as npm's
        # does for the JS suite), so later runs skip re-reading typeshed.
        cache = os.path.join(tempfile.gettempdir(), "optd-mypy-%d" % os.getuid())
        config = os.path.join(REPO, "clients", "python", "pyproject.toml")
        r = subprocess.run(["/usr/bin/python3", "-m", "mypy", "--python-executable", py,
                            "--config-file", config, "--cache-dir", cache, good, bad],
                           cwd=self.home, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        out = r.stdout.decode(errors="replace")
        self.assertNotEqual(r.returncode, 0, out)
        self.assertNotIn("typed_use.py", out, "mypy refuses the typed use")
        self.assertNotIn("missing library stubs or py.typed", out)
        self.assertIn('Argument 1 to "create_session" of "Client" has incompatible type "int"', out)
        self.assertIn('Argument "loss" to "step" of "Session" has incompatible type "str"', out)
        # and the package's own hints agree with its code
        r = subprocess.run(["/usr/bin/python3", "-m", "mypy", "--cache-dir", cache, "optd"],
                           cwd=os.path.join(REPO, "clients", "python"), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        self.assertEqual(r.returncode, 0, r.stdout.decode(errors="replace"))


TYPED_USE = """\
from typing import Any, Dict, List, Optional

import optd


def train(url: str) -> Optional[int]:
    client = optd.Client(url, api_key=None, retries=2, binary_threshold=16)
    s: optd.Session = client.create_session("mlp", "adam", size=4, dtype="float64")
    p = s.params()
    s.step([0.1, 0.2, 0.3, 0.4], loss=0.5, base_step=0, worker="w0")
    doc: Dict[str, Any] = s.update(lr=1e-4)
    rows: List[Dict[str, Any]] = s.history(limit=10)
    try:
        client.session("gone")
    except optd.NotFound as e:
        print(e.status, e.kind, e.field, doc["step"], len(rows), p)
    s.delete()
    return s.last_step
"""

WRONG_USE = """\
import optd

client = optd.Client("http://127.0.0.1:8080")
s = client.create_session(5, "adam", size=4)
s.step([0.1], loss="high")
"""


if __name__ == "__main__":
    unittest.main()
