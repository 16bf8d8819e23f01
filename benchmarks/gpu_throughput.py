"""GPU training throughput and MFU: our model against HF transformers' LlamaForCausalLM
(attn_implementation="sdpa"), bf16, at the 1B recipe's width with fewer layers.

    python -m benchmarks.gpu_throughput [--batch 4] [--seq-len 2048] [--layers 4] [--zero-stage 1]

Dims: configs/pretrain_1b.yaml's width (read from it: d_model 2048, 16 heads, 4 kv heads,
vocab 32000, FFN 5632) with `--layers` blocks (default 4) so both models and their optimizer
states fit on one GPU. Our model runs with every option off (pre-LN RMSNorm, SwiGLU, RoPE,
untied head) so that it and HF compute the same function from the same weights (the first
losses agree); `ours_recipe_engine` adds the options the 1B recipe turns on (Peri-LN with
its embedding norm, learned value residual, ...) at the same width and depth.

Steps, interleaved round by round (benchmarks.common.interleave):
  ours_engine / hf_engine / ours_recipe_engine: `trainer.step.train_step` through a
      1-process DeepSpeed engine from `trainer.parallel.engine.build_engine` with
      parallel.precision=bf16 at `--zero-stage` (default 1: bf16 parameters, fp32 masters,
      fp32 gradient accumulation; 0: autocast over fp32 parameters), exactly as
      `trainer.train` runs it. HF goes through the same engine behind the CPU benchmark's
      adapter, so ours_engine vs hf_engine differ only in the model: `ratio_vs_hf`.
  ours_plain / hf_plain (skip with --no-plain): both models cast to bf16 in a bare loop
      (forward, CE, backward, clip, torch AdamW), without DeepSpeed.

tokens/s = tokens per step / median wall time of a step (every step ends in `.item()`,
which waits for the GPU). MFU = flops_per_token × tokens/s ÷ peak, with the harness's peak
for this device and precision (`trainer.metrics.peak_flops_per_device`, what training logs:
the datasheet value for a listed GPU) and, beside it (`mfu_vs_probe`), the best time of a
bf16 [n, n] matmul measured here with `trainer.metrics.matmul_probe`.

Writes benchmarks/results/gpu_throughput.json naming the device. Without CUDA it prints one
line and exits 1.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    ROOT,
    FixedBatch,
    command_line,
    engine_train_step,
    interleave,
    machine_info,
    median,
    plain_train_step,
    print_summary,
    run_config,
    speed_ratio,
    write_result,
)

NAME = "gpu_throughput"
RECIPE = ROOT / "configs" / "pretrain_1b.yaml"
# Taken from configs/pretrain_1b.yaml (the depth comes from --layers).
WIDTH_KEYS = ("d_model", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden")


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="micro batch (default 4)")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sample (default 2048)")
    ap.add_argument("--layers", type=int, default=4, help="blocks, at the 1B recipe's width (default 4)")
    ap.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage of the engines")
    ap.add_argument("--warmup", type=int, default=3, help="rounds discarded (compilation, allocator warm-up)")
    ap.add_argument("--reps", type=int, default=10, help="rounds measured")
    ap.add_argument("--probe-n", type=int, default=8192, help="matmul size of the bf16 peak probe")
    ap.add_argument("--no-plain", action="store_true", help="skip the bare-loop pair (saves memory)")
    ap.add_argument("--no-recipe", action="store_true", help="skip our model with the 1B recipe's options")
    ap.add_argument("--model", type=json.loads, default={},
                    help='JSON overriding model keys of the recipe, e.g. \'{"d_model": 1024}\' for a small GPU')
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    return ap.parse_args(argv)


def harness_peak(device: torch.device) -> tuple[float, str]:
    """The peak `trainer.train` divides by for MFU on this device in bf16, and its source
    (a datasheet row, or a measured bf16 matmul for a GPU not in the table)."""
    from trainer.metrics import peak_flops_per_device

    return peak_flops_per_device(device, "bf16")


def configs(args):
    """(ours with every option off, ours as the 1B recipe configures it): the recipe's width
    (or `--model` overrides of it), `--layers` deep, one GPU, bf16."""
    from trainer.config import load_config

    run = {"model.n_layers": args.layers, "model.max_seq_len": args.seq_len, "data.seq_len": args.seq_len,
           "parallel.micro_batch": args.batch, "parallel.grad_accum": 1, "parallel.sp": 1,
           "parallel.zero_stage": args.zero_stage, "parallel.precision": "bf16",
           **{f"model.{k}": v for k, v in args.model.items()}}
    recipe = load_config(RECIPE, [f"{k}={v}" for k, v in run.items()])
    width = {f"model.{k}": getattr(recipe.model, k) for k in WIDTH_KEYS}
    plain = run_config({**width, **run})  # tiny.yaml: every model option off
    return plain, recipe


def measure(args) -> dict:
    from benchmarks.throughput import HFAdapter, hf_copy
    from trainer.metrics import matmul_probe
    from trainer.parallel.dist import init_distributed
    from trainer.parallel.engine import build_engine, build_model

    cfg, recipe_cfg = configs(args)
    dist = init_distributed()
    device = dist.device
    data = FixedBatch(cfg.model.vocab_size, args.batch, args.seq_len)
    ours = build_model(cfg, cfg.model.n_layers)
    hf = hf_copy(ours)
    attn_impl = hf.config._attn_implementation

    steps = {
        "ours_engine": engine_train_step(build_engine(cfg, dist, copy.deepcopy(ours)), data, dist, cfg),
        "hf_engine": engine_train_step(build_engine(cfg, dist, HFAdapter(copy.deepcopy(hf))), data, dist, cfg),
    }
    fpt = {"ours_engine": ours.flops_per_token(args.seq_len), "hf_engine": ours.flops_per_token(args.seq_len)}
    if not args.no_recipe:
        recipe = build_model(recipe_cfg, recipe_cfg.model.n_layers)
        fpt["ours_recipe_engine"] = recipe.flops_per_token(args.seq_len)
        steps["ours_recipe_engine"] = engine_train_step(build_engine(recipe_cfg, dist, recipe), data, dist,
                                                        recipe_cfg)
    if not args.no_plain:
        x, y = data.inputs.to(device), data.labels.to(device)

        def ce(logits):  # sum / tokens, as train_step computes it
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum") / y.numel()

        ours_bf16, hf_bf16 = ours.to(device, torch.bfloat16), hf.to(device, torch.bfloat16)
        steps["ours_plain"] = plain_train_step(ours_bf16, lambda m: ce(m(x)), cfg)
        steps["hf_plain"] = plain_train_step(hf_bf16, lambda m: ce(m(input_ids=x, use_cache=False).logits), cfg)
        fpt["ours_plain"] = fpt["hf_plain"] = fpt["ours_engine"]

    probe_before = matmul_probe(device, torch.bfloat16, args.probe_n)
    raw = interleave(steps, args.warmup, args.reps)
    probe_after = matmul_probe(device, torch.bfloat16, args.probe_n)
    probe = max(probe_before["peak_flops_wall"], probe_after["peak_flops_wall"])
    peak, peak_source = harness_peak(device)

    tokens = args.batch * args.seq_len
    wall = {n: r["wall_s"] for n, r in raw.items()}
    tps = {n: tokens / median(w) for n, w in wall.items()}
    ratios = {"ours_vs_hf_engine": speed_ratio(wall["ours_engine"], wall["hf_engine"])}
    if "ours_plain" in steps:
        ratios["ours_vs_hf_plain"] = speed_ratio(wall["ours_plain"], wall["hf_plain"])
    props = torch.cuda.get_device_properties(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "device_info": {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                        "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                        "cuda": torch.version.cuda},
        "ratio_vs_hf": ratios["ours_vs_hf_engine"],
        "ratios": ratios,
        "tokens_per_s": tps,
        "mfu": {n: fpt[n] * tps[n] / peak for n in steps},
        "mfu_vs_probe": {n: fpt[n] * tps[n] / probe for n in steps},
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "peak_flops_probe_bf16": probe,
        "peak_probe": {"before": probe_before, "after": probe_after},
        "flops_per_token": fpt,
        "headline": "ratio_vs_hf: tokens/s of ours_engine over hf_engine, both trainer.step.train_step on a 1-process "
                    f"DeepSpeed ZeRO-{args.zero_stage} bf16 engine (what trainer.train runs), interleaved rounds, "
                    "median wall time per step after warm-up",
        "mfu_basis": "flops_per_token (model.flops_per_token, the harness's MFU convention) × tokens/s ÷ peak_flops "
                     "(trainer.metrics for this device, as training logs it); mfu_vs_probe divides by a bf16 matmul "
                     "measured in this run instead",
        "config": {"d_model": cfg.model.d_model, "n_heads": cfg.model.n_heads, "n_kv_heads": cfg.model.kv_heads,
                   "ffn_dim": cfg.model.ffn_dim,
                   "vocab_size": cfg.model.vocab_size, "n_layers": args.layers, "seq_len": args.seq_len,
                   "batch": args.batch, "tokens_per_step": tokens, "zero_stage": args.zero_stage,
                   "precision": "bf16", "hf_attn_implementation": attn_impl, "warmup_rounds": args.warmup,
                   "measured_rounds": args.reps, "num_params": ours.num_params(),
                   "recipe_options": None if args.no_recipe else {
                       "norm": recipe_cfg.model.norm, "embed_norm": recipe_cfg.model.embed_norm,
                       "ln_scaling": recipe_cfg.model.ln_scaling, "value_residual": recipe_cfg.model.value_residual,
                       "mod_capacity": recipe_cfg.model.mod.capacity}},
        "first_step_loss": {n: s.losses[0] for n, s in steps.items()},
        "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "raw": {n: {"wall_s": wall[n], "losses": steps[n].losses} for n in steps},
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"benchmarks.{NAME} needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
              "nothing was measured", file=sys.stderr)
        return 1
    result = {"benchmark": NAME, "command": command_line(NAME, argv), "machine": machine_info(), **measure(args)}
    assert all(math.isfinite(v) for v in result["first_step_loss"].values()), result["first_step_loss"]
    path = write_result(NAME, result, args.out)
    print_summary(path, ["device", "ratio_vs_hf", "peak_flops"])
    print(f"tokens/s {result['tokens_per_s']}\nmfu {result['mfu']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
