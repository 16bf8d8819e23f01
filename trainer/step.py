"""One optimizer step and one evaluation pass, on whatever engine and layout they get."""
from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F

from model import Routing
from trainer import faults
from trainer.config import RunConfig
from trainer.parallel.dist import Dist
from trainer.parallel.ds_state import base_optimizer
from trainer.parallel.layout import BatchLayout
from trainer.parallel.ulysses import shard_sequence


class StepResult:
    """One optimizer step. `loss` (mean token CE over the global batch) and `grad_norm` stay
    on the compute device until read: reading one waits for the device, so the loop reads
    them on logging steps only. `skipped` (a non-finite loss or gradient on any rank: weights
    and moments untouched) is already a bool, the optimizer's one sync of the step."""

    def __init__(self, loss: torch.Tensor | float, grad_norm: torch.Tensor | float, skipped: bool):
        self._loss, self._grad_norm, self.skipped = loss, grad_norm, skipped

    @cached_property
    def loss(self) -> float:
        return float(self._loss)

    @cached_property
    def grad_norm(self) -> float:
        return float(self._grad_norm)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto the compute device without waiting: CUDA copies from pageable memory
    synchronously, from pinned memory asynchronously (the host allocator keeps the pinned
    block until the copy is done)."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _token_loss_sum(engine, inputs, labels, pos, cfg: RunConfig, causal: bool = False):
    routing = Routing(causal=causal)
    logits = engine(inputs, pos, routing)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
    return ce, routing.aux_loss()


def train_step(engine, data, dist: Dist, cfg: RunConfig, layout: BatchLayout, step: int) -> StepResult:
    """One optimizer step over `layout.grad_accum` micro-batches. Nothing here waits for the
    device but the optimizer's skip decision (trainer.parallel.optim); `engine.grad_scale` is
    build_engine's."""
    # Loss = Σ token losses / tokens of the whole sample: SP ranks each hold a slice, and
    # DeepSpeed averages over DP (and over micro-steps via engine.backward).
    scale = engine.grad_scale / layout.tokens_per_micro
    faults.at_step(step, dist.rank)
    poison = float("nan") if step in faults.nan_steps() else 1.0
    ce_total = torch.zeros(1, device=dist.device)  # summed on the device: no host sync per micro-step
    optimizer = base_optimizer(engine)
    engine.train()
    for micro in range(layout.grad_accum):
        x, y = data.train_batch(step, micro, layout)
        x, y, pos = shard_sequence(x, y, dist)
        x, y, pos = to_device(x, dist.device), to_device(y, dist.device), to_device(pos, dist.device)
        ce, aux = _token_loss_sum(engine, x, y, pos, cfg)
        engine.backward((ce + cfg.model.mod.aux_weight * aux) * scale * poison)
        ce_total += ce.detach().float() * poison
        if engine.is_gradient_accumulation_boundary():
            plain_norm = _plain_grad_norm(engine)
            # A non-finite loss skips the update as a non-finite gradient does, in the same
            # decision (one sync, agreed over ranks), before the optimizer runs.
            optimizer.loss_flag = ~ce_total.isfinite()
        engine.step()
    optimizer.loss_flag = None
    dist.all_reduce(ce_total)
    # float64 on the device: the same value as the host's float division it replaces.
    loss = ce_total[0].double() / layout.tokens_per_step
    norm = engine.get_global_grad_norm()
    norm = plain_norm if norm is None else norm.detach() if torch.is_tensor(norm) else norm
    return StepResult(loss=loss, grad_norm=norm, skipped=optimizer.skipped_last_step)


def _plain_grad_norm(engine) -> torch.Tensor | float:
    """Without a ZeRO/bf16 optimizer DeepSpeed clips but does not record the norm; the
    grads are whole and already averaged at the boundary, so take it before the step."""
    if engine.zero_optimization() or engine.bfloat16_enabled():
        return math.nan
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads)


@torch.no_grad()
def evaluate(engine, data, dist: Dist, cfg: RunConfig, causal: bool = False) -> float:
    """Mean validation token loss over `run.eval_batches` batches. `causal` routes MoD blocks
    with the causal rule. DP rank r evaluates batches r, r + dp, r + 2·dp, ... (the SP ranks of
    one DP group read the same batch, each its slice), and the sums meet in one all-reduce, so
    the mean is the unsharded one."""
    engine.eval()
    total = torch.zeros(1, device=dist.device)
    count = torch.zeros(1, dtype=torch.long, device=dist.device)  # CUDA takes CPU operands only 0-dim
    n_batches = mine = 0
    spare = None
    for i, (x, y) in enumerate(data.val_batches(cfg.run.eval_batches, cfg.parallel.micro_batch)):
        n_batches = i + 1
        spare = (x, y) if spare is None else spare
        if i % dist.dp_size != dist.dp_rank:
            continue
        ce, tokens = _eval_loss_sum(engine, x, y, dist, cfg, causal)
        total += ce
        count += tokens
        mine += 1
    if spare is not None and mine < -(-n_batches // dist.dp_size):
        # ZeRO-3 gathers parameters in every forward, from every rank: a rank with one batch
        # fewer runs one more forward, and does not count it.
        _eval_loss_sum(engine, *spare, dist, cfg, causal)
    dist.all_reduce(total)
    dist.all_reduce(count)
    engine.train()
    return (total / count).item()


def _eval_loss_sum(engine, x, y, dist: Dist, cfg: RunConfig, causal: bool) -> tuple[torch.Tensor, int]:
    """(Σ token CE, tokens) of this rank's slice of one batch."""
    x, y, pos = shard_sequence(x, y, dist)
    x, y, pos = to_device(x, dist.device), to_device(y, dist.device), to_device(pos, dist.device)
    return _token_loss_sum(engine, x, y, pos, cfg, causal)[0].float(), x.numel()
