"""The Python client installed as a user installs it: the README's install
lines run as written (make wheel, a fresh venv with --system-site-packages,
pip install of the wheel, offline), then the README's example run by the
venv's interpreter, from outside the repository, against a real daemon."""

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
    text = open(README, encoding="utf-8").read()
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


if __name__ == "__main__":
    unittest.main()
