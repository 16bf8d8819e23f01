"""Run every benchmark: `python -m benchmarks.run_all [--only a,b] [--skip a,b] [--dry-run]` (`make bench`).

A benchmark is a module `benchmarks/<name>.py` that defines `main(argv)` and writes
`benchmarks/results/<name>.json`. Each runs in its own process, `python -m benchmarks.<name>`
with its defaults, one after another, so thread settings, process groups and memory never
leak between them and each JSON records the command that reproduces it. Known ones run in
ORDER; any other module with a `main` runs after them, unless it is in NOT_BENCHMARKS.
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time

from benchmarks.common import RESULTS, ROOT

ORDER = ("throughput", "mod", "ulysses_memory", "growth")
NOT_BENCHMARKS = {
    "run_all": "this runner",
    "common": "shared helpers",
    "ablate": "hours of training runs; `make ablate` runs it",
    "plot_diagnostics": "plots existing runs, measures nothing",
}


def has_main(path) -> bool:
    """Whether the module defines a top-level `main` (read from its source, not imported)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def discover() -> list[str]:
    found = {p.stem for p in (ROOT / "benchmarks").glob("*.py")
             if not p.stem.startswith("_") and p.stem not in NOT_BENCHMARKS and has_main(p)}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated names to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated names not to run")
    ap.add_argument("--dry-run", action="store_true", help="list the commands and exit")
    args = ap.parse_args(argv)
    names = discover()
    only = [n for n in args.only.split(",") if n]
    unknown = set(only) - set(names)
    if unknown:
        print(f"error: --only {','.join(sorted(unknown))}: no such benchmark; available: {', '.join(names)}",
              file=sys.stderr)
        return 2
    skip = {n for n in args.skip.split(",") if n}
    names = [n for n in names if (not only or n in only) and n not in skip]
    failed = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}"]
        print(f"== {name}: python -m benchmarks.{name}", flush=True)
        if args.dry_run:
            continue
        start = time.time()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        result = RESULTS / f"{name}.json"
        wrote = result.exists() and result.stat().st_mtime >= start
        print(f"== {name}: exit {rc} after {time.time() - start:.0f} s"
              + (f", wrote {result.relative_to(ROOT)}" if wrote else ", no new result"), flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
