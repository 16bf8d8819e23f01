"""Rotary position embedding (Su et al., arXiv 2104.09864) in the HF Llama convention:
frequencies for the two *halves* of the head dim, rotated with `rotate_half`, so the
weights and logits match `transformers.LlamaForCausalLM` exactly."""
from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """cos/sin tables for positions 0..max_seq_len-1, kept as non-persistent fp32 buffers.

    `forward(position_ids)` takes *global* positions ([T] or [B, T]; under sequence
    parallelism the trainer passes each rank its slice of the global ids) and returns
    (cos, sin), each [B, T, head_dim], or [1, T, head_dim] when position_ids is [T].

    The tables stay fp32 when the module is cast (`model.to(torch.bfloat16)`), as OLMo-core
    keeps them: a bf16 table holds cos/sin to 3 digits only, and `apply_rope` rotates in fp32.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.table_args = (head_dim, max_seq_len, theta)
        cos, sin = rope_tables(*self.table_args)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        """Moves follow the module; a dtype cast gets the exact fp32 tables again (rebuilt, not
        cast back: bf16 has already rounded them)."""
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            cos, sin = rope_tables(*self.table_args)
            self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        return self.cos[ids], self.sin[ids]


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin), each [max_seq_len, head_dim], on the CPU."""
    # Same expression as HF's default rope init, so the fp32 tables are bitwise equal.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_seq_len, head_dim]
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, Dh]; cos, sin: fp32 [B or 1, T, Dh]. Returns x rotated by its position,
    computed in fp32 (OLMo-core's full-precision RoPE) and returned in x's dtype, so bf16 q/k
    stay in v's dtype. In fp32 this is HF Llama's rotation, bit for bit."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)
