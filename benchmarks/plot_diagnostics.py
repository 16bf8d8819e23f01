"""Plots of the depth diagnostics (trainer/evaluation/diagnostics.py) from runs' metrics.jsonl.

    python -m benchmarks.plot_diagnostics RUN_DIR [RUN_DIR ...] [--out PNG]

Per run: `<run_dir>/plots/diagnostics.png`, residual RMS, angle, grad norm and attention
entropy against the layer at every diag step (light to dark = early to late).
With several runs, or `--out`: one figure of the same four panels at each run's last diag
step, one line per run (default `<first run's parent>/diagnostics_compare.png`).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# (series in `diag/<series>/l<l>`, panel title, log scale)
PANELS = [("resid_rms", "residual-stream RMS after block l", True),
          ("angle", "angle(block input, output) / π", False),
          ("grad_norm", "grad norm of block l", True),
          ("attn_entropy", "attention entropy (nats)", False)]


def diag_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("diag")]


def profile(row: dict, series: str) -> tuple[list[int], list[float]]:
    """Layers and values of one per-layer series in a diag row, by layer."""
    pattern = re.compile(rf"^diag/{series}/l(\d+)$")
    found = sorted((int(m.group(1)), v) for k, v in row.items() if (m := pattern.match(k)))
    return [layer for layer, _ in found], [v for _, v in found]


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (_, name, log) in zip(axes, PANELS):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("layer l")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return fig, axes


def plot_run(run_dir: Path) -> Path | None:
    """Every diag step of one run; returns the PNG path, or None if it has no diag rows."""
    rows = diag_rows(run_dir)
    if not rows:
        return None
    import matplotlib.pyplot as plt

    fig, axes = _figure(f"{Path(run_dir).name}: depth diagnostics by step")
    cmap = plt.get_cmap("viridis")
    for i, row in enumerate(rows):
        shade = cmap(0.15 + 0.75 * i / max(1, len(rows) - 1))
        for ax, (series, _, _) in zip(axes, PANELS):
            layers, values = profile(row, series)
            ax.plot(layers, values, marker=".", color=shade, lw=1.5 if i == len(rows) - 1 else 0.8,
                    label=f"step {row['step']}")
    axes[-1].legend(fontsize=7, loc="best")
    out = Path(run_dir) / "plots" / "diagnostics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_compare(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """The last diag step of each run, one line per run."""
    import matplotlib.pyplot as plt

    fig, axes = _figure("depth diagnostics at the last diag step")
    for i, run_dir in enumerate(run_dirs):
        rows = diag_rows(run_dir)
        if not rows:
            continue
        label = (labels[i] if labels else Path(run_dir).name) + f" (step {rows[-1]['step']})"
        for ax, (series, _, _) in zip(axes, PANELS):
            layers, values = profile(rows[-1], series)
            ax.plot(layers, values, marker=".", label=label)
    axes[0].legend(fontsize=7, loc="best")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    ap.add_argument("--out", type=Path, help="combined PNG (default with several runs: "
                                             "<first run's parent>/diagnostics_compare.png)")
    args = ap.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        ap.error(f"no metrics.jsonl in {', '.join(missing)}")
    for run_dir in args.run_dirs:
        path = plot_run(run_dir)
        print(path or f"{run_dir}: no diag rows (run with logging.diag_every > 0)")
    if args.out or len(args.run_dirs) > 1:
        print(plot_compare(args.run_dirs, args.out or args.run_dirs[0].parent / "diagnostics_compare.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
