"""Eval is split across DP ranks: rank r evaluates validation batches r, r + dp, ..., and
one all-reduce of the sums gives the unsharded mean (2 gloo ranks against 1 process)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import ROOT, torchrun_module
from trainer.config import load_config
from trainer.step import evaluate

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=64", "model.max_seq_len=16",
        "data.seq_len=16", "parallel.micro_batch=2", "run.eval_batches=3"]


class _ValData:
    def __init__(self, batches):
        self.batches = batches

    def val_batches(self, n, micro):
        return iter(self.batches[:n])


def evaluate_fixture(dist) -> tuple[float, int]:
    """(val loss, forwards run) of a seeded model on 3 fixed batches: with 2 DP ranks one
    rank holds 2 batches, the other 1 (plus the uncounted forward that keeps ZeRO-3 in step)."""
    from model import Transformer

    cfg = load_config(ROOT / "configs/tiny.yaml", TINY)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
               for _ in range(3)]
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    return evaluate(model, _ValData(batches), dist, cfg), len(forwards)


def test_val_loss_on_two_dp_ranks_equals_one_process(tmp_path):
    from trainer.dist import Dist

    alone, forwards = evaluate_fixture(Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), sp=1))
    assert forwards == 3
    proc = torchrun_module("tests.workers.eval_dp", 2, str(tmp_path / "out"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert [r["forwards"] for r in ranks] == [2, 2]  # rank 1: its batch and the spare forward
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"] == pytest.approx(alone, rel=1e-6)
