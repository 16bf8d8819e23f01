"""Progressive depth growth (docs/design.md §6): at `growth.stages[i].at_step` the model becomes
`layers` deep, its weights and Adam moments mapped from the shallower one.

Methods (0-based source block of each new block, old depth L, new depth N):
    stack       G_stack / StackBERT: [0..L-1, 0..L-1, ...] (the whole stack copied on top)
    interleave  each block duplicated in place: [0, 0, 1, 1, ...] (N/L copies of each)
    identity    stack order, so the old blocks keep their absolute positions (their LNS
                factors and MoD routing are unchanged), and the new blocks L..N-1 are made
                exact no-ops: pre-LN zeroes their o_proj and down_proj, peri-LN their
                output-norm gains (attn_out, mlp_out; the sublayer weights stay non-zero, see
                the Peri-LN pitfall in docs/design.md §4). Post-LN cannot be made function
                preserving this way; config validation rejects it.

Parameters follow their block by name (`blocks.{j}.x` -> `blocks.{i}.x`). A name the new
block has but its source lacks is fresh, taken from the new model's own initialisation: the
router and predictor of a routed slot that copies a dense block, and λ of a `learned`
value-residual block that copies block 1 (block 1 has no λ). A name the source has but the
new block lacks is dropped: the router of a routed block copied into a dense slot, and
block 1's v_proj copied to l ≥ 2 under `shared`. Block 0 is always copied from block 0, so
V1 still comes from the bottom layer. LNS factors and the `fixed` λ are non-persistent
buffers, recomputed when the deeper model is constructed.

Adam state. Weights and moments are read from, and written to, the fp32 masters (never the
bf16 module copy) through trainer/ds_state.py, at fp32 and bf16 and every ZeRO stage.
Moments (exp_avg, exp_avg_sq) follow the weights: copied for copied parameters,
zero for fresh and for identity-zeroed ones. Every parameter gets the old optimizer's step
count t, at every ZeRO stage: ZeRO 1-3 keep one count per flat partition, so a per-parameter
count is impossible there, and stage 0 does the same so that growth trains identically at
every stage. Copied moments are therefore bias-corrected exactly as before growth. A
zero-moment parameter is in effect not bias-corrected: its k-th update after growth is
(1-β1^k)/sqrt(1-β2^k) times a corrected one, which for the default β = (0.9, 0.95) stays in
[0.45, 1.1] (a mild built-in warmup); with β2 near 1 (0.999) it would overshoot several-fold
for hundreds of steps, so pair such β2 with `growth.rewarm_steps`.

Resume. The loop checkpoints after a step, before `grow` runs at the top of the next,
so a checkpoint `step-s` always holds the depth *before* any growth due at s. `grow`
also saves one at s (unless the loop just did). Resuming from it rebuilds the old depth and
grows again at s, deterministically (`build_model` reseeds); resuming from a later checkpoint
rebuilds the grown depth and skips the stage (`layers > state.n_layers` fails).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Mapping, Optional

import torch
from torch import Tensor

from model.config import ModelConfig, select
from trainer import ds_state
from trainer.ds_state import MOMENTS, FullState

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Per norm placement, the parameters that turn a block's two residual increments to exactly 0.
_NO_OP_PARAMS = {"pre": ("attn.o_proj.weight", "mlp.down_proj.weight"),
                 "peri": ("attn_out.weight", "mlp_out.weight")}


# ---- the mapping (pure) -------------------------------------------------------------

def _stack_order(old_layers: int, new_layers: int) -> list[int]:
    return [i % old_layers for i in range(new_layers)]


def _interleave_order(old_layers: int, new_layers: int) -> list[int]:
    if new_layers % old_layers:
        raise ValueError(f"interleave needs a multiple of {old_layers} layers, got {new_layers}")
    return [i // (new_layers // old_layers) for i in range(new_layers)]


# growth.stages[].method -> the 0-based old block each new block copies (identity keeps
# stack order, so old blocks stay at their absolute positions, and zeroes the new ones).
METHODS = {"stack": _stack_order, "interleave": _interleave_order, "identity": _stack_order}


def source_blocks(old_layers: int, new_layers: int, method: str) -> list[int]:
    """0-based old block that each new block copies."""
    if new_layers <= old_layers:
        raise ValueError(f"growth must add layers: {old_layers} -> {new_layers}")
    return select(METHODS, "growth method", method)(old_layers, new_layers)


@dataclass(frozen=True)
class GrowthPlan:
    """Where each parameter of the deeper model comes from.

    sources: new parameter name -> old name it copies, None = fresh (new model's init).
    zeroed: identity's no-op parameters (value 0, moments 0).
    blocks: new 0-based block -> old block it copies.

    The mapped dicts reference the input tensors (a block copied twice shares storage with
    its source), so growing a large model holds one copy of the old state, not three.
    """

    sources: dict[str, Optional[str]]
    zeroed: frozenset[str]
    blocks: dict[int, Optional[int]]

    def weights(self, old: Mapping[str, Tensor], init: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: torch.zeros_like(init[k]) if k in self.zeroed else
                (old[src] if src is not None else init[k]).detach()
                for k, src in self.sources.items()}

    def moments(self, old: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One moment (e.g. exp_avg) of every new parameter; `like` gives fresh shapes."""
        return {k: old[src].detach() if src is not None and k not in self.zeroed else torch.zeros_like(like[k])
                for k, src in self.sources.items()}


def plan_growth(old_names, new_names, old_layers: int, new_layers: int, method: str,
                mcfg: ModelConfig) -> GrowthPlan:
    """Map every name of the deeper model (`new_names`) to a name of the shallower one."""
    src_block = source_blocks(old_layers, new_layers, method)
    old_names = set(old_names)
    sources: dict[str, Optional[str]] = {}
    for name in new_names:
        m = _BLOCK_KEY.match(name)
        src = f"blocks.{src_block[int(m.group(1))]}.{m.group(2)}" if m else name
        sources[name] = src if src in old_names else None
    zeroed: set[str] = set()
    if method == "identity":
        if mcfg.norm not in _NO_OP_PARAMS:
            raise ValueError(f"identity growth needs model.norm in {sorted(_NO_OP_PARAMS)}, got {mcfg.norm!r}")
        zeroed = {f"blocks.{i}.{p}" for i in range(old_layers, new_layers) for p in _NO_OP_PARAMS[mcfg.norm]}
        assert zeroed <= set(sources), "no-op parameter names do not match the model"
    return GrowthPlan(sources, frozenset(zeroed), dict(enumerate(src_block)))


def grow_state_dict(state: Mapping[str, Tensor], old_layers: int, new_layers: int, method: str,
                    cfg: ModelConfig, init: Optional[Mapping[str, Tensor]] = None
                    ) -> tuple[dict[str, Tensor], dict[int, Optional[int]]]:
    """Weights of an `old_layers`-deep model -> weights of a `new_layers`-deep one.

    `cfg` is the model config (any n_layers). `init` is the deeper model's freshly initialised
    state dict: it names the parameters to produce and supplies the fresh ones; if omitted a
    model is constructed for it (consuming the global RNG). Returns (state dict, new block
    -> old block it copies).
    """
    if init is None:
        from model import Transformer

        init = Transformer(replace(cfg, n_layers=new_layers)).state_dict()
    plan = plan_growth(state.keys(), init.keys(), old_layers, new_layers, method, cfg)
    return plan.weights(state, init), plan.blocks


# ---- the hook the loop calls ---------------------------------------------------------

class Grower:
    """Built once; at a growth step the loop hands it the engine and trains on the deeper one
    it returns:

        if grower.due(state):
            held, engine = [engine], None  # the only reference, so the old engine can be freed
            engine = grower.grow(state, held)
    """

    def __init__(self, cfg, dist, core, ckpt, metrics):
        self.cfg, self.dist, self.core, self.ckpt, self.metrics = cfg, dist, core, ckpt, metrics

    def due(self, state) -> bool:
        return due_stage(self.cfg, state) is not None

    def grow(self, state, held: list):
        return grow(self.cfg, state, held, self.dist, self.core, self.ckpt, self.metrics)


def due_stage(cfg, state):
    """The growth stage to apply now, or None."""
    return next((st for st in cfg.growth.stages if st.at_step == state.step and st.layers > state.n_layers), None)


def grow(cfg, state, held: list, dist, core, ckpt, metrics):
    """Apply the stage due at `state.step` (see the module docstring for the checkpoint and
    resume semantics) and return the deeper engine.

    `held` is a one-element list holding the current engine and the caller's only reference
    to it: it is emptied here, so that once the full state has been read out nothing refers
    to the old engine and its GPU memory (bf16 weights, fp32 masters, moments and gradient
    buffers, ~18 GB at 1B) is freed before the new engine is built."""
    from trainer.engine import build_engine, build_model

    stage = due_stage(cfg, state)
    assert stage is not None, f"no growth stage due at step {state.step}"
    t0 = time.perf_counter()
    engine = held.pop()
    already_saved = dist.broadcast_object(any(p.name == f"step-{state.step}" for p in ckpt.complete_steps())
                                          if dist.is_main else None)
    if not already_saved:
        ckpt.save(engine, state)
    old = ds_state.gather_full_state(engine)  # the fp32 masters, not the bf16 module copy
    counters = ds_state.engine_counters(engine)
    ds_state.release(engine)
    del engine
    ds_state.free_memory()  # after the last reference went: the engine's cycles are collected now

    model = build_model(cfg, stage.layers, core)
    params = dict(model.named_parameters())
    plan = plan_growth(old.weights, params, state.n_layers, stage.layers, stage.method, cfg.model)
    # Fresh values are cloned: ZeRO-3 re-points the parameters when it partitions them.
    fresh = {k: params[k].detach().clone() for k, src in plan.sources.items() if src is None or k in plan.zeroed}
    weights = plan.weights(old.weights, fresh)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    grown = FullState(weights, {k: plan.moments(old.moments[k], weights) for k in MOMENTS}, old.step)
    del old
    engine = build_engine(cfg, dist, model)
    ds_state.set_full_state(engine, grown)
    ds_state.set_engine_counters(engine, counters)

    row = {"step": state.step, "event": "growth", "n_layers_from": state.n_layers, "n_layers": stage.layers,
           "method": stage.method}
    state.n_layers = stage.layers
    metrics.log(row)
    metrics.message(f"step {state.step}: grew {row['n_layers_from']} -> {stage.layers} layers ({stage.method}, "
                    f"blocks copied from {[plan.blocks[i] for i in range(stage.layers)]}) "
                    f"in {time.perf_counter() - t0:.1f} s")
    return engine
