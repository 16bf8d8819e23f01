"""What the GPU tests share. Every test runs the real entry point (`python -m
trainer.train`, or torchrun with one process per GPU: nccl on CUDA) in bf16, and compares
against an independent reference: another layout on the GPU (ZeRO-0, SP=1, an
uninterrupted run) or the same run on the CPU in fp32 (gloo, `CUDA_VISIBLE_DEVICES=""`).

bf16 keeps 8 significant bits, and GPU kernels (SDPA backward, atomics in reductions) are
not bit-deterministic, so losses are compared within `BF16_REL` rather than exactly.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import losses, tiny_overrides

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

# Module-level marks for every file in tests/gpu: `make test-gpu` selects them with -m gpu,
# and `make test` on a machine without CUDA collects and skips them.
GPU = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]
TWO_GPUS = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
NPROCS = [pytest.param(1, id="1gpu"), pytest.param(2, id="2gpu", marks=TWO_GPUS)]

# Relative tolerance on a per-step loss between a bf16 run and its reference over a few
# steps: ~5 bf16 roundings (2^-9 each) of an O(1) loss, accumulated through a few updates.
BF16_REL = 2e-2
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
