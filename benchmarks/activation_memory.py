"""Activation memory and step time under `parallel.activation_checkpointing`: none, full, every_2.

    python -m benchmarks.activation_memory [--batch 2] [--reps 6]

The model is built by `trainer.parallel.engine.build_model` with each mode (the path `trainer.train`
takes), same seed and weights, fp32 on CPU, one intra-op thread, dims as benchmarks.throughput.

Memory (`act_peak_mb`). One forward + backward (CE loss) per mode under
`torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True)`; torch's
memory profiler (`prof._memory_profile()`, `MemoryProfileTimeline`) turns the allocator events
into a timeline of live tensor bytes on the CPU. A warm-up step first allocates every parameter
gradient, and gradients are zeroed in place (set_to_none=False), so the pre-step level holds
parameters and gradients and the step's excess over it is what the step itself allocates:
saved activations, checkpointed inputs, recomputed activations and autograd temporaries.
`act_peak_mb` = max over the step of live tensor bytes − the pre-step level. Exact for
tensors (each allocation and free is an event) and free of glibc's heap caching, unlike RSS.
The profiler's own categories (ACTIVATION, AUTOGRAD_DETAIL, TEMPORARY) are recorded beside it.

Time (`step_time_ratio_vs_none`). The full training step through `trainer.step.train_step` on a
1-process DeepSpeed ZeRO-0 engine (forward, backward, clip, AdamW), the modes interleaved round
after round (order alternating), median process CPU time after warm-up; wall time beside it.
Writes benchmarks/results/activation_memory.json.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import (
    FixedBatch,
    command_line,
    engine_train_step,
    interleave,
    machine_info,
    median,
    print_summary,
    run_config,
    set_threads,
    speedups,
    timing_parser,
    write_result,
)
from benchmarks.throughput import DIMS

NAME = "activation_memory"
MODES = ("none", "full", "every_2")


def overrides(dims: dict, batch: int, mode: str) -> dict:
    return {"model.d_model": dims["d_model"], "model.n_layers": dims["n_layers"], "model.n_heads": dims["n_heads"],
            "model.n_kv_heads": dims["n_kv_heads"], "model.vocab_size": dims["vocab_size"],
            "model.max_seq_len": dims["seq_len"], "data.seq_len": dims["seq_len"], "parallel.micro_batch": batch,
            "parallel.grad_accum": 1, "parallel.zero_stage": 0, "parallel.precision": "fp32", "parallel.sp": 1,
            "parallel.activation_checkpointing": mode}


def step_memory(model: torch.nn.Module, data: FixedBatch) -> dict:
    """Peak live tensor bytes of one forward + backward above the pre-step level (see module doc)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    def fwd_bwd():
        logits = model(data.inputs)
        F.cross_entropy(logits.flatten(0, 1), data.labels.flatten(), reduction="sum").backward()

    fwd_bwd()  # allocates every .grad
    model.zero_grad(set_to_none=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fwd_bwd()
    model.zero_grad(set_to_none=True)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(s) for s in sizes]
    by_category = {(c.name if c is not None else "UNKNOWN"): max(s[i + 1] for s in sizes) / 2**20
                   for c, i in _CATEGORY_TO_INDEX.items()}
    return {"act_peak_mb": (max(totals) - totals[0]) / 2**20, "pre_step_mb": totals[0] / 2**20,
            "category_peaks_mb": by_category}


def measure(dims: dict, batch: int, threads: int, warmup: int, reps: int) -> dict:
    from trainer.parallel.dist import init_distributed
    from trainer.parallel.engine import build_engine, build_model

    set_threads(threads)
    dist = init_distributed("gloo", 1)
    cfgs = {m: run_config(overrides(dims, batch, m)) for m in MODES}
    data = FixedBatch(dims["vocab_size"], batch, dims["seq_len"])
    memory = {m: step_memory(build_model(cfgs[m], dims["n_layers"]), data) for m in MODES}
    steps = {m: engine_train_step(build_engine(cfgs[m], dist, build_model(cfgs[m], dims["n_layers"])), data, dist,
                                  cfgs[m]) for m in MODES}
    raw = interleave(steps, warmup, reps)
    losses = {m: s.losses for m, s in steps.items()}
    ratios = {m: speedups(raw, "none", m) for m in MODES if m != "none"}  # none's speed over m's = m's time ratio
    return {
        "act_memory_ratio_full_vs_none": memory["full"]["act_peak_mb"] / memory["none"]["act_peak_mb"],
        "act_memory_ratio_every_2_vs_none": memory["every_2"]["act_peak_mb"] / memory["none"]["act_peak_mb"],
        "step_time_ratio_full_vs_none": ratios["full"]["cpu_time"],
        "step_time_ratio_every_2_vs_none": ratios["every_2"]["cpu_time"],
        "step_time_ratio_full_vs_none_wall": ratios["full"]["wall"],
        "targets": {"act_memory_ratio_full_vs_none": "<= 0.45", "step_time_ratio_full_vs_none": "<= 1.40"},
        "memory": memory,
        "memory_method": "torch memory profiler (profile_memory + _memory_profile timeline) over one forward+backward "
                         "per mode: peak live CPU tensor bytes minus the pre-step level, parameter gradients "
                         "pre-allocated by a warm-up step and zeroed in place, so the figure is what the step "
                         "allocates (activations, checkpoint inputs, recomputation, autograd temporaries)",
        "time_method": "trainer.step.train_step on a 1-process DeepSpeed ZeRO-0 fp32 engine per mode, interleaved "
                       "(alternating order), median process CPU time per step after warm-up; ratio = mode / none",
        "time_ratios": ratios,
        "step_cpu_s_median": {m: median(r["cpu_s"]) for m, r in raw.items()},
        "losses_identical_across_modes": all(losses[m] == losses["none"] for m in MODES),
        "config": {**dims, "batch": batch, "threads": threads, "dtype": "float32", "device": "cpu",
                   "warmup_rounds": warmup, "measured_rounds": reps,
                   "num_params": build_model(cfgs["none"], dims["n_layers"]).num_params()},
        "raw": {m: {**raw[m], "losses": losses[m]} for m in MODES},
    }


def main(argv=None) -> int:
    ap = timing_parser(NAME, __doc__)
    ap.set_defaults(reps=6)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    result = {"benchmark": NAME, "command": command_line(NAME, argv), "machine": machine_info(),
              **measure({**DIMS, **args.dims}, args.batch, args.threads, args.warmup, args.reps)}
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    path = write_result(NAME, result, args.out)
    print_summary(path, ["act_memory_ratio_full_vs_none", "act_memory_ratio_every_2_vs_none",
                         "step_time_ratio_full_vs_none", "step_time_ratio_every_2_vs_none"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
