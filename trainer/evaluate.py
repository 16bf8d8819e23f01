"""`python -m trainer.evaluate RUN_DIR --tasks T1,T2 [--limit N]`: lm-evaluation-harness on a run.

The run's checkpoint is exported (`trainer.export`) to a temporary directory and scored by
lm_eval's own Hugging Face model class (`HFLM`, trust_remote_code, fp32), so the numbers are
the ones anyone evaluating the exported model would get. Task names are lm_eval's built-in
tasks plus the YAML tasks in `trainer/tasks/` (and `--include-path DIR`). Built-in tasks
download their datasets from the Hugging Face hub unless they are cached; with
`HF_DATASETS_OFFLINE=1` nothing touches the network.

The same function runs in the training loop when `run.eval_tasks` is set, logging
`eval/<task>/<metric>` rows (see `trainer/downstream.py`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from trainer.errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def task_manager(include_path: Sequence[str | Path] = ()):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_path)])


def check_tasks(tm, tasks: Sequence[str], key: str = "--tasks") -> None:
    """One-line error naming unknown tasks, before any model is loaded."""
    if not tasks:
        raise UserError(f"{key} is empty: name at least one lm_eval task, e.g. harness_smoke or hellaswag")
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        local = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
        raise UserError(f"{key}: unknown lm_eval task(s) {', '.join(unknown)}; accepted: lm_eval's task names "
                        f"(`lm_eval ls tasks`), the local tasks {', '.join(local)}, or YAML tasks under "
                        f"--include-path")


def check_datasets(tm, tasks: Sequence[str]) -> None:
    """Load each task (and so its dataset) once before any export: a dataset that cannot be
    had (offline, or the hub unreachable) is one line naming the task, not lm_eval's traceback
    after the export. A loaded dataset is cached, so lm_eval's own load reads it again cheaply."""
    import os

    from trainer.data.sources import first_line

    for task in tasks:
        try:
            tm.load([task])
        except Exception as e:  # datasets and the hub raise many types; all mean "no dataset"
            offline = os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
            fix = ("HF_DATASETS_OFFLINE is set and it is not cached: run once with network access and "
                   "HF_DATASETS_OFFLINE unset to cache it" if offline else
                   "run once where the Hugging Face hub is reachable to cache it (then HF_DATASETS_OFFLINE=1 "
                   "uses the cache without the network and fails at once when a dataset is missing)")
            raise UserError(f"--tasks {task}: could not load its dataset ({first_line(e)[:200]}); {fix}") from None


def single_process_lm(export_dir: Path, batch_size: int = 8, device: str = "cpu"):
    """lm_eval's `HFLM` over the exported model, as one process with a world of one.

    Given a path, HFLM builds an `accelerate.Accelerator`, which under torchrun adopts the
    job's processes: on 2+ GPUs it takes the job's world size and gathers on rank 0 alone
    while the other ranks wait (the in-loop eval runs on rank 0 only), a hang. Given a model
    object it skips that and uses rank 0 of 1. The model is the export loaded by
    `transformers` (fp32, remote code), as anyone evaluating the export would load it."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    return HFLM(pretrained=model.to(device).eval(), tokenizer=tokenizer, batch_size=batch_size)


def run_lm_eval(export_dir: Path, tasks: Sequence[str], tm, limit: int | None = None, batch_size: int = 8,
                device: str = "cpu", log_samples: bool = False) -> dict:
    """lm_eval's `simple_evaluate` on an exported model directory; its results dict."""
    from lm_eval import simple_evaluate

    lm = single_process_lm(export_dir, batch_size, device)
    # bootstrap_iters=0: no bootstrapped stderr, which costs minutes on CPU for nothing here.
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, bootstrap_iters=0,
                           log_samples=log_samples)


def metric_row(results: dict) -> dict[str, float]:
    """{"eval/<task>/<metric>": value}; a non-default lm_eval filter is appended as /<filter>."""
    row = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            row[f"eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return row


def evaluate(run_dir: Path, tasks: Sequence[str], limit: int | None = None, step: int | None = None,
             batch_size: int = 8, device: str = "cpu", include_path: Sequence[str | Path] = (),
             log_samples: bool = False) -> dict:
    """Export the run's checkpoint to a temporary directory and run lm_eval on it."""
    from trainer.export import export
    from trainer.generate import run_dir_or_error

    run_dir = run_dir_or_error(run_dir)
    tm = task_manager(include_path)
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
