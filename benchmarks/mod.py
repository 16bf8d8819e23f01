"""Mixture-of-Depths training speed-up over the dense model with the same dims.

    python -m benchmarks.mod [--batch 2] [--threads 1] [--reps 8] [--no-profile]

d_model 384, 8 layers, 6 heads, seq 512, vocab 4096, fp32 CPU; MoD routes every other block
(2, 4, 6, 8) at capacity 0.125 (k = 64 of 512 tokens), causal rule `aux_loss`.
Four steps run interleaved, round after round:
  dense_engine / mod_engine: `trainer.step.train_step` on a 1-process DeepSpeed engine (ZeRO-0,
      fp32), as trainer.train runs it; the aux BCE is part of MoD's loss. Headline `speedup`.
  dense_plain / mod_plain: the same loss (CE + aux_weight·aux) / tokens in a bare loop with
      torch AdamW, without DeepSpeed's per-step overhead.
`flop_ideal` = dense flops_per_token ÷ MoD flops_per_token (the FLOP counter's view, which
excludes norms, softmax, CE, routing and the optimizer); `measured_over_ideal` = speedup ÷
flop_ideal. One profiled plain step of each splits MoD's time by phase and operator, and sums
the routing machinery (router logits' top-k and sort, gathers and scatters, aux BCE).
Writes benchmarks/results/mod.json.
"""
from __future__ import annotations

import sys

import torch.nn.functional as F

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
from model import Routing

NAME = "mod"
DIMS = dict(d_model=384, n_layers=8, n_heads=6, n_kv_heads=6, vocab_size=4096, seq_len=512)
MOD = {"model.mod.capacity": 0.125, "model.mod.every": 2}
# Operators only a routed block runs (forward and their backward formulas).
ROUTING_OPS = ("aten::topk", "aten::sort", "aten::gather", "aten::scatter", "aten::scatter_", "aten::scatter_add",
               "aten::scatter_add_", "aten::binary_cross_entropy_with_logits", "aten::zeros_like", "aten::expand",
               "aten::sigmoid", "aten::new_zeros", "aten::index_select")


def routing_ms(profile: dict, name: str) -> dict:
    ops = profile["self_ms_by_op"][name]
    found = {k: v for k, v in ops.items() if k in ROUTING_OPS or k.split("::")[-1].startswith(("scatter", "gather"))}
    return {"total_ms": round(sum(found.values()), 2), "by_op": found}


def measure(dims: dict, batch: int, threads: int, warmup: int, reps: int, profile: bool = True) -> dict:
    """The benchmark proper, without the CLI: returns the JSON payload (minus machine/command)."""
    from trainer.parallel.dist import init_distributed
    from trainer.parallel.engine import build_engine, build_model

    set_threads(threads)
    common = {"model.d_model": dims["d_model"], "model.n_layers": dims["n_layers"], "model.n_heads": dims["n_heads"],
              "model.n_kv_heads": dims["n_kv_heads"], "model.vocab_size": dims["vocab_size"],
              "model.max_seq_len": dims["seq_len"], "data.seq_len": dims["seq_len"], "parallel.micro_batch": batch,
              "parallel.grad_accum": 1, "parallel.zero_stage": 0, "parallel.precision": "fp32", "parallel.sp": 1}
    cfgs = {"dense": run_config(common), "mod": run_config({**common, **MOD})}
    dist = init_distributed("gloo", 1)
    data = FixedBatch(dims["vocab_size"], batch, dims["seq_len"])
    x, y = data.inputs, data.labels
    models, steps = {}, {}
    for kind, cfg in cfgs.items():
        models[kind] = build_model(cfg, cfg.model.n_layers)
        steps[f"{kind}_engine"] = engine_train_step(build_engine(cfg, dist, build_model(cfg, cfg.model.n_layers)),
                                                    data, dist, cfg)

    def loss_fn(aux_weight):  # train_step's loss: (Σ CE + aux_weight · aux) / tokens
        def f(model):
            routing = Routing()
            logits = model(x, routing=routing)
            aux = routing.aux_loss()
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
            return (ce + aux_weight * aux) / y.numel()
        return f

    for kind, cfg in cfgs.items():
        steps[f"{kind}_plain"] = plain_train_step(models[kind], loss_fn(cfg.model.mod.aux_weight), cfg)
    steps = {k: steps[k] for k in ("dense_engine", "mod_engine", "dense_plain", "mod_plain")}
    raw = interleave(steps, warmup, reps)

    T = dims["seq_len"]
    fpt = {k: m.flops_per_token(T) for k, m in models.items()}
    flop_ideal = fpt["dense"] / fpt["mod"]
    engine, plain = speedups(raw, "mod_engine", "dense_engine"), speedups(raw, "mod_plain", "dense_plain")
    tokens = batch * T
    out = {
        "speedup": engine["cpu_time"],
        "flop_ideal": flop_ideal,
        "measured_over_ideal": engine["cpu_time"] / flop_ideal,
        "speedup_wall": engine["wall"],
        "speedup_plain": plain["cpu_time"],
        "measured_over_ideal_plain": plain["cpu_time"] / flop_ideal,
        "headline": "speedup: mod_engine vs dense_engine, both trainer.step.train_step on a 1-process DeepSpeed "
                    "ZeRO-0 fp32 engine, interleaved, medians after warm-up; speedup_plain: the same pair in a bare "
                    "torch loop. Basis: " + HEADLINE_BASIS,
        "ratios": {"mod_vs_dense_engine": engine, "mod_vs_dense_plain": plain},
        "tokens_per_s": {n: tokens / median(r["wall_s"]) for n, r in raw.items()},
        "tokens_per_cpu_s": {n: tokens / median(r["cpu_s"]) for n, r in raw.items()},
        "config": {**dims, "mod": {"capacity": MOD["model.mod.capacity"], "every": MOD["model.mod.every"],
                                   "routed_blocks": [i for i in range(1, dims["n_layers"] + 1)
                                                     if cfgs["mod"].model.is_routed(i)],
                                   "causal": cfgs["mod"].model.mod.causal,
                                   "route_chunks": cfgs["mod"].model.mod.route_chunks},
                   "ffn_dim": cfgs["dense"].model.ffn_dim, "batch": batch, "tokens_per_step": tokens,
                   "threads": threads, "dtype": "float32", "device": "cpu", "zero_stage": 0,
                   "warmup_rounds": warmup, "measured_rounds": reps,
                   "flops_per_token": fpt, "num_params": {k: m.num_params() for k, m in models.items()}},
        "raw": {n: {**raw[n], "losses": steps[n].losses} for n in steps},
    }
    if profile:
        prof = op_profile({"mod_plain": steps["mod_plain"], "dense_plain": steps["dense_plain"]})
        prof["routing_ops_mod_plain"] = routing_ms(prof, "mod_plain")
        out["profile"] = prof
    return out


def main(argv=None) -> int:
    ap = timing_parser(NAME, __doc__)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    result = {"benchmark": NAME, "command": command_line(NAME, argv), "machine": machine_info(),
              **measure({**DIMS, **args.dims}, args.batch, args.threads, args.warmup, args.reps,
                         not args.no_profile)}
    path = write_result(NAME, result, args.out)
    print_summary(path, ["speedup", "speedup_wall", "flop_ideal", "measured_over_ideal", "speedup_plain"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
