"""`BatchLayout`, the one place the batch arithmetic lives: which global samples each
(micro-step, DP rank) reads, the counts the step, the train state and the throughput figures
take from it, and the planner counting alike."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.helpers import ROOT
from trainer.checkpoint.state import TrainState
from trainer.config import load_config
from trainer.data import PackedData
from trainer.metrics import Throughput
from trainer.parallel.dist import Dist
from trainer.parallel.layout import BatchLayout
from trainer.planner import plan

TINY = ROOT / "configs/tiny.yaml"
SHAPES = [(1, 1, 1), (4, 1, 2), (3, 5, 4), (2, 2, 3)]  # (micro_batch, grad_accum, dp_size)


def _dist(rank: int, world: int, sp: int = 1) -> Dist:
    return Dist(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"), sp=sp)


def _old_indices(first: int, micro: int, dp_rank: int, dp_size: int, micro_batch: int) -> np.ndarray:
    """The loader's formula before the layout held it: the reference the layout must keep."""
    return first + (micro * dp_size + dp_rank) * micro_batch + np.arange(micro_batch, dtype=np.int64)


@pytest.mark.parametrize("micro_batch,grad_accum,dp_size", SHAPES)
@pytest.mark.parametrize("first", [0, 7, 10**12])
def test_a_steps_micro_steps_and_ranks_tile_its_samples_once(micro_batch, grad_accum, dp_size, first):
    ranks = [BatchLayout(micro_batch, grad_accum, 16, dp_size, r) for r in range(dp_size)]
    parts = [(m, lay.dp_rank, lay.sample_indices(first, m)) for m in range(grad_accum) for lay in ranks]
    for m, r, got in parts:
        assert got.dtype == np.int64 and got.tolist() == _old_indices(first, m, r, dp_size, micro_batch).tolist()
    flat = np.concatenate([got for _, _, got in parts])
    # micro-step-major, then rank: in order, no gap, no overlap
    assert flat.tolist() == list(range(first, first + ranks[0].samples_per_step))
    assert ranks[0].samples_per_step == micro_batch * grad_accum * dp_size


@pytest.mark.parametrize("rank,world,sp,dp_rank,dp_size", [(0, 1, 1, 0, 1), (3, 4, 1, 3, 4), (5, 8, 2, 2, 4),
                                                           (7, 8, 4, 1, 2)])
def test_build_takes_the_dp_coordinates_of_the_rank(rank, world, sp, dp_rank, dp_size):
    cfg = load_config(TINY, ["parallel.micro_batch=3", "parallel.grad_accum=2", "data.seq_len=64"])
    lay = BatchLayout.build(cfg, _dist(rank, world, sp))
    assert (lay.micro_batch, lay.grad_accum, lay.seq_len, lay.dp_rank, lay.dp_size) == (3, 2, 64, dp_rank, dp_size)
    # SP ranks of one DP rank read the same samples: each count is per whole sample
    assert lay.tokens_per_micro == 3 * 64
    assert lay.tokens_per_step == lay.tokens_per_micro * 2 * dp_size == lay.samples_per_step * 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.dp_rank = 0


def test_the_loader_reads_the_layouts_samples_from_its_anchor():
    data = PackedData(np.arange(4000, dtype=np.uint32), np.arange(1000, dtype=np.uint32), None, 8, 0)
    lay = BatchLayout(4, 2, 8, 3, dp_rank=1)
    data.seek(5, 77)  # resumed: 77 samples consumed before step 5, whatever the old layout
    for step in (5, 6, 9):
        first = 77 + (step - 5) * lay.samples_per_step
        for micro in range(2):
            want = _old_indices(first, micro, 1, 3, 4)
            assert data.sample_indices(step, micro, lay).tolist() == want.tolist()
            x, _ = data.train_batch(step, micro, lay)
            assert (x == data.samples(want)[0]).all()


def test_state_and_throughput_count_what_the_layout_says():
    cfg = load_config(TINY, ["parallel.micro_batch=3", "parallel.grad_accum=2", "parallel.sp=2"])
    dist = _dist(0, 4, sp=2)
    lay = BatchLayout.build(cfg, dist)
    state = TrainState()
    for skipped in (False, True, False):
        state.advance(skipped, lay)
    assert (state.step, state.samples, state.tokens) == (3, 3 * 3 * 2 * 2, 3 * 3 * 2 * 2 * cfg.data.seq_len)
    assert Throughput(cfg, dist, lay, peak_flops=1e12).tokens_per_step == lay.tokens_per_step


@pytest.mark.parametrize("world,sp", [(1, 1), (8, 1), (8, 2), (16, 4)])
def test_planner_and_trainer_agree_on_tokens_per_step(world, sp):
    cfg = load_config(TINY, ["parallel.micro_batch=3", "parallel.grad_accum=5", f"parallel.sp={sp}"])
    trainer_side = BatchLayout.build(cfg, _dist(world - 1, world, sp))
    pl = plan(cfg, world_size=world)
    assert pl.dp == trainer_side.dp_size
    assert pl.tokens_per_step == trainer_side.tokens_per_step == 3 * 5 * (world // sp) * cfg.data.seq_len
