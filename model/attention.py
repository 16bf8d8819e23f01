"""Grouped-query causal self-attention with RoPE on q/k, an injected attention core, and a
value module chosen at build time for value residual learning.

Value residual (ResFormer, Zhou et al., arXiv 2410.17897; SVFormer for `shared`): layer 1's
value projection output V1 [B, T, Hkv·Dh] (no RoPE, before the head reshape) is handed to
every later layer, which attends with V_l ← λ1·V_l + λ2·V1, mixed at kv-head width.

The attention core is `core(q, k, v, key_mask=None) -> out`, q [B, T, H, Dh], k/v
[B, T, Hkv, Dh], out [B, T, H, Dh], causal. The trainer may pass a sequence-parallel
(Ulysses) core with the same signature; nothing here knows about process groups.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .flops import Flops, attention_pair_flops, children_flops
from .rope import apply_rope

AttentionCore = Callable[..., torch.Tensor]


def causal_key_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool keys allowed -> [B, 1, T, T] bool: causal AND key allowed.

    Each query also always sees itself, so no row is empty (an all-masked row makes SDPA
    return NaN). For an allowed query this changes nothing, since it is itself allowed.
    """
    T = key_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=key_mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=key_mask.device)
    return ((causal & key_mask[:, None, :]) | eye).unsqueeze(1)


def local_attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal SDPA on one device. q [B, T, H, Dh], k/v [B, T, Hkv, Dh] -> [B, T, H, Dh].

    GQA uses `enable_gqa=True` rather than `repeat_interleave`: the CPU flash kernel (and
    CUDA flash) broadcast kv heads inside the kernel, so K/V are never copied H/Hkv times,
    and the result equals the repeated computation (the parity test checks against HF's
    `repeat_kv`). With `key_mask` [B, T] (MoD causal-rule eval) the mask is causal AND key
    allowed, see `causal_key_mask`.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if key_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_key_mask(key_mask), enable_gqa=True)
    return out.transpose(1, 2)


class ValueProjection(nn.Module):
    """v = W_v x. Layer 1 (whose output is V1) and `value_residual: none`."""

    def __init__(self, d_model: int, kv_dim: int):
        super().__init__()
        self.v_proj = nn.Linear(d_model, kv_dim, bias=False)

    def forward(self, x: torch.Tensor, v1: Optional[torch.Tensor]) -> torch.Tensor:
        return self.v_proj(x)


class MixedValue(nn.Module):
    """ResFormer: v = λ1·W_v x + λ2·V1 at kv width [B, T, Hkv·Dh].

    fixed: λ = (0.5, 0.5) as a constant buffer; learned: per-layer scalar parameters
    initialised to 0.5. Both live at `lambdas` so names are the same in either mode.
    """

    def __init__(self, d_model: int, kv_dim: int, learned: bool):
        super().__init__()
        self.v_proj = nn.Linear(d_model, kv_dim, bias=False)
        lambdas = torch.full((2,), 0.5)
        if learned:
            self.lambdas = nn.Parameter(lambdas)
        else:
            self.register_buffer("lambdas", lambdas, persistent=False)

    def forward(self, x: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
        return self.lambdas[0] * self.v_proj(x) + self.lambdas[1] * v1


class SharedValue(nn.Module):
    """SVFormer: no value projection; the layer attends with V1 itself."""

    def forward(self, x: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
        return v1


class Attention(nn.Module):
    """Causal GQA self-attention; the value path is the injected `value` module."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, value: nn.Module,
                 core: AttentionCore = local_attention_core):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.value = value
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.core = core

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                v1: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D], rope (cos, sin) [B|1, T, Dh], v1 [B, T, Hkv·Dh] or None.

        Returns (out [B, T, D], v [B, T, Hkv·Dh]), v being the values this layer attended
        with; for layer 1 that is W_v x, i.e. V1.
        """
        B, T, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.value(x, v1)  # values get no RoPE
        out = self.core(q, k, v.view(B, T, self.n_kv_heads, self.head_dim), key_mask=key_mask)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim)), v

    def flops(self, seq_len: int) -> Flops:
        """The projections (whatever the value module holds) plus QKᵀ and AV: 2·2·H·Dh FLOPs
        per query–key pair. GQA shares K/V heads but every query head still scores every key."""
        return children_flops(self, seq_len) + attention_pair_flops(2 * 2 * self.n_heads * self.head_dim, seq_len)
