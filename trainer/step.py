"""One optimizer step and one evaluation pass, on whatever engine and layout they get."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import Routing
from trainer import faults
from trainer.config import RunConfig
from trainer.dist import Dist
from trainer.engine import base_optimizer, deepspeed_config
from trainer.ulysses import grad_scale, largest_param, shard_sequence


@dataclass
class StepResult:
    loss: float  # mean token CE over the global batch
    grad_norm: float
    skipped: bool  # non-finite loss or gradient: weights and moments untouched


def _token_loss_sum(engine, inputs, labels, pos, cfg: RunConfig, causal: bool = False):
    routing = Routing(causal=causal)
    logits = engine(inputs, pos, routing)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
    return ce, routing.aux_loss()


def train_step(engine, data, dist: Dist, cfg: RunConfig, step: int) -> StepResult:
    p = cfg.parallel
    # Loss = Σ token losses / tokens of the whole sample: SP ranks each hold a slice, and
    # DeepSpeed averages over DP (and over micro-steps via engine.backward).
    tokens_per_micro = p.micro_batch * cfg.data.seq_len
    scale = grad_scale(deepspeed_config(cfg, dist), p.sp, dist.world, largest_param(engine.module)) / tokens_per_micro
    faults.at_step(step, dist.rank)
    poison = float("nan") if step in faults.nan_steps() else 1.0
    ce_total = torch.zeros(1, device=dist.device)  # summed on the device: no host sync per micro-step
    engine.train()
    for micro in range(p.grad_accum):
        x, y = data.train_batch(step, micro, dist.dp_rank, dist.dp_size, p.micro_batch, p.grad_accum)
        x, y, pos = shard_sequence(x, y, dist)
        x, y, pos = x.to(dist.device), y.to(dist.device), pos.to(dist.device)
        ce, aux = _token_loss_sum(engine, x, y, pos, cfg)
        engine.backward((ce + cfg.model.mod.aux_weight * aux) * scale * poison)
        if engine.is_gradient_accumulation_boundary():
            plain_norm = _plain_grad_norm(engine)
        engine.step()
        ce_total += ce.detach().float() * poison
    dist.all_reduce(ce_total)
    loss = ce_total.item() / (tokens_per_micro * p.grad_accum * dist.dp_size)
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else plain_norm
    skipped = base_optimizer(engine).skipped_last_step or not (torch.isfinite(torch.tensor([loss, norm])).all())
    return StepResult(loss=loss, grad_norm=norm, skipped=skipped)


def _plain_grad_norm(engine) -> float:
    """Without a ZeRO/bf16 optimizer DeepSpeed clips but does not record the norm; the
    grads are whole and already averaged at the boundary, so take it before the step."""
    if engine.zero_optimization() or engine.bfloat16_enabled():
        return float("nan")
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).item()


@torch.no_grad()
def evaluate(engine, data, dist: Dist, cfg: RunConfig, causal: bool = False) -> float:
    """Mean validation token loss. `causal` routes MoD blocks with the causal rule."""
    engine.eval()
    total, count = torch.zeros(1, device=dist.device), 0
    for x, y in data.val_batches(cfg.run.eval_batches, cfg.parallel.micro_batch):
        x, y, pos = shard_sequence(x, y, dist)
        ce, _ = _token_loss_sum(engine, x.to(dist.device), y.to(dist.device), pos.to(dist.device), cfg, causal)
        total += ce.float()
        count += x.numel()
    dist.all_reduce(total)
    # The count lives on the compute device too: a CUDA op takes a CPU operand only when 0-dim.
    count = dist.all_reduce(torch.tensor([float(count)], device=dist.device))
    engine.train()
    return (total / count).item()
