"""bf16 training on 1 and 2 GPUs against independent references: the same run in fp32 on
the CPU, ZeRO-0, SP=1 and an uninterrupted run, compared on losses and on grad norms (a
wrong gradient scale passes a loss-only check under Adam). Skipped without CUDA;
`make test-gpu`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gpu.gpu_common import (
    BF16_REL,
    CPU_ONLY,
    GPU,
    GRAD_NORM_REL,
    NPROCS,
    TIMEOUT,
    TWO_GPUS,
    assert_runs_close,
    bf16_overrides,
    fp32_cpu_overrides,
)
from tests.helpers import ROOT, _env, free_port, metrics, train

pytestmark = GPU


@pytest.mark.parametrize("nproc", NPROCS)
def test_bf16_run_matches_the_fp32_cpu_run(tmp_path, nproc):
    out = tmp_path / "runs"
    train(bf16_overrides(out, "gpu"), nproc=nproc, timeout=TIMEOUT)
    train(fp32_cpu_overrides(out, "cpu"), nproc=nproc, env=CPU_ONLY, timeout=TIMEOUT)
    assert_runs_close(out / "gpu", out / "cpu")


@pytest.mark.parametrize("nproc", NPROCS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_zero0_in_bf16(tmp_path, stage, nproc):
    """ZeRO-0 runs bf16 under autocast over fp32 parameters; ZeRO 1-3 keep bf16 parameters
    with fp32 masters and fp32 gradient accumulation (grad_accum 2 exercises it)."""
    out = tmp_path / "runs"
    extra = {"parallel.grad_accum": 2}
    train(bf16_overrides(out, "z0", **extra, **{"parallel.zero_stage": 0}), nproc=nproc, timeout=TIMEOUT)
    train(bf16_overrides(out, f"z{stage}", **extra, **{"parallel.zero_stage": stage}), nproc=nproc, timeout=TIMEOUT)
    assert_runs_close(out / f"z{stage}", out / "z0")


@TWO_GPUS
@pytest.mark.parametrize("stage,deepspeed", [
    (1, {}), (2, {}), (3, {}),
    # The predivide path that makes ZeRO-1 average over the SP ranks (factor 2); bf16 ZeRO-1
    # with SP runs DeepSpeed's ZeRO-1 optimizer (BF16_Optimizer cannot take SP), so it applies.
    (1, {"zero_optimization.reduce_scatter": "false", "gradient_predivide_factor": 2.0}),
], ids=["z1", "z2", "z3", "z1-predivide-world"])
def test_sp2_matches_sp1_in_bf16(tmp_path, stage, deepspeed):
    """Stages 1 and 3 reduce SP gradients differently (sum vs average); same global batch.
    ZeRO-2 is the 16k recipe's layout (fp32 accumulation with Ulysses). bf16 ZeRO-1 with SP
    sums micro-batches in bf16, so it is refused with accumulation and runs without."""
    out = tmp_path / "runs"
    extra = {"parallel.zero_stage": stage, "parallel.grad_accum": 1 if stage == 1 else 2,
             **{f"parallel.deepspeed.{k}": v for k, v in deepspeed.items()}}
    train(bf16_overrides(out, "sp1", **extra), timeout=TIMEOUT)
    train(bf16_overrides(out, "sp2", **extra, **{"parallel.sp": 2}), nproc=2, timeout=TIMEOUT)
    assert_runs_close(out / "sp2", out / "sp1")


def _popen(overrides: list[str], nproc: int, log: Path, env: dict) -> subprocess.Popen:
    """The trainer in its own process group, so one killpg takes torchrun and its ranks down."""
    cmd = [sys.executable, "-m", "trainer.train", "configs/tiny.yaml", *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *cmd[1:]]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(env), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.parametrize("nproc", NPROCS)
def test_bf16_kill_then_resume_continues_the_losses(tmp_path, nproc):
    """kill -9 while step 8's checkpoint is being written (a test-only pause holds the save
    open), then the same command resumes from step 4 and finishes: every step is logged
    once and the losses follow the uninterrupted run within bf16 tolerance."""
    out = tmp_path / "runs"
    extra = {"run.max_steps": 12, "checkpoint.every": 4, "checkpoint.keep": 3, "parallel.zero_stage": 2}
    train(bf16_overrides(out, "ref", **extra), nproc=nproc, timeout=TIMEOUT)
    over = bf16_overrides(out, "crashy", **extra)
    run = out / "crashy"
    proc = _popen(over, nproc, tmp_path / "crashy.log", {"HARNESS_FAULT_SLOW_SAVE": "20"})
    deadline = time.time() + 600
    while not (run / "checkpoints" / "step-8.tmp").is_dir():
        assert proc.poll() is None, (tmp_path / "crashy.log").read_text()[-3000:]
        assert time.time() < deadline, "timed out waiting for the step-8 save"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "step-4" / "COMPLETE").is_file()
    assert not (run / "checkpoints" / "step-8" / "COMPLETE").exists()

    resumed = train(over, nproc=nproc, timeout=TIMEOUT)
    assert "resumed from" in resumed.stdout and "step-4" in resumed.stdout
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, 13))
    assert_runs_close(run, out / "ref")


@pytest.mark.parametrize("nproc", NPROCS)
def test_mod_in_bf16_matches_the_fp32_cpu_run(tmp_path, nproc):
    """Mixture-of-Depths (top-k routing, causal predictor) on the GPU. bf16 can flip a
    near-tied top-k choice, so the tolerance is wider than for dense runs."""
    out = tmp_path / "runs"
    mod = {"model.mod.capacity": 0.25, "model.mod.every": 2, "model.n_layers": 4, "run.eval_every": 4}
    train(bf16_overrides(out, "gpu", **mod), nproc=nproc, timeout=TIMEOUT)
    train(fp32_cpu_overrides(out, "cpu", **mod), nproc=nproc, env=CPU_ONLY, timeout=TIMEOUT)
    assert_runs_close(out / "gpu", out / "cpu", loss_rel=2 * BF16_REL, first_norm_rel=2 * BF16_REL,
                      norm_rel=2 * GRAD_NORM_REL)
    val = {name: [r["val_loss"] for r in metrics(out / name) if "val_loss" in r] for name in ("gpu", "cpu")}
    assert len(val["gpu"]) == len(val["cpu"]) == 2
    for got, ref in zip(val["gpu"], val["cpu"]):
        assert got == pytest.approx(ref, rel=2 * BF16_REL)


@pytest.mark.parametrize("nproc", NPROCS)
@pytest.mark.parametrize("mode", ["full", "every_2"])
def test_activation_checkpointing_matches_no_checkpointing_in_bf16(tmp_path, mode, nproc):
    """Recomputed blocks (MoD on, so a routed block's router stays outside the recompute)."""
    out = tmp_path / "runs"
    extra = {"parallel.zero_stage": 2, "model.n_layers": 4, "model.mod.capacity": 0.5, "model.mod.every": 2}
    train(bf16_overrides(out, "stored", **extra), nproc=nproc, timeout=TIMEOUT)
    train(bf16_overrides(out, "recomputed", **extra, **{"parallel.activation_checkpointing": mode}), nproc=nproc,
          timeout=TIMEOUT)
    assert_runs_close(out / "recomputed", out / "stored")


@pytest.mark.parametrize("nproc", NPROCS)
@pytest.mark.parametrize("stage", [0, 1])
def test_compile_matches_eager_in_bf16(tmp_path, stage, nproc):
    """torch.compile per block (inductor kernels on CUDA) against eager, under autocast
    (ZeRO-0) and with bf16 parameters (ZeRO-1)."""
    out = tmp_path / "runs"
    extra = {"parallel.zero_stage": stage}
    train(bf16_overrides(out, "eager", **extra), nproc=nproc, timeout=TIMEOUT)
    train(bf16_overrides(out, "compiled", **extra, **{"parallel.compile": "true"}), nproc=nproc, timeout=TIMEOUT)
    assert_runs_close(out / "compiled", out / "eager")
