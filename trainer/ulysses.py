"""Ulysses sequence parallelism (DESIGN §5): every rank of an SP group reads the same
sample, keeps a contiguous slice of it, and attention runs through DeepSpeed's
`DistributedAttention` (all-to-all: scatter heads, gather sequence) around the model's own
local core. The model never sees a process group; it only receives this core."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from model import local_attention_core
from trainer.dist import Dist


def attention_core(dist: Dist, kv_heads: int) -> Optional[Callable]:
    """The attention core injected into the model; None = the model's local SDPA core.

    q [B, T/sp, H, Dh] and k/v [B, T/sp, Hkv, Dh] become [B, T, H/sp, Dh] after the
    all-to-all. When sp is a multiple of Hkv, each kv head is replicated sp/Hkv times first,
    so every rank holds the kv head its contiguous block of query heads belongs to.
    """
    if dist.sp == 1:
        return None
    from deepspeed.sequence.layer import DistributedAttention

    rep = max(1, dist.sp // kv_heads)
    ulysses = DistributedAttention(local_attention_core, dist.sp_group, scatter_idx=2, gather_idx=1)

    def core(q, k, v, key_mask=None):
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        if key_mask is not None:  # MoD causal-rule eval: every rank needs the whole key mask
            key_mask = gather_sequence(key_mask, dist)
        return ulysses(q, k, v, 0, None, key_mask=key_mask)

    return core


# Eager under torch.compile: traced, the all-gather of a bool mask reached inductor's CPU
# code generator as int64 and failed to compile (torch 2.13).
@torch.compiler.disable
@torch.no_grad()
def gather_sequence(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """[B, T/sp, ...] slices of the SP group → [B, T, ...] (no gradient)."""
    return torch.cat(dist.all_gather(t, group=dist.sp_group), dim=1)


def shard_sequence(inputs: torch.Tensor, labels: torch.Tensor, dist: Dist):
    """[B, T] → this rank's contiguous [B, T/sp] slice plus its global position ids.
    Labels were shifted before slicing (by the data loader), so no token loses its target."""
    n = inputs.shape[1] // dist.sp
    lo = dist.sp_rank * n
    return inputs[:, lo:lo + n], labels[:, lo:lo + n], torch.arange(lo, lo + n)


def grad_scale(zero_stage: int, sp: int) -> float:
    """Factor on each rank's loss (Σ local token losses / tokens of the whole sample) so
    that the reduced gradient equals SP=1's.

    DeepSpeed reduces over the sequence-data-parallel group (all dp×sp ranks) but divides
    differently per stage: ZeRO-0/1/2 divide by dp only, i.e. *sum* over the SP ranks —
    exactly the gradient of the sample's loss, so no factor; ZeRO-3 divides by dp·sp,
    *averaging* over the SP ranks, so each rank's loss is scaled by sp.
    tests/test_ulysses.py pins this at every stage.
    """
    return float(sp) if zero_stage == 3 else 1.0


def all_to_all_bytes_per_layer(batch: int, seq_len: int, sp: int, n_heads: int, kv_heads: int, head_dim: int,
                               bytes_per_el: int) -> int:
    """Bytes each rank feeds into the all-to-alls of one attention layer's forward: q, k, v
    in and the output back, each [B, T/sp, heads, Dh]. Constant when T and sp scale together."""
    if sp == 1:
        return 0
    kv = max(kv_heads, sp)  # replicated up to sp when sp is a multiple of Hkv
    return batch * (seq_len // sp) * head_dim * (2 * n_heads + 2 * kv) * bytes_per_el
