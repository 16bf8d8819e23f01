"""Pure-PyTorch model math: no DeepSpeed, no torch.distributed. The trainer injects the
attention core (local SDPA or Ulysses) and the sequence-parallel degree."""
from .attention import local_attention_core
from .config import ModConfig, ModelConfig
from .mod import Routing
from .transformer import Transformer

__all__ = ["Transformer", "ModelConfig", "ModConfig", "Routing", "local_attention_core"]
