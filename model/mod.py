"""Mixture-of-Depths (Raposo et al., arXiv 2404.02258).

A routed block scores every token with its own router r = wᵀx, processes only the top-k
tokens of each sequence chunk, and updates them as x_i ← x_i + r_i·f_i (MoD eq. 1), f being
the block's residual increment; other tokens pass through unchanged.

`RoutedBlock` *is* a `Block` (it subclasses it and adopts the wrapped block's submodules),
so its parameters keep the dense names `blocks.{i}.attn.q_proj.weight`, ... and add
`blocks.{i}.router.weight` and, for the predictor rule, `blocks.{i}.causal_rule.fc{1,2}.*`.
Growth can therefore copy any block into any position by index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block
from .config import ModelConfig, lookup
from .flops import Flops, linear_flops, module_flops


@dataclass
class Routing:
    """Per-forward routing context: the caller creates one and passes it to
    `Transformer.forward(ids, pos, routing)`, then reads `aux_loss()` and `stats` from it
    (a default one is made when none is passed); dense blocks ignore it.

    causal: use the causal rule (σ(logit) > 0.5) instead of top-k (eval / generation).
    collect_stats: fill `stats` with python floats (costs a device sync per routed block).
    aux: token-summed BCE losses fitting the causal rule, one per routed block, unweighted
         (the trainer multiplies by mod.aux_weight and divides by the token count).
         `Transformer.forward` appends them from the blocks' outputs: a block compiled by
         `parallel.compile` must not append to it itself, since dynamo specialises on the
         list's length and so compiles the block again for every routed block before it.
    """

    causal: bool = False
    collect_stats: bool = False
    aux: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def aux_loss(self) -> torch.Tensor | float:
        """Σ of the routed blocks' BCE losses (0.0 without MoD)."""
        return torch.stack(self.aux).sum() if self.aux else 0.0


def tokens_per_chunk(capacity: float, chunk_len: int) -> int:
    """k = ceil(capacity · Tc), rounded first so that e.g. 0.1·30 gives 3, not 4."""
    return math.ceil(round(capacity * chunk_len, 6))


def predictor_hidden(d_model: int) -> int:
    return max(1, d_model // 8)


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, T, C], idx [B, K] -> [B, K, C]."""
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


class AuxLossRule(nn.Module):
    """The router logit is the causal decision; the BCE aux loss trains the router itself."""

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return r


class PredictorRule(nn.Module):
    """A small MLP on stopgrad(x) predicts top-k membership; its BCE trains only itself."""

    def __init__(self, d_model: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, predictor_hidden(d_model))
        self.fc2 = nn.Linear(predictor_hidden(d_model), 1)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x.detach()))).squeeze(-1)

    def flops(self, seq_len: int) -> Flops:
        """fc1 reads stopgrad(x), so its backward has no input gradient."""
        return Flops(detached_matmul=linear_flops(self.fc1, seq_len)) + module_flops(self.fc2, seq_len)


# model.mod.causal -> the causal rule fitted for eval/generation.
CAUSAL_RULES = {"aux_loss": lambda d: AuxLossRule(), "predictor": PredictorRule}


class RoutedBlock(Block):
    """A Block that processes only k = ceil(capacity·Tc) tokens per chunk of each sequence.

    `local_chunks` = mod.route_chunks // sp: with the sequence split over sp ranks each rank
    routes its own contiguous chunks of the same length Tc as at sp = 1, so routing does not
    depend on the parallel layout. `layer` (1-based) names the stats keys.
    """

    def __init__(self, block: Block, cfg: ModelConfig, local_chunks: int, layer: int):
        super().__init__(**dict(block.named_children()))
        assert local_chunks >= 1, "route_chunks must be a positive multiple of the SP degree"
        self.router = nn.Linear(cfg.d_model, 1, bias=False)
        self.causal_rule = lookup(CAUSAL_RULES, "model.mod.causal", cfg.mod.causal)(cfg.d_model)
        self.capacity = cfg.mod.capacity
        self.local_chunks, self.layer = local_chunks, layer
        # FLOPs are counted per whole sequence, which has route_chunks chunks at any SP degree.
        self.route_chunks = cfg.mod.route_chunks

    def select(self, r: torch.Tensor) -> torch.Tensor:
        """Router logits [B, T] -> indices [B, K] of the top-k tokens of each chunk of each
        sequence (never across the batch), in sequence order. K = k · local_chunks."""
        B, T = r.shape
        C = self.local_chunks
        assert T % C == 0, f"local sequence length {T} is not divisible by {C} route chunks"
        Tc = T // C
        k = tokens_per_chunk(self.capacity, Tc)
        idx = r.view(B, C, Tc).topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
        offsets = torch.arange(0, T, Tc, device=r.device).view(1, C, 1)
        return (idx + offsets).view(B, C * k)

    def flops(self, seq_len: int) -> Flops:
        """Training (top-k) forward: the router and the causal rule score all T tokens; the
        block runs on the K = k·route_chunks selected ones, its attention over K(K+1)/2 causal
        pairs (the gathered tokens keep their order)."""
        C = self.route_chunks
        k = tokens_per_chunk(self.capacity, seq_len // C) * C
        return sum((module_flops(child, seq_len if name in ("router", "causal_rule") else k)
                    for name, child in self.named_children()), Flops())

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                v1: Optional[torch.Tensor], routing: Routing) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x [B, T, D] -> (y [B, T, D], aux): a routed block is never block 1, so V1 is not
        its output; aux is the token-summed BCE fitting the causal rule under top-k, None
        under the causal rule (the caller collects it: Routing.aux)."""
        r = self.router(x).squeeze(-1)  # [B, T] raw router logits
        rule_logit = self.causal_rule(x, r)
        if routing.causal:
            return self._causal_forward(x, r, rule_logit, rope, v1, routing), None
        return self._top_k_forward(x, r, rule_logit, rope, v1, routing)

    def _top_k_forward(self, x, r, rule_logit, rope, v1, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Training rule: gather the top-k tokens, run the block on [B, K, D], scatter back.
        Causal attention over the gathered tokens is exact because their order is kept and
        RoPE uses their original positions. Also returns the causal rule's BCE against the
        top-k selection."""
        B = x.shape[0]
        idx = self.select(r)
        selected = torch.zeros_like(r, dtype=torch.bool).scatter(1, idx, True)
        aux = F.binary_cross_entropy_with_logits(rule_logit.float(), selected.float(), reduction="sum")
        x_sel = gather_tokens(x, idx)
        rope_sel = tuple(gather_tokens(t.expand(B, -1, -1), idx) for t in rope)
        v1_sel = None if v1 is None else gather_tokens(v1, idx)
        y_sel, _ = self.run(x_sel, rope_sel, v1_sel)
        r_sel = r.gather(1, idx).unsqueeze(-1)
        out_sel = x_sel + r_sel * (y_sel - x_sel)  # MoD eq. 1: x + r·f, not r·(x + f)
        if routing.collect_stats:
            self._record_stats(routing, selected, rule_logit, selected)
        return x.scatter(1, idx.unsqueeze(-1).expand_as(x_sel), out_sel), aux

    def _causal_forward(self, x, r, rule_logit, rope, v1, routing: Routing) -> torch.Tensor:
        """Eval rule: tokens with σ(logit) > 0.5 are processed; they attend only to each
        other (key_mask) at their own positions, so the result at selected tokens equals
        running the block on the selected sub-sequence."""
        selected = rule_logit > 0
        y, _ = self.run(x, rope, v1, key_mask=selected)
        out = torch.where(selected.unsqueeze(-1), x + r.unsqueeze(-1) * (y - x), x)
        if routing.collect_stats:
            top_k = torch.zeros_like(selected).scatter(1, self.select(r), True)
            self._record_stats(routing, selected, rule_logit, top_k)
        return out

    def _record_stats(self, routing: Routing, selected: torch.Tensor, rule_logit: torch.Tensor,
                      top_k: torch.Tensor) -> None:
        """Selected fraction, causal-rule accuracy vs top-k, mean selected position / T."""
        selected, rule_logit = selected.detach(), rule_logit.detach()
        T = selected.shape[1]
        pos = torch.arange(T, device=selected.device, dtype=torch.float32)
        prefix = f"mod/block{self.layer}/"
        routing.stats[prefix + "selected_frac"] = selected.float().mean().item()
        routing.stats[prefix + "causal_acc"] = ((rule_logit > 0) == top_k).float().mean().item()
        routing.stats[prefix + "mean_pos"] = (
            (selected * pos).sum() / selected.sum().clamp(min=1) / T).item()
