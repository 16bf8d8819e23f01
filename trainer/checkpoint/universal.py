"""Resuming on another world size or ZeRO stage through DeepSpeed's universal checkpoint:
whether a checkpoint needs it, and the conversion, with the fixes DeepSpeed 0.19's converter
needs so one universal checkpoint loads at every stage. These edit DeepSpeed's own checkpoint
files; the engine-side internals (loading it, repairing the optimizer after) are in
trainer/parallel/ds_state.py."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import torch

from trainer.checkpoint.manifest import fsync_dir, fsync_write
from trainer.errors import CheckpointError

UNIVERSAL = "universal"


def needs_universal(path: Path, saved: dict, now: dict) -> bool:
    """False when DeepSpeed can load the files as they are; raises for unsupported combinations."""
    reordered = saved.get("param_order", now.get("param_order")) != now.get("param_order")
    if reordered and 0 in (saved["zero_stage"], now["zero_stage"]):
        raise CheckpointError(
            f"checkpoint {path} lists the optimizer's parameters in another order than this version of the harness "
            f"(odd-sized parameters now go last, for 16-byte alignment), and at ZeRO-0 DeepSpeed restores the "
            f"optimizer state by position: resume it with the commit that wrote it, or start from its weights with "
            f"run.init_from")
    if saved["zero_stage"] == 0 and now["zero_stage"] == 0:
        return False  # replicated weights and optimizer: any world size reads mp_rank_00
    if saved["world_size"] == now["world_size"] and saved["zero_stage"] == now["zero_stage"] and not reordered:
        return False  # the same flat layout; a reordered one is read by name through the universal checkpoint
    if saved["zero_stage"] == 0 or now["zero_stage"] == 0:
        raise CheckpointError(
            f"checkpoint {path} was saved at parallel.zero_stage={saved['zero_stage']} on {saved['world_size']} ranks "
            f"and cannot be resumed at parallel.zero_stage={now['zero_stage']} on {now['world_size']} ranks: "
            f"resharding needs ZeRO 1-3 on both sides (or ZeRO-0 on both); resume with "
            f"parallel.zero_stage={saved['zero_stage']}" + ("" if saved["zero_stage"] else " or start a new run"))
    return True


def convert_to_universal(path: Path, out: Path) -> None:
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    tmp = path / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"converting {path} to DeepSpeed's universal checkpoint failed: {e!r}") from None
    (path / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; we pass the tag
    # Weights and moments come from zero/; the model-states file only carries metadata, but
    # DeepSpeed looks for it under the *target* stage's name (mp_rank_00_... at ZeRO 1-2,
    # zero_pp_rank_0_mp_rank_00_... at ZeRO-3), and the converter keeps the source's names.
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    have = [n for n in names if (tmp / n).is_file()]
    for n in names:
        if have and not (tmp / n).exists():
            shutil.copyfile(tmp / have[0], tmp / n)
    _add_stage3_optimizer_header(tmp / "zero")
    _add_stage12_optimizer_state(tmp / "zero", path)
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_write(tmp / "COMPLETE", "universal\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    fsync_dir(path)


def _add_stage12_optimizer_state(zero_dir: Path, source: Path) -> None:
    """The converse, for a ZeRO-3 source loaded at ZeRO 1/2. The converter writes a ZeRO-3
    source in ZeRO-3's own dialect, which only the ZeRO-3 loader reads: each parameter's
    fp32/exp_avg/exp_avg_sq as a bare flat tensor (the ZeRO 1/2 loader wants {"param":
    tensor of the parameter's shape}, which the ZeRO-3 loader reads too), Adam's step only in
    the header (the ZeRO 1/2 loader takes it from each parameter's step.pt; without one the
    resumed AdamW would restart its bias correction at step 0), and no `ds_version` in the
    header (ZeRO-3 saves it beside its optimizer state; the ZeRO 1/2 loader asserts on it).
    Add all three from the source. Its rank-0 flat fp32 partition (`fp32_flat_groups`),
    copied into the header, is dropped: the weights are in the per-parameter files."""
    from deepspeed.checkpoint.constants import PARAM

    path = zero_dir / "optimizer_state.pt"
    sd = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's own files (pickled config)
    if "ds_version" in sd or "optimizer_state_dict" not in sd or sd.get("zero_stage") != 3:
        return
    sd["ds_version"] = torch.load(source / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                                  weights_only=False)["ds_version"]
    sd.pop("fp32_flat_groups", None)
    states = [state for state in sd["optimizer_state_dict"]["state"].values() if "step" in state]
    if len({float(state["step"]) for state in states}) > 1:
        raise CheckpointError(f"{source}: its parameter groups are at different Adam steps")
    torch.save(sd, path)
    model = torch.load(source / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shapes = {name: shape for group in model["param_shapes"] for name, shape in group.items()}
    for param in (d for d in zero_dir.iterdir() if d.is_dir() and d.name in shapes):
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            f = param / f"{state}.pt"
            flat = torch.load(f, map_location="cpu", weights_only=True)
            if torch.is_tensor(flat):
                torch.save({PARAM: flat.view(shapes[param.name])}, f)
        if states and not (param / "step.pt").exists():
            torch.save(states[0]["step"], param / "step.pt")


def _add_stage3_optimizer_header(zero_dir: Path) -> None:
    """Converted from ZeRO 1/2, `zero/optimizer_state.pt` holds the hyperparameters at the top
    level, where the ZeRO 1/2 loader reads them; the ZeRO-3 loader reads the Adam step and the
    hyperparameters under `optimizer_state_dict` (the layout a ZeRO-3 source gives). Add that
    view so one universal checkpoint loads at any stage."""
    path = zero_dir / "optimizer_state.pt"
    sd = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's own file (pickled config)
    if "optimizer_state_dict" in sd or "param_groups" not in sd:
        return
    step_file = next(zero_dir.glob("*/step.pt"), None)
    step = torch.load(step_file, map_location="cpu", weights_only=False) if step_file else 0
    sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    torch.save(sd, path)
