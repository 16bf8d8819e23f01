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


def _fake_run(run_dir, norms: dict[int, float], loss: float = 3.0):
    import json

    run_dir.mkdir(parents=True)
    rows = [{"step": s, "loss": loss, "grad_norm": n} for s, n in norms.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_grad_norm_comparison_catches_what_a_loss_comparison_misses(tmp_path):
    """Same losses, gradient twice too large (a divisor lost over ranks or micro-steps): the
    GPU suite's comparison fails; so does a layout that logs no norm (NaN)."""
    from tests.gpu.gpu_common import assert_losses_close, assert_runs_close

    ref = _fake_run(tmp_path / "ref", {1: 2.0, 2: 1.5, 3: 1.2})
    assert_runs_close(_fake_run(tmp_path / "close", {1: 2.01, 2: 1.6, 3: 1.15}), ref)
    doubled = _fake_run(tmp_path / "doubled", {1: 4.0, 2: 3.0, 3: 2.4})
    assert_losses_close(doubled, ref)
    with pytest.raises(AssertionError):
        assert_runs_close(doubled, ref)
    with pytest.raises(AssertionError):  # the first step, from identical weights, is held tighter
        assert_runs_close(_fake_run(tmp_path / "first", {1: 2.1, 2: 1.5, 3: 1.2}), ref)
    with pytest.raises(AssertionError):
        assert_runs_close(_fake_run(tmp_path / "nan", {1: float("nan"), 2: 1.5, 3: 1.2}), ref)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero0_runs_log_a_finite_grad_norm_for_the_gpu_suite_to_compare(tmp_path, precision):
    """The fp32 CPU reference runs at ZeRO-0, where DeepSpeed records no norm: the step's own
    norm is logged (bf16 ZeRO-0 is autocast over fp32 parameters, the same path)."""
    import math

    from tests.gpu.gpu_common import grad_norms
    from tests.helpers import tiny_overrides, train

    out = tmp_path / "runs"
    train(tiny_overrides(out, "z0", **{"run.max_steps": 3, "parallel.grad_accum": 2, "parallel.precision": precision}))
    norms = grad_norms(out / "z0")
    assert sorted(norms) == [1, 2, 3] and all(math.isfinite(v) and v > 0 for v in norms.values()), norms
