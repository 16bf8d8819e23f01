"""Downstream evaluation inside the training loop: `run.eval_tasks` (lm_eval task names).

At the validation cadence the current weights are exported (the same `trainer.export` path
as `python -m trainer.evaluate`) to `<run_dir>/downstream/step-N/`, scored by lm_eval's
`HFLM` on rank 0, and logged as one `eval/<task>/<metric>` row; the export is deleted after.
Other ranks wait at a barrier (under ZeRO-3 they first help gather the weights). lm_eval
seeds the global RNGs for reproducible evaluation; the training process's RNG states are
restored afterwards, so a run with downstream evals trains exactly as one without.
"""
from __future__ import annotations

import random
import shutil
from contextlib import nullcontext

import numpy as np
import torch

from model import Transformer
from trainer.config import RunConfig
from trainer.dist import Dist


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of every weight; collective under ZeRO-3, so call it on all ranks."""
    module = engine.module
    gather = nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()))
    with gather:
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


class DownstreamEval:
    def __init__(self, cfg: RunConfig, dist: Dist, run_dir):
        from trainer.evaluate import check_tasks, task_manager

        self.tasks, self.limit = list(cfg.run.eval_tasks), cfg.run.eval_tasks_limit or None
        self.batch_size = cfg.parallel.micro_batch
        self.dist, self.dir = dist, run_dir / "downstream"
        self.tokenizer = run_dir / "tokenizer" / "tokenizer.model"
        self.tm = task_manager()
        check_tasks(self.tm, self.tasks, "run.eval_tasks")  # before training starts, on every rank

    def run(self, engine, step: int) -> dict | None:
        """The `eval/<task>/<metric>` row on rank 0, None elsewhere."""
        from trainer.evaluate import metric_row, run_lm_eval
        from trainer.hf_export import write_export

        state = full_state_dict(engine)
        row = None
        if self.dist.is_main:
            model = Transformer(engine.module.cfg)
            model.load_state_dict(state)
            out = self.dir / f"step-{step}"
            write_export(model, self.tokenizer if self.tokenizer.is_file() else None, out)
            py_state, np_state = random.getstate(), np.random.get_state()
            devices = [self.dist.device] if self.dist.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                results = run_lm_eval(out, self.tasks, self.tm, self.limit, self.batch_size, str(self.dist.device))
            random.setstate(py_state)
            np.random.set_state(np_state)
            shutil.rmtree(out, ignore_errors=True)
            if not any(self.dir.iterdir()):
                self.dir.rmdir()
            row = {"step": step, **metric_row(results)}
        self.dist.barrier()
        return row


class NoDownstreamEval:
    def run(self, engine, step: int) -> None:
        return None


def make_downstream(cfg: RunConfig, dist: Dist, run_dir) -> DownstreamEval | NoDownstreamEval:
    return DownstreamEval(cfg, dist, run_dir) if cfg.run.eval_tasks else NoDownstreamEval()
