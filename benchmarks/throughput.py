"""Training throughput of our model against HF transformers' LlamaForCausalLM, same dims.

    python -m benchmarks.throughput [--batch 2] [--threads 1] [--reps 8] [--no-profile] [--no-compile]

All model options off (pre-LN RMSNorm, SwiGLU, RoPE, untied head), fp32 on CPU, identical
dims, batch, thread count and optimizer (torch AdamW with param_groups' weight decay split,
the config's lr/betas/eps, clipping at optim.grad_clip); HF runs with attn_implementation="sdpa"
and starts from our weights (trainer.export's name map), so the first losses must agree.

Five steps run interleaved, round after round:
  ours_engine / hf_engine: `trainer.step.train_step` through a 1-process DeepSpeed engine
      (ZeRO-0, fp32) exactly as `trainer.train` runs it: forward, CE sum / tokens, backward,
      clip, SkipNonFiniteAdamW. HF goes through the same engine and step behind a thin
      adapter, so the pair differs only in the model. This pair is the headline `ratio_vs_hf`.
  ours_plain / hf_plain: the same math in a bare loop (model, F.cross_entropy, backward,
      clip_grad_norm_, torch.optim.AdamW), without DeepSpeed.
  ours_compiled_engine: ours_engine with `parallel.compile=true` (each block through
      torch.compile/inductor; embedding, head, loss and optimizer eager), same weights.
      `ratio_compiled_vs_eager` = its speed over ours_engine, `ratio_compiled_vs_hf` over
      hf_engine. Compilation happens in the warm-up rounds and is not timed (`--no-compile`
      drops this step).
`mfu` = flops_per_token · tokens per CPU-second ÷ an fp32 matmul probe's FLOPs per CPU-second
at the same thread count (`mfu_wall`: both by wall time). Profiled steps break ours vs HF
(plain and engine) and engine vs plain down by operator.
Writes benchmarks/results/throughput.json.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    HEADLINE_BASIS,
    FixedBatch,
    command_line,
    engine_train_step,
    interleave,
    machine_info,
    median,
    op_profile,
    plain_train_step,
    print_summary,
    run_config,
    set_threads,
    speedups,
    timing_parser,
    write_result,
)
from trainer.metrics import matmul_probe
from trainer.parallel.engine import adamw_kernel

NAME = "throughput"
DIMS = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=4096, seq_len=256)


class HFAdapter(nn.Module):
    """LlamaForCausalLM behind our model's call signature, so `train_step` drives it unchanged."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, position_ids=None, routing=None):
        pos = None if position_ids is None else position_ids.expand(input_ids.shape[0], -1)
        return self.hf(input_ids=input_ids, position_ids=pos, use_cache=False).logits


def hf_copy(model) -> nn.Module:
    """A LlamaForCausalLM (sdpa attention) holding `model`'s weights."""
    from transformers import LlamaForCausalLM

    from trainer.export import llama_config, to_llama_state_dict

    hf = LlamaForCausalLM._from_config(llama_config(model.cfg, {}), attn_implementation="sdpa")
    hf.load_state_dict(to_llama_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}))
    return hf.train()


def measure(dims: dict, batch: int, threads: int, warmup: int, reps: int, profile: bool = True,
            probe_n: int = 2048, compiled: bool = True) -> dict:
    """The benchmark proper, without the CLI: returns the JSON payload (minus machine/command)."""
    from trainer.parallel.dist import init_distributed
    from trainer.parallel.engine import build_engine, build_model

    set_threads(threads)
    cfg = run_config(cfg_overrides(dims, batch))
    cfg_compiled = run_config({**cfg_overrides(dims, batch), "parallel.compile": "true"})
    dist = init_distributed("gloo", 1)
    data = FixedBatch(cfg.model.vocab_size, batch, cfg.data.seq_len)
    ours = build_model(cfg, cfg.model.n_layers)
    hf = hf_copy(ours)
    attn_impl = hf.config._attn_implementation
    x, y = data.inputs, data.labels

    def ce(logits):  # sum / tokens, as train_step computes it
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum") / y.numel()

    steps = {
        "ours_engine": engine_train_step(build_engine(cfg, dist, copy.deepcopy(ours)), data, dist, cfg),
        "hf_engine": engine_train_step(build_engine(cfg, dist, HFAdapter(copy.deepcopy(hf))), data, dist, cfg),
        "ours_plain": plain_train_step(ours, lambda m: ce(m(x)), cfg),
        "hf_plain": plain_train_step(hf, lambda m: ce(m(input_ids=x, use_cache=False).logits), cfg),
    }
    if compiled:  # build_model seeds identically, so the compiled model starts from ours' weights
        steps["ours_compiled_engine"] = engine_train_step(
            build_engine(cfg_compiled, dist, build_model(cfg_compiled, cfg.model.n_layers)), data, dist, cfg_compiled)
    peak_before = matmul_probe(torch.device("cpu"), torch.float32, probe_n)
    raw = interleave(steps, warmup, reps)
    peak_after = matmul_probe(torch.device("cpu"), torch.float32, probe_n)
    peak = max(peak_before["peak_flops"], peak_after["peak_flops"])
    peak_wall = max(peak_before["peak_flops_wall"], peak_after["peak_flops_wall"])

    tokens = batch * cfg.data.seq_len
    fpt = ours.flops_per_token(cfg.data.seq_len)
    wall = {n: r["wall_s"] for n, r in raw.items()}
    cpu = {n: r["cpu_s"] for n, r in raw.items()}
    tps = {n: tokens / median(w) for n, w in wall.items()}
    tps_cpu = {n: tokens / median(c) for n, c in cpu.items()}
    r_engine, r_plain = speedups(raw, "ours_engine", "hf_engine"), speedups(raw, "ours_plain", "hf_plain")
    out = {
        "ratio_vs_hf": r_engine["cpu_time"],
        "ratio_vs_hf_wall": r_engine["wall"],
        "ratio_vs_hf_plain_loop": r_plain["cpu_time"],
        "ratio_vs_hf_plain_loop_wall": r_plain["wall"],
        "mfu": fpt * tps_cpu["ours_engine"] / peak,
        "hf_mfu": fpt * tps_cpu["hf_engine"] / peak,
        "mfu_plain": fpt * tps_cpu["ours_plain"] / peak,
        "hf_mfu_plain": fpt * tps_cpu["hf_plain"] / peak,
        "mfu_wall": fpt * tps["ours_engine"] / peak_wall,
        "hf_mfu_wall": fpt * tps["hf_engine"] / peak_wall,
        "peak_flops": peak,
        "peak_flops_wall": peak_wall,
        "headline": "ratio_vs_hf: ours_engine vs hf_engine, both trainer.step.train_step on a 1-process DeepSpeed "
                    "ZeRO-0 fp32 engine (the step trainer.train runs), interleaved, medians after warm-up. "
                    "ratio_vs_hf_plain_loop: the same pair in a bare torch loop. Basis: " + HEADLINE_BASIS,
        "mfu_basis": "mfu = flops_per_token × tokens per CPU-second (median step) ÷ matmul-probe FLOPs per CPU-second "
                     "at the same thread count; mfu_wall uses wall time on both sides (deflated by other processes "
                     "sharing the core)",
        "ratios": {"ours_vs_hf_engine": r_engine, "ours_vs_hf_plain": r_plain,
                   "ours_engine_vs_hf_plain": speedups(raw, "ours_engine", "hf_plain"),
                   "ours_engine_vs_ours_plain": speedups(raw, "ours_engine", "ours_plain"),
                   "hf_engine_vs_hf_plain": speedups(raw, "hf_engine", "hf_plain")},
        "tokens_per_s": tps,
        "tokens_per_cpu_s": tps_cpu,
        "config": {**dims, "n_kv_heads": cfg.model.kv_heads, "ffn_dim": cfg.model.ffn_dim, "batch": batch,
                   "tokens_per_step": tokens, "threads": threads, "dtype": "float32", "device": "cpu",
                   "hf_attn_implementation": attn_impl, "optimizer": {
                       "class": "torch.optim.AdamW (engine: trainer.parallel.optim.SkipNonFiniteAdamW, a subclass)",
                       "kernel": adamw_kernel(torch.device("cpu")),
                       "lr": cfg.optim.lr, "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": cfg.optim.eps,
                       "weight_decay": cfg.optim.weight_decay, "grad_clip": cfg.optim.grad_clip},
                   "zero_stage": 0, "warmup_rounds": warmup, "measured_rounds": reps,
                   "flops_per_token": fpt, "num_params": ours.num_params(),
                   "num_params_non_embedding": ours.num_params(non_embedding=True)},
        "peak_probe": {"before": peak_before, "after": peak_after, "peak_flops_used": peak},
        "first_step_loss": {n: s.losses[0] for n, s in steps.items()},
        "raw": {n: {"wall_s": wall[n], "cpu_s": cpu[n], "losses": steps[n].losses} for n in steps},
    }
    if compiled:
        r_comp = speedups(raw, "ours_compiled_engine", "ours_engine")
        r_comp_hf = speedups(raw, "ours_compiled_engine", "hf_engine")
        out.update({
            "ratio_compiled_vs_eager": r_comp["cpu_time"], "ratio_compiled_vs_eager_wall": r_comp["wall"],
            "ratio_compiled_vs_hf": r_comp_hf["cpu_time"], "ratio_compiled_vs_hf_wall": r_comp_hf["wall"],
            "mfu_compiled": fpt * tps_cpu["ours_compiled_engine"] / peak,
            "mfu_compiled_wall": fpt * tps["ours_compiled_engine"] / peak_wall,
            "compiled_targets": {"ratio_compiled_vs_eager": ">= 1.10", "ratio_compiled_vs_hf": ">= 1.15"},
        })
        out["ratios"].update({"ours_compiled_vs_ours_engine": r_comp, "ours_compiled_vs_hf_engine": r_comp_hf})
    if profile:
        out["profile"] = {
            "ours_vs_hf_plain": op_profile({"ours_plain": steps["ours_plain"], "hf_plain": steps["hf_plain"]}),
            "ours_vs_hf_engine": op_profile({"ours_engine": steps["ours_engine"], "hf_engine": steps["hf_engine"]}),
            "engine_vs_plain_ours": op_profile({"ours_engine": steps["ours_engine"], "ours_plain": steps["ours_plain"]}),
        }
        if compiled:
            prof = op_profile({"ours_compiled_engine": steps["ours_compiled_engine"], "ours_engine": steps["ours_engine"]})
            out["profile"]["compiled_vs_eager_ours"] = prof
            out["compile_ceiling"] = compile_ceiling(out["profile"]["ours_vs_hf_engine"]["self_ms_by_op"]["ours_engine"])
    return out


def compile_ceiling(self_ms: dict[str, float]) -> dict:
    """How much compiling the blocks could buy at most: inductor leaves matmuls and the SDPA
    kernels to the same aten/oneDNN calls, so the eager step's time outside them bounds the
    gain (`ceiling` = step ÷ (matmul + SDPA), were every other op fused away)."""
    kernel = sum(v for k, v in self_ms.items() if k in ("aten::mm", "aten::addmm", "aten::bmm")
                 or k.startswith("aten::_scaled_dot_product"))
    total = sum(self_ms.values())
    return {"matmul_and_sdpa_share_of_eager_step": kernel / total, "ceiling": total / kernel,
            "basis": "eager ours_engine profile (self CPU ms by operator, min over reps)"}


def cfg_overrides(dims: dict, batch: int) -> dict:
    return {"model.d_model": dims["d_model"], "model.n_layers": dims["n_layers"], "model.n_heads": dims["n_heads"],
            "model.n_kv_heads": dims["n_kv_heads"], "model.vocab_size": dims["vocab_size"],
            "model.max_seq_len": dims["seq_len"], "data.seq_len": dims["seq_len"], "parallel.micro_batch": batch,
            "parallel.grad_accum": 1, "parallel.zero_stage": 0, "parallel.precision": "fp32", "parallel.sp": 1}


def main(argv=None) -> int:
    ap = timing_parser(NAME, __doc__, batch_help="micro batch (default 2: ~1.5 s/step on one core)")
    ap.add_argument("--probe-n", type=int, default=2048, help="matmul size of the peak-FLOPs probe")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled step (no inductor compile)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    result = {"benchmark": NAME, "command": command_line(NAME, argv), "machine": machine_info(),
              **measure({**DIMS, **args.dims}, args.batch, args.threads, args.warmup, args.reps,
                         not args.no_profile, args.probe_n, not args.no_compile)}
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    path = write_result(NAME, result, args.out)
    print_summary(path, ["ratio_vs_hf", "ratio_vs_hf_wall", "ratio_vs_hf_plain_loop", "mfu", "hf_mfu", "peak_flops",
                         "ratio_compiled_vs_eager", "ratio_compiled_vs_hf", "mfu_compiled"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
