"""Norms N(): RMSNorm or LayerNorm, each with a learnable gain initialised to 1 and no bias,
plus LayerNorm Scaling (Sun et al., "The Curse of Depth in LLMs", arXiv 2502.05795).

Parameter names: a plain norm holds `weight`; `LayerScaledNorm` wraps one, so under
`model.ln_scaling` the gain lives at `<slot>.norm.weight` in every block (block 1 included,
with factor 1), which keeps names regular within a model and across growth.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, lookup


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g, computed in fp32 as HF Llama does. x: [..., D]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerNorm(nn.Module):
    """y = (x − mean) / sqrt(var + eps) · g; gain only, like RMSNorm. x: [..., D]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, self.eps)


class LayerScaledNorm(nn.Module):
    """LNS: N(x) · 1/sqrt(l) for the sublayer-input norms of 1-based block l.

    The factor is a constant, non-persistent buffer: it is recomputed from the absolute
    block index whenever a model is built, so growth never carries a stale factor.
    """

    def __init__(self, norm: nn.Module, layer: int):
        super().__init__()
        self.norm = norm
        self.register_buffer("scale", torch.tensor(1.0 / math.sqrt(layer)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale


# model.norm_type -> norm class (the registry config validation reads).
NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm class `model.norm_type` names, at width d_model."""
    return lookup(NORMS, "model.norm_type", cfg.norm_type)(cfg.d_model, cfg.norm_eps)
