"""Eval is split across DP ranks: rank r evaluates validation batches r, r + dp, ..., and
one all-reduce of the sums gives the unsharded mean (2 gloo ranks, `spawn_gloo`, against 1 process)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import ROOT, spawn_gloo
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


def _evaluate_on_rank(rank: int, world: int) -> tuple[float, int]:
    from trainer.parallel.dist import init_distributed

    return evaluate_fixture(init_distributed("gloo"))


def test_val_loss_on_two_dp_ranks_equals_one_process():
    from trainer.parallel.dist import Dist

    alone, forwards = evaluate_fixture(Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), sp=1))
    assert forwards == 3
    ranks = spawn_gloo(_evaluate_on_rank, 2)
    assert [f for _, f in ranks] == [2, 2]  # rank 1: its batch and the spare forward
    assert ranks[0][0] == ranks[1][0] == pytest.approx(alone, rel=1e-6)
