"""tests.helpers.spawn_gloo: ranks of one gloo group, their results back in rank order, and a
failing rank's own traceback in the error."""
from __future__ import annotations

import time

import pytest
import torch

from tests.helpers import spawn_gloo


def _sum_of_ranks(rank: int, world: int, scale: float) -> tuple[int, torch.Tensor]:
    import torch.distributed as tdist

    t = torch.tensor([float(rank + 1)]) * scale
    tdist.all_reduce(t)
    return tdist.get_world_size(), t


def _rank_1_fails(rank: int, world: int) -> None:
    if rank == 1:
        # Late, so rank 0 already waits at spawn_gloo's closing barrier and sees a reset
        # connection: the error must still be rank 1's own.
        time.sleep(1.0)
        raise ValueError("rank 1 was told to fail")


def test_ranks_share_one_group_and_return_in_rank_order():
    got = spawn_gloo(_sum_of_ranks, 2, 10.0)
    assert [w for w, _ in got] == [2, 2]
    assert all(torch.equal(t, torch.tensor([30.0])) for _, t in got)


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(AssertionError, match=r"(?s)_rank_1_fails.*ValueError: rank 1 was told to fail"):
        spawn_gloo(_rank_1_fails, 2)
