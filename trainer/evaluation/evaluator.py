"""Validation at the eval cadence (every run.eval_every steps and after the last step): the
validation loss and perplexity (MoD: the causal rule, with top-k beside it), and each extra
held-out set of `data.eval` as `val/<name>_loss`."""
from __future__ import annotations

import math

from trainer.checkpoint.state import TrainState
from trainer.config import RunConfig
from trainer.evaluation.downstream import make_downstream
from trainer.parallel.dist import Dist
from trainer.step import evaluate


class Evaluator:
    def __init__(self, cfg: RunConfig, dist: Dist, data, metrics):
        self.cfg, self.dist, self.data, self.metrics = cfg, dist, data, metrics
        self.downstream = make_downstream(cfg, dist, cfg.run_dir)  # run.eval_tasks; checks the names now

    def due(self, step: int) -> bool:
        every = self.cfg.run.eval_every
        return bool(every and step % every == 0) or step == self.cfg.run.max_steps

    def maybe_run(self, state: TrainState, engine) -> dict | None:
        """Evaluate and log a row when `state.step` is due; every rank calls it (collectives)."""
        if not self.due(state.step):
            return None
        row = self.row(engine, state)
        self.metrics.log(row)
        if tasks_row := self.downstream.run(engine, state.step):
            self.metrics.log(tasks_row)
        return row

    def row(self, engine, state: TrainState) -> dict:
        cfg, dist = self.cfg, self.dist
        # MoD's top-k routing picks a block's tokens by looking at the whole sequence, later
        # tokens included, so its loss is not a causal LM's. The headline val_loss uses the
        # causal rule (what generation runs); the top-k figure (as trained) sits beside it.
        mod = cfg.model.mod.capacity > 0
        row = {"step": state.step, "val_loss": evaluate(engine, self.data, dist, cfg, causal=mod),
               "n_layers": state.n_layers}
        row["val_ppl"] = math.exp(min(row["val_loss"], 69.0))  # e^69 ≈ 1e30: finite in JSON
        if mod:
            row["val_loss_topk"] = evaluate(engine, self.data, dist, cfg)
        for name, held_out in self.data.eval_sets.items():  # data.eval: extra held-out sets, same rule
            row[f"val/{name}_loss"] = evaluate(engine, held_out, dist, cfg, causal=mod)
        return row
