"""Architecture ablation: every `configs/ablations/*.yaml` but base, trained by the real entry
point on the same data and seed, one after another.

    python -m benchmarks.ablate [--source PATH] [--steps-scale X] [--only a,b] [--report-only]

Budgets. Dense variants train for base's steps, so they see the same tokens. Variants with
Mixture-of-Depths (capacity > 0) are iso-FLOP: their steps are base FLOPs / (their
flops_per_token × tokens per step), computed here from `Transformer.flops_per_token` and
passed as `run.max_steps`, so the configs hold no hand-computed step count.

Each run's subprocess gets OMP_NUM_THREADS=1 unless the caller sets it: on a 2-core machine
shared with other work, two OpenMP threads per process measured ~8× slower than one.

Writes benchmarks/results/ablation.json (per variant: final and best val loss, median tokens/s,
total FLOPs, tokens, steps, command), ablation.md (the table), ablation_val_vs_tokens.png,
ablation_val_vs_flops.png and ablation_diagnostics.png (trainer/diagnostics.py's per-layer
profiles at each run's last diag step); the runs live in benchmarks/results/ablation_runs/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, flops_per_token

CONFIGS = ROOT / "configs" / "ablations"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
REFERENCE = "pre_ln"  # the variant the table's deltas are relative to


def _rel(path: Path) -> str:
    """`path` relative to the repository when inside it (commands read as a user types them)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def variant_configs(only: list[str] | None = None) -> list[Path]:
    # The reference first and everything-on last, so the table reads as base -> single options -> all.
    paths = sorted((p for p in CONFIGS.glob("*.yaml") if p.stem != "base"),
                   key=lambda p: (p.stem != REFERENCE, p.stem == "all_on", p.stem))
    if only:
        unknown = set(only) - {p.stem for p in paths}
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {sorted(unknown)}; have {[p.stem for p in paths]}")
        paths = [p for p in paths if p.stem in only]
    return paths


def plan(paths: list[Path], common: list[str], scale: float) -> tuple[dict, list[dict]]:
    """The shared budget and, per variant, its steps and overrides."""
    from trainer.config import load_config

    base = load_config(CONFIGS / "base.yaml", common)
    tokens_per_step = base.parallel.micro_batch * base.parallel.grad_accum * base.data.seq_len
    base_steps = max(1, round(base.run.max_steps * scale))
    base_fpt = flops_per_token(base)
    budget = {"steps": base_steps, "tokens_per_step": tokens_per_step, "tokens": base_steps * tokens_per_step,
              "flops": base_fpt * tokens_per_step * base_steps, "flops_per_token": base_fpt}
    cadence = {"run.eval_every": max(1, round(base.run.eval_every * scale)),
               "logging.diag_every": max(1, round(base.logging.diag_every * scale)),
               "schedule.warmup_steps": max(1, round(base.schedule.warmup_steps * scale))}
    runs = []
    for path in paths:
        cfg = load_config(path, common)
        fpt = flops_per_token(cfg)
        iso_flop = cfg.model.mod.capacity > 0
        steps = round(budget["flops"] / (fpt * tokens_per_step)) if iso_flop else base_steps
        runs.append({"variant": path.stem, "config": str(path.relative_to(ROOT)), "run_name": cfg.run.name,
                     "budget": "iso-FLOP" if iso_flop else "iso-token", "steps": steps,
                     "flops_per_token": fpt, "overrides": [*common, f"run.max_steps={steps}",
                                                           *[f"{k}={v}" for k, v in cadence.items()]]})
    return budget, runs


def throughput_probe(runs: list[dict], threads: int, rounds: int = 5, steps: int = 2) -> dict[str, float]:
    """Forward+backward tokens/s of each variant's model on one random batch, measured in this
    process in interleaved rounds (median), so that other work on a shared machine slows every
    variant alike; the training runs' own tokens/s are taken minutes apart."""
    import torch
    import torch.nn.functional as F

    from model import Routing, Transformer
    from trainer.config import load_config

    torch.set_num_threads(threads)
    models, times = {}, {run["variant"]: [] for run in runs}
    for run in runs:
        cfg = load_config(ROOT / run["config"], run["overrides"])
        torch.manual_seed(cfg.run.seed)
        batch = torch.randint(0, cfg.model.vocab_size, (cfg.parallel.micro_batch, cfg.data.seq_len))
        models[run["variant"]] = (Transformer(cfg.model), batch, cfg.model.mod.aux_weight)

    def step(model, batch, aux_weight):
        routing = Routing()
        logits = model(batch, routing=routing)
        aux = routing.aux_loss()
        loss = F.cross_entropy(logits.flatten(0, 1), batch.flatten()) + aux_weight * aux / batch.numel()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for name, args in models.items():
        step(*args)  # warm-up
    for _ in range(rounds):
        for name, args in models.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step(*args)
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: models[name][1].numel() / statistics.median(t) for name, t in times.items()}


def train(run: dict, out: Path, env: dict) -> float:
    """Fresh run of one variant (an old run dir would be resumed, so it is removed)."""
    run_dir = out / run["run_name"]
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "trainer.train", run["config"], *run["overrides"]]
    run["command"] = " ".join(["python", *cmd[1:]])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / f"{run['variant']}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{run['variant']} failed (exit {proc.returncode}); see {out / (run['variant'] + '.log')}")
    return time.perf_counter() - t0


def summarise(run: dict, out: Path, tokens_per_step: int) -> dict:
    rows = [json.loads(line) for line in (out / run["run_name"] / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    evals = [r for r in rows if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 1]
    steps = max(r["step"] for r in rows)
    fpt = run["flops_per_token"]
    res = {k: run[k] for k in ("budget", "steps", "flops_per_token", "config")}
    res.update({
        "final_val_loss": evals[-1]["val_loss"], "best_val_loss": min(r["val_loss"] for r in evals),
        "final_train_loss": [r["loss"] for r in rows if "loss" in r][-1],
        "tokens_per_s_median": statistics.median(speeds) if speeds else None,
        "tokens": steps * tokens_per_step, "total_flops": fpt * steps * tokens_per_step,
        "curve": [{"step": r["step"], "tokens": r["step"] * tokens_per_step,
                   "flops": fpt * r["step"] * tokens_per_step, "val_loss": r["val_loss"]} for r in evals],
        "run_dir": _rel(out / run["run_name"]), "command": run.get("command", ""),
    })
    if "val_loss_causal" in evals[-1]:  # MoD: the causal routing rule, as generation would use it
        res["final_val_loss_causal"] = evals[-1]["val_loss_causal"]
    return res


def markdown(report: dict) -> str:
    ref = report["variants"].get(REFERENCE, {})
    b = report["budget"]
    lines = [f"# Ablation ({b['tokens']:,} tokens / {b['flops']:.3g} FLOPs per dense run, "
             f"source `{report['source']}`)", "",
             "| variant | budget | steps | tokens | FLOPs | final val loss | Δ vs pre_ln | best val loss "
             "| tokens/s (run) | tokens/s (probe) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in report["variants"].items():
        delta = v["final_val_loss"] - ref["final_val_loss"] if ref else float("nan")
        causal = f" (causal rule {v['final_val_loss_causal']:.4f})" if "final_val_loss_causal" in v else ""
        speed = f"{v['tokens_per_s_median']:.0f}" if v["tokens_per_s_median"] else "-"
        probe = v.get("probe_tokens_per_s")
        probe = f"{probe:.0f} ({probe / ref['probe_tokens_per_s']:.2f}×)" if probe and ref.get("probe_tokens_per_s") else "-"
        lines.append(f"| {name} | {v['budget']} | {v['steps']} | {v['tokens']:,} | {v['total_flops']:.3g} | "
                     f"{v['final_val_loss']:.4f}{causal} | {delta:+.4f} | {v['best_val_loss']:.4f} | {speed} | {probe} |")
    lines += ["", f"tokens/s (run): median over the training run's steps, variants run minutes apart; "
              f"tokens/s (probe): forward+backward of one batch, all variants interleaved in one process "
              f"(ratio to {REFERENCE}). Steps scale {report['steps_scale']}, "
              f"OMP_NUM_THREADS={report['omp_num_threads']}, {report['cpus']} CPUs, 1-min load average "
              f"{report['load_avg_start']} at start and {report['load_avg_end']} at end.", ""]
    return "\n".join(lines)


def plot_curves(report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for axis, label, name in (("tokens", "training tokens", "ablation_val_vs_tokens.png"),
                              ("flops", "training FLOPs", "ablation_val_vs_flops.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant, v in report["variants"].items():
            ax.plot([p[axis] for p in v["curve"]], [p["val_loss"] for p in v["curve"]], marker=".", label=variant)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.set_title(f"ablation: validation loss vs {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / name, dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", help="data.source for every variant (default: tinyshakespeare at ../shared/data, "
                                     "else the embedded corpus)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply steps and cadences (e.g. 0.05 to check)")
    ap.add_argument("--only", help="comma-separated variants to run (default: all)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from existing runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "ablation_runs", help="run.out_dir of the runs")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    if args.source:
        source = args.source
    elif SHAKESPEARE.exists():
        source = str(SHAKESPEARE)
    else:
        source = "embedded"
        print(f"note: {SHAKESPEARE} not found; using the embedded corpus (the stdlib sources) instead")
    out = args.out.resolve()
    common = [f"run.out_dir={_rel(out)}", f"data.source={source}", "logging.progress=false", "logging.every=1"]
    budget, runs = plan(variant_configs(args.only.split(",") if args.only else None), common, args.steps_scale)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    env.setdefault("OMP_NUM_THREADS", "1")
    print(f"budget per dense run: {budget['steps']} steps, {budget['tokens']:,} tokens, {budget['flops']:.3g} FLOPs")
    load_start = os.getloadavg()[0]
    report = {"source": source, "steps_scale": args.steps_scale, "budget": budget, "cpus": os.cpu_count(),
              "omp_num_threads": env["OMP_NUM_THREADS"], "load_avg_start": round(load_start, 2), "variants": {}}
    previous = json.loads((RESULTS / "ablation.json").read_text()) if args.report_only and \
        (RESULTS / "ablation.json").is_file() else {}
    for i, run in enumerate(runs, start=1):
        print(f"[{i}/{len(runs)}] {run['variant']}: {run['budget']}, {run['steps']} steps", end="", flush=True)
        if not args.report_only:
            run["wall_s"] = round(train(run, out, env), 1)
        else:  # keep what the training pass recorded
            before = previous.get("variants", {}).get(run["variant"], {})
            run["command"] = before.get("command") or " ".join(["python -m trainer.train", run["config"],
                                                                 *run["overrides"]])
            if "wall_s" in before:
                run["wall_s"] = before["wall_s"]
        report["variants"][run["variant"]] = summarise(run, out, budget["tokens_per_step"])
        if "wall_s" in run:
            report["variants"][run["variant"]]["wall_s"] = run["wall_s"]
        print(f" -> val loss {report['variants'][run['variant']]['final_val_loss']:.4f}"
              + (f" in {run['wall_s']:.0f}s" if "wall_s" in run else ""), flush=True)
    if previous:
        report["load_avg_start"], report["load_avg_end"] = previous["load_avg_start"], previous["load_avg_end"]
    else:
        report["load_avg_end"] = round(os.getloadavg()[0], 2)
    print("throughput probe (variants interleaved) ...", flush=True)
    for name, tps in throughput_probe(runs, int(env["OMP_NUM_THREADS"])).items():
        report["variants"][name]["probe_tokens_per_s"] = tps

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ablation.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "ablation.md").write_text(markdown(report))
    plot_curves(report)
    from benchmarks.plot_diagnostics import plot_compare, plot_run

    run_dirs = [ROOT / v["run_dir"] for v in report["variants"].values()]
    for run_dir in run_dirs:
        plot_run(run_dir)
    plot_compare(run_dirs, RESULTS / "ablation_diagnostics.png", labels=list(report["variants"]))
    print(markdown(report))
    print(f"wrote {RESULTS / 'ablation.json'}, ablation.md and PNGs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
