"""The loop's parts own their cadence (trainer/loop.py only orders them): when to save, stop,
evaluate and run diagnostics, and how a step advances the train state."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.helpers import ROOT
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.preemption import StopRequest
from trainer.checkpoint.state import TrainState
from trainer.config import load_config
from trainer.evaluation.diagnostics import Diagnostics
from trainer.evaluation.evaluator import Evaluator
from trainer.parallel.layout import BatchLayout


class _Dist:
    """A one-rank stand-in whose `any` is what the other ranks would report."""

    def __init__(self, others: bool = False):
        self.others = others

    def any(self, flag: bool) -> bool:
        return flag or self.others


def test_checkpointer_saves_every_n_steps_at_the_end_and_when_stopping(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, dist=None, every=3, last_step=10)
    assert [s for s in range(1, 11) if ckpt.should_save(s)] == [3, 6, 9, 10]
    assert ckpt.should_save(4, stopping=True)
    off = Checkpointer(tmp_path, keep=2, dist=None, every=0, last_step=10)
    assert [s for s in range(1, 11) if off.should_save(s)] == [10]
    saved = []
    ckpt.save = lambda engine, state: saved.append(state.step)
    for s in range(1, 11):
        ckpt.maybe_save(TrainState(step=s), None, stopping=s == 4)
    assert saved == [3, 4, 6, 9, 10]  # the loop's hook: the same cadence, state and engine in


def test_stop_reason_names_the_signal_the_stop_step_or_another_rank():
    stop = StopRequest(stop_at=5)
    assert stop.reason(4, _Dist()) is None
    assert stop.reason(5, _Dist()) == "run.stop_at"
    assert stop.reason(4, _Dist(others=True)) == "a stop request on another rank"
    stop.signal = "SIGUSR1"
    assert stop.reason(2, _Dist()) == "SIGUSR1"


def test_train_state_advances_and_counts_consecutive_bad_steps():
    st = TrainState(n_layers=2)
    for skipped in (False, True, True, False, True):
        st.advance(skipped, BatchLayout(micro_batch=4, grad_accum=2, seq_len=64, dp_size=1))
    assert (st.step, st.samples, st.tokens, st.bad_steps) == (5, 40, 40 * 64, 1)


@pytest.mark.parametrize("eval_every,diag_every", [(4, 3), (0, 0)])
def test_eval_and_diagnostics_cadence(eval_every, diag_every, monkeypatch):
    cfg = load_config(ROOT / "configs/tiny.yaml", ["run.max_steps=10", f"run.eval_every={eval_every}",
                                                   f"logging.diag_every={diag_every}"])
    logged = []
    sink = SimpleNamespace(log=logged.append)
    ev = Evaluator(cfg, None, None, sink)
    ev.row = lambda engine, state: {"step": state.step, "val_loss": 1.0}
    diag = Diagnostics(cfg, None, None, sink)
    evals = [s for s in range(1, 11) if ev.maybe_run(TrainState(step=s), None)]
    assert evals == ([4, 8, 10] if eval_every else [10])  # and always after the last step
    d_calls = []
    monkeypatch.setattr("trainer.evaluation.diagnostics.depth_diagnostics",
                        lambda engine, data, dist, cfg, step: d_calls.append(step) or {"step": step})
    for s in range(1, 11):
        diag.maybe_run(TrainState(step=s), None)
    assert d_calls == ([3, 6, 9] if diag_every else [])
    assert len(logged) == len(evals) + len(d_calls)
