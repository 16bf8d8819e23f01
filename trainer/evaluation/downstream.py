"""Downstream evaluation inside the training loop: `run.eval_tasks` (lm_eval task names).

At the validation cadence the current weights are exported (the same `trainer.export` path
as `python -m trainer.evaluate`) to `<run_dir>/downstream/step-N/`, scored by lm_eval's
`HFLM` on rank 0, and logged as one `eval/<task>/<metric>` row; the export is deleted after.
The weights are the fp32 masters (gathered from every rank under ZeRO), taken from the
engine, not read back from a checkpoint; other ranks then wait for rank 0's marker file
(`checkpoint.rank0_work`), not in a barrier that parallel.timeout_minutes would end. lm_eval
is given a model object, so it runs as one process even under torchrun. Building the
export model and lm_eval both use the global RNGs (lm_eval seeds them for reproducible
evaluation); the training process's RNG states are restored afterwards, so a run with
downstream evals trains exactly as one without.
"""
from __future__ import annotations

import random
import shutil

import numpy as np
import torch

from model import Transformer
from trainer.checkpoint.checkpointer import rank0_work
from trainer.config import RunConfig
from trainer.evaluation.lm_eval_runner import check_tasks, metric_row, run_lm_eval, task_manager
from trainer.export.hf import write_export
from trainer.parallel import ds_state
from trainer.parallel.dist import Dist


class DownstreamEval:
    def __init__(self, cfg: RunConfig, dist: Dist, run_dir):
        self.tasks, self.limit = list(cfg.run.eval_tasks), cfg.run.eval_tasks_limit or None
        self.batch_size = cfg.parallel.micro_batch
        self.dist, self.dir = dist, run_dir / "downstream"
        self.marker = run_dir / "downstream.status"
        self.tokenizer = run_dir / "tokenizer" / "tokenizer.model"
        self.tm = task_manager(self.tasks)
        check_tasks(self.tm, self.tasks, "run.eval_tasks")  # before training starts, on every rank

    def run(self, engine, step: int) -> dict | None:
        """The `eval/<task>/<metric>` row on rank 0, None elsewhere."""
        weights = ds_state.fp32_weights(engine)
        rows = []

        def score() -> None:
            out = self.dir / f"step-{step}"
            py_state, np_state = random.getstate(), np.random.get_state()
            devices = [self.dist.device] if self.dist.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                model = Transformer(engine.module.cfg)
                missing, unexpected = model.load_state_dict(weights, strict=False)
                assert not unexpected and set(missing) <= {"lm_head.weight"} and \
                    (not missing or model.cfg.tie_embeddings), (missing, unexpected)
                write_export(model, self.tokenizer if self.tokenizer.is_file() else None, out)
                results = run_lm_eval(out, self.tasks, self.tm, self.limit, self.batch_size, str(self.dist.device))
            random.setstate(py_state)
            np.random.set_state(np_state)
            shutil.rmtree(out, ignore_errors=True)
            if not any(self.dir.iterdir()):
                self.dir.rmdir()
            rows.append({"step": step, **metric_row(results)})

        # A full task set can take longer than parallel.timeout_minutes, which bounds a barrier.
        rank0_work(self.dist, self.marker, f"the downstream eval at step {step}", score)
        return rows[0] if rows else None


class NoDownstreamEval:
    def run(self, engine, step: int) -> None:
        return None


def make_downstream(cfg: RunConfig, dist: Dist, run_dir) -> DownstreamEval | NoDownstreamEval:
    return DownstreamEval(cfg, dist, run_dir) if cfg.run.eval_tasks else NoDownstreamEval()
