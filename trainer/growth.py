"""Progressive depth growth on a running engine (docs/design.md §6). The pure mapping (methods,
plan, weights) is model/growth.py; this module applies it to the fp32 masters and Adam
moments of a DeepSpeed engine.

Adam state. Weights and moments are read from, and written to, the fp32 masters (never the
bf16 module copy) through trainer/parallel/ds_state.py, at fp32 and bf16 and every ZeRO stage.
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

import time

import torch

from model.growth import plan_growth
from trainer.parallel import ds_state
from trainer.parallel.ds_state import MOMENTS, FullState
from trainer.parallel.engine import build_engine, build_model


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
