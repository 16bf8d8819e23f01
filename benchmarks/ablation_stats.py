"""Statistics of an ablation sweep, kept apart from the runner so they can be tested on
synthetic summaries.

A summary is one finished run: {setting, source, variant, lr, seed, final_val_loss, ...}.
Per (setting, source, variant, lr) the seeds give a mean and a spread; the spread is the
range (max − min) over seeds, the more conservative choice for the 2–3 seeds a CPU sweep
affords. Each variant is then reported twice, as papers compare them: at its own best LR
(lowest mean) and at the shared LR. A difference from the reference counts (better or
worse) only when it exceeds the larger of the two seed spreads, and a claim that a variant
lowers the loss is marked reproduced only when it is better by that rule; with a single
seed nothing counts.
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


def verdict(variant: dict, reference: dict) -> str:
    """"better" or "worse" when the means differ by more than either seed spread (both with
    at least two seeds, so a spread exists), else "noise"."""
    if variant["n"] < 2 or reference["n"] < 2:
        return "noise"
    diff, spread = variant["mean"] - reference["mean"], max(variant["spread"], reference["spread"])
    return "better" if -diff > spread else "worse" if diff > spread else "noise"


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
            row[label] = {"lr": lr, "lrs_run": len(lrs), **here}
            there = ref.get(lr_of(ref)) if ref else None
            if there is not None:
                row[label]["delta"] = here["mean"] - there["mean"]
                row[label]["reproduced"] = name != reference and reproduced(here, there)
                row[label]["verdict"] = verdict(here, there) if name != reference else "reference"
        rows.append(row)
    return rows


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
                lr = [f"{c['lr']:g} (of {c.get('lrs_run', '?')})"] if label == "best" else []
                delta = f"{c['delta']:+.4f}" if "delta" in c else "-"
                mark = {"better": "**better**", "worse": "**worse**", "noise": "no", "reference": "-"}[
                    c.get("verdict", "noise")]
                cells += lr + [f"{c['mean']:.4f} ± {c['spread'] / 2:.4f} (n={c['n']})", delta, mark]
            out.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
        for extra in table.get("notes", []):
            out += ["", extra]
        out.append("")
    out += [f"± is half the range over seeds; a Δ is marked better or worse only when it exceeds the larger seed "
            f"range of the two (a claim that a variant helps is reproduced only when it is marked better). "
            f"Reference: `{report['reference']}`.", ""]
    return "\n".join(out)
