"""Progressive depth growth, the pure mapping (docs/design.md §6): at `growth.stages[i].at_step`
the model becomes `layers` deep, its weights mapped from the shallower one. Plain state dicts
in and out; trainer/growth.py applies the plan to a running engine (fp32 masters, Adam
moments, checkpoint and resume).

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
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional

import torch
from torch import Tensor

from .config import ModelConfig, lookup
from .transformer import Transformer

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Per norm placement, the parameters that turn a block's two residual increments to exactly 0.
_NO_OP_PARAMS = {"pre": ("attn.o_proj.weight", "mlp.down_proj.weight"),
                 "peri": ("attn_out.weight", "mlp_out.weight")}


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
    return lookup(METHODS, "growth method", method)(old_layers, new_layers)


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
        init = Transformer(replace(cfg, n_layers=new_layers)).state_dict()
    plan = plan_growth(state.keys(), init.keys(), old_layers, new_layers, method, cfg)
    return plan.weights(state, init), plan.blocks
