"""The optimizer handed to DeepSpeed. DeepSpeed's ZeRO wrappers call the base
optimizer's `step()` on every rank at the same point, after clipping, with this rank's
(possibly partitioned) fp32 gradients; that is the one place where skipping a step on a
non-finite gradient is correct at every ZeRO stage."""
from __future__ import annotations

from typing import Optional

import torch
import xxhash
from torch import nn

from trainer.parallel.dist import Dist


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that leaves weights and moments untouched when any rank holds a non-finite grad
    or a non-zero `loss_flag` (a device tensor the train step sets when its loss is
    non-finite). `dist` makes the decision agree across ranks; None = this process alone.
    The decision is the step's one host sync."""

    def __init__(self, *args, dist: Optional[Dist] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dist = dist
        self.skipped_last_step = False
        self.loss_flag: Optional[torch.Tensor] = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad = torch.zeros(1, device=grads[0].device if grads else "cpu")
        if grads:  # a norm is non-finite iff some element is; one fused pass instead of one per tensor
            bad += (~torch.stack(torch._foreach_norm(grads)).isfinite()).any().float()
        if self.loss_flag is not None:
            bad += self.loss_flag.to(bad.device).float().sum()
        if self.dist is not None:  # ZeRO-Offload keeps grads on the CPU; Dist reduces on the GPU
            self.dist.all_reduce(bad, "max")
        self.skipped_last_step = bool(bad.item())
        if self.skipped_last_step:
            return None
        return super().step(closure)


# Elements whose bytes are a multiple of 16 (torch.compile's alignment) in fp32 and in bf16.
ALIGN_ELEMENTS = 8


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (projections, embeddings); not norms gains, λ scalars or routers' biases.

    Within a group, parameters whose size is a multiple of 16 bytes come first and the odd
    ones (value-residual λs, routers' biases) last. DeepSpeed's bf16 and ZeRO-1/2 optimizers
    lay a group out in one flat buffer, in this order, and make the parameters views into it,
    so an odd-sized parameter early in the group would shift every later one off 16-byte
    alignment. torch.compile compiles one graph for all blocks of a kind, treats parameters as
    static inputs that were aligned when it compiled block 0, and does not check them again:
    block 1's shifted norm gains then crashed with "misaligned address" on the H200
    (benchmarks/results/gpu_check.json). tests/integration/test_param_layout.py pins the layout."""
    return _groups(model, weight_decay, aligned=True)


def _groups(model: nn.Module, weight_decay: float, aligned: bool) -> list[dict]:
    def order(params):  # stable: model order otherwise. ZeRO-3 keeps a partitioned param's size in ds_numel
        params = list(params)
        return sorted(params, key=lambda p: getattr(p, "ds_numel", p.numel()) % ALIGN_ELEMENTS != 0) if aligned \
            else params

    decay = order(p for p in model.parameters() if p.requires_grad and p.ndim >= 2)
    other = order(p for p in model.parameters() if p.requires_grad and p.ndim < 2)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def param_order(model: nn.Module, legacy: bool = False) -> str:
    """A digest of the parameters' order in the optimizer's groups, which fixes the layout of
    DeepSpeed's flat buffers and of the optimizer state in a checkpoint. `legacy`: the order
    before odd-sized parameters moved last (checkpoints that do not record one)."""
    names = {id(p): n for n, p in model.named_parameters()}
    listed = "\n".join(names[id(p)] for g in _groups(model, 0.0, aligned=not legacy) for p in g["params"])
    return xxhash.xxh3_64_hexdigest(listed.encode())
