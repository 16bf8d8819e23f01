"""What the GPU tests share. Every test runs the real entry point (`python -m
trainer.train`, or torchrun with one process per GPU: nccl on CUDA) in bf16, and compares
against an independent reference: another layout on the GPU (ZeRO-0, SP=1, an
uninterrupted run) or the same run on the CPU in fp32 (gloo, `CUDA_VISIBLE_DEVICES=""`).

bf16 keeps 8 significant bits, and GPU kernels (SDPA backward, atomics in reductions) are
not bit-deterministic, so losses are compared within `BF16_REL` rather than exactly.

Losses alone miss a wrong gradient scale: Adam divides it out of the update, so a gradient
twice too large (a divisor lost over ranks, micro-steps or SP ranks) trains the same losses.
The logged pre-clip `grad_norm` shows it, so runs are also compared on that
(`assert_grad_norms_close`).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers import losses, metrics, tiny_overrides

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

# Module-level marks for every file in tests/gpu: `make test-gpu` selects them with -m gpu,
# and `make test` on a machine without CUDA collects and skips them.
GPU = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]
TWO_GPUS = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
NPROCS = [pytest.param(1, id="1gpu"), pytest.param(2, id="2gpu", marks=TWO_GPUS)]

# Relative tolerance on a per-step loss between a bf16 run and its reference over a few
# steps: ~5 bf16 roundings (2^-9 each) of an O(1) loss, accumulated through a few updates.
BF16_REL = 2e-2
# Relative tolerance on a logged grad norm after the first step: the two runs' weights have
# drifted apart by then (Adam's early updates are ~lr·sign(g), and bf16 flips the sign of
# near-zero gradients), and a norm follows the weights more closely than a loss does. A
# wrong gradient scale is a factor of 2 or more (grad_accum, dp or sp), far outside it.
GRAD_NORM_REL = 1e-1
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # the fp32 CPU reference run on a GPU machine
TIMEOUT = 900  # seconds per run: a fresh machine may JIT-build DeepSpeed ops and inductor kernels first


def bf16_overrides(out: Path, name: str, **extra) -> list[str]:
    """A tiny model in bf16 with a batch large enough that one step is not all launch overhead."""
    base = {"parallel.precision": "bf16", "model.d_model": 128, "model.n_heads": 4, "model.n_kv_heads": 2,
            "data.seq_len": 64, "parallel.micro_batch": 4, "run.max_steps": 8, "optim.lr": 1e-3}
    return tiny_overrides(out, name, **{**base, **extra})


def fp32_cpu_overrides(out: Path, name: str, **extra) -> list[str]:
    return bf16_overrides(out, name, **{**extra, "parallel.precision": "fp32"})


def assert_losses_close(got_dir: Path, ref_dir: Path, rel: float = BF16_REL) -> None:
    got, ref = losses(got_dir), losses(ref_dir)
    assert sorted(got) == sorted(ref) and got, (got, ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=rel), (step, got, ref)


def grad_norms(run_dir: Path) -> dict[int, float]:
    """The pre-clip global gradient norm of every optimizer step (metrics.jsonl `grad_norm`)."""
    return {r["step"]: r["grad_norm"] for r in metrics(run_dir) if "grad_norm" in r and not r.get("skipped")}


def assert_grad_norms_close(got_dir: Path, ref_dir: Path, first_rel: float = BF16_REL,
                            rel: float = GRAD_NORM_REL) -> None:
    """Every step's grad norm is finite in both runs (NaN is what a layout that records no
    norm logs) and agrees: within `first_rel` at the first step, where both runs start from
    the same weights, so only the precision and the reduction differ, and within `rel` after."""
    got, ref = grad_norms(got_dir), grad_norms(ref_dir)
    assert sorted(got) == sorted(ref) and got, (got, ref)
    first = min(ref)
    for step in ref:
        assert math.isfinite(got[step]) and math.isfinite(ref[step]) and ref[step] > 0, (step, got, ref)
        tol = first_rel if step == first else rel
        assert got[step] == pytest.approx(ref[step], rel=tol), (step, got, ref)


def assert_runs_close(got_dir: Path, ref_dir: Path, loss_rel: float = BF16_REL, norm_rel: float = GRAD_NORM_REL,
                      first_norm_rel: float = BF16_REL) -> None:
    """Losses and grad norms of two runs of the same training, step by step."""
    assert_losses_close(got_dir, ref_dir, rel=loss_rel)
    assert_grad_norms_close(got_dir, ref_dir, first_rel=first_norm_rel, rel=norm_rel)
