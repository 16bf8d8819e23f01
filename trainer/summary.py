"""`--dry-run`: validate a config and say what it would cost, without data or hardware."""
from __future__ import annotations

import dataclasses

import torch

from model import Transformer
from trainer.config import RunConfig
from trainer.dist import print0


def memory_per_gpu(cfg: RunConfig, n_params: int, dp: int) -> dict[str, float]:
    """Rough bytes per GPU: weights, grads and AdamW states by ZeRO stage, plus activations
    (Korthikanti et al. 2022, ~34·s·b·d bytes per layer in 16-bit with flash attention,
    sequence split over SP, no activation checkpointing)."""
    p = cfg.parallel
    w = 2 if p.precision == "bf16" else 4
    g = w
    o = 12 if p.precision == "bf16" else 8  # (fp32 master +) two fp32 moments
    z = p.zero_stage
    per_param = {0: w + g + o, 1: w + g + o / dp, 2: w + (g + o) / dp, 3: (w + g + o) / dp}[z]
    states = per_param * n_params
    tokens = p.micro_batch * cfg.data.seq_len / p.sp
    acts = 34 * tokens * cfg.model.d_model * cfg.final_layers * (w / 2)
    logits = tokens * cfg.model.vocab_size * 4 * 2  # fp32 logits and their grad
    return {"states": states, "activations": acts + logits, "total": states + acts + logits}


def dry_run(cfg: RunConfig, world_size: int = 0) -> None:
    world = world_size or cfg.parallel.sp
    dp = max(1, world // cfg.parallel.sp)
    mcfg = dataclasses.replace(cfg.model, n_layers=cfg.final_layers)
    with torch.device("meta"):
        model = Transformer(mcfg, sp_degree=1)
    n, n_ne = model.num_params(), model.num_params(non_embedding=True)
    fpt = model.flops_per_token(cfg.data.seq_len)
    tokens = cfg.parallel.micro_batch * cfg.parallel.grad_accum * dp * cfg.data.seq_len
    mem = memory_per_gpu(cfg, n, dp)
    gib = 2**30
    depth = f"{cfg.model.n_layers} -> {cfg.final_layers} layers (growth)" if cfg.growth.stages else f"{cfg.model.n_layers} layers"
    print0(f"config OK: {cfg.run.name}")
    print0(f"  model       {depth}, d_model {mcfg.d_model}, heads {mcfg.n_heads}/{mcfg.kv_heads} kv, "
           f"norm {mcfg.norm}, ln_scaling {mcfg.ln_scaling}, value_residual {mcfg.value_residual}, "
           f"mod capacity {mcfg.mod.capacity}")
    print0(f"  parameters  {n:,} total, {n_ne:,} non-embedding")
    print0(f"  FLOPs/token {fpt:,.0f} (training, seq_len {cfg.data.seq_len})")
    print0(f"  batch       {tokens:,} tokens per step (micro {cfg.parallel.micro_batch} x accum "
           f"{cfg.parallel.grad_accum} x dp {dp}, seq {cfg.data.seq_len}, sp {cfg.parallel.sp}; world {world})")
    print0(f"  memory/GPU  ~{mem['total'] / gib:.1f} GiB (ZeRO-{cfg.parallel.zero_stage} states "
           f"{mem['states'] / gib:.1f} GiB, activations {mem['activations'] / gib:.1f} GiB; {cfg.parallel.precision})")
    print0(f"  run dir     {cfg.run_dir}")
