"""Loading a trained model back: `trainer.load_model(run_dir_or_checkpoint)`.

Weights are the fp32 masters (under bf16 the model file holds only the bf16 copy), read
with torch's weights-only unpickler: a run dir handed over by someone else cannot run code.
The checkpoint is verified against its manifest first (`trainer.checkpoint.manifest.verified`), so a damaged
file is refused in one line naming it; export, generate and evaluate load through here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from model import Transformer
from trainer.checkpoint.manifest import STEP_DIR, complete_steps, verified
from trainer.checkpoint.state import read_state_blob
from trainer.config import RunConfig, from_yaml_text
from trainer.errors import CheckpointError, UserError
from trainer.parallel.ds_state import fp32_state_dict


def run_dir_or_error(path: Path) -> Path:
    """The path itself, or a one-line error when it does not exist."""
    if not Path(path).exists():
        raise UserError(f"run dir {path} does not exist (give a run dir such as runs/tiny, "
                        f"or one of its checkpoints/step-N dirs)")
    return Path(path)


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, Path]:
    """(run_dir, checkpoint dir): a run dir picks its newest complete checkpoint (or `step`)."""
    path = Path(path)
    if STEP_DIR.match(path.name):
        return path.parent.parent, path
    done = complete_steps(path / "checkpoints")
    if step is not None:
        done = [p for p in done if p.name == f"step-{step}"]
    if not done:
        want = f"step-{step}" if step is not None else "any complete checkpoint"
        raise CheckpointError(f"{path} has no {want} under checkpoints/ (give a run dir or a checkpoints/step-N dir)")
    return path, done[-1]


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 master weights from a DeepSpeed checkpoint of any ZeRO stage and precision."""
    return fp32_state_dict(ckpt)


def load_model(path: str | Path, step: int | None = None) -> Transformer:
    """Our model at the depth it was saved, in eval mode; `model(ids)` gives logits [B, T, V]."""
    run_dir, ckpt = resolve_checkpoint(path, step)
    weights = consolidated_state_dict(verified(ckpt))  # first: it vets every .pt file of the checkpoint
    cfg: RunConfig = from_yaml_text((run_dir / "config.yaml").read_text())
    state, _, _ = read_state_blob(ckpt)
    model = Transformer(dataclasses.replace(cfg.model, n_layers=state.n_layers))
    model.load_state_dict(weights, strict=True)
    return model.eval()
