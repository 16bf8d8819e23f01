"""Descriptive cells of an ablation sweep and its LR-grid extension, kept apart from the
runner so they can be tested on synthetic summaries. The verdicts are not here: the tables
judge with benchmarks/ladder/stats.py (benchmarks/ablate.py, `judge`).

A summary is one finished run: {setting, source, variant, lr, seed, final_val_loss, ...}.
Per (setting, source, variant, lr) the seeds give a cell: mean, spread (max − min) and n.
A best LR (lowest mean) at either end of the grid is at the edge: the optimum may lie beyond
it, and `edge_extension` names the LR that would bracket it.

`sign_beyond_spread` / `verdict` are the rule the old tables used (a difference counts only
beyond the larger seed range of the two cells). With 2 seeds it flags about 22% of null
comparisons (benchmarks/ladder/stats.py); it is kept only so benchmarks/ladder/report.py can
show it beside the new verdicts, and nothing here judges with it.
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
    """The old rule: +1 / -1 when the variant's mean is above / below the reference's by more
    than either seed spread (both with at least two seeds), else 0."""
    if variant["n"] < 2 or reference["n"] < 2:
        return 0
    diff, spread = variant["mean"] - reference["mean"], max(variant["spread"], reference["spread"])
    return 1 if diff > spread else -1 if -diff > spread else 0


def verdict(variant: dict, reference: dict) -> str:
    """The old rule's word for a loss: "better" (lower) / "worse" beyond both seed spreads, else "noise"."""
    return {-1: "better", 0: "noise", 1: "worse"}[sign_beyond_spread(variant, reference)]
