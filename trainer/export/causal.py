"""Inference logits: the one call from outside into `Transformer.forward`.

Mixture-of-Depths routes with top-k over the whole sequence in training, so a token's
routing there depends on later tokens; generation and scoring must use the causal rule
(σ(router or predictor logit) > 0.5), which gives the same logits whether a sequence is
scored at once or grown token by token. Every inference path (the HF export, generation,
the evaluation tests) goes through `causal_logits`, so the forward contract is used in one place.
"""
from __future__ import annotations

import torch

from model.mod import Routing


def causal_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] -> fp32 logits [B, T, V] with MoD's causal routing rule."""
    return model(input_ids, routing=Routing(causal=True))
