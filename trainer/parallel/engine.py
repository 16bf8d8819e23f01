"""Model construction and the DeepSpeed engine. The DeepSpeed JSON is derived from our
config here and nowhere else; `parallel.deepspeed` is merged last for expert keys."""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from model import Transformer
from trainer.config import ConfigError, RunConfig, activation_checkpoint_every
from trainer.parallel.dist import Dist
from trainer.parallel.optim import SkipNonFiniteAdamW, param_groups
from trainer.parallel.ulysses import grad_scale, largest_param


def deepspeed_config(cfg: RunConfig, dist: Optional[Dist] = None) -> dict:
    p = cfg.parallel
    if p.precision == "bf16" and p.zero_stage == 1 and p.sp > 1 and p.grad_accum > 1:
        # Refused rather than run: see precision_config. The planner (--dry-run) and the engine
        # build both derive this config, so the run stops before its first step.
        raise ConfigError(
            f"parallel.zero_stage=1 with parallel.sp={p.sp} and parallel.grad_accum={p.grad_accum} under bf16 "
            f"would sum micro-batch gradients in bf16 (DeepSpeed 0.19.8's fp32-accumulating ZeRO-1 optimizer "
            f"cannot take Ulysses); use parallel.zero_stage=2, or parallel.grad_accum=1")
    ds: dict[str, Any] = {
        # Batch size lives in one place: global = micro × accum × dp, DeepSpeed derives it.
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": p.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        **precision_config(p.precision, p.zero_stage, p.sp),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if p.sp > 1:
        ds["sequence_parallel_size"] = p.sp
    return _deep_merge(ds, dict(p.deepspeed))


def precision_config(precision: str, zero_stage: int, sp: int = 1) -> dict:
    """DeepSpeed keys that keep fp32 master weights, fp32 Adam moments, fp32 gradient
    accumulation and fp32 gradient communication under bf16, at every ZeRO stage.

    ZeRO 1-3: bf16 parameters with fp32 masters in the ZeRO (stage 1: BF16_Optimizer)
    partitions; DeepSpeed's default accumulates gradients in the model dtype, so
    `grad_accum_dtype` is set to fp32. ZeRO-0: DeepSpeed 0.19.8 offers bf16 there only with
    bf16 accumulation (`FP16_UnfusedOptimizer`; bf16 + fp32 accumulation raises
    NotImplementedError), so stage 0 uses torch autocast instead, as torchtitan does for
    unsharded training: the parameters, gradients and moments stay fp32 and the matmuls and
    attention run in bf16. An empty `lower_precision_safe_modules` keeps DeepSpeed from
    all-reducing Linear gradients in bf16.

    Communication: DeepSpeed casts gradients to the engine's `communication_data_type` before
    every all-reduce and reduce-scatter (engine.allreduce_bucket for BF16_Optimizer's fp32
    buffers, stage_1_and_2 and stage3 for their buckets), and that defaults to the model
    dtype, bf16. fp32 is set, as torchtitan and OLMo-core reduce. Under Ulysses the engine
    replaces it with `seq_parallel_communication_data_type` (engine._configure_distributed_model),
    so both keys are set.

    One exception: ZeRO-1 with Ulysses (sp > 1). There fp32 accumulation makes DeepSpeed
    0.19.8 use BF16_Optimizer, which treats the SP group as tensor parallel, skips every
    gradient on SP ranks > 0 for the norm and crashes (`stack expects a non-empty
    TensorList`). That combination keeps the ZeRO-1 optimizer: fp32 masters and moments, and
    bf16 gradients, which is exact only without accumulation, so deepspeed_config refuses it
    with parallel.grad_accum > 1. ZeRO-2/3 never use BF16_Optimizer and keep fp32
    accumulation with SP.
    """
    if precision != "bf16":
        return {"bf16": {"enabled": False}}
    fp32_comm = {"communication_data_type": "fp32", "seq_parallel_communication_data_type": "fp32"}
    if zero_stage == 0:
        return {"bf16": {"enabled": False}, **fp32_comm,
                "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
    if zero_stage == 1 and sp > 1:
        return {"bf16": {"enabled": True}, **fp32_comm}
    return {"bf16": {"enabled": True}, **fp32_comm, "data_types": {"grad_accum_dtype": "fp32"}}


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_model(cfg: RunConfig, n_layers: int, attn_core: Optional[Callable] = None) -> Transformer:
    """Same seed on every rank, so every rank starts from identical weights. Activation
    checkpointing and torch.compile are applied here, so a model rebuilt by growth gets them too."""
    torch.manual_seed(cfg.run.seed)
    mcfg = dataclasses.replace(cfg.model, n_layers=n_layers)
    model = Transformer(mcfg, attn_core=attn_core, sp_degree=cfg.parallel.sp)
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    if cfg.parallel.compile:
        apply_compile(model, fullgraph=cfg.parallel.sp == 1)
    return model


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Recompute blocks k, 2k, ... (1-based; k from `mode`) in the backward instead of keeping
    their activations, with non-reentrant `torch.utils.checkpoint`.

    What is checkpointed is each block's `run` (attention and MLP with their norms), not its
    `forward`: a routed block's router, top-k and scatter stay outside, so the recompute never
    appends a second MoD aux loss or stats entry, and the top-k indices are not recomputed.
    Inputs (x, RoPE, V1, key mask) are held by the checkpoint; the Ulysses all-to-all inside
    the attention core runs again in the recompute, on every rank in the same order. The
    instance attribute shadows the method, so parameter names and the state dict are unchanged.
    """
    k = activation_checkpoint_every(mode)
    for layer, block in enumerate(model.blocks, start=1):
        if k and layer % k == 0:
            block.run = functools.partial(checkpoint, block.run, use_reentrant=False)


def apply_compile(model: Transformer, fullgraph: bool = True) -> None:
    """torch.compile each block in place (`nn.Module.compile`: parameter names unchanged).

    Blocks of one kind share a graph, since dynamo treats parameters as inputs. Shapes are
    static: a MoD block's k is a Python int from the config. Embedding, final norm, LM head and
    loss stay eager. `fullgraph`: a block is one graph or an error, never silently split; the
    caller turns it off under Ulysses, where the all-gather of the MoD eval key mask runs eager
    by design (trainer.parallel.ulysses.gather_sequence), a graph break (docs/design.md)."""
    for block in model.blocks:
        block.compile(fullgraph=fullgraph)


def build_engine(cfg: RunConfig, dist: Dist, model: torch.nn.Module):
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    ds_config = deepspeed_config(cfg, dist)
    # Refuses what it cannot scale, up front; computed once here, every train_step reads it.
    scale = grad_scale(ds_config, cfg.parallel.sp, dist.world, largest_param(model))
    optimizer = SkipNonFiniteAdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, dist=dist, **adamw_kernel(dist.device))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, mpu=dist.mpu)
    if dist.world == 1 and cfg.parallel.zero_stage == 0:
        # Alone, DeepSpeed still flattens every gradient into buckets for an all-reduce with
        # itself (~7% of a CPU step); ZeRO stages need that path to fill their partitions.
        engine.enable_backward_allreduce = False
    engine.grad_scale = scale  # trainer.parallel.ulysses.grad_scale: the loss factor for this layout
    return engine


def adamw_kernel(device: torch.device) -> dict[str, bool]:
    """torch's fused AdamW, one kernel over all tensors, where torch has it (CUDA and CPU); the
    multi-tensor foreach path stays the choice on other devices. Its CPU cost per step is
    measured in benchmarks/results/throughput.json (profile, clip+optimizer)."""
    fused = device.type in ("cuda", "cpu")
    return {"foreach": not fused, "fused": fused}


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
