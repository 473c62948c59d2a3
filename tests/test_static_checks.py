"""Static checks that run with the suite: the layers of formats/ARCHITECTURE.md (import-linter's
contract in pyproject.toml), ruff's lint and mypy's type check of walcrypt/ (their configuration is in
pyproject.toml).  The tools are in the test extra; where one is missing the check skips, saying so."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which(tool, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip(f"{tool} is not installed (pip install '.[test]')")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))   # this checkout
    return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_the_layers_hold():
    res = _run("lint-imports")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_finds_nothing_in_walcrypt():
    res = _run("ruff", "check", "walcrypt")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_finds_nothing_in_walcrypt():
    res = _run("mypy")          # files and strictness: [tool.mypy] in pyproject.toml
    assert res.returncode == 0, res.stdout + res.stderr
