"""Statistics of an ablation sweep, kept apart from the runner so they can be tested on
synthetic summaries.

A summary is one finished run: {setting, source, variant, lr, seed, final_val_loss, ...}.
Per (setting, source, variant, lr) the seeds give a mean and a spread; the spread is the
range (max − min) over seeds, the more conservative choice for the 2–3 seeds a CPU sweep
affords. Each variant is then reported twice, as papers compare them: at its own best LR
(lowest mean) and at the shared LR. A claim that a variant lowers the loss is marked
reproduced only when its improvement over the reference exceeds the larger of the two seed
spreads; with a single seed nothing can be marked reproduced.
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


def reproduced(variant: dict, reference: dict) -> bool:
    """True when the variant's mean is lower than the reference's by more than either spread
    (and both have at least two seeds, so a spread exists)."""
    if variant["n"] < 2 or reference["n"] < 2:
        return False
    return reference["mean"] - variant["mean"] > max(variant["spread"], reference["spread"])


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
            row[label] = {"lr": lr, **here}
            there = ref.get(lr_of(ref)) if ref else None
            if there is not None:
                row[label]["delta"] = here["mean"] - there["mean"]
                row[label]["reproduced"] = name != reference and reproduced(here, there)
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    """The tables of `report` (see benchmarks/ablate.py) as Markdown."""
    out = [f"# Ablation sweep ({report['protocol']})", ""]
    for table in report["tables"]:
        out += [f"## {table['setting']} · {table['source']}", "",
                "| variant | shared LR: val loss | Δ vs ref | reproduced | best LR | val loss at best LR | Δ vs ref "
                "| reproduced |", "|---|---:|---:|:-:|---:|---:|---:|:-:|"]
        for row in table["rows"]:
            cells = []
            for label in ("shared", "best"):
                c = row.get(label)
                if c is None:
                    cells += ["-"] * (3 if label == "shared" else 4)
                    continue
                lr = [f"{c['lr']:g}"] if label == "best" else []
                delta = f"{c['delta']:+.4f}" if "delta" in c else "-"
                mark = "yes" if c.get("reproduced") else "no"
                cells += lr + [f"{c['mean']:.4f} ± {c['spread'] / 2:.4f} (n={c['n']})", delta, mark]
            out.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
        for extra in table.get("notes", []):
            out += ["", extra]
        out.append("")
    out += [f"± is half the range over seeds; a Δ counts as reproduced only when the improvement exceeds the "
            f"larger seed range of the two. Reference: `{report['reference']}`.", ""]
    return "\n".join(out)
