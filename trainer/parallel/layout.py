"""The batch layout: how one optimizer step's global batch splits into micro-steps and
data-parallel ranks, and every count derived from that split (samples and tokens per step,
the loss denominator, which global samples a rank reads). The loop builds it once; the data
loader, the step, the train state, the throughput figures and the planner all read it, so
the arithmetic exists once.

Sequence parallelism does not enter: the SP ranks of one DP rank read the same samples and
each keeps a slice (trainer.parallel.ulysses), so every count here is per whole sample. The
SP gradient factor is not here either: it follows DeepSpeed's reduction path and the model's
largest parameter, so `build_engine` computes it once per engine (`engine.grad_scale`), and
growth, which builds a new engine, computes it again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from trainer.config import RunConfig
    from trainer.parallel.dist import Dist


@dataclass(frozen=True)
class BatchLayout:
    micro_batch: int  # samples per micro-step on one DP rank
    grad_accum: int  # micro-steps per optimizer step
    seq_len: int
    dp_size: int
    dp_rank: int = 0

    @classmethod
    def build(cls, cfg: RunConfig, dist: Dist) -> BatchLayout:
        """This rank's layout in a running job."""
        return cls.of(cfg, dist.dp_size, dist.dp_rank)

    @classmethod
    def of(cls, cfg: RunConfig, dp_size: int, dp_rank: int = 0) -> BatchLayout:
        """The layout at `dp_size` DP ranks, without a process group (the planner's)."""
        p = cfg.parallel
        return cls(micro_batch=p.micro_batch, grad_accum=p.grad_accum, seq_len=cfg.data.seq_len,
                   dp_size=dp_size, dp_rank=dp_rank)

    @property
    def samples_per_step(self) -> int:
        """The global batch: micro × accum × dp."""
        return self.micro_batch * self.grad_accum * self.dp_size

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.seq_len

    @property
    def tokens_per_micro(self) -> int:
        """Tokens of one micro-step on one DP rank: the denominator of its loss."""
        return self.micro_batch * self.seq_len

    def sample_indices(self, first: int, micro: int) -> np.ndarray:
        """Global sample indices [micro_batch] that this DP rank reads in micro-step `micro` of
        the step whose batch starts at global sample `first`. Micro-step-major, then rank, so
        the (micro, rank) pairs of a step tile [first, first + samples_per_step) in order."""
        start = first + (micro * self.dp_size + self.dp_rank) * self.micro_batch
        return start + np.arange(self.micro_batch, dtype=np.int64)
