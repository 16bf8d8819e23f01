"""Growth efficiency: FLOPs a grown run needs to reach a full-depth baseline's final val loss.

    python -m benchmarks.growth [--quick]

A full-depth model (8 layers) trains from scratch to a fixed FLOP budget. Grown runs start at
4 layers and grow to 8 at a fraction of the budget, each method and schedule its own run, and
train to the *same* FLOP budget (so their LR schedule has the same shape and more steps). For
each we report `flops_ratio_to_target` = FLOPs spent when its val loss first reaches the
baseline's final val loss ÷ the baseline's FLOPs (None if it never does). Goal ≤ 0.8.
Writes benchmarks/results/growth.json and growth_loss_vs_flops.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, SHAKESPEARE, flops_per_token, machine_info, repo_relative, run_config

DIMS = {"model.d_model": 128, "model.n_heads": 4, "model.n_kv_heads": 2, "model.vocab_size": 1024,
        "model.max_seq_len": 128, "data.seq_len": 128, "parallel.micro_batch": 16, "optim.lr": 3e-3,
        "schedule.warmup_steps": 20, "logging.wandb_mode": "disabled", "logging.progress": "false",
        "logging.every": 1, "checkpoint.every": 0, "data.max_docs": 0, "logging.peak_flops": 1e12}
FULL, SHALLOW = 8, 4


def depth_flops_per_token(n_layers: int) -> float:
    return flops_per_token(run_config({**DIMS, "model.n_layers": n_layers}))


def run(name: str, out: Path, steps: int, eval_every: int, source: str, extra: dict) -> tuple[list[dict], str]:
    over = {**DIMS, "run.out_dir": repo_relative(out), "run.name": name, "run.max_steps": steps, "run.eval_every": eval_every,
            "run.eval_batches": 8, "data.source": source, "data.cache_dir": repo_relative(out / ".cache"), **extra}
    cmd = [sys.executable, "-m", "trainer.train", "configs/tiny.yaml", *[f"{k}={v}" for k, v in over.items()]]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows, " ".join(["python", *cmd[1:]])


def flops_curve(rows: list[dict], tokens_per_step: int, fpt: dict[int, float]) -> list[tuple[int, float, float]]:
    """(step, cumulative FLOPs, val_loss) at each eval, FLOPs summed at each step's depth."""
    depth, spent, out = {}, 0.0, []
    for r in rows:
        if "loss" in r:
            depth[r["step"]] = r["n_layers"]
    last_step = 0
    for r in rows:
        if "val_loss" in r:
            for s in range(last_step + 1, r["step"] + 1):
                spent += fpt[depth.get(s, r["n_layers"])] * tokens_per_step
            last_step = r["step"]
            out.append((r["step"], spent, r["val_loss"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="baseline steps (sets the FLOP budget)")
    ap.add_argument("--quick", action="store_true", help="a 60-step smoke run")
    ap.add_argument("--variants", default="stack:0.25,stack:0.35,interleave:0.35,identity:0.35",
                    help="method:fraction-of-budget-before-growing, comma separated")
    ap.add_argument("--out", type=Path, default=RESULTS / "growth_runs")
    args = ap.parse_args(argv)
    steps = 60 if args.quick else args.steps
    eval_every = max(5, steps // 30)
    source = repo_relative(SHAKESPEARE) if SHAKESPEARE.exists() else "embedded"
    fpt = {FULL: depth_flops_per_token(FULL), SHALLOW: depth_flops_per_token(SHALLOW)}
    tokens_per_step = DIMS["parallel.micro_batch"] * DIMS["data.seq_len"]
    budget = fpt[FULL] * tokens_per_step * steps
    t0 = time.time()

    base_rows, base_cmd = run("baseline", args.out, steps, eval_every, source, {"model.n_layers": FULL})
    base_curve = flops_curve(base_rows, tokens_per_step, fpt)
    target = base_curve[-1][2]
    results = {"baseline": {"n_layers": FULL, "steps": steps, "flops": budget, "final_val_loss": target,
                            "command": base_cmd, "curve": base_curve}}

    variants = [(m, float(f)) for m, f in (v.split(":") for v in args.variants.split(","))]
    for method, frac in variants:
        grow_flops = frac * budget  # FLOPs spent shallow before growing
        at_step = int(grow_flops / (fpt[SHALLOW] * tokens_per_step))
        total = at_step + int((budget - at_step * fpt[SHALLOW] * tokens_per_step) / (fpt[FULL] * tokens_per_step))
        name = f"{method}-{int(frac * 100)}"
        rows, cmd = run(name, args.out, total, eval_every, source, {
            "model.n_layers": SHALLOW,
            "growth.stages": f"[{{at_step: {at_step}, layers: {FULL}, method: {method}}}]"})
        curve = flops_curve(rows, tokens_per_step, fpt)
        reached = next((f for _, f, v in curve if v <= target), None)
        results[name] = {"method": method, "grow_at_fraction_of_budget": frac, "at_step": at_step, "steps": total,
                         "final_val_loss": curve[-1][2], "flops_to_target": reached,
                         "flops_ratio_to_target": None if reached is None else reached / budget,
                         "command": cmd, "curve": curve}

    grown = {k: v for k, v in results.items() if k != "baseline"}
    ok = {k: v["flops_ratio_to_target"] for k, v in grown.items() if v["flops_ratio_to_target"] is not None}
    best = min(ok, key=ok.get) if ok else None
    summary = {
        "benchmark": "growth",
        "command": "python -m benchmarks.growth " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "data": source,
        "dims": DIMS, "full_layers": FULL, "shallow_layers": SHALLOW,
        "flops_ratio_to_target": ok.get(best) if best else None,
        "best": best,
        "goal": "<= 0.8",
        "meets_goal": [k for k, v in ok.items() if v <= 0.8],
        "misses_goal": [k for k in grown if k not in ok or ok[k] > 0.8],
        "runs": results,
        "wall_s": time.time() - t0,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "growth_quick" if args.quick else "growth"
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1))
    _plot(results, RESULTS / f"{name}_loss_vs_flops.png")
    print(json.dumps({k: summary[k] for k in ("flops_ratio_to_target", "best", "meets_goal", "misses_goal")}))
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        xs, ys = [c[1] for c in r["curve"]], [c[2] for c in r["curve"]]
        ax.plot(xs, ys, label=name, lw=2.5 if name == "baseline" else 1.2)
    ax.axhline(results["baseline"]["final_val_loss"], color="gray", ls=":", lw=1)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("val loss")
    ax.set_title(f"depth growth {SHALLOW}->{FULL} layers vs full depth from scratch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
