"""Depth growth in bf16 on 1 and 2 GPUs: the fp32 masters and Adam moments are carried
name by name at every ZeRO stage (tests/workers/growth_moments.py, run on CUDA), identity
growth keeps the loss, and a growing run follows its fp32 CPU twin. `make test-gpu`."""
from __future__ import annotations

import json

import pytest

from tests.gpu.gpu_common import (
    BF16_REL,
    CPU_ONLY,
    GPU,
    NPROCS,
    TIMEOUT,
    assert_runs_close,
    bf16_overrides,
    fp32_cpu_overrides,
)
from tests.helpers import losses, metrics, torchrun_module, train

pytestmark = GPU


@pytest.mark.parametrize("nproc", NPROCS)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_growth_carries_fp32_masters_and_moments(tmp_path, stage, nproc):
    proc = torchrun_module("tests.workers.growth_moments", nproc, str(stage), str(tmp_path), "bf16", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert json.loads((tmp_path / f"moments-ok-{stage}").read_text())["checked"] > 20


@pytest.mark.parametrize("nproc", NPROCS)
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_growing_run_matches_its_fp32_cpu_twin(tmp_path, stage, nproc):
    out = tmp_path / "runs"
    grow = {"run.max_steps": 8, "parallel.zero_stage": stage,
            "growth.stages": "[{at_step: 4, layers: 4, method: stack}]"}
    train(bf16_overrides(out, "gpu", **grow), nproc=nproc, timeout=TIMEOUT)
    train(fp32_cpu_overrides(out, "cpu", **grow), nproc=nproc, env=CPU_ONLY, timeout=TIMEOUT)
    assert [r["n_layers"] for r in metrics(out / "gpu") if "loss" in r] == [2] * 4 + [4] * 4
    assert_runs_close(out / "gpu", out / "cpu")  # grad norms too: the grown engine keeps the gradient scale


@pytest.mark.parametrize("nproc", NPROCS)
def test_bf16_identity_growth_keeps_the_loss_at_the_first_step_after_growth(tmp_path, nproc):
    """The new blocks' zeroed output projections add exact zeros, in bf16 too."""
    out = tmp_path / "runs"
    peri = {"run.max_steps": 6, "model.norm": "peri", "model.ln_scaling": "true", "parallel.zero_stage": 2}
    train(bf16_overrides(out, "shallow", **peri), nproc=nproc, timeout=TIMEOUT)
    train(bf16_overrides(out, "identity", **peri, **{"growth.stages": "[{at_step: 3, layers: 5, method: identity}]"}),
          nproc=nproc, timeout=TIMEOUT)
    ref, got = losses(out / "shallow"), losses(out / "identity")
    for step in (1, 2, 3, 4):
        assert got[step] == pytest.approx(ref[step], rel=BF16_REL / 10), (step, got, ref)
