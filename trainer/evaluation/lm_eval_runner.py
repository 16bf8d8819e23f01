"""lm-evaluation-harness on an exported model: task lookup and checks, the HF model wrapper,
the run, and the metrics row (used by `python -m trainer.evaluate` and, during training,
by trainer/evaluation/downstream.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from trainer.data.sources import first_line
from trainer.errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def task_manager(tasks: Sequence[str] = (), include_path: Sequence[str | Path] = ()):
    """lm_eval's TaskManager over the local tasks and `include_path`, and over lm_eval's own
    ~15,000 task configs only when `tasks` may need one of them: indexing those takes seconds in
    every process that evaluates, which runs on local tasks alone never need. Only plain tasks
    (YAML or Python) found locally skip it: a local group or tag may name lm_eval's own tasks,
    and an unknown name gets the full index, so check_tasks can say so."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_path)]
    if tasks:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            return local
    return TaskManager(include_path=paths)


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
