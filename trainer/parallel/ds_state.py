"""DeepSpeed state surgery: full fp32 weights and Adam moments out of and into an engine,
and reading DeepSpeed's checkpoint files without unpickling arbitrary objects.

Growth (trainer/growth.py), the step (skipped-step flag), the Checkpointer's resume,
downstream evaluation's weights and `load_model`/export reach DeepSpeed's internals only
through this module, so a DeepSpeed upgrade is checked here (the universal-checkpoint file
conversion, which edits DeepSpeed's files rather than its objects, is
trainer/checkpoint/universal.py).
It relies on these DeepSpeed 0.19.8 internals, each for the reason given:

Engine and optimizer wrappers
  - `engine.optimizer` is our `SkipNonFiniteAdamW` (fp32 and bf16 ZeRO-0, which runs under
    torch autocast) or a wrapper that keeps it as `.optimizer`: `BF16_Optimizer` (bf16
    ZeRO-1), `DeepSpeedZeroOptimizer` (ZeRO-1/2), `DeepSpeedZeroOptimizer_Stage3`.
    `base_optimizer` walks that chain to read the skipped-step flag and the step count.
  - The flat fp32 master partitions the base optimizer steps on, and whose tensors key its
    `state`: `single_partition_of_fp32_groups` (ZeRO-1/2), `fp32_partitioned_groups_flat`
    (ZeRO-3), `fp32_groups_flat_partition` (BF16_Optimizer). Needed to create Adam state
    before the grown engine's first step, so moments can be written into it.
  - `_lazy_init_hp_params_optimizer_state()` and its `_hp_optimizer_states_linked` flag
    (ZeRO-1/2 and BF16_Optimizer): each parameter's moment fragments are linked to the flat
    state once, after the first step; resetting the flag re-links them to the current state
    so that `safe_get/set_full_optimizer_state` see it.
  - Parameter attributes `ds_id` (ZeRO-3) and `_hp_mapping` (ZeRO-1/2, BF16_Optimizer: the
    fp32 master fragment): a parameter carrying one is reached through
    `deepspeed.utils.safe_get_full_fp32_param` / `safe_get_full_optimizer_state` /
    `safe_set_full_fp32_param` / `safe_set_full_optimizer_state` (collective under ZeRO);
    one carrying neither is owned by the base optimizer directly (ZeRO-0).
  - Engine counters `global_steps`, `global_samples`, `micro_steps`, `skipped_steps`, copied
    onto a re-created engine, and `engine.destroy()` to drop the old engine's hooks. After
    that the engine is freed by garbage collection once its last reference goes.
  - `engine._config.load_universal_checkpoint`: DeepSpeed reads a universal checkpoint only
    when its private config says so; `load_checkpoint` sets it for one load. Its ZeRO-3
    loader then copies group 0's hyperparameters into every group and shares one `step`
    tensor across parameters, which `_repair_after_universal_load` undoes.

Checkpoint files
  - `deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` consolidates
    ZeRO-1/2/3 partitions into full fp32 masters. It calls `torch.load(weights_only=False)`;
    `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` makes torch use the weights-only unpickler anyway.
  - ZeRO optimizer files pickle three plain-data DeepSpeed types besides tensors and
    builtins (found by `torch.serialization.get_unsafe_globals_in_checkpoint` on real
    checkpoints of every stage): `tensor_fragment.fragment_address` (a dataclass),
    `zero.config.ZeroStageEnum` (an Enum) and `fp16.loss_scaler.LossScaler` (attributes
    only). They are the whole allow-list; the model files need none.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from trainer.errors import CheckpointError
from trainer.parallel.optim import SkipNonFiniteAdamW

MOMENTS = ("exp_avg", "exp_avg_sq")
_FLAT_PARTITIONS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
_RANK = re.compile(r"zero_pp_rank_(\d+)_")
_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


# ---- the optimizer under DeepSpeed's wrappers -------------------------------------------

def base_optimizer(engine) -> SkipNonFiniteAdamW:
    opt = engine.optimizer
    while not isinstance(opt, SkipNonFiniteAdamW):
        opt = opt.optimizer
    return opt


def _is_deepspeed_managed(p: Tensor) -> bool:
    """ZeRO-3 (ds_id) or ZeRO-1/2 / BF16 (fp32 master fragment) parameter."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _step_count(base) -> Optional[Tensor]:
    steps = [s["step"] for s in base.state.values() if "step" in s]
    return max(steps, key=float).detach().clone() if steps else None


def _link_optimizer_state(engine) -> None:
    """ZeRO-1/2 and BF16 link each parameter's moment fragments to the flat state after
    their first step, once; (re)link now so the fragments match the current state."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


# ---- full fp32 weights and Adam moments ---------------------------------------------------

@dataclass
class FullState:
    """Unpartitioned fp32 tensors on CPU, keyed by parameter name (tied weights once).

    step: the optimizer's step count (the tensor AdamW keeps), None before any step.
    """

    weights: dict[str, Tensor]
    moments: dict[str, dict[str, Tensor]]  # "exp_avg" | "exp_avg_sq" -> name -> tensor
    step: Optional[Tensor]


def gather_full_state(engine) -> FullState:
    """Full fp32 weights (the fp32 masters, never the bf16 module copy) and moments of every
    parameter, on every rank, at ZeRO 0-3.

    Collective under ZeRO 1-3: every rank must call it (parameters are visited in the same
    order everywhere)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = base_optimizer(engine)
    step = _step_count(base)
    if step is not None:
        _link_optimizer_state(engine)
    weights: dict[str, Tensor] = {}
    moments: dict[str, dict[str, Tensor]] = {k: {} for k in MOMENTS}
    for name, p in engine.module.named_parameters():
        if _is_deepspeed_managed(p):
            w = safe_get_full_fp32_param(p)
            ms = {k: safe_get_full_optimizer_state(p, k) if step is not None else torch.zeros_like(w) for k in MOMENTS}
        else:  # ZeRO-0 (fp32, or bf16 under autocast): the fp32 parameter is its own master
            w, st = p.detach().float(), base.state.get(p, {})
            ms = {k: st[k] if k in st else torch.zeros_like(w) for k in MOMENTS}
        weights[name] = w.detach().float().cpu().clone()
        for k in MOMENTS:
            moments[k][name] = ms[k].detach().float().cpu().clone()
    return FullState(weights, moments, step)


def _materialise_optimizer_state(engine, step: Tensor) -> None:
    """AdamW creates its state at its first step; create it now (zero moments, step count
    `step`) so that moments can be written before the first step on the new engine."""
    base = base_optimizer(engine)
    flats = next((getattr(engine.optimizer, a) for a in _FLAT_PARTITIONS if hasattr(engine.optimizer, a)), None)
    if flats is None:  # ZeRO-0: the base optimizer steps on the parameters themselves
        flats = [p for g in base.param_groups for p in g["params"]]
    for t in flats:
        base.state[t] = {"step": step.clone(), "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
    _link_optimizer_state(engine)


def set_full_state(engine, full: FullState) -> None:
    """Write full fp32 weights (into the fp32 masters under ZeRO/bf16) and moments.

    `engine.module` must already hold the same weights (its bf16 copy is not rewritten:
    it was rounded from the same values). Under ZeRO 1-3 every rank must call it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if full.step is not None:
        _materialise_optimizer_state(engine, full.step)
    base = base_optimizer(engine)
    for name, p in engine.module.named_parameters():
        if _is_deepspeed_managed(p):
            device = p.device
            safe_set_full_fp32_param(p, full.weights[name].to(device))
            if full.step is not None:
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, full.moments[k][name].to(device), k)
        elif full.step is not None:
            for k in MOMENTS:
                base.state[p][k].copy_(full.moments[k][name])


def engine_counters(engine) -> dict[str, int]:
    """DeepSpeed's step/sample counters, to carry onto a re-created engine."""
    return {k: getattr(engine, k) for k in _COUNTERS if hasattr(engine, k)}


def set_engine_counters(engine, counters: dict[str, int]) -> None:
    for k, v in counters.items():
        setattr(engine, k, v)


def release(engine) -> None:
    """Drop an engine's hooks and optimizer state. Its weights and DeepSpeed's buffers live
    until the last reference to the engine goes; then `free_memory` returns them."""
    base_optimizer(engine).state.clear()
    if hasattr(engine, "destroy"):
        engine.destroy()


def free_memory() -> None:
    """Collect what no longer has a reference (an engine is full of reference cycles: module
    hooks and optimizer closures that point back at it) and hand the cached blocks back to
    the GPU. Call it after dropping every reference, or it frees nothing."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- reading checkpoint files safely ------------------------------------------------------

def _safe_types() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler]


@contextlib.contextmanager
def _weights_only(ckpt: Path) -> Iterator[None]:
    """Refuse `ckpt` if any of its files pickles a type outside the allow-list (checked by
    reading the pickle opcodes, executing nothing), then force every `torch.load` inside
    the block onto the weights-only unpickler with that allow-list."""
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    allowed = _safe_types()
    with safe_globals(allowed):
        for f in sorted(Path(ckpt).glob("*.pt")):
            try:
                unsafe = get_unsafe_globals_in_checkpoint(f)
            except Exception as e:  # not a torch.save zip: truncated, or written by something else
                raise CheckpointError(f"{f} is not a torch checkpoint file ({e})") from None
            if unsafe:
                raise CheckpointError(
                    f"{f} pickles {', '.join(sorted(unsafe))}, not only tensors and plain data; refusing to load it "
                    f"(only files written by this harness and DeepSpeed {_ds_version()} load)")
        old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__


def fp32_state_dict(ckpt: Path) -> dict[str, Tensor]:
    """Full fp32 master weights from a checkpoint dir of any ZeRO stage, read weights-only.

    ZeRO 1-3 keep the masters in the optimizer partitions (the model file holds the bf16
    copy under bf16); ZeRO-0 keeps fp32 parameters in the model file (bf16 runs there under
    autocast, so the parameters are the masters)."""
    ckpt = Path(ckpt)
    with _weights_only(ckpt):
        optim_files = sorted(ckpt.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                             key=lambda f: int(_RANK.search(f.name).group(1)))
        if not optim_files:
            states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
            return {k: v.float() for k, v in states["module"].items()}
        first = torch.load(optim_files[0], map_location="cpu", weights_only=True)["optimizer_state_dict"]
        if "zero_stage" not in first:  # BF16_Optimizer (bf16 ZeRO-1): zero_to_fp32 does not read it
            return _bf16_optimizer_masters(ckpt, optim_files)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def _bf16_optimizer_masters(ckpt: Path, optim_files: list[Path]) -> dict[str, Tensor]:
    """BF16_Optimizer saves, per rank and parameter group, its flat fp32 partition
    (`single_partition_of_fp32_groups`) and where each parameter's slice of it lies
    (`param_slice_mappings`: name -> fragment_address(numel, start)). A parameter is the
    concatenation of its slices in rank order. Buffers and tied names come from the model file."""
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    out = {k: v.float() for k, v in states["module"].items()}
    pieces: dict[str, list[Tensor]] = {}
    for f in optim_files:
        osd = torch.load(f, map_location="cpu", weights_only=True)["optimizer_state_dict"]
        for flat, mapping in zip(osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
    for name, parts in pieces.items():
        out[name] = torch.cat(parts).float().view(out[name].shape).clone()
    for name, source in states.get("shared_params", {}).items():
        out[name] = out[source]
    return out


def load_checkpoint(engine, tag_dir: Path, universal: bool) -> Optional[str]:
    """`engine.load_checkpoint` of `tag_dir` (its parent is the save dir, its name the tag), with
    the optimizer and without a scheduler (the LR is a function of the step). `universal`
    reads DeepSpeed's universal format, which DeepSpeed takes only from its private config
    (`engine._config.load_universal_checkpoint`), set for this one load. Returns DeepSpeed's
    load path, None when it found nothing."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    engine._config.load_universal_checkpoint = universal
    try:
        load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = False
    if universal:
        _repair_after_universal_load(engine, hyper)
    return load_path


def _repair_after_universal_load(engine, hyper: list[dict]) -> None:
    """Undo two side effects of DeepSpeed's ZeRO-3 universal loader: it copies group 0's
    hyperparameters into every group (weight decay into the no-decay group; they come from our
    config, so put them back), and it stores one `step` tensor in every parameter's Adam
    state, which AdamW then increments once per group each step (wrong bias correction)."""
    for group, values in zip(engine.optimizer.param_groups, hyper):
        group.update(values)
    for st in base_optimizer(engine).state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()


def fp32_weights(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights on CPU, keyed by parameter name (a tied head once): the fp32
    masters under ZeRO and bf16, as a checkpoint export reads them, not the bf16 module
    copy. Collective under ZeRO 1-3, so every rank calls it, visiting parameters in order."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        managed = hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")  # ZeRO-3 / ZeRO-1,2 or bf16 fragment
        out[name] = (safe_get_full_fp32_param(p) if managed else p).detach().float().cpu().clone()
    return out
