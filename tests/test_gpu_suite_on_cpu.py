"""What of the GPU suite can be checked without a GPU: it is collected and every test is
skipped (so `make test` stays green on CPU), and the GPU benchmark refuses in one line."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, _env

NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_gpu_suite_is_collected_and_skipped_without_cuda():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu"],
                          cwd=ROOT, env=_env(NO_CUDA), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    skipped = re.search(r"(\d+) skipped", summary)
    assert skipped and int(skipped.group(1)) >= 20 and not re.search(r"passed|failed|error", summary), summary


@pytest.mark.slow
def test_gpu_throughput_benchmark_exits_with_one_line_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_throughput", "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(NO_CUDA), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())
