"""Typed model configuration. Every architecture option is a field here; the model
is built from it once and `forward` never consults it again."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def lookup(registry: dict, key: str, value: str):
    """registry[value] for option `key`; the one place an unknown model option is reported.
    Each registry lives next to the classes it selects, and trainer config validation
    checks the same keys, so this only fires for models built without a validated config."""
    if value not in registry:
        raise ValueError(f"{key}={value!r}: expected one of {' | '.join(registry)}")
    return registry[value]


@dataclass
class ModConfig:
    """Mixture-of-Depths (Raposo et al., 2024). capacity 0 disables routing."""

    capacity: float = 0.0  # fraction of tokens a routed block processes, in (0, 1]; 0 = off
    every: int = 2  # blocks l with l % every == 0 (1-based) are routed; block 1 is always dense
    route_chunks: int = 1  # top-k is taken inside each of this many contiguous sequence chunks
    causal: str = "aux_loss"  # aux_loss | predictor: the causal rule fitted for eval/generation
    aux_weight: float = 0.01  # weight of the BCE loss that fits the causal rule


@dataclass
class ModelConfig:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (plain MHA)
    vocab_size: int = 2048
    max_seq_len: int = 256
    ffn_hidden: int = 0  # 0 = SwiGLU default: 8/3·d_model rounded up to a multiple of 64
    norm: str = "pre"  # pre | post | peri
    norm_type: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    embed_norm: bool = False  # a norm on the embedding output (Peri-LN's option; also valid as a Pre-LN control)
    out_norm_gain: float = 1.0  # initial gain of Peri-LN's output norms Ñ (1 as in OLMo-core and Gemma-2)
    ln_scaling: bool = False  # LayerNorm Scaling: sublayer-input norms of block l times 1/sqrt(l)
    value_residual: str = "none"  # none | fixed | learned | shared
    mod: ModConfig = field(default_factory=ModConfig)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02
    depth_scaled_init: bool = True  # out-projections std/sqrt(2L); forced off by ln_scaling

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-int(8 * self.d_model / 3) // 64) * 64

    def is_routed(self, layer: int) -> bool:
        """Whether 1-based block `layer` is a Mixture-of-Depths block."""
        return self.mod.capacity > 0 and layer > 1 and layer % self.mod.every == 0
