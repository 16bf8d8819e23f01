"""FLOP accounting that each module reports for itself.

A module that does more than run its children on the tokens it is given defines
`flops(seq_len) -> Flops`: the forward FLOPs of running it on one sequence of `seq_len`
tokens. Everything else is counted by `module_flops`: an `nn.Linear` costs 2·in·out per
token, any other module the sum of its children (so norms, RoPE and the embedding lookup
cost nothing, and a value module with no projection contributes nothing). A module built
for a new option is therefore counted correctly as long as its linears see every token it
is given; only a module that changes which tokens its children see (a MoD routed block) or
adds non-linear matmuls (attention's QKᵀ and AV) defines `flops` itself.

The totals convert to training FLOPs two ways:
- model FLOPs (PaLM, Chowdhery et al. 2022, App. B; the basis of MFU): 3 × the forward's
  matmuls (forward, input gradient, weight gradient), attention over causal query–key pairs
  only, nothing recomputed;
- hardware FLOPs (the basis of `hfu`): what `torch.utils.flop_counter` counts the kernels
  doing, i.e. 2 × (not 3 ×) for matmuls whose input is detached, and attention over the full
  square at `ATTN_KERNEL_MULT` × its forward.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

# Model FLOPs: training = 3 × the forward's matmuls (forward, input gradient, weight gradient).
MATMUL_TRAIN_MULT = 3
# A matmul on a detached input has no input gradient: forward + weight gradient.
DETACHED_TRAIN_MULT = 2
# What torch.utils.flop_counter counts the kernels doing: its SDPA backward is 5 T×T
# matmuls (flash kernels recompute the scores) against 2 in the forward, so attention
# runs 3.5× its forward FLOPs, over the full T×T square.
ATTN_KERNEL_MULT = 3.5


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs (2 per multiply-accumulate) of one sequence, by how training pays for them.

    matmul: projections, MLP, router, LM head: inputs that need a gradient.
    detached_matmul: matmuls whose input is detached (the MoD predictor's first layer): the
        backward computes only the weight gradient.
    attn_full / attn_causal: attention's QKᵀ and AV over n² and n(n+1)/2 query–key pairs
        for a sequence of n tokens.
    """

    matmul: float = 0.0
    detached_matmul: float = 0.0
    attn_full: float = 0.0
    attn_causal: float = 0.0

    def __add__(self, other: Flops) -> Flops:
        return Flops(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def model_train(self) -> float:
        """PaLM's model FLOPs of training on this sequence: 3 × every forward matmul,
        attention causal, no recompute."""
        return MATMUL_TRAIN_MULT * (self.matmul + self.detached_matmul + self.attn_causal)

    def hardware_train(self) -> float:
        """Training FLOPs as torch's FLOP counter counts the kernels (an upper bound on what
        flash kernels execute, since they skip fully masked tiles)."""
        return (MATMUL_TRAIN_MULT * self.matmul + DETACHED_TRAIN_MULT * self.detached_matmul
                + ATTN_KERNEL_MULT * self.attn_full)


def linear_flops(linear: nn.Linear, tokens: int) -> float:
    """Forward FLOPs of `linear` on `tokens` tokens (a bias add is not a matmul)."""
    return 2 * linear.in_features * linear.out_features * tokens


def attention_pair_flops(pair_flops: float, n: int) -> Flops:
    """Attention over one sequence of n tokens, `pair_flops` per (query, key) pair."""
    return Flops(attn_full=pair_flops * n * n, attn_causal=pair_flops * n * (n + 1) / 2)


def module_flops(module: nn.Module, seq_len: int) -> Flops:
    """Forward FLOPs of `module` run on one sequence of `seq_len` tokens: its own
    `flops(seq_len)` when it defines one, else see the module docstring."""
    own = getattr(type(module), "flops", None)
    if own is not None:
        return module.flops(seq_len)
    if isinstance(module, nn.Linear):
        return Flops(matmul=linear_flops(module, seq_len))
    return children_flops(module, seq_len)


def children_flops(module: nn.Module, seq_len: int) -> Flops:
    """The sum of `module_flops` over the direct children of `module`."""
    return sum((module_flops(child, seq_len) for child in module.children()), Flops())
