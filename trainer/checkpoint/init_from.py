"""`run.init_from`: start a new run from another run's weights.

A staged recipe (e.g. a 2k-context base run, then a 16k long-context stage) trains the
second stage as a new run: its own run dir, step 0, a fresh AdamW and its own LR schedule,
starting from the first run's final (or a named) checkpoint. Only the model weights are
taken, as the fp32 masters, so the new run may use another sequence length, SP degree,
RoPE theta, ZeRO stage, world size or precision. The model's shape and architecture
options must match: anything else would silently drop or reinterpret weights.

`init_from` applies to a fresh run only. Once the new run has a checkpoint of its own,
re-running the command resumes from that, like any other run.
"""
from __future__ import annotations

import dataclasses
import filecmp
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.checkpoint.checkpointer import Checkpointer, rank0_work
from trainer.checkpoint.manifest import verified
from trainer.config import RunConfig, _flatten, from_yaml_text
from trainer.errors import CheckpointError, ConfigError
from trainer.export.load import consolidated_state_dict, resolve_checkpoint
from trainer.parallel.ds_state import FullState, set_full_state

# Model keys that leave every parameter's shape and meaning unchanged: positions (RoPE
# theta and table length), the MoD routing granularity, loss weights and initialisation.
MAY_DIFFER = ("max_seq_len", "rope_theta", "mod.route_chunks", "mod.aux_weight", "init_std", "depth_scaled_init")


@dataclass
class InitSource:
    run_dir: Path
    checkpoint: Path
    n_layers: int  # the depth the checkpoint was saved at (after any growth)


def model_diff(source: dict, target: dict) -> list[str]:
    """`model.<key> (source vs target)` for every shape/option key that differs."""
    a, b = _flatten(source), _flatten(target)
    keys = sorted(k for k in set(a) | set(b) if k not in MAY_DIFFER and a.get(k) != b.get(k))
    return [f"model.{k} ({a.get(k)!r} there, {b.get(k)!r} here)" for k in keys]


def resolve_init_source(cfg: RunConfig, dist=None) -> InitSource:
    """Find the checkpoint `run.init_from` names, verify it against its manifest (on rank 0
    of `dist`, which shares the verdict) and check its model fits `cfg.model`; before any
    data work."""
    spec = cfg.run.init_from
    key = f"run.init_from={spec!r}"
    if not Path(spec).exists():
        raise ConfigError(f"{key}: no such directory (give a run dir or its checkpoints/step-N dir)")
    problem = None
    try:
        run_dir, ckpt = resolve_checkpoint(spec)
        if dist is None or dist.is_main:
            verified(ckpt)
    except CheckpointError as e:
        problem = str(e)
    if dist is not None:
        problem = dist.broadcast_object(problem)
    if problem is not None:
        raise ConfigError(f"{key}: {problem}")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{key}: {saved} is missing, so the source model is unknown (is {run_dir} a run dir?)")
    state, _ = Checkpointer.read_state(ckpt)
    src = dataclasses.replace(from_yaml_text(saved.read_text()).model, n_layers=state.n_layers)
    diff = model_diff(dataclasses.asdict(src), dataclasses.asdict(cfg.model))
    if diff:
        raise ConfigError(f"{key}: {ckpt} holds a different model: {', '.join(diff)}; only "
                          f"{', '.join('model.' + k for k in MAY_DIFFER)} may change when starting from its weights")
    return InitSource(run_dir, ckpt, state.n_layers)


def source_weights(src: InitSource) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the source checkpoint, whatever its ZeRO stage and world size."""
    return consolidated_state_dict(src.checkpoint)


def shared_weights_path(run_dir: Path) -> Path:
    return run_dir / "init_from.weights.pt"


def shared_source_weights(src: InitSource, run_dir: Path, dist) -> dict[str, torch.Tensor]:
    """The source's fp32 weights on every rank, consolidated once per job. Consolidating reads
    every rank's optimizer partition of the source (about 12 GB at 1B) and holds the full
    fp32 state (4 GB): done on every rank, a node of 8 GPUs would read 96 GB and hold 32 GB.
    Instead rank 0 consolidates and writes the state dict to the new run dir (shared by all
    ranks, like its checkpoints), and after a barrier every rank maps that file with
    torch.load(mmap=True), so a node keeps one copy in its page cache. Rewritten at every
    fresh start, so a file left by a crash never stands in for a changed run.init_from;
    `release_shared_weights` removes it once the engine holds the weights."""
    path = shared_weights_path(run_dir)

    def consolidate() -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(source_weights(src), tmp)
        os.replace(tmp, path)

    # Minutes at 1B: the others poll for rank 0's marker, not a barrier under parallel.timeout_minutes.
    rank0_work(dist, _done_marker(run_dir), f"consolidating {src.checkpoint} for run.init_from", consolidate)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _done_marker(run_dir: Path) -> Path:
    return run_dir / "init_from.weights.status"


def release_shared_weights(run_dir: Path, dist) -> None:
    """After every rank copied the mapped weights into its engine: the file is not needed
    again (the run's own checkpoints take over), and it is as large as the model in fp32."""
    dist.barrier()
    if dist.is_main:
        shared_weights_path(run_dir).unlink(missing_ok=True)
        _done_marker(run_dir).unlink(missing_ok=True)


def load_into_model(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Before the DeepSpeed engine exists: every rank's module gets the weights."""
    model.load_state_dict(weights, strict=True)


def load_into_engine(engine, weights: dict[str, torch.Tensor]) -> None:
    """After the engine exists: write the exact fp32 values into its fp32 masters (under
    bf16 or ZeRO the engine made them from its bf16 copy, which rounded them). Collective
    under ZeRO-3: every rank calls it."""
    set_full_state(engine, FullState(weights={k: v.float() for k, v in weights.items()}, moments={}, step=None))


def check_tokenizer(src: InitSource, run_dir: Path) -> None:
    """The new run must read text with the source's tokenizer, or every embedding row means
    another token. Both runs keep a copy at tokenizer/tokenizer.model."""
    theirs, ours = src.run_dir / "tokenizer" / "tokenizer.model", run_dir / "tokenizer" / "tokenizer.model"
    if theirs.is_file() and ours.is_file() and not filecmp.cmp(theirs, ours, shallow=False):
        raise ConfigError(f"run.init_from={str(src.run_dir)!r}: this run's tokenizer ({ours}) differs from the source "
                          f"run's; set data.tokenizer={theirs} so token ids mean the same thing")
