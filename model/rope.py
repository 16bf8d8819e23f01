"""Rotary position embedding (Su et al., arXiv 2104.09864) in the HF Llama convention:
frequencies for the two *halves* of the head dim, rotated with `rotate_half`, so the
weights and logits match `transformers.LlamaForCausalLM` exactly."""
from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """cos/sin tables for positions 0..max_seq_len-1, kept as non-persistent buffers.

    `forward(position_ids)` takes *global* positions ([T] or [B, T]; under sequence
    parallelism the trainer passes each rank its slice of the global ids) and returns
    (cos, sin), each [B, T, head_dim], or [1, T, head_dim] when position_ids is [T].
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        # Same expression as HF's default rope init, so the fp32 tables are bitwise equal.
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_seq_len, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        return self.cos[ids], self.sin[ids]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, Dh]; cos, sin: [B or 1, T, Dh]. Returns x rotated by its position, in
    x's dtype (fp32 tables would otherwise promote bf16 q/k away from v)."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin
