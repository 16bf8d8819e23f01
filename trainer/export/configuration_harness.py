"""Configuration of an exported harness model (`AutoConfig` with trust_remote_code).

`harness_model_config` is our `ModelConfig` as a dict, the single source the model is built
from; the standard HF names beside it (hidden_size, max_position_embeddings, ...) are
derived copies for tools such as lm-evaluation-harness that read them. This file is copied
verbatim into every export, so it imports nothing from this repository.
"""
from transformers import PreTrainedConfig


class HarnessConfig(PreTrainedConfig):
    model_type = "harness"

    harness_model_config: dict | None = None
    vocab_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    max_position_embeddings: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = False  # no KV cache: every forward runs the whole sequence
