"""Ulysses sequence parallelism (DESIGN §5): every rank of an SP group reads the same
sample, keeps a contiguous slice of it, and attention runs through DeepSpeed's
`DistributedAttention` (all-to-all: scatter heads, gather sequence)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from trainer.dist import Dist


def attention_core(dist: Dist) -> Optional[Callable]:
    """The attention core injected into the model; None = the model's local SDPA core."""
    if dist.sp == 1:
        return None
    raise NotImplementedError("parallel.sp > 1 is not wired yet")


def shard_sequence(inputs: torch.Tensor, labels: torch.Tensor, dist: Dist):
    """[B, T] → this rank's contiguous [B, T/sp] slice plus its global position ids.
    Labels were shifted before slicing (by the data loader)."""
    T = inputs.shape[1]
    n = T // dist.sp
    lo = dist.sp_rank * n
    pos = torch.arange(lo, lo + n)
    return inputs[:, lo:lo + n], labels[:, lo:lo + n], pos


def grad_scale(zero_stage: int, sp: int) -> float:
    """Factor on the loss so SP gradients equal SP=1's after DeepSpeed's reduction."""
    return 1.0
