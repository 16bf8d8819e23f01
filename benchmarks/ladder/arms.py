"""The option ladder's arms, settings, model shapes and training budgets: the one registry
the runner, the plan and the tests read.

Arms. Each arm is Pre-LN Llama (configs/ladder/base.yaml) plus the model overrides of one
option, or the control that isolates part of an option:

- pre_ln: the reference;
- pre_ln_embed_norm: Pre-LN with a norm on the embedding output, the control for Peri-LN's
  embedding norm;
- peri_ln: Peri-LN with its embedding norm (without it Peri-LN lost to Pre-LN at every LR in
  benchmarks/results/ablation.md, which is not the method as published);
- value_residual: learned value residual on Pre-LN;
- lns: LayerNorm Scaling (sublayer-input norms of block l times 1/sqrt(l)); it turns off the
  depth-scaled init (out-projections std/sqrt(2L)), so
- pre_ln_lns_init: Pre-LN with LNS's init (depth_scaled_init off) is its control: LNS minus
  this is the scaling alone;
- mod: Mixture-of-Depths, capacity 0.125 on every other block, judged on FLOPs;
- mod_c1: MoD at capacity 1.0 (every token through every block, still weighted by its router
  score), the control for the router-score scaling;
- grow: progressive depth growth, L/2 layers stacked to L (G_stack) at 25% of the steps, the
  recipe configs/pretrain_1b_grow.yaml uses and benchmarks/growth.py measured;
- shallow: a fixed L/2-layer model trained for grow's FLOPs, grow's control.

Settings. "width": widths 32..160 at 8 layers, every arm. "depth": 6, 12 and 24 layers at
width 48 for pre_ln, lns and pre_ln_lns_init, since LNS targets depth (the Curse of Depth):
doubling depth from 6 to 24 spans the same 4x in parameters as the width ladder's 32 -> 80.

Shapes. head_dim is 16 at every width (n_heads = width / 16: 2, 3, 5, 8, 10), plain MHA:
a fixed head_dim keeps attention's geometry (the RoPE frequencies per head, the logit scale)
the same on every rung, so only width changes, as in the usual scaling ladders; 16 is the
largest power of two that divides every width and leaves at least 2 heads at width 32. The
SwiGLU hidden size is 8/3 width rounded up to a multiple of 16 (96, 128, 224, 352, 432): the
model's default rounds to 64, which would swing the MLP ratio from 4.0 at width 32 to 2.7 at 48.

Budgets (`budgets`). Per (setting, width, depth), the reference trains ceil(tpp·N/T) steps
of T tokens, N the largest non-embedding parameter count among the iso-token arms (so every
one sees >= tpp tokens per parameter) and tpp = 8 by default. Iso-token arms (the dense ones
and grow) train those steps. mod and mod_c1 are iso-FLOP with pre_ln, as benchmarks/ablate.py
does: steps = pre_ln's FLOPs / (their flops_per_token · T), rounded up, never below tpp tokens
per their own parameter (that floor binds only for mod_c1, whose router makes a token 0.05%
dearer than pre_ln's). shallow trains grow's FLOPs: grow's FLOPs are summed stage by stage,
each stage at its own depth, as trainer/planner.py counts them. FLOPs are PaLM's model FLOPs
(`Transformer.flops_per_token`), the project's convention.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

HEAD_DIM = 16
GROW_AT = 0.25  # fraction of grow's steps trained at half depth
REWARM = 0.01  # growth.rewarm_steps as a fraction of the steps (the 1B recipe: 100 of 11,000)
WARMUP = 0.05  # schedule.warmup_steps as a fraction of the steps
REFERENCE = "pre_ln"


@dataclass(frozen=True)
class Arm:
    name: str
    model: dict = field(default_factory=dict)  # model.* overrides on the base config
    budget: str = "iso-token"  # iso-token | iso-FLOP (with pre_ln) | grow-FLOP (with grow)
    control_for: str = ""  # the arm this one isolates part of
    doc: str = ""


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("pre_ln", doc="the reference"),
    Arm("pre_ln_embed_norm", {"embed_norm": True}, control_for="peri_ln", doc="Peri-LN's embedding norm alone"),
    Arm("peri_ln", {"norm": "peri", "embed_norm": True}),
    Arm("value_residual", {"value_residual": "learned"}),
    Arm("lns", {"ln_scaling": True, "depth_scaled_init": False}),
    Arm("pre_ln_lns_init", {"depth_scaled_init": False}, control_for="lns", doc="LNS's init alone"),
    Arm("mod", {"mod.capacity": 0.125, "mod.every": 2}, budget="iso-FLOP"),
    Arm("mod_c1", {"mod.capacity": 1.0, "mod.every": 2}, budget="iso-FLOP", control_for="mod",
        doc="MoD's router-score scaling without dropping tokens"),
    Arm("grow", doc="L/2 layers stacked to L at 25% of the steps"),
    Arm("shallow", budget="grow-FLOP", control_for="grow", doc="L/2 layers for grow's FLOPs"),
)}


@dataclass(frozen=True)
class Setting:
    name: str
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    arms: tuple[str, ...]


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("width", (32, 48, 80, 128, 160), (8,), tuple(ARMS)),
    Setting("depth", (48,), (6, 12, 24), ("pre_ln", "lns", "pre_ln_lns_init")),
)}


def ffn_hidden(width: int) -> int:
    """8/3 width rounded up to a multiple of 16 (module docstring)."""
    return -(-8 * width // (3 * 16)) * 16


def shape(width: int, n_layers: int) -> dict[str, object]:
    """model.* overrides of one rung's shape."""
    if width % HEAD_DIM:
        raise ValueError(f"width {width} is not a multiple of head_dim {HEAD_DIM}")
    return {"d_model": width, "n_layers": n_layers, "n_heads": width // HEAD_DIM, "n_kv_heads": width // HEAD_DIM,
            "ffn_hidden": ffn_hidden(width)}


def trained_layers(arm: str, n_layers: int) -> int:
    """The depth the arm starts at: half for grow (it grows back to n_layers) and shallow."""
    return n_layers // 2 if arm in ("grow", "shallow") else n_layers


def model_overrides(arm: str, width: int, n_layers: int) -> dict[str, object]:
    """model.* of `arm` at a rung, as it starts training."""
    return {**shape(width, trained_layers(arm, n_layers)), **ARMS[arm].model}


def schedule_overrides(arm: str, steps: int, n_layers: int) -> dict[str, object]:
    """run/schedule/growth keys that depend on the steps: warmup 5%, and grow's stage."""
    out: dict[str, object] = {"run.max_steps": steps, "schedule.warmup_steps": max(1, round(WARMUP * steps))}
    if arm == "grow":
        out["growth.stages"] = f"[{{at_step: {grow_step(steps)}, layers: {n_layers}, method: stack}}]"
        out["growth.rewarm_steps"] = max(1, round(REWARM * steps))
    return out


def grow_step(steps: int) -> int:
    return max(1, round(GROW_AT * steps))


@dataclass(frozen=True)
class Budget:
    arm: str
    n_layers: int  # the final depth (shallow: its fixed depth)
    params: int  # non-embedding, at the final depth
    flops_per_token: float  # at the final depth
    steps: int
    tokens: int
    flops: float  # training FLOPs, summed over growth stages

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def _model(model_cfg):
    import torch

    from model import Transformer

    with torch.device("meta"):
        return Transformer(model_cfg)


def budgets(base_cfg, width: int, n_layers: int, tokens_per_param: float, arms=tuple(ARMS)) -> dict[str, Budget]:
    """{arm: Budget} at one rung (module docstring). `base_cfg` is the loaded base RunConfig
    (its batch and seq_len); `arms` are those of the setting (all arms' budgets hang off
    pre_ln's and grow's, which are computed whether listed or not)."""
    seq = base_cfg.data.seq_len
    tps = base_cfg.parallel.micro_batch * base_cfg.parallel.grad_accum * seq

    def model_at(arm: str, layers: int):
        m = base_cfg.model
        for key, value in {**shape(width, layers), **ARMS[arm].model}.items():
            if key.startswith("mod."):
                m = dataclasses.replace(m, mod=dataclasses.replace(m.mod, **{key[4:]: value}))
            else:
                m = dataclasses.replace(m, **{key: value})
        return _model(m)

    info = {}
    for arm in dict.fromkeys((REFERENCE, "grow", *arms)):
        final = n_layers // 2 if arm == "shallow" else n_layers
        m = model_at(arm, final)
        info[arm] = (final, m.num_params(non_embedding=True), m.flops_per_token(seq))
    iso_token = [a for a in info if ARMS[a].budget == "iso-token"]
    ref_steps = math.ceil(tokens_per_param * max(info[a][1] for a in iso_token) / tps)
    ref_flops = ref_steps * tps * info[REFERENCE][2]
    half_fpt = model_at("grow", n_layers // 2).flops_per_token(seq)
    g_at = grow_step(ref_steps)
    grow_flops = tps * (g_at * half_fpt + (ref_steps - g_at) * info["grow"][2])
    out = {}
    for arm in arms:
        final, params, fpt = info[arm]
        kind = ARMS[arm].budget
        floor = math.ceil(tokens_per_param * params / tps)
        if kind == "iso-token":
            steps = ref_steps
        elif kind == "iso-FLOP":
            steps = max(math.ceil(ref_flops / (fpt * tps)), floor)
        else:  # grow-FLOP
            steps = max(math.ceil(grow_flops / (fpt * tps)), floor)
        flops = grow_flops if arm == "grow" else steps * tps * fpt
        out[arm] = Budget(arm, final, params, fpt, steps, steps * tps, flops)
    return out
