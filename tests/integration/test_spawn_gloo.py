"""tests.helpers.spawn_gloo: ranks of one gloo group, their results back in rank order, and a
failing rank's own traceback in the error."""
from __future__ import annotations

import time

import pytest
import torch

from tests.helpers import _env, launch_ranks, spawn_gloo


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


def test_launch_ranks_gives_torchruns_env_one_output_and_a_failed_rank_ends_the_others():
    """tests.helpers.launch_ranks, which `train(nproc=2)` uses in place of torchrun."""
    show = "import os; print(*(os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE')))"
    ok = launch_ranks(["-c", show], 2, _env(), timeout=60)
    assert ok.returncode == 0 and sorted(ok.stdout.splitlines()) == ["0 0 2 2", "1 1 2 2"]
    fail = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(600)"
    t0 = time.monotonic()
    bad = launch_ranks(["-c", fail], 2, _env(), timeout=120)
    assert bad.returncode == 3 and time.monotonic() - t0 < 60  # rank 0 was stopped, not waited for
