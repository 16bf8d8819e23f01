"""Statistics of an ablation sweep, kept apart from the runner so they can be tested on
synthetic summaries.

A summary is one finished run: {setting, source, variant, lr, seed, final_val_loss, ...}.
Per (setting, source, variant, lr) the seeds give a mean and a spread; the spread is the
range (max − min) over seeds, the more conservative choice for the 2–3 seeds a CPU sweep
affords. Each variant is then reported twice, as papers compare them: at its own best LR
(lowest mean) and at the shared LR. A difference from the reference counts (better or
worse) only when it exceeds the larger of the two seed spreads, and a claim that a variant
lowers the loss is marked reproduced only when it is better by that rule; with a single
seed nothing counts. A best LR at either end of the grid is flagged: the variant's optimum
may lie beyond it, so its margin is a lower bound.

The depth measures (the loss rise when the last quarter of blocks is skipped, and that
quarter's mean input/output angle) get their own table, at the same two LRs as the loss;
for them a larger value means the late blocks do more, so a difference beyond the spreads
reads "larger" or "smaller".
"""
from __future__ import annotations

import statistics
from collections import defaultdict

METRIC = "final_val_loss"  # MoD runs: the causal rule's loss (the headline eval), see ablate.summarise


def cell(values: list[float]) -> dict:
    """mean, spread (max − min) and n of one variant × LR over seeds."""
    return {"mean": statistics.fmean(values), "spread": max(values) - min(values), "n": len(values),
            "values": sorted(values)}


def aggregate(summaries: list[dict], metric: str = METRIC) -> dict:
    """{(setting, source): {variant: {lr: cell}}} from finished-run summaries."""
    grouped: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for s in summaries:
        grouped[(s["setting"], s["source"])][s["variant"]][float(s["lr"])].append(s[metric])
    return {key: {variant: {lr: cell(v) for lr, v in sorted(lrs.items())} for variant, lrs in variants.items()}
            for key, variants in grouped.items()}


def best_lr(lrs: dict[float, dict]) -> float:
    """The LR whose seed mean is lowest."""
    return min(lrs, key=lambda lr: lrs[lr]["mean"])


def at_edge(lrs: dict[float, dict], lr: float) -> bool:
    """The LR is the smallest or largest of a grid of at least two: the optimum may be outside."""
    return len(lrs) >= 2 and lr in (min(lrs), max(lrs))


def edge_extension(lrs: dict[float, dict], grid: list[float], seeds: int, max_extra: int) -> float | None:
    """The LR to add so that a variant's best is bracketed: one grid step (the grid's geometric
    ratio; 2 for a one-LR grid) below the smallest or above the largest LR run, when the best
    of a complete set (every grid LR, and every LR added so far, with `seeds` seeds) is there
    and fewer than `max_extra` LRs were added beyond the grid. None otherwise."""
    if any(lr not in lrs or lrs[lr]["n"] < seeds for lr in grid) or any(c["n"] < seeds for c in lrs.values()):
        return None
    if sum(lr not in grid for lr in lrs) >= max_extra:
        return None
    best = best_lr(lrs)
    if not at_edge(lrs, best):
        return None
    ratio = (max(grid) / min(grid)) ** (1 / (len(grid) - 1)) if len(grid) > 1 else 2.0
    return float(f"{(min(lrs) / ratio if best == min(lrs) else max(lrs) * ratio):.3g}")


def sign_beyond_spread(variant: dict, reference: dict) -> int:
    """+1 / -1 when the variant's mean is above / below the reference's by more than either
    seed spread (both with at least two seeds, so a spread exists), else 0."""
    if variant["n"] < 2 or reference["n"] < 2:
        return 0
    diff, spread = variant["mean"] - reference["mean"], max(variant["spread"], reference["spread"])
    return 1 if diff > spread else -1 if -diff > spread else 0


def verdict(variant: dict, reference: dict) -> str:
    """For a loss: "better" (lower) or "worse" beyond both seed spreads, else "noise"."""
    return {-1: "better", 0: "noise", 1: "worse"}[sign_beyond_spread(variant, reference)]


def reproduced(variant: dict, reference: dict) -> bool:
    """A claim that the variant lowers the loss holds: it is better beyond both seed spreads."""
    return verdict(variant, reference) == "better"


def compare(variants: dict[str, dict[float, dict]], reference: str, shared_lr: float) -> list[dict]:
    """One row per variant: at the shared LR and at its own best LR, with Δ vs `reference`
    (compared at the reference's shared and best LR respectively) and the reproduced flags."""
    ref = variants.get(reference)
    rows = []
    for name, lrs in variants.items():
        row: dict = {"variant": name}
        for label, lr_of in (("shared", lambda _lrs: shared_lr), ("best", best_lr)):
            lr = lr_of(lrs)
            here = lrs.get(lr)
            if here is None:
                continue
            row[label] = {"lr": lr, "lrs_run": len(lrs), "at_edge": label == "best" and at_edge(lrs, lr), **here}
            there = ref.get(lr_of(ref)) if ref else None
            if there is not None:
                row[label]["delta"] = here["mean"] - there["mean"]
                row[label]["reproduced"] = name != reference and reproduced(here, there)
                row[label]["verdict"] = verdict(here, there) if name != reference else "reference"
        rows.append(row)
    return rows


def compare_depth(depth: dict[str, dict[str, dict[float, dict]]], loss_rows: list[dict], reference: str) -> list[dict]:
    """Rows of the depth table: per variant, each depth metric ({metric: {variant: {lr: cell}}})
    at the LRs its loss row used (shared and best), with Δ vs the reference at its LRs and
    "larger"/"smaller"/"noise" beyond the seed spreads."""
    rows = []
    for loss_row in loss_rows:
        name, row = loss_row["variant"], {"variant": loss_row["variant"]}
        for label in ("shared", "best"):
            lr, ref_lr = loss_row.get(label, {}).get("lr"), next(
                (r[label]["lr"] for r in loss_rows if r["variant"] == reference and label in r), None)
            for metric, variants in depth.items():
                here = variants.get(name, {}).get(lr)
                if here is None:
                    continue
                c = row.setdefault(label, {"lr": lr})[metric] = dict(here)
                there = variants.get(reference, {}).get(ref_lr)
                if there is not None and name != reference:
                    c["delta"] = here["mean"] - there["mean"]
                    c["verdict"] = {1: "larger", 0: "noise", -1: "smaller"}[sign_beyond_spread(here, there)]
        if "shared" in row or "best" in row:
            rows.append(row)
    return rows


DEPTH_METRICS = {"skip_last_quarter_gap": "loss rise, last quarter skipped",
                 "last_quarter_angle": "last quarter's angle"}


def _depth_markdown(rows: list[dict]) -> list[str]:
    head = " | ".join(f"{label} LR: {title} | Δ vs ref" for label in ("shared", "best")
                      for title in DEPTH_METRICS.values())
    out = [f"| variant | {head} |", "|---|" + "---:|---:|" * (2 * len(DEPTH_METRICS))]
    for row in rows:
        cells = []
        for label in ("shared", "best"):
            for metric in DEPTH_METRICS:
                c = row.get(label, {}).get(metric)
                if c is None:
                    cells += ["-", "-"]
                    continue
                mark = {"larger": " **larger**", "smaller": " **smaller**"}.get(c.get("verdict"), "")
                cells += [f"{c['mean']:.4f} ± {c['spread'] / 2:.4f}",
                          f"{c['delta']:+.4f}{mark}" if "delta" in c else "-"]
        out.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return out


def markdown(report: dict) -> str:
    """The tables of `report` (see benchmarks/ablate.py) as Markdown."""
    out = [f"# Ablation sweep ({report['protocol']})", ""]
    for table in report["tables"]:
        out += [f"## {table['setting']} · {table['source']}", "",
                "| variant | shared LR: val loss | Δ vs ref | beyond seed spread | best LR (of LRs run) | val loss at best LR "
                "| Δ vs ref | beyond seed spread |", "|---|---:|---:|:-:|---:|---:|---:|:-:|"]
        for row in table["rows"]:
            cells = []
            for label in ("shared", "best"):
                c = row.get(label)
                if c is None:
                    cells += ["-"] * (3 if label == "shared" else 4)
                    continue
                edge = ", **edge**" if c.get("at_edge") else ""
                lr = [f"{c['lr']:g} (of {c.get('lrs_run', '?')}{edge})"] if label == "best" else []
                delta = f"{c['delta']:+.4f}" if "delta" in c else "-"
                mark = {"better": "**better**", "worse": "**worse**", "noise": "no", "reference": "-"}[
                    c.get("verdict", "noise")]
                cells += lr + [f"{c['mean']:.4f} ± {c['spread'] / 2:.4f} (n={c['n']})", delta, mark]
            budget = f" ({row['budget']})" if row.get("budget") else ""
            out.append(f"| {row['variant']}{budget} | " + " | ".join(cells) + " |")
        if table.get("depth"):
            out += ["", "Depth (do the late blocks still matter?): the loss rise when the last quarter of blocks is "
                    "skipped, and that quarter's mean input/output angle (/π), at the same LRs as above; "
                    "larger means the late blocks do more.", "", *_depth_markdown(table["depth"])]
        for extra in table.get("notes", []):
            out += ["", extra]
        out.append("")
    out += [f"± is half the range over seeds; a Δ is marked better or worse only when it exceeds the larger seed "
            f"range of the two (a claim that a variant helps is reproduced only when it is marked better). "
            f"**edge**: the best LR is the grid's smallest or largest, so that variant's optimum may lie beyond "
            f"it and its margin is a lower bound. Reference: `{report['reference']}`.", ""]
    return "\n".join(out)
