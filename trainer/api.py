"""Loading a trained model back: `trainer.load_model(run_dir_or_checkpoint)`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from model import Transformer
from trainer.checkpoint import STEP_DIR, Checkpointer, CheckpointError
from trainer.config import RunConfig, from_yaml_text


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, Path]:
    """(run_dir, checkpoint dir): a run dir picks its newest complete checkpoint (or `step`)."""
    path = Path(path)
    if STEP_DIR.match(path.name):
        return path.parent.parent, path
    root = path / "checkpoints"
    done = [p for p in root.glob("step-*") if STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()] \
        if root.is_dir() else []
    if step is not None:
        done = [p for p in done if p.name == f"step-{step}"]
    if not done:
        want = f"step-{step}" if step is not None else "any complete checkpoint"
        raise CheckpointError(f"{path} has no {want} under checkpoints/ (give a run dir or a checkpoints/step-N dir)")
    return path, max(done, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage."""
    if any(ckpt.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    # ZeRO-0: DeepSpeed's own file (it pickles more than tensors, so not weights_only).
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def load_model(path: str | Path, step: int | None = None) -> Transformer:
    """Our model at the depth it was saved, in eval mode; `model(ids)` gives logits [B, T, V]."""
    run_dir, ckpt = resolve_checkpoint(path, step)
    cfg: RunConfig = from_yaml_text((run_dir / "config.yaml").read_text())
    state, _ = Checkpointer.read_state(ckpt)
    model = Transformer(dataclasses.replace(cfg.model, n_layers=state.n_layers))
    model.load_state_dict(consolidated_state_dict(ckpt), strict=True)
    return model.eval()
