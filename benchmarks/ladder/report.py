"""The option ladder's report: per-size comparisons with Holm verdicts, scaling fits, m(N)
and its slope, MoD against the dense FLOPs frontier and the best-LR law. (The old ablation is
re-judged by the same statistics in its own report, benchmarks/ablate.py's ablation.md.)

    python -m benchmarks.ladder.report [--runs benchmarks/results/ladder_runs.jsonl] [--out benchmarks/results]
                                       [--boot 4000] [--fit-boot 2000]

Writes <out>/ladder.md, <out>/ladder.json and PNGs (<out>/ladder_<setting>_<corpus>_{loss,m,lr}.png).
Rows of different (setting, corpus) are never pooled: each gets its own section, and the report
says when there is more than one corpus. It works with the first rungs alone or with arms
missing: what cannot be judged yet reads "undecided" (and a fit needs 3 sizes per arm).
Methods: benchmarks/ladder/stats.py (comparisons) and benchmarks/ladder/fit.py (fits).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
from pathlib import Path

import numpy as np

from benchmarks.ladder import fit, stats
from benchmarks.ladder.arms import ARMS

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
REFS = ("pre_ln", "pre_ln_embed_norm")  # Pre-LN, and Pre-LN + embed_norm: the stronger simple baseline
EXTRA_METRICS = ("ood_loss", "induction")
REPORT_FIT_BOOT = 2000


def rel(path: Path | str) -> str:
    return os.path.relpath(os.path.abspath(path), ROOT)


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_mod(arm: str) -> bool:
    return arm == "mod" or arm.startswith("mod_")


def short(corpus: str) -> str:
    return corpus[:12]


def lr_at_1b(lf: dict) -> str:
    """The best-LR fit's lr* at N = 1e9 for the report, or why it gives none."""
    pts = sorted(lf["points"], key=lambda p: p["N"])
    # an edge LR bounds the optimum, it does not place it; and a line through fewer than
    # fit.MIN_SIZES sizes is no law to carry four decades on
    if not all(p["bracketed"] for p in pts):
        return "- (an edge)"
    if len(pts) < fit.MIN_SIZES:
        return f"- ({len(pts)} size{'s' if len(pts) > 1 else ''})"
    out = f"{math.exp(lf['a'] + lf['b'] * math.log(1e9)):.3g}"
    # a line through points that go up and down is mostly their scatter: say so beside the
    # number (LNS by depth: 0.005, 0.026, 0.016 gave b = +0.85 and an lr* of 11 at 1e9)
    lrs = [p["lr"] for p in pts]
    if lrs != sorted(lrs) and lrs != sorted(lrs, reverse=True):
        out += " (lr* not monotone in N)"
    return out


def _fmt(x, spec=".4f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def reference_pairs(arms) -> list[tuple[str, str]]:
    """(ref, arm): every arm against each reference (the second reference against the first
    too), then each option against its own control (arms.py's control_for: LNS against Pre-LN
    with LNS's init, grow against the shallow model at its FLOPs, MoD against MoD at capacity 1):
    the controls exist to isolate the option, so the option must be compared with them."""
    out = [(ref, arm) for ref in REFS if ref in arms for arm in sorted(arms)
           if arm != ref and not (arm in REFS and REFS.index(arm) < REFS.index(ref))]
    out += [(c, ARMS[c].control_for) for c in sorted(arms)
            if c in ARMS and ARMS[c].control_for in arms and (c, ARMS[c].control_for) not in out]
    return out


def comparison_pairs(cells: dict) -> list[tuple[str, str, int]]:
    """(ref, arm, size): each pair of `reference_pairs` at each size both arms have."""
    return [(ref, arm, size) for ref, arm in reference_pairs(cells)
            for size in sorted(set(cells[arm]) & set(cells[ref]))]


def replicates_for(m: int, n_boot: int) -> int:
    """Enough replicates that the smallest Monte-Carlo p-value, 2/(B+1), stays 10× below the
    Holm threshold α/m of the family's most significant comparison (else a big family could
    never reject, whatever the data)."""
    return max(n_boot, math.ceil(20 * m / stats.ALPHA))


def comparisons(cells: dict, noise: dict, n_boot: int, seed: int) -> list[dict]:
    return [stats.compare(cells, ref, arm, size, noise, n_boot=n_boot, rng=seed + i)
            for i, (ref, arm, size) in enumerate(comparison_pairs(cells))]


def arm_sigmas(noise: dict) -> dict:
    """{arm: {sigma, df}} of stats.seed_noise, for the report (arms with no estimate left out)."""
    return {arm: {"sigma": math.sqrt(s2), "df": df} for arm, (s2, df) in noise.items() if df}


def extras(rows: list[dict], cells: dict) -> list[dict]:
    """At each arm's best (val-loss) LR per size: OOD loss, induction score, and loss by position
    (mean over the first and the last quarter of positions), each a mean over seeds."""
    out = []
    for arm, sizes in sorted(cells.items()):
        for size, lrs in sizes.items():
            lr, _ = stats.best(lrs)
            here = [r for r in rows if r["arm"] == arm and stats.size_of(r) == size and float(r["lr"]) == lr]
            row = {"arm": arm, "size": size, "lr": lr}
            for m in EXTRA_METRICS:
                vals = [float(r[m]) for r in here if r.get(m) is not None and math.isfinite(float(r[m]))]
                row[m] = float(np.mean(vals)) if vals else None
            # probes.loss_by_position: {"1": ce, "2-3": ce, ...}, buckets in position order
            lbp = [np.asarray(list(r["loss_by_position"].values()), dtype=float) for r in here
                   if r.get("loss_by_position")]
            if lbp:
                q = max(1, min(len(v) for v in lbp) // 4)
                row["loss_first_quarter"] = float(np.mean([v[:q].mean() for v in lbp]))
                row["loss_last_quarter"] = float(np.mean([v[-q:].mean() for v in lbp]))
            if any(row.get(k) is not None for k in (*EXTRA_METRICS, "loss_first_quarter")):
                out.append(row)
    return out


def flops_by_size(rows: list[dict]) -> dict:
    """{arm: {size: median training FLOPs}} (the same for every LR and seed of a cell)."""
    got: dict = {}
    for r in rows:
        if r.get("flops"):
            got.setdefault(r["arm"], {}).setdefault(stats.size_of(r), []).append(float(r["flops"]))
    return {a: {s: float(np.median(v)) for s, v in sizes.items()} for a, sizes in got.items()}


def fields_of(rows: list[dict]) -> tuple:
    """What separates groups: (setting, corpus), and the token budget per parameter when the rows
    carry it (a rung trained at another tokens/param is another experiment)."""
    return stats.KEY + (("tokens_per_param",) if any(r.get("tokens_per_param") is not None for r in rows) else ())


def stem(s: dict) -> str:
    tpp = f"_tpp{s['tokens_per_param']:g}" if s.get("tokens_per_param") is not None else ""
    return f"ladder_{s['setting']}_{short(s['corpus'])}{tpp}"


def section(key: tuple, rows: list[dict], cells: dict, args, seed: int, n_boot: int) -> dict:
    """Everything about one (setting, corpus); verdicts are set later, over the whole report."""
    noise = stats.seed_noise(cells)
    sizes = sorted({s for sizes in cells.values() for s in sizes})
    pairs = [(o, r) for r, o in reference_pairs(cells) if not is_mod(o)]  # MoD: against the FLOPs frontier
    fits = fit.ladder_fit(cells, noise, pairs, n_boot=args.fit_boot, rng=seed)
    flops = flops_by_size(rows)
    mod = [m for r in REFS for o in sorted(cells) if is_mod(o) and o in flops and r in flops
           for m in [fit.compute_multiplier(cells, flops, r, o, noise, n_boot=args.fit_boot, rng=seed)] if m]
    return {"setting": key[0], "corpus": key[1], "tokens_per_param": key[2] if len(key) > 2 else None,
            "key": list(key), "runs": len(rows), "sizes": sizes, "arms": sorted(cells),
            "arm_sigma": arm_sigmas(noise), "comparisons": comparisons(cells, noise, n_boot, seed),
            "fit": fits, "mod": mod, "lr_fit": {a: fit.lr_fit(sz) for a, sz in sorted(cells.items())},
            "extras": extras(rows, cells)}


def build(args) -> dict:
    rows = load_rows(args.runs)
    fields = fields_of(rows)
    groups = stats.group(rows, fields=fields)
    sections = []
    n_boot = replicates_for(sum(len(comparison_pairs(c)) for c in groups.values()), args.boot)
    for i, (key, cells) in enumerate(sorted(groups.items())):
        here = [r for r in rows if stats.row_key(r, fields) == key]
        sections.append(section(key, here, cells, args, seed=1000 * i, n_boot=n_boot))
    stats.judge([c for s in sections for c in s["comparisons"]])  # Holm over the whole report
    fit.judge_slopes([p for s in sections if s["fit"].get("fit") for p in s["fit"]["pairs"]])
    report = {"runs_file": rel(args.runs), "runs": len(rows), "corpora": sorted({k[1] for k in groups}),
              "diverged": sum(bool(r.get("diverged")) for r in rows),
              "commits": len({r.get("commit") for r in rows}),
              "dirty": sum(str(r.get("commit")).endswith("-dirty") for r in rows),
              "devices": dict(collections.Counter(r.get("device", "?") for r in rows).most_common()),
              "sections": sections, "alpha": stats.ALPHA, "boot": n_boot, "fit_boot": args.fit_boot}
    return report


# ---------------------------------------------------------------- plots


def _save(fig, path: Path) -> str:
    """Write and close one figure; its file name, for the report's list."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot(section: dict, cells: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem_ = stem(section)
    written = []
    f = section["fit"].get("fit")
    e = f["E"] if f else 0.0

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, sizes in sorted(cells.items()):
        ns, ls = fit.best_curve(sizes)
        line = ax.plot(ns, ls - e, marker="o", ls="" if f and arm in f["arms"] else "-", label=arm)[0]
        for n in ns:  # the seeds of the best-LR cell, as points
            lr, _ = stats.best(sizes[int(n)])
            ax.scatter([n] * len(sizes[int(n)][lr]), sizes[int(n)][lr] - e, s=8, color=line.get_color(), alpha=0.5)
        if f and arm in f["arms"]:
            grid = np.geomspace(ns.min(), ns.max(), 50)
            ax.plot(grid, fit.predict(f, arm, grid) - e, color=line.get_color(), lw=1)
    ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N",
           ylabel=f"val loss − E (E = {e:.3f})" if f else "val loss (no fit yet)",
           title=f"{section['setting']} · {short(section['corpus'])}: best-LR loss against N")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / f"{stem_}_loss.png"))

    if section["fit"]["pairs"]:
        # one panel per reference this setting runs (depth has no pre_ln_embed_norm), and one
        # for the options against their own controls
        panels = [*(r for r in REFS if r in cells), *(["control"] if any(p["ref"] not in REFS for p in section["fit"]["pairs"]) else [])]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, ref in zip(axes[0], panels):
            for p in (p for p in section["fit"]["pairs"] if p["ref"] == ref or (ref == "control" and p["ref"] not in REFS)):
                ms = [m for m in p["m"] if not m["extrapolation"]]
                x = [m["N"] for m in ms]
                name = p["option"] if ref != "control" else f"{p['option']} vs {p['ref']}"
                line = ax.plot(x, [m["m"] for m in ms], marker="o", label=f"{name} ({p['verdict']})")[0]
                ax.fill_between(x, [m["lo"] for m in ms], [m["hi"] for m in ms], color=line.get_color(), alpha=0.2)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set(xscale="log", yscale="log", xlabel="N", ylabel="effective-size multiplier m(N)",
                   title="options vs their controls" if ref == "control" else f"vs {ref}")
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no option fitted against it yet", transform=ax.transAxes, ha="center")
        written.append(_save(fig, out / f"{stem_}_m.png"))

    arms = sorted(cells)
    ncols = min(4, len(arms))
    fig, axes = plt.subplots(math.ceil(len(arms) / ncols), ncols, figsize=(3.5 * ncols, 3 * math.ceil(len(arms) / ncols)),
                             squeeze=False)
    for ax, arm in zip(axes.flat, arms):
        for size, lrs in cells[arm].items():
            line = ax.plot(list(lrs), [v.mean() for v in lrs.values()], marker="o", label=f"N={size:.3g}")[0]
            for lr, v in lrs.items():
                ax.scatter([lr] * len(v), v, s=6, color=line.get_color(), alpha=0.5)
        ax.set(xscale="log", xlabel="LR", ylabel="val loss", title=arm)
        # ticks at the LRs run, written plainly: a grid under a decade wide gets log-scale minor
        # labels ("2×10⁻³") that run into each other
        grid = sorted({lr for lrs in cells[arm].values() for lr in lrs})
        ax.set_xticks(grid, [f"{lr:g}" for lr in grid], rotation=45, fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(arms):]:
        ax.axis("off")
    written.append(_save(fig, out / f"{stem_}_lr.png"))
    return written


# ---------------------------------------------------------------- markdown


def _comparison_table(comps: list[dict]) -> list[str]:
    out = ["| arm | vs | N | best LR arm (ref) | Δ val loss | 95% interval | p | p (Holm) | verdict |",
           "|---|---|---:|---|---:|---|---:|---:|---|"]
    for c in comps:
        edge = lambda lr, e: f"{lr:g}{' **edge**' if e else ''}"  # noqa: E731
        v = c["verdict"] if c["verdict"] == "undecided" else f"**{c['verdict']}**"
        out.append(f"| {c['arm']} | {c['ref']} | {c['size']:.3g} | {edge(c['arm_lr'], c['arm_edge'])} "
                f"({edge(c['ref_lr'], c['ref_edge'])}) | {c['delta']:+.4f} | [{_fmt(c['lo'], '+.4f')}, "
                f"{_fmt(c['hi'], '+.4f')}] | {c['p']:.3f} | {c['p_holm']:.3f} | {v} |")
    return out


def _sigmas(arm_sigma: dict) -> str:
    return ", ".join(f"{a} {v['sigma']:.3f} ({v['df']} df)" for a, v in arm_sigma.items()) or "-"


def markdown(rep: dict, plots: dict) -> str:
    out = ["# Option ladder", ""]
    secs = rep["sections"]
    out += [f"{rep['runs']} run(s) from `{rep['runs_file']}`" + (f", {rep['diverged']} of them diverged (their LR "
                                                                 "counts as +inf: never best, still in the grid)."
                                                                 if rep.get("diverged") else ".")]
    if rep.get("devices"):
        out += ["", f"Provenance: {rep['commits']} commit(s), {rep['dirty']} row(s) from a dirty tree; devices: "
                f"{', '.join(f'{d} ({n})' for d, n in rep['devices'].items())}."
                + (" Rows of different CPUs are pooled: the same run differs between them by far less than seed "
                   "noise (benchmarks/README.md, Option ladder)." if len(rep["devices"]) > 1 else "")]
    if len(rep["corpora"]) > 1:
        out += [f"**{len(rep['corpora'])} corpora** ({', '.join(short(c) for c in rep['corpora'])}): rows of "
                "different corpora are never pooled; each (setting, corpus) has its own section."]
    if not secs:
        out += ["", "No runs yet: every comparison and slope is undecided."]
    out += ["", "Method (benchmarks/ladder/stats.py, fit.py): each arm at its own best LR per size against each "
            f"reference ({', '.join(REFS)}), and each option against its control (arms.py: "
            f"{', '.join(f'{a.control_for} vs {c}' for c, a in ARMS.items() if a.control_for and c not in REFS)}); "
            "Δ = arm − ref val loss (negative: the arm is better). Intervals bound the best-LR selection for any shape of the LR "
            "curves (each arm's seed σ² pooled over the cells near its best LR at every size, drawn from its posterior; why per arm: stats.py); verdicts need Holm's "
            f"adjusted p < {rep['alpha']} over all {sum(len(s['comparisons']) for s in secs)} comparisons of this "
            "report **and** an interval that excludes 0, else *undecided*. **edge**: the best LR is at the end of "
            "its grid (its optimum may lie beyond, so its loss only bounds the tuned one): an arm at its edge is "
            "never called worse, nor an arm better than a reference at its edge.", ""]
    for s in secs:
        tpp = f" · {s['tokens_per_param']:g} tokens/param" if s.get("tokens_per_param") is not None else ""
        out += [f"## {s['setting']} · corpus {short(s['corpus'])}{tpp}", "",
                f"**{len(s['sizes'])} size(s) so far**: N = {', '.join(f'{n:.3g}' for n in s['sizes'])}; arms: "
                f"{', '.join(s['arms'])}; {s['runs']} runs. Seed σ per arm, near its best LRs: {_sigmas(s['arm_sigma'])}.", ""]
        for name in plots.get(tuple(s["key"]), []):
            out.append(f"![{name}]({name})")
        out += ["", "### Comparisons at each size", ""]
        out += _comparison_table(s["comparisons"]) if s["comparisons"] else ["No arm shares a size with a reference yet."]
        f = s["fit"]
        out += ["", "### Scaling fit: L(N) = E + A·N^−α, E shared", ""]
        if not f.get("fit"):
            out += [f"{f['note']}."]
        else:
            lo, hi = f["E_interval"]
            out += [f"E = {f['fit']['E']:.4f} [{_fmt(lo)}, {_fmt(hi)}]; arms fitted: {', '.join(f['arms_fitted'])}."]
            if f["fit"]["E"] < 1e-6:
                out[-1] += (" E sits at its lower bound 0: these sizes cannot separate an irreducible loss from the "
                            "power law, so each α is the log-log slope of the loss itself (a positive E would make "
                            "every α larger), and α and m(N) will move when larger rungs pin E down.")
            out += ["", "| arm | α | 95% interval | A |", "|---|---:|---|---:|"]
            out += [f"| {a} | {v['value']:.3f} | [{_fmt(v['lo'], '.3f')}, {_fmt(v['hi'], '.3f')}] | {v['A']:.4g} |"
                    for a, v in f["alpha"].items()]
            out += ["", "### Effective-size multiplier m(N) (the reference's size factor that matches the option)", "",
                    "| option | vs | m at each N [95%] | m at N=1e9 (extrapolation) | slope d log m/d log N [95%] | "
                    "p (Holm) | verdict |", "|---|---|---|---|---|---:|---|"]
            for p in f["pairs"]:
                ms = "; ".join(f"{m['N']:.3g}: {m['m']:.3g} [{m['lo']:.3g}, {m['hi']:.3g}]"
                               for m in p["m"] if not m["extrapolation"])
                x = p["m"][-1]
                v = p["verdict"] if p["verdict"] == "undecided" else f"**{p['verdict']}**"
                if p.get("edges"):
                    v += f" (best LR at an edge at N = {', '.join(f'{n:.3g}' for n in p['edges'])})"
                out.append(f"| {p['option']} | {p['ref']} | {ms} | {x['m']:.3g} [{x['lo']:.3g}, {x['hi']:.3g}] | "
                           f"{p['slope']:+.3f} [{_fmt(p['slope_lo'], '+.3f')}, {_fmt(p['slope_hi'], '+.3f')}] | "
                           f"{p['p_holm']:.3f} | {v} |")
            out += ["", "slope > 0: the option's gain grows with scale; < 0: it shrinks (a verdict needs the interval "
                    "to exclude 0, Holm over the report's slopes, and every size's best LR bracketed for both arms)."]
        if s["mod"]:
            out += ["", "### Mixture-of-Depths against the dense loss-vs-FLOPs frontier", "",
                    "| option | dense | N | FLOPs C | loss | dense compute needed / C [95%] |", "|---|---|---:|---:|---:|---|"]
            for m in s["mod"]:
                for r in m["at"]:
                    flag = " (extrapolation)" if r["extrapolation"] else ""
                    out.append(f"| {m['option']} | {m['dense']} (β={m['frontier']['beta']:.3f}) | {r['N']:.3g} | "
                               f"{r['C']:.3g} | {r['loss']:.4f} | {r['multiplier']:.3g} [{r['lo']:.3g}, "
                               f"{r['hi']:.3g}]{flag} |")
        out += ["", "### Best LR against size: log lr* = a + b·log N", "", "| arm | b | lr* per size | lr* at 1e9 |",
                "|---|---:|---|---:|"]
        for a, lf in s["lr_fit"].items():
            pts = "; ".join(f"{p['N']:.3g}: {p['lr']:.3g}{'' if p['bracketed'] else ' (edge)'}" for p in lf["points"])
            out.append(f"| {a} | {lf['b']:+.3f} | {pts} | {lr_at_1b(lf)} |")
        if s["extras"]:
            out += ["", "### Beside val loss (at each arm's best val-loss LR, mean over seeds)", "",
                    "| arm | N | OOD loss | induction | loss, first ¼ of positions | loss, last ¼ |",
                    "|---|---:|---:|---:|---:|---:|"]
            out += [f"| {r['arm']} | {r['size']:.3g} | {_fmt(r.get('ood_loss'))} | {_fmt(r.get('induction'))} | "
                    f"{_fmt(r.get('loss_first_quarter'))} | {_fmt(r.get('loss_last_quarter'))} |" for r in s["extras"]]
        out.append("")
    out += ["The old ablation (one size per setting) is re-judged by the same statistics in "
            "[ablation.md](ablation.md), beside its old rule's verdicts (`python -m benchmarks.ablate --report-only`).",
            ""]
    return "\n".join(out) + "\n"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k) if not isinstance(k, str) else k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=RESULTS / "ladder_runs.jsonl", help="the runner's rows (JSON lines)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where ladder.md, ladder.json and the PNGs go")
    ap.add_argument("--boot", type=int, default=stats.N_BOOT, help="replicates per comparison")
    # 2000, not fit.N_BOOT's 200: p near Holm's threshold needs it. 200 refits (standard error
    # 0.015 at p = 0.05) put Peri-LN's slope at p 0.050, "shrinks"; 2000 put the same 239 rows
    # at 0.062, undecided. 2000 refits take about a minute.
    ap.add_argument("--fit-boot", type=int, default=REPORT_FIT_BOOT, help="bootstrap refits per scaling fit")
    args = ap.parse_args(argv)
    rep = build(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.runs)
    groups = stats.group(rows, fields=fields_of(rows))
    plots = {}
    for s in rep["sections"]:
        names = plot(s, groups[tuple(s["key"])], args.out)
        s["plots"] = [rel(args.out / n) for n in names]
        plots[tuple(s["key"])] = names
    (args.out / "ladder.json").write_text(json.dumps(_jsonable(rep), indent=1))
    (args.out / "ladder.md").write_text(markdown(rep, plots))
    print(f"wrote {rel(args.out / 'ladder.md')} and ladder.json ({rep['runs']} runs, {len(rep['sections'])} section(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
