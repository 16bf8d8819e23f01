"""Inference logits: the one call from outside into `Transformer.forward`.

Mixture-of-Depths routes with top-k over the whole sequence in training, so a token's
routing there depends on later tokens; generation and scoring must use the causal rule
(σ(router or predictor logit) > 0.5), which gives the same logits whether a sequence is
scored at once or grown token by token. Every inference path (the HF export, generation,
the in-loop evaluation) goes through `causal_logits`, so a change to the forward contract
is absorbed here.
"""
from __future__ import annotations

import inspect

import torch

from model.mod import Routing


def causal_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] -> fp32 logits [B, T, V] with MoD's causal routing rule."""
    if "routing" in inspect.signature(model.forward).parameters:
        return model(input_ids, routing=Routing(causal=True))
    return model(input_ids, causal_routing=True)
