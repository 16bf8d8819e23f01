"""`HarnessForCausalLM`: a `PreTrainedModel` around our `Transformer`, for every option set.

In this repository it imports the model from `model/`; `trainer.export.hf.modeling_source`
writes an export's self-contained `modeling_harness.py` by pasting the model sources above
this file's code, so the exported model is the trained model's own code and cannot drift.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.config import ModelConfig
from model.transformer import Transformer
from trainer.export.causal import causal_logits
from trainer.export.configuration_harness import HarnessConfig


def config_from_dict(cls, values: dict):
    """Rebuild a (nested) config dataclass from `dataclasses.asdict` output."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            value = config_from_dict(type(f.default_factory()), value)
        kwargs[f.name] = value
    return cls(**kwargs)


class HarnessForCausalLM(PreTrainedModel, GenerationMixin):
    """Logits [B, T, V] from `Transformer`, MoD routed by its causal rule. No KV cache:
    each generation step re-runs the whole sequence."""

    config_class = HarnessConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _tied_weights_keys = {"transformer.lm_head.weight": "transformer.embed_tokens.weight"}

    def __init__(self, config: HarnessConfig):
        super().__init__(config)
        self.transformer = Transformer(config_from_dict(ModelConfig, config.harness_model_config))
        self._fresh_buffers: Optional[dict] = None
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Parameters all come from the checkpoint. `from_pretrained` builds on the meta
        device and leaves non-persistent buffers (RoPE tables, LNS factors, fixed λ)
        uninitialised; they are functions of the config, so copy them from a fresh build
        whose weights are allocated but never initialised."""
        if not module._non_persistent_buffers_set:
            return
        if self._fresh_buffers is None:
            with torch.device("cpu"), no_init_weights():
                fresh = Transformer(self.transformer.cfg)
            self._fresh_buffers = {f"transformer.{k}": v for k, v in fresh.named_buffers()}
        prefix = next(name for name, sub in self.named_modules() if sub is module)
        for name in module._non_persistent_buffers_set:
            buf = module._buffers[name]
            module._buffers[name] = self._fresh_buffers[f"{prefix}.{name}"].to(buf.device)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.transformer.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.transformer.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, T]; attention_mask may only mark right padding (positions are
        0..T-1 for every row); labels [B, T] give the mean next-token loss (-100 ignored)."""
        T, limit = input_ids.shape[1], self.transformer.cfg.max_seq_len
        if T > limit:
            raise ValueError(f"sequence of {T} tokens exceeds the model's max_seq_len={limit}")
        if attention_mask is not None and (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            raise ValueError("left padding is not supported: positions start at 0 in every row; pad on the right")
        logits = causal_logits(self.transformer, input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask=None, **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
