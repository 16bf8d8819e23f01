"""What the console says about a run: one line per eval with the val loss, and the val loss
in the final summary (issue 26)."""
from __future__ import annotations

import torch

from tests.helpers import ROOT
from trainer.checkpoint.state import TrainState
from trainer.config import load_config
from trainer.metrics import Metrics, Throughput
from trainer.parallel.dist import Dist
from trainer.parallel.layout import BatchLayout


def _metrics(tmp_path, *overrides: str) -> Metrics:
    cfg = load_config(ROOT / "configs/tiny.yaml", ["logging.wandb_mode=disabled", "logging.progress=false",
                                                   *overrides])
    dist = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), sp=1)
    return Metrics(cfg, tmp_path, 0, Throughput(cfg, dist, BatchLayout.build(cfg, dist), peak_flops=1e12))


def test_each_eval_prints_one_val_loss_line_and_the_summary_ends_with_the_last(tmp_path, capsys):
    m = _metrics(tmp_path)
    m.log({"step": 50, "val_loss": 3.25, "val_ppl": 25.79, "n_layers": 4})
    m.log({"step": 100, "val_loss": 2.5, "val_ppl": 12.18, "n_layers": 4, "val_loss_topk": 2.4,
           "val/held_loss": 2.75})
    m.log({"step": 100, "loss": 2.4})  # a training row prints nothing
    m.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 50: val loss 3.2500 (ppl 25.79)",
        "step 100: val loss 2.5000 (ppl 12.18), top-k routing 2.4000; held-out: held 2.7500",
    ]
    state = TrainState(n_layers=4)
    state.step = 100
    m.first_loss, m.last = 7.7, {"loss": 2.4, "tokens_per_s": 1000.0}
    assert "loss 7.7000 -> 2.4000, val loss 2.5000 at step 100," in m.summary(state, None, tmp_path)


def test_summary_without_an_eval_has_no_val_loss(tmp_path):
    m = _metrics(tmp_path)
    m.close()
    m.first_loss, m.last = 7.7, {"loss": 2.4}
    assert "val loss" not in m.summary(TrainState(n_layers=4), None, tmp_path)
