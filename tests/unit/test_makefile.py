"""The Makefile as a user meets it: a bare `make` lists every target, `make clean` leaves
trained runs alone, and deleting runs asks first (issue 26)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


@pytest.fixture
def project(tmp_path):
    """A copy of the Makefile beside a trained run, caches and build artefacts."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for d in ("runs/tiny/checkpoints/step-10", "runs/.cache/shards", "pkg/__pycache__", ".pytest_cache", "build",
              "harness.egg-info", ".venv/lib/__pycache__"):
        (tmp_path / d).mkdir(parents=True)
    return tmp_path


def test_bare_make_prints_help_listing_every_target(project):
    out = make(project)
    assert out.returncode == 0, out.stderr
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    listed = {line.split()[0] for line in out.stdout.splitlines()[1:]}
    assert set(phony) == listed, set(phony) ^ listed
    assert all(len(line.split(None, 1)) == 2 for line in out.stdout.splitlines()[1:])  # each has its line
    assert make(project, "help").stdout == out.stdout


def test_clean_removes_build_artefacts_and_keeps_runs_and_the_venv(project):
    assert make(project, "clean").returncode == 0
    assert (project / "runs/tiny/checkpoints/step-10").is_dir() and (project / "runs/.cache").is_dir()
    assert (project / ".venv/lib/__pycache__").is_dir()
    for gone in ("pkg/__pycache__", ".pytest_cache", "build", "harness.egg-info"):
        assert not (project / gone).exists(), gone


def test_clean_runs_refuses_without_a_terminal_unless_forced(project):
    out = make(project, "clean-runs")
    assert out.returncode != 0 and "FORCE=1" in out.stderr
    assert (project / "runs/tiny").is_dir()
    assert make(project, "clean-runs", "FORCE=1").returncode == 0
    assert not (project / "runs").exists()
