"""Llama-style decoder: embedding, blocks (dense or Mixture-of-Depths), final norm, LM head.

Every option is resolved here, once, into the modules it selects (norm slots, value
module, routed or dense block); `forward` only composes them.

Parameter names (HF Llama name in brackets; `trainer.export` maps them):
    embed_tokens.weight [model.embed_tokens]      embed_norm.weight (embed_norm only)
    blocks.{i}.attn_in.weight [input_layernorm]   (.attn_in.norm.weight under ln_scaling)
    blocks.{i}.attn.{q,k,o}_proj.weight           blocks.{i}.attn.value.v_proj.weight
    blocks.{i}.attn.value.lambdas (learned)       blocks.{i}.attn_out.weight (peri)
    blocks.{i}.mlp_in.weight [post_attention_layernorm]
    blocks.{i}.mlp.{gate,up,down}_proj.weight     blocks.{i}.{attn,mlp}_post.weight (post)
    blocks.{i}.router.weight, blocks.{i}.causal_rule.fc{1,2}.* (routed blocks)
    norm.weight [model.norm]                      lm_head.weight (is embed_tokens.weight when tied)
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from .attention import Attention, AttentionCore, MixedValue, SharedValue, ValueProjection, local_attention_core
from .block import Block, norm_slots
from .config import ModelConfig, lookup
from .flops import ATTN_KERNEL_MULT, MATMUL_TRAIN_MULT, Flops, children_flops
from .mlp import SwiGLU
from .mod import RoutedBlock, Routing
from .norms import make_norm
from .rope import Rotary

__all__ = ["Transformer", "build_block", "build_value", "VALUE_MODULES", "MATMUL_TRAIN_MULT", "ATTN_KERNEL_MULT"]


# model.value_residual -> the value module of blocks 2..L (block 1 always projects V1).
VALUE_MODULES: dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda d, kv: ValueProjection(d, kv),
    "fixed": lambda d, kv: MixedValue(d, kv, learned=False),
    "learned": lambda d, kv: MixedValue(d, kv, learned=True),
    "shared": lambda d, kv: SharedValue(),
}


def build_value(cfg: ModelConfig, layer: int) -> nn.Module:
    """The value module `model.value_residual` selects for 1-based block `layer`."""
    kv_dim = cfg.kv_heads * cfg.head_dim
    make = lookup(VALUE_MODULES, "model.value_residual", cfg.value_residual)
    return ValueProjection(cfg.d_model, kv_dim) if layer == 1 else make(cfg.d_model, kv_dim)


def build_block(cfg: ModelConfig, layer: int, core: AttentionCore, local_chunks: int) -> Block:
    attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, build_value(cfg, layer), core)
    block = Block(attn=attn, mlp=SwiGLU(cfg.d_model, cfg.ffn_dim), **norm_slots(cfg, layer))
    return RoutedBlock(block, cfg, local_chunks, layer) if cfg.is_routed(layer) else block


class Transformer(nn.Module):
    """Decoder LM. `attn_core` defaults to local causal SDPA; the trainer passes a
    Ulysses-wrapped core and its `sp_degree` (MoD then routes route_chunks // sp chunks of
    each rank's local sequence)."""

    def __init__(self, cfg: ModelConfig, attn_core: Optional[AttentionCore] = None, sp_degree: int = 1):
        super().__init__()
        self.cfg = cfg
        core = attn_core or local_attention_core
        local_chunks = cfg.mod.route_chunks // sp_degree
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else nn.Identity()
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(build_block(cfg, layer, core, local_chunks)
                                    for layer in range(1, cfg.n_layers + 1))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self) -> None:
        """normal(0, init_std) for every linear and the embedding, out-projections scaled by
        1/sqrt(2L) under depth_scaled_init unless ln_scaling (LNS authors: the two together
        diminish LNS). Out-projections are never zero: under Peri-LN an RMSNorm of a zero
        vector has a huge Jacobian. Norm gains start at 1, λ at 0.5, biases at 0, except
        Peri-LN's output norms Ñ, which start at model.out_norm_gain: each sublayer's first
        increment then has RMS out_norm_gain instead of 1, against an embedding of RMS
        init_std (1 with embed_norm)."""
        cfg = self.cfg
        out_std = cfg.init_std
        if cfg.depth_scaled_init and not cfg.ln_scaling:
            out_std /= math.sqrt(2 * cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = out_std if name.endswith(("o_proj", "down_proj")) else cfg.init_std
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, cfg.init_std)
        if cfg.norm == "peri":
            for block in self.blocks:
                for out in (block.attn_out, block.mlp_out):
                    nn.init.constant_(out.weight, cfg.out_norm_gain)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                routing: Optional[Routing] = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (fp32).

        position_ids [T] or [B, T] are global positions (default 0..T-1; under sequence
        parallelism the trainer passes each rank's slice). routing: the MoD context; the
        caller passes `Routing(causal=True)` for the causal rule (eval, generation) or
        `collect_stats=True`, and afterwards reads `routing.aux_loss()` (the causal-rule BCE
        summed over tokens and routed blocks; the trainer weights it by mod.aux_weight and
        divides by the token count) and `routing.stats`. None means top-k, nothing kept.
        """
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        rope = self.rotary(position_ids)
        routing = Routing() if routing is None else routing
        x = self.embed_norm(self.embed_tokens(input_ids))
        x, v1 = self.blocks[0](x, rope, None, routing)  # block 1 is dense; its values are V1
        for block in self.blocks[1:]:
            x, out = block(x, rope, v1, routing)  # out: a dense block's values, a routed one's aux
            if isinstance(block, RoutedBlock) and out is not None:
                routing.aux.append(out)
        return self.lm_head(self.norm(x)).float()

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counted once). non_embedding excludes the token
        embedding and the LM head (Kaplan et al.'s N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if self.lm_head.weight is not self.embed_tokens.weight:
                n -= self.lm_head.weight.numel()
        return n

    def flops(self, seq_len: int) -> Flops:
        """Forward FLOPs of one sequence of T = seq_len tokens, each module reporting its own
        (see model.flops): blocks, dense or routed, and the LM head (tied or not, the same
        matmul). Norms, RoPE, softmax and elementwise ops are not counted."""
        return children_flops(self, seq_len)

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per trained token at sequence length T = seq_len, as PaLM's MFU
        defines them: 3 × the forward's matmul FLOPs (2 per multiply-accumulate), with
        attention counted causally, T(T+1)/2 query–key pairs per sequence, and no recompute.

        A routed MoD block runs on K = ceil(capacity·Tc)·route_chunks tokens: its
        projections scale by K/T and its attention covers K(K+1)/2 pairs; its router (and
        predictor) see all T tokens. The count is per whole sequence, so it is the same at
        every sequence-parallel degree.
        """
        return self.flops(seq_len).model_train() / seq_len

    def hardware_flops_per_token(self, seq_len: int) -> float:
        """FLOPs per trained token as `torch.utils.flop_counter` counts the kernels: matmuls
        3× forward except the MoD predictor's first layer (its input is detached: 2×), and
        attention over the full T×T square at 3.5× forward (the backward recomputes the
        scores). The basis of `hfu`; flash kernels skip fully masked tiles, so this is an
        upper bound on what they execute."""
        return self.flops(seq_len).hardware_train() / seq_len
