"""The linter (ruff.toml: unused and undefined names, import order) is clean on the whole tree, and its rules are
live: a planted unused import and an undefined name are reported."""
import os
import subprocess
import sys

from tests.conftest import REPO

RUFF = os.path.join(os.path.dirname(sys.executable), "ruff")


def ruff(*args, stdin=None):
    return subprocess.run([RUFF, "check", "--no-cache", *args], cwd=REPO, input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_the_tree_is_clean():
    result = ruff(".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_catch_a_planted_unused_import_and_an_undefined_name():
    result = ruff("--stdin-filename", "sslscale/planted.py", "-", stdin="import os\n\n\ndef f():\n    return x\n")
    assert result.returncode == 1
    assert "F401" in result.stdout and "F821" in result.stdout
