"""Architecture ablation with a protocol: every variant in `configs/ablations/` (and the
deep-narrow setting in `configs/ablations/deep/`), trained by the real entry point on each
corpus, at several learning rates and seeds, `--jobs` runs at a time (default 1).

    python -m benchmarks.ablate [--seeds 2] [--lrs 1.5e-3,3e-3,6e-3] [--sources shakespeare,embedded]
                                [--settings default,deep] [--only a,b] [--jobs N] [--steps-scale X]
                                [--extend-edges N] [--report-only] [--rows PATH] [--boot N]

Protocol. Each (setting, corpus, variant, LR, seed) is one run. The tables give every
variant at the shared LR (the base config's) and at its own best LR as mean ± spread over
seeds, and judge each variant against Pre-LN and against Pre-LN + embed_norm with the option
ladder's statistics (benchmarks/ladder/stats.py): seed variance pooled per arm near its best LR,
a best-LR comparison whose 95% interval holds for any shape of the LR curves, and Holm over
every comparison of the report; "better" / "worse" only when the Holm-adjusted p < 5% and the
interval excludes 0, else "undecided". A best LR at the grid's edge is flagged, and
--extend-edges adds LRs beyond it until the optimum is bracketed. The deep setting (24 narrow
layers) adds the Curse-of-Depth measures: the loss with the last quarter of blocks skipped and
the last quarter's mean angular update (trainer/evaluation/diagnostics.py), described, not
tested.

Budgets. Dense variants train for base's steps, so they see the same tokens. Variants with
Mixture-of-Depths (capacity > 0) are iso-FLOP: their steps are base FLOPs / (their
flops_per_token × tokens per step), computed here from `Transformer.flops_per_token` and
passed as `run.max_steps`, so the configs hold no hand-computed step count. MoD's loss is
the causal rule's (what generation uses).

Resumable. Each finished run's summary is written to benchmarks/results/ablation/<setting>/
<corpus>/<variant>/lr<lr>-seed<seed>.json and a rerun skips it, so a sweep longer than one
session continues where it stopped (commit the summaries as they finish); the summaries are
the raw record. Each finished run also appends one row to benchmarks/results/ablation_runs.jsonl
(`row_of`: setting, corpus, arm, size, params, LR, seed, commit, device, val loss...; flushed and
fsync'd, never rewritten). A (setting, corpus, arm, LR, seed) gets one row, its first: a summary
whose key has a row adds none, and every invocation first adds the rows of stored summaries
that have none (in key order; so the runs stored before the file existed were backfilled).
Each run's subprocess gets OMP_NUM_THREADS=1 unless the caller sets it: on a 2-core machine shared
with other work, two OpenMP threads per process measured ~8× slower than one. So on N cores,
`--jobs N` runs N one-thread runs at once; each corpus is prepared once before they start
(`trainer.prepare`), so parallel runs never build the same data cache. The losses do not
depend on --jobs (CPU fp32, fixed seeds), only the wall time does.

Writes benchmarks/results/ablation.json and ablation.md (the tables; `--report-only` rebuilds
them from the stored summaries without training), and, from the shared-LR first-seed runs of the default setting, ablation_val_vs_tokens.png, ablation_val_vs_flops.png
and ablation_diagnostics.png; the run dirs live in benchmarks/results/ablation_runs/.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import ablation_stats
from benchmarks.common import RESULTS, ROOT, SHAKESPEARE, flops_per_token, repo_relative
from benchmarks.ladder import stats

CONFIGS = ROOT / "configs" / "ablations"
SUMMARIES = RESULTS / "ablation"
SETTINGS = {"default": CONFIGS, "deep": CONFIGS / "deep"}
REFERENCE = "pre_ln"  # the variant the table's deltas are relative to
REFS = (REFERENCE, "pre_ln_embed_norm")  # each variant is judged against both (the second: the stronger baseline)
ROWS = RESULTS / "ablation_runs.jsonl"
ROW_KEY = ("setting", "corpus", "arm", "lr", "seed")  # one row per key: a run's summary path says the same
DEPTH_METRICS = {"skip_last_quarter_gap": "loss rise, last quarter skipped",
                 "last_quarter_angle": "last quarter's angle"}


def variant_configs(only: list[str] | None = None, folder: Path = CONFIGS) -> list[Path]:
    """The variants of a setting: the reference first and everything-on last, so the table
    reads base -> single options -> all; with --only, those named, in the order given (the
    order the runs start in, so the most wanted finish first)."""
    paths = sorted((p for p in folder.glob("*.yaml") if p.stem != "base"),
                   key=lambda p: (p.stem != REFERENCE, p.stem == "all_on", p.stem))
    if only:
        unknown = set(only) - {p.stem for p in paths}
        if unknown and folder == CONFIGS:
            raise SystemExit(f"--only: unknown variant(s) {sorted(unknown)}; have {[p.stem for p in paths]}")
        by_name = {p.stem: p for p in paths}
        paths = [by_name[name] for name in only if name in by_name]
    return paths


def model_size(cfg) -> tuple[float, int]:
    """(training FLOPs per token, non-embedding parameters) of the model a RunConfig describes."""
    import torch

    from model import Transformer

    with torch.device("meta"):
        m = Transformer(cfg.model)
    return m.flops_per_token(cfg.data.seq_len), m.num_params(non_embedding=True)


def plan(paths: list[Path], common: list[str], scale: float, folder: Path = CONFIGS) -> tuple[dict, list[dict]]:
    """The shared budget and, per variant, its steps and overrides."""
    from trainer.config import load_config

    base = load_config(folder / "base.yaml", common)
    tokens_per_step = base.parallel.micro_batch * base.parallel.grad_accum * base.data.seq_len
    base_steps = max(1, round(base.run.max_steps * scale))
    base_fpt = flops_per_token(base)
    budget = {"steps": base_steps, "tokens_per_step": tokens_per_step, "tokens": base_steps * tokens_per_step,
              "flops": base_fpt * tokens_per_step * base_steps, "flops_per_token": base_fpt, "lr": base.optim.lr}
    cadence = {"run.eval_every": max(1, round(base.run.eval_every * scale)),
               "logging.diag_every": max(1, round(base.logging.diag_every * scale)),
               "schedule.warmup_steps": max(1, round(base.schedule.warmup_steps * scale))}
    runs = []
    for path in paths:
        cfg = load_config(path, common)
        fpt, params = model_size(cfg)
        iso_flop = cfg.model.mod.capacity > 0
        steps = round(budget["flops"] / (fpt * tokens_per_step)) if iso_flop else base_steps
        runs.append({"variant": path.stem, "config": str(path.relative_to(ROOT)), "run_name": cfg.run.name,
                     "budget": "iso-FLOP" if iso_flop else "iso-token", "steps": steps,
                     "flops_per_token": fpt, "params": params, "overrides": [*common, f"run.max_steps={steps}",
                                                           *[f"{k}={v}" for k, v in cadence.items()]]})
    return budget, runs


def train(run: dict, out: Path, env: dict) -> float:
    """Fresh run of one variant (an old run dir would be resumed, so it is removed)."""
    run_dir = out / run["run_name"]
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "trainer.train", run["config"], *run["overrides"]]
    run["command"] = " ".join(["python", *cmd[1:]])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / f"{run['run_name']}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{run['run_name']} failed (exit {proc.returncode}); see {out / (run['run_name'] + '.log')}")
    return time.perf_counter() - t0


def summarise(run: dict, out: Path, tokens_per_step: int) -> dict:
    rows = [json.loads(line) for line in (out / run["run_name"] / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    evals = [r for r in rows if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 1]
    steps = max(r["step"] for r in rows)
    fpt = run["flops_per_token"]
    # MoD: the headline is the causal rule's loss (top-k peeks at later tokens); older runs
    # logged it as val_loss_causal beside a top-k val_loss.
    val = [r.get("val_loss_causal", r["val_loss"]) for r in evals]
    topk = [r["val_loss"] if "val_loss_causal" in r else r.get("val_loss_topk") for r in evals]
    res = {k: run[k] for k in ("budget", "steps", "flops_per_token", "params", "config") if k in run}
    res.update({
        "final_val_loss": val[-1], "best_val_loss": min(val),
        "final_train_loss": [r["loss"] for r in rows if "loss" in r][-1],
        "tokens_per_s_median": statistics.median(speeds) if speeds else None,
        "tokens": steps * tokens_per_step, "total_flops": fpt * steps * tokens_per_step,
        "curve": [{"step": r["step"], "tokens": r["step"] * tokens_per_step,
                   "flops": fpt * r["step"] * tokens_per_step, "val_loss": v} for r, v in zip(evals, val)],
        "run_dir": repo_relative(out / run["run_name"]), "command": run.get("command", ""),
    })
    info = out / run["run_name"] / "run_info.json"
    if info.is_file():  # the code and machine that trained it: a sweep spans sessions, commits and machines
        res.update({k: v for k, v in json.loads(info.read_text()).items() if k in ("git_commit", "device")})
    if topk and topk[-1] is not None:  # MoD's top-k routing as trained, for reference only
        res["final_val_loss_topk"] = topk[-1]
    diag = [r for r in rows if r.get("diag")]
    if diag and "diag/loss_skip_last_quarter" in diag[-1]:
        last = diag[-1]
        n = last["n_layers"]
        tail = [last[f"diag/angle/l{layer}"] for layer in range(n - n // 4 + 1, n + 1) if f"diag/angle/l{layer}" in last]
        res["skip_last_quarter_gap"] = last["diag/loss_skip_last_quarter"] - last["diag/loss"]
        res["last_quarter_angle"] = statistics.fmean(tail) if tail else None
    return res


def plot_curves(report: dict, results: Path = RESULTS) -> None:
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
        fig.savefig(results / name, dpi=110)
        plt.close(fig)


# --------------------------------------------------------------------------- rows


@functools.lru_cache(maxsize=None)
def config_size(config: str) -> tuple[float, int] | None:
    """(FLOPs per token, non-embedding parameters) of a variant's config as it is now; None if gone."""
    from trainer.config import load_config

    path = ROOT / config
    return model_size(load_config(path, [])) if path.is_file() else None


def params_of(s: dict) -> int | None:
    """A run's non-embedding parameter count: its summary's, else derived from its config when
    the config as it is now still gives the FLOPs per token the run recorded (else None)."""
    if s.get("params") is not None:
        return int(s["params"])
    now = config_size(s["config"]) if s.get("config") else None
    return now[1] if now and math.isclose(now[0], s.get("flops_per_token") or 0.0, rel_tol=1e-9) else None


def size_of(setting: str) -> int:
    """The size a setting's comparisons are made at: its reference's (Pre-LN's) non-embedding
    parameters. Every variant of a setting shares it (their own counts differ by a few norms,
    scalars or a router, under 0.2%), so stats.compare sees one size per setting."""
    return config_size(repo_relative(SETTINGS[setting] / f"{REFERENCE}.yaml"))[1]


def row_of(s: dict, summaries: Path = SUMMARIES) -> dict:
    """The ablation_runs.jsonl row of one summary. `corpus` is the corpus name the summary
    records (shakespeare, embedded, or a path's stem): the summaries carry no data fingerprint."""
    path = summary_path(summaries, s["setting"], s["source"], s["variant"], s["lr"], s["seed"])
    return {"setting": s["setting"], "corpus": s["source"], "arm": s["variant"], "size": size_of(s["setting"]),
            "params": params_of(s), "lr": float(s["lr"]), "seed": int(s["seed"]), "commit": s.get("git_commit"),
            "device": s.get("device"), "val_loss": s["final_val_loss"], "val_loss_topk": s.get("final_val_loss_topk"),
            "best_val_loss": s.get("best_val_loss"), "train_loss": s.get("final_train_loss"),
            "budget": s.get("budget"), "steps": s.get("steps"), "tokens": s.get("tokens"),
            "flops": s.get("total_flops"), "flops_per_token": s.get("flops_per_token"),
            "shared_lr": s.get("shared_lr"), "steps_scale": s.get("steps_scale"),
            **{m: s.get(m) for m in DEPTH_METRICS}, "wall_s": s.get("wall_s"),
            "summary": repo_relative(path) if path.resolve().is_relative_to(ROOT) else str(path)}


def read_rows(path: Path) -> list[dict]:
    """The rows of an ablation_runs.jsonl (a torn last line, from a killed writer, is skipped)."""
    out = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


_rows_lock = threading.Lock()


def record(summaries: list[dict], path: Path, root: Path = SUMMARIES) -> int:
    """Append the row of each summary whose key has none yet, in the order given; one JSON
    line each, flushed and fsync'd; the file is only ever appended to. Returns rows added."""
    with _rows_lock:
        have = {tuple(r.get(k) for k in ROW_KEY) for r in read_rows(path)}
        new = []
        for s in summaries:
            row = row_of(s, root)
            key = tuple(row[k] for k in ROW_KEY)
            if key not in have:
                have.add(key)
                new.append(row)
        if new:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                for row in new:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        return len(new)


def stored_summaries(root: Path) -> list[dict]:
    """Every summary under `root`, in (setting, corpus, variant, LR, seed) order: the backfill's order."""
    got = [json.loads(p.read_text()) for p in root.glob("*/*/*/lr*-seed*.json")]
    return sorted(got, key=lambda s: (s["setting"], s["source"], s["variant"], float(s["lr"]), int(s["seed"])))


def source_path(name: str) -> str:
    """data.source for a corpus name: `shakespeare`, `embedded` (the stdlib sources), or a path."""
    if name == "shakespeare":
        if not SHAKESPEARE.exists():
            raise SystemExit(f"--sources shakespeare: {SHAKESPEARE} not found; pass a path or 'embedded'")
        return repo_relative(SHAKESPEARE)
    return name


def corpus_name(name: str) -> str:
    return name if name in ("shakespeare", "embedded") else Path(name).stem


def summary_path(root: Path, setting: str, corpus: str, variant: str, lr: float, seed: int) -> Path:
    return root / setting / corpus / variant / f"lr{lr:g}-seed{seed}.json"


def prepare_corpus(config: Path, common: list[str], env: dict) -> None:
    """Tokenizer and shards of one corpus, once, before parallel runs start: two runs that
    each found the cache empty would otherwise both build it (the two-phase workflow)."""
    cmd = [sys.executable, "-m", "trainer.prepare", str(config.relative_to(ROOT)), *common, "--workers", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"preparing {common[1]} failed: {proc.stderr.strip().splitlines()[-1:]}")


def missing_runs(args, out: Path, summaries: Path, env: dict, extra: dict, prepare_fn) -> tuple[list, list]:
    """The summaries already stored and the runs still to train, over the grid (`args.lrs`)
    plus each variant's LRs in `extra` ({(setting, corpus, variant): [lr, ...]})."""
    found, pending = [], []
    for setting in args.settings:
        folder = SETTINGS[setting]
        paths = variant_configs(args.only, folder)
        for source in args.sources:
            corpus = corpus_name(source)
            common = [f"run.out_dir={repo_relative(out)}", f"data.source={source_path(source)}", "logging.progress=false",
                      "logging.every=1"]
            budget, runs = plan(paths, common, args.steps_scale, folder)
            todo = []
            for run in runs:
                for lr in [*(args.lrs or [budget["lr"]]), *extra.get((setting, corpus, run["variant"]), [])]:
                    for seed in range(args.seeds):
                        path = summary_path(summaries, setting, corpus, run["variant"], lr, seed)
                        if path.is_file():
                            found.append(json.loads(path.read_text()))
                        elif not args.report_only:
                            name = f"{setting}-{corpus}-{run['variant']}-lr{lr:g}-s{seed}"
                            overrides = [*run["overrides"], f"run.name={name}", f"optim.lr={lr}",
                                         f"run.seed={1337 + seed}"]
                            todo.append(({**run, "run_name": name, "overrides": overrides}, path,
                                         {"setting": setting, "source": corpus, "variant": run["variant"], "lr": lr,
                                          "seed": seed, "shared_lr": budget["lr"], "steps_scale": args.steps_scale},
                                         budget["tokens_per_step"]))
            if todo:
                prepare_fn(folder / "base.yaml", common, env)
            pending += todo
    return found, pending


def edge_extensions(found: list[dict], args, extra: dict) -> dict:
    """{(setting, corpus, variant): lr} for each variant whose finished LRs put its best at an
    edge, with fewer than args.extend_edges LRs added beyond the grid so far."""
    if not getattr(args, "extend_edges", 0):
        return {}
    new = {}
    for (setting, corpus), variants in ablation_stats.aggregate(found).items():
        grid = args.lrs or [next(s["shared_lr"] for s in found if (s["setting"], s["source"]) == (setting, corpus))]
        for variant, lrs in variants.items():
            key = (setting, corpus, variant)
            lr = ablation_stats.edge_extension(lrs, grid, args.seeds, args.extend_edges)
            if lr is not None and lr not in extra.get(key, []):
                new[key] = lr
    return new


def sweep(args, out: Path, summaries: Path, env: dict, run_fn=None, prepare_fn=None,
          rows: Path | None = None) -> list[dict]:
    """Train every missing (setting, corpus, variant, LR, seed), up to `args.jobs` at once,
    and return all their summaries. A run whose summary exists is skipped; a summary is
    written atomically, only when its run finished, so an interrupted sweep loses at most the
    runs in progress; a run that fails is reported, gets no summary, and is retried by the next
    sweep. Runs start in setting, corpus, variant (the --only order), LR, seed
    order; the summaries come back in the table's order whatever the order of finishing.

    With --extend-edges N, a variant whose best LR is the grid's smallest or largest gets the
    next LR beyond it (one grid step), up to N times, each round after the last one's runs
    finished, so its optimum ends up bracketed (or the table still says **edge**)."""
    run_fn, prepare_fn = run_fn or train, prepare_fn or prepare_corpus
    extra: dict = {}
    failed: set[str] = set()  # retried by the next sweep, not by this one's later rounds
    while True:
        found, pending = missing_runs(args, out, summaries, env, extra, prepare_fn)
        done, failures = run_all([job for job in pending if job[0]["run_name"] not in failed], args.jobs, out, env,
                                 run_fn, rows, summaries)
        found, failed = found + done, failed | set(failures)
        new = edge_extensions(found, args, extra)
        if not new:
            break
        for key, lr in new.items():
            if not args.report_only:  # there, the table's **edge** says it
                print(f"{'/'.join(key)}: best LR at the grid's edge; adding lr {lr:g}", flush=True)
            extra.setdefault(key, []).append(lr)
    if failed:
        print(f"{len(failed)} run(s) failed and will be retried by the next sweep: {', '.join(sorted(failed))}",
              flush=True)
    order = {name: i for i, name in enumerate(args.only or [])}
    return sorted(found, key=lambda s: (args.settings.index(s["setting"]),
                                        [corpus_name(x) for x in args.sources].index(s["source"]),
                                        s["variant"] != REFERENCE, order.get(s["variant"], len(order)),
                                        s["variant"] == "all_on", s["variant"], s["lr"], s["seed"]))


def run_all(pending: list, jobs: int, out: Path, env: dict, run_fn, rows: Path | None = None,
            summaries: Path = SUMMARIES) -> tuple[list[dict], list[str]]:
    """Train `pending`, `jobs` at a time: the summaries of those that finished, and the names
    of those that failed. With `rows`, each finished run's row is appended there."""
    failed: list[str] = []

    def one(job) -> dict | None:
        run, path, head, tokens_per_step = job
        print(f"{run['run_name']}: {run['budget']}, {run['steps']} steps: started", flush=True)
        try:
            wall = run_fn(run, out, env)
        except SystemExit as e:  # the others go on; no summary, so the next sweep retries it
            print(f"{run['run_name']}: FAILED: {e}", flush=True)
            failed.append(run["run_name"])
            return None
        summary = {**head, "wall_s": round(wall, 1), **summarise(run, out, tokens_per_step)}
        # The weights are not needed for the report; a sweep keeps hundreds of runs.
        shutil.rmtree(out / run["run_name"] / "checkpoints", ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, path)
        if rows is not None:
            record([summary], rows, summaries)
        print(f"{run['run_name']}: val loss {summary['final_val_loss']:.4f} in {wall:.0f}s", flush=True)
        return summary

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = [s for s in pool.map(one, pending) if s is not None]
    return done, failed


def judge(rows: list[dict], n_boot: int = stats.N_BOOT) -> tuple[list[dict], dict, int]:
    """Every variant against each reference (REFS) at its own best LR, per (setting, corpus),
    with benchmarks/ladder/stats.py: σ² per arm (stats.seed_noise), the best-LR comparison's
    interval and p, then Holm over all the comparisons together (one report, one family).
    Returns (comparisons, {(setting, corpus): {arm: {sigma, df}}}, replicates per comparison)."""
    from benchmarks.ladder.report import arm_sigmas, comparison_pairs, comparisons, replicates_for

    groups = stats.group(rows, size_key="size")
    n_boot = replicates_for(sum(len(comparison_pairs(c)) for c in groups.values()), n_boot)
    comps, pooled = [], {}
    for key, cells in sorted(groups.items()):
        noise = stats.seed_noise(cells)
        pooled[key] = arm_sigmas(noise)
        comps += [{**c, "setting": key[0], "corpus": key[1]} for c in comparisons(cells, noise, n_boot, seed=len(comps))]
    return stats.judge(comps), pooled, n_boot


def _cell_at(lrs: dict, lr: float | None) -> dict | None:
    return None if lr is None or lr not in lrs else dict(lrs[lr])


def depth_rows(here: list[dict], variants: dict, shared: float) -> list[dict]:
    """Per variant, each depth measure at the LRs its loss row uses (shared, best), with Δ vs
    the reference at its own: described (mean ± half the range over seeds), not tested."""
    cells = {m: next(iter(ablation_stats.aggregate([s for s in here if s.get(m) is not None], metric=m).values()), {})
             for m in DEPTH_METRICS}
    lr_of = {v: {"shared": shared, "best": ablation_stats.best_lr(lrs)} for v, lrs in variants.items()}
    out = []
    for variant in variants:
        row: dict = {"variant": variant}
        for label in ("shared", "best"):
            for m, by_variant in cells.items():
                here_c = _cell_at(by_variant.get(variant, {}), lr_of[variant][label])
                if here_c is None:
                    continue
                ref_c = _cell_at(by_variant.get(REFERENCE, {}), lr_of.get(REFERENCE, {}).get(label))
                if ref_c is not None and variant != REFERENCE:
                    here_c["delta"] = here_c["mean"] - ref_c["mean"]
                row.setdefault(label, {"lr": lr_of[variant][label]})[m] = here_c
        if "shared" in row or "best" in row:
            out.append(row)
    return out


def report(summaries: list[dict], args) -> dict:
    """The tables: per (setting, corpus), each variant's cells (shared LR, best LR) and its
    verdicts against each reference, judged together (`judge`), plus the depth measures."""
    rows = [row_of(s) for s in summaries]
    comps, pooled, n_boot = judge(rows, getattr(args, "boot", stats.N_BOOT))
    tables = []
    for (setting, corpus), variants in ablation_stats.aggregate(summaries).items():
        here = [s for s in summaries if s["setting"] == setting and s["source"] == corpus]
        shared = here[0]["shared_lr"]
        table = {"setting": setting, "source": corpus, "shared_lr": shared, "size": size_of(setting),
                 "arm_sigma": pooled[(setting, corpus)], "rows": [], "notes": []}
        for variant, lrs in variants.items():
            best = ablation_stats.best_lr(lrs)
            s = next(s for s in here if s["variant"] == variant)
            row = {"variant": variant, "lrs_run": len(lrs),
                   # what the budget was: MoD variants train longer at the same FLOPs
                   "budget": f"{s['budget']}, {s['steps']} steps" if s.get("budget") == "iso-FLOP" else None,
                   "shared": {"lr": shared, **lrs[shared]} if shared in lrs else None,
                   "best": {"lr": best, "at_edge": ablation_stats.at_edge(lrs, best), **lrs[best]},
                   "vs": {c["ref"]: {**{k: c[k] for k in ("delta", "lo", "hi", "p", "p_holm", "verdict", "ref_lr",
                                                          "ref_edge")},
                                     # what the old rule said (beyond the larger seed range), beside the new verdict
                                     "old_verdict": ablation_stats.verdict(
                                         lrs[best], variants[c["ref"]][ablation_stats.best_lr(variants[c["ref"]])])}
                          for c in comps if (c["setting"], c["corpus"], c["arm"]) == (setting, corpus, variant)}}
            table["rows"].append(row)
        if any(s.get(m) is not None for s in here for m in DEPTH_METRICS):
            table["depth"] = depth_rows(here, variants, shared)
        topk = ablation_stats.aggregate([s for s in here if s.get("final_val_loss_topk") is not None],
                                        metric="final_val_loss_topk")
        for variant, lrs in next(iter(topk.values()), {}).items():
            c = lrs.get(shared)
            if c:  # the headline is the causal rule's loss; top-k (as trained) peeks at later tokens
                table["notes"].append(f"{variant}: val loss with top-k routing as trained (sees later tokens, "
                                      f"not usable for generation) {c['mean']:.4f} ± {c['spread'] / 2:.4f} at the "
                                      f"shared LR (n={c['n']}); the table gives the causal rule's")
        tables.append(table)
    protocol = (f"{args.seeds} seed(s) × LRs {args.lrs or 'shared'} × corpora {args.sources}, settings "
                f"{args.settings}, steps scale {args.steps_scale}")
    if getattr(args, "extend_edges", 0):
        protocol += f", up to {args.extend_edges} LR(s) added beyond a best LR at the grid's edge"
    return {"protocol": protocol, "reference": REFERENCE, "references": list(REFS), "alpha": stats.ALPHA,
            "boot": n_boot, "comparisons": len(comps), "tables": tables, "cpus": os.cpu_count(),
            "load_avg_end": round(os.getloadavg()[0], 2)}


def _judged(v: dict | None) -> list[str]:
    """The two cells of one comparison: Δ [95% interval], and the verdict with Holm's p."""
    if not v:
        return ["-", "-"]
    lo, hi = (f"{x:+.4f}" if x is not None and math.isfinite(x) else "-" for x in (v["lo"], v["hi"]))
    word = v["verdict"] if v["verdict"] == "undecided" else f"**{v['verdict']}**"
    was = f"; old rule: {v['old_verdict']}" if v.get("old_verdict") else ""
    return [f"{v['delta']:+.4f} [{lo}, {hi}]", f"{word} ({v['p_holm']:.3f}{was})"]


def _depth_markdown(rows: list[dict]) -> list[str]:
    head = " | ".join(f"{label} LR: {title} | Δ vs ref" for label in ("shared", "best") for title in DEPTH_METRICS.values())
    out = [f"| variant | {head} |", "|---|" + "---:|---:|" * (2 * len(DEPTH_METRICS))]
    for row in rows:
        cells = []
        for label in ("shared", "best"):
            for metric in DEPTH_METRICS:
                c = row.get(label, {}).get(metric)
                cells += (["-", "-"] if c is None else
                          [f"{c['mean']:.4f} ± {c['spread'] / 2:.4f}", f"{c['delta']:+.4f}" if "delta" in c else "-"])
        out.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return out


def markdown(rep: dict) -> str:
    """The tables of `report` as Markdown."""
    refs = rep.get("references", [rep["reference"]])
    out = [f"# Ablation sweep ({rep['protocol']})", ""]
    for table in rep["tables"]:
        per_arm = ", ".join(f"{a} {v['sigma']:.4f} ({v['df']} df)" for a, v in table.get("arm_sigma", {}).items())
        sigma = (f"seed σ per arm, near its best LR: {per_arm}" if per_arm
                 else "no cell with 2 seeds: nothing can be judged")
        out += [f"## {table['setting']} · {table['source']}", "", f"Size {table['size']:,} non-embedding parameters "
                f"(Pre-LN's); {sigma}.", "",
                "| variant | shared LR: val loss | best LR (of LRs run) | val loss at best LR | "
                + " | ".join(f"Δ vs {r} [95%] | verdict (Holm p)" for r in refs) + " |",
                "|---|---:|---:|---:|" + "---:|:-:|" * len(refs)]
        for row in table["rows"]:
            sh, best = row.get("shared"), row["best"]
            edge = ", **edge**" if best.get("at_edge") else ""
            budget = f" ({row['budget']})" if row.get("budget") else ""
            cells = [f"{sh['mean']:.4f} ± {sh['spread'] / 2:.4f} (n={sh['n']})" if sh else "-",
                     f"{best['lr']:g} (of {row['lrs_run']}{edge})",
                     f"{best['mean']:.4f} ± {best['spread'] / 2:.4f} (n={best['n']})"]
            for r in refs:
                cells += ["-", "reference"] if row["variant"] == r else _judged(row["vs"].get(r))
            out.append(f"| {row['variant']}{budget} | " + " | ".join(cells) + " |")
        if table.get("depth"):
            out += ["", "Depth (do the late blocks still matter?): the loss rise when the last quarter of blocks is "
                    "skipped, and that quarter's mean input/output angle (/π), at the same LRs as above; larger means "
                    "the late blocks do more. Described (mean ± half the range over seeds), not tested.", "",
                    *_depth_markdown(table["depth"])]
        for extra in table.get("notes", []):
            out += ["", extra]
        out.append("")
    out += [f"± is half the range over seeds. Δ = variant − reference val loss, each at its own best LR (negative: "
            f"the variant is better), with its 95% interval; both come from benchmarks/ladder/stats.py: the seed "
            f"variance of each arm pooled over the cells near its best LR, and bounds on the best-LR "
            f"selection that hold for any shape of the LR curves. A verdict is **better** or **worse** only when "
            f"Holm's adjusted p (over all {rep.get('comparisons', 0)} comparisons of this report, "
            f"{rep.get('boot', 0)} replicates each) is below {rep.get('alpha', stats.ALPHA)} and the interval excludes "
            f"0, else undecided. **edge**: the best LR is the grid's smallest or largest, so that variant's optimum "
            f"may lie beyond it and its loss is an upper bound on its tuned loss: a variant at its edge is never "
            f"called worse, nor a variant better than a reference at its edge. \"old rule\": this sweep's verdict "
            f"before these statistics (beyond the larger seed range of 2 seeds, each arm at its best LR; noise: "
            f"within it), kept to show which claims changed. References: "
            f"{', '.join(f'`{r}`' for r in refs)}.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2, help="seeds per variant and LR (default 2)")
    ap.add_argument("--lrs", type=lambda v: [float(x) for x in v.split(",")], default=None,
                    help="comma-separated learning rates (default: the base config's only)")
    ap.add_argument("--sources", type=lambda v: v.split(","), default=["shakespeare"],
                    help="comma-separated corpora: shakespeare, embedded, or paths (default: shakespeare)")
    ap.add_argument("--settings", type=lambda v: v.split(","), default=["default"],
                    help=f"comma-separated settings from {list(SETTINGS)} (default: default)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply steps and cadences (e.g. 0.05 to check)")
    ap.add_argument("--extend-edges", type=int, default=0, metavar="N",
                    help="for a variant whose best LR is at the grid's edge, add the next LR beyond it (one grid "
                         "step), up to N times, so its optimum is bracketed (default 0)")
    ap.add_argument("--only", type=lambda v: v.split(","), default=None,
                    help="comma-separated variants, started in this order (default: all)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, each a one-thread process (default 1; the machine's cores at most)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the stored summaries")
    ap.add_argument("--out", type=Path, default=RESULTS / "ablation_runs", help="run.out_dir of the runs")
    ap.add_argument("--summaries", type=Path, default=SUMMARIES, help="where finished runs' summaries are kept")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where ablation.json/.md and PNGs go")
    ap.add_argument("--rows", type=Path, default=ROWS, help="the append-only run rows (JSON lines)")
    ap.add_argument("--boot", type=int, default=stats.N_BOOT,
                    help="replicates per comparison (at least enough for Holm over the report's family)")
    args = ap.parse_args(argv)
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad:
        raise SystemExit(f"--settings: unknown {bad}; expected some of {list(SETTINGS)}")
    if args.extend_edges < 0:
        raise SystemExit(f"--extend-edges {args.extend_edges}: must be >= 0 (0 keeps the grid as given)")
    if args.seeds < 1:
        raise SystemExit(f"--seeds {args.seeds}: must be >= 1")
    if not 1 <= args.jobs <= (os.cpu_count() or 1):
        raise SystemExit(f"--jobs {args.jobs}: must be between 1 and this machine's {os.cpu_count()} cores")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    env.setdefault("OMP_NUM_THREADS", "1")
    out = args.out.resolve()
    added = record(stored_summaries(args.summaries), args.rows, args.summaries)  # any summary without its row
    if added:
        print(f"{repo_relative(args.rows)}: {added} row(s) added for stored summaries", flush=True)
    summaries = sweep(args, out, args.summaries, env, rows=args.rows)
    if not summaries:
        raise SystemExit("no finished runs to report (run without --report-only first)")
    rep = report(summaries, args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "ablation.json").write_text(json.dumps(rep, indent=1))
    (args.results / "ablation.md").write_text(markdown(rep))
    first = {s["variant"]: s for s in summaries if s["setting"] == "default" and s["seed"] == 0
             and s["lr"] == s["shared_lr"] and s["source"] == corpus_name(args.sources[0])}
    if first:  # curves from the summaries; the diagnostics plot only where the run dirs are at hand
        plot_curves({"variants": first}, args.results)
        from benchmarks.plot_diagnostics import plot_compare

        at_hand = {name: ROOT / v["run_dir"] for name, v in first.items() if (ROOT / v["run_dir"]).is_dir()}
        if at_hand:
            plot_compare(list(at_hand.values()), args.results / "ablation_diagnostics.png", labels=list(at_hand))
    print(markdown(rep))
    print(f"wrote {repo_relative(args.results / 'ablation.json')} and ablation.md ({len(summaries)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
