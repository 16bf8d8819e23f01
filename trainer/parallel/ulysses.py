"""Ulysses sequence parallelism (docs/design.md §5): every rank of an SP group reads the same
sample, keeps a contiguous slice of it, and attention runs through DeepSpeed's
`DistributedAttention` (all-to-all: scatter heads, gather sequence) around the model's own
local core. The model never sees a process group; it only receives this core."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from model import local_attention_core
from trainer.errors import ConfigError
from trainer.parallel.dist import Dist


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


def grad_scale(ds: dict, sp: int, world: int, largest_param: int) -> float:
    """Factor on each rank's loss (Σ local token losses / tokens of the whole sample) so
    that the gradient DeepSpeed reduces equals the global batch's mean, as at SP=1.

    `ds` is the merged DeepSpeed config (`parallel.deepspeed` overrides included), `world`
    = dp·sp ranks, `largest_param` the numel of the model's largest parameter. DeepSpeed
    sums gradients over all dp·sp ranks and divides the sum by a divisor that depends on
    the path; the factor is divisor / dp. Divisor dp sums over the SP ranks (each holds
    part of the sample's loss), so the factor is 1; divisor dp·sp averages over them, so
    each loss is scaled by sp. Paths read from DeepSpeed 0.19.8:

    - ZeRO-0, `engine.allreduce_bucket`: dp, whatever the predivide factor.
    - ZeRO-1/2 with `reduce_scatter` (default), `average_tensor`: dp. Without it,
      `gradient_reduction_w_predivide`: dp, except dp·sp when `gradient_predivide_factor`
      equals the world size (it then skips the post-scale).
    - ZeRO-3 with `reduce_scatter` (default), `reduce_scatter_coalesced`: dp·sp. Without
      it, gradients that fit a contiguous bucket (`contiguous_gradients`, numel ≤
      `reduce_bucket_size`) are all-reduced over dp, the rest averaged over dp·sp.
    - bf16 ZeRO-1 with fp32 gradient accumulation (DeepSpeed's `BF16_Optimizer`, what
      trainer.parallel.engine configures): `engine.allreduce_bucket` as at ZeRO-0, so dp whatever
      `reduce_scatter` and the predivide factor say.
    - `gradient_allreduce_op: sum` removes the division at ZeRO-0/1/2 (divisor 1).

    Combinations that no single factor makes right raise ConfigError: ZeRO-3 without
    reduce_scatter when some parameters fit the bucket and some do not, and ZeRO-3 without
    reduce_scatter with `gradient_predivide_factor` equal to the world size (DeepSpeed then
    divides by it twice). tests/integration/test_ulysses.py pins the factor against SP=1 on 2 ranks.
    """
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
    dp, stage = world // sp, int(z.stage)
    post = not ds.get("prescale_gradients", False)
    predivide = float(ds.get("gradient_predivide_factor", 1.0))
    average = ds.get("gradient_allreduce_op", "mean") == "mean"
    if stage == 3 and z.reduce_scatter:
        divisor = world
    elif stage == 3:
        if post and predivide != 1.0 and predivide == world:
            raise ConfigError(f"parallel.deepspeed.gradient_predivide_factor={predivide:g} equals the world size at "
                              f"ZeRO-3 without reduce_scatter: DeepSpeed then divides gradients by it twice. "
                              f"Accepted: any other value (default 1.0), or zero_optimization.reduce_scatter=true")
        fits = z.contiguous_gradients and largest_param <= z.reduce_bucket_size
        if z.contiguous_gradients and not fits and sp > 1:
            raise ConfigError(
                f"parallel.deepspeed.zero_optimization: reduce_scatter=false at ZeRO-3 with parallel.sp={sp} and a "
                f"parameter of {largest_param:,} elements > reduce_bucket_size={z.reduce_bucket_size:,}: DeepSpeed "
                f"then sums the SP ranks' gradients of small parameters and averages those of large ones, which "
                f"no loss scale corrects. Accepted: reduce_scatter=true, or reduce_bucket_size >= {largest_param:,}")
        divisor = dp if fits else world
    elif not average:
        divisor = 1
    elif stage == 1 and _bf16_optimizer(ds, z):
        divisor = dp
    elif stage in (1, 2) and not z.reduce_scatter and post and predivide == world and (
            z.contiguous_gradients or _offloads_optimizer(z)):
        divisor = world
    else:
        divisor = dp
    return divisor / dp


def largest_param(model: torch.nn.Module) -> int:
    """Elements of the largest trainable parameter (its full size under ZeRO-3 partitioning)."""
    return max((getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad), default=0)


def _bf16_optimizer(ds: dict, z) -> bool:
    """DeepSpeed 0.19.8 wraps the optimizer in BF16_Optimizer (not the ZeRO-1 optimizer) for
    bf16 parameters with fp32 gradient accumulation at stage 1 without optimizer offload."""
    from deepspeed.runtime.config import DtypeEnum

    bf16 = ds.get("bf16", ds.get("bfloat16", {})).get("enabled", False)
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    return bool(bf16) and accum is not None and DtypeEnum(accum).value == torch.float32 and not _offloads_optimizer(z)


def _offloads_optimizer(z) -> bool:
    """ZeRO-1/2 turn contiguous gradients on whenever the optimizer is offloaded."""
    return z.offload_optimizer is not None and z.offload_optimizer.device != "none"


def all_to_all_bytes_per_layer(batch: int, seq_len: int, sp: int, n_heads: int, kv_heads: int, head_dim: int,
                               bytes_per_el: int) -> int:
    """Bytes each rank feeds into the all-to-alls of one attention layer's forward: q, k, v
    in and the output back, each [B, T/sp, heads, Dh]. Constant when T and sp scale together."""
    if sp == 1:
        return 0
    kv = max(kv_heads, sp)  # replicated up to sp when sp is a multiple of Hkv
    return batch * (seq_len // sp) * head_dim * (2 * n_heads + 2 * kv) * bytes_per_el
