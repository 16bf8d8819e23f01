"""One generic transformer block. Norm placement is chosen once, at build time, by filling
six slots with a norm or `nn.Identity()`; `Block.run` is the same equation for all three:

    a, v = attn(attn_in(x));  h = attn_post(x + attn_out(a));  y = mlp_post(h + mlp_out(mlp(mlp_in(h))))

    pre : in = N (·1/sqrt(l) under LNS), out = post = I   ->  h = x + Attn(N(x))
    post: in = out = I, post = N                          ->  h = N(x + Attn(x))
    peri: in = N (·1/sqrt(l) under LNS), out = Ñ, post = I ->  h = x + Ñ(Attn(N(x)))
          (Peri-LN, Kim et al., arXiv 2502.02732: the residual stream is never normalised)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .config import ModelConfig, lookup
from .norms import LayerScaledNorm, make_norm


def _none(cfg: ModelConfig, layer: int) -> nn.Module:
    return nn.Identity()


def _norm(cfg: ModelConfig, layer: int) -> nn.Module:
    return make_norm(cfg)


def _input_norm(cfg: ModelConfig, layer: int) -> nn.Module:
    return LayerScaledNorm(make_norm(cfg), layer) if cfg.ln_scaling else make_norm(cfg)


# model.norm -> makers of the (in, out, post) slots, each applied to both sublayers.
PLACEMENTS: dict[str, tuple[Callable[[ModelConfig, int], nn.Module], ...]] = {
    "pre": (_input_norm, _none, _none),
    "post": (_none, _none, _norm),
    "peri": (_input_norm, _norm, _none),
}


def norm_slots(cfg: ModelConfig, layer: int) -> dict[str, nn.Module]:
    """The six norm slots of 1-based block `layer` for `cfg.norm` (a PLACEMENTS key)."""
    make_in, make_out, make_post = lookup(PLACEMENTS, "model.norm", cfg.norm)
    return {f"{sub}_{slot}": make(cfg, layer) for sub in ("attn", "mlp")
            for slot, make in (("in", make_in), ("out", make_out), ("post", make_post))}


class Block(nn.Module):
    """Attention then MLP, each wrapped in its three norm slots (see module docstring)."""

    def __init__(self, *, attn_in: nn.Module, attn: nn.Module, attn_out: nn.Module,
                 attn_post: nn.Module, mlp_in: nn.Module, mlp: nn.Module, mlp_out: nn.Module,
                 mlp_post: nn.Module):
        super().__init__()
        self.attn_in, self.attn, self.attn_out, self.attn_post = attn_in, attn, attn_out, attn_post
        self.mlp_in, self.mlp, self.mlp_out, self.mlp_post = mlp_in, mlp, mlp_out, mlp_post

    def run(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
            v1: Optional[torch.Tensor], key_mask: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (y [B, T, D], v [B, T, Hkv·Dh]); key_mask [B, T] bool or None."""
        a, v = self.attn(self.attn_in(x), rope, v1, key_mask)
        h = self.attn_post(x + self.attn_out(a))
        y = self.mlp_post(h + self.mlp_out(self.mlp(self.mlp_in(h))))
        return y, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                v1: Optional[torch.Tensor], routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense block: every token is processed; `routing` is ignored."""
        return self.run(x, rope, v1)
