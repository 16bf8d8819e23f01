"""`python -m trainer.evaluate RUN_DIR --tasks T1,T2 [--limit N]`: lm-evaluation-harness on a run.

The run's checkpoint is exported (`trainer.export`) to a temporary directory and scored by
lm_eval's own Hugging Face model class (`HFLM`, trust_remote_code, fp32), so the numbers are
the ones anyone evaluating the exported model would get. Task names are lm_eval's built-in
tasks plus the YAML tasks in `trainer/evaluation/tasks/` (and `--include-path DIR`). Built-in tasks
download their datasets from the Hugging Face hub unless they are cached; with
`HF_DATASETS_OFFLINE=1` nothing touches the network.

The same function runs in the training loop when `run.eval_tasks` is set, logging
`eval/<task>/<metric>` rows (see `trainer/evaluation/downstream.py`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from trainer.errors import UserError
from trainer.evaluation.lm_eval_runner import check_datasets, check_tasks, run_lm_eval, task_manager
from trainer.export import export
from trainer.export.load import run_dir_or_error


def evaluate(run_dir: Path, tasks: Sequence[str], limit: int | None = None, step: int | None = None,
             batch_size: int = 8, device: str = "cpu", include_path: Sequence[str | Path] = (),
             log_samples: bool = False) -> dict:
    """Export the run's checkpoint to a temporary directory and run lm_eval on it."""
    run_dir = run_dir_or_error(run_dir)
    tm = task_manager(tasks, include_path)
    check_tasks(tm, tasks)
    check_datasets(tm, tasks)
    with tempfile.TemporaryDirectory(prefix="harness-eval-") as tmp:
        out = export(run_dir, Path(tmp) / "model", step)
        return run_lm_eval(out, tasks, tm, limit, batch_size, device, log_samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="run dir (newest complete checkpoint) or checkpoints/step-N dir")
    ap.add_argument("--tasks", required=True, nargs="+", help="lm_eval task names, comma- or space-separated")
    ap.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1, ...)")
    ap.add_argument("--include-path", action="append", default=[], help="extra directory of lm_eval task YAMLs")
    ap.add_argument("--output", type=Path, default=None, help="write lm_eval's results (with samples) as JSON")
    args = ap.parse_args(argv)
    tasks = [t for arg in args.tasks for t in arg.split(",") if t]
    try:
        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit={args.limit} is invalid: must be a positive integer")
        results = evaluate(args.run_dir, tasks, args.limit, args.step, args.batch_size, args.device,
                           args.include_path, log_samples=args.output is not None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
