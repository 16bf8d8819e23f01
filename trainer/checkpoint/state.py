"""The loop's own state, saved beside DeepSpeed's in every checkpoint: steps, tokens, the data
position, the depth, and the run of non-finite steps. At the bottom of the import graph, so
any part of the loop can hold one."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from trainer.parallel.layout import BatchLayout


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0
    samples: int = 0  # global samples consumed: the data position, whatever the batch layout was
    n_layers: int = 0  # depth the checkpoint was saved at (growth)
    bad_steps: int = 0  # consecutive non-finite steps

    def advance(self, skipped: bool, layout: BatchLayout) -> None:
        """One optimizer step done on `layout` (a skipped step still consumed its batch)."""
        self.step += 1
        self.samples += layout.samples_per_step
        self.tokens += layout.tokens_per_step
        self.bad_steps = self.bad_steps + 1 if skipped else 0


def read_state_blob(path: Path, rank: int = 0) -> tuple[TrainState, dict, Optional[dict]]:
    """(state, RNG state, layout or None) that `rank` saved in checkpoint dir `path`."""
    f = Path(path) / f"trainer_state_rank{rank}.pt"
    if not f.is_file():  # resuming on a larger world: rank 0's step/depth still apply
        f = Path(path) / "trainer_state_rank0.pt"
    blob = torch.load(f, map_location="cpu", weights_only=True)
    return TrainState(**blob["state"]), blob["rng"], blob.get("layout")
