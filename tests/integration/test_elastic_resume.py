"""Resuming on another world size or ZeRO stage (through DeepSpeed's universal checkpoint),
against an uninterrupted run with the same global batch: 2 ranks -> 1, 1 -> 2, ZeRO-2 -> 3,
and a 2-rank ZeRO-3 checkpoint on 1 rank at ZeRO-2 and ZeRO-3."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import losses, tiny_overrides, train
from trainer.checkpoint.checkpointer import Checkpointer

pytestmark = pytest.mark.slow

STEPS, CUT, GLOBAL_BATCH = 8, 4, 4


def _over(out: Path, name: str, ranks: int, zero: int) -> list[str]:
    # Same global batch on any world size: micro_batch x ranks (grad_accum 1).
    return tiny_overrides(out, name, **{"run.max_steps": STEPS, "checkpoint.every": CUT, "checkpoint.keep": 2,
                                        "parallel.zero_stage": zero, "parallel.micro_batch": GLOBAL_BATCH // ranks})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """Uninterrupted 2-rank ZeRO-2 run; its step-4 checkpoint seeds the resumes."""
    out = tmp_path_factory.mktemp("elastic") / "runs"
    train(_over(out, "ref", 2, 2), nproc=2)
    return out, out / "ref"


def _fork_at_cut(src: Path, dst: Path) -> None:
    """A copy of run `src` as it was after step CUT: its config, tokenizer and step-CUT checkpoint."""
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n == "metrics.jsonl"
                                                         or (n.startswith("step-") and n != f"step-{CUT}")])


def _assert_continues(run: Path, ref: Path) -> None:
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(CUT + 1, STEPS + 1)), "the resumed run starts after the checkpoint"
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])


@pytest.mark.parametrize("ranks,zero", [(1, 2), (2, 3)], ids=["2to1_ranks", "zero2_to_zero3"])
def test_zero2_two_rank_checkpoint_resumes_on_another_layout_like_uninterrupted(reference, ranks, zero):
    out, ref = reference
    name = f"to_{ranks}r_z{zero}"
    _fork_at_cut(ref, out / name)
    proc = train(_over(out, name, ranks, zero), nproc=ranks)
    assert "through DeepSpeed's universal checkpoint" in proc.stdout, proc.stdout[-2000:]
    _assert_continues(out / name, ref)
    ckpt = out / name / "checkpoints" / f"step-{CUT}"
    assert (ckpt / "universal" / "COMPLETE").is_file()
    assert Checkpointer.verify(ckpt) is None, "the original files are kept as they were"


def test_one_rank_checkpoint_resumes_on_two_ranks_like_uninterrupted(reference):
    out, ref = reference
    over = _over(out, "from_1r", 1, 2)
    train([*over, f"run.stop_at={CUT}"])
    assert losses(out / "from_1r")[CUT] == pytest.approx(losses(ref)[CUT], rel=1e-5)
    (out / "from_1r" / "metrics.jsonl").unlink()
    proc = train(_over(out, "from_1r", 2, 2), nproc=2)
    assert "through DeepSpeed's universal checkpoint" in proc.stdout
    _assert_continues(out / "from_1r", ref)


def test_zero0_checkpoint_at_zero2_is_refused_in_one_line(tmp_path):
    out = tmp_path / "runs"
    over = tiny_overrides(out, "z0", **{"run.max_steps": 4, "checkpoint.every": 2})
    train([*over, "run.stop_at=2"])
    proc = train([*over, "parallel.zero_stage=2"], check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "parallel.zero_stage=0" in err[0] and "parallel.zero_stage=2" in err[0], proc.stderr
    assert (out / "z0/checkpoints/step-2/COMPLETE").is_file()


@pytest.fixture(scope="module")
def zero3_at_cut(reference) -> Path:
    """A 2-rank ZeRO-3 run of the reference's config stopped at CUT, trained once for both
    targets (each resumes a copy of it)."""
    out, _ = reference
    train([*_over(out, "z3src", 2, 3), f"run.stop_at={CUT}"], nproc=2)
    return out / "z3src"


@pytest.mark.parametrize("zero", [2, 3], ids=["to_zero2", "to_zero3"])
def test_zero3_two_rank_checkpoint_resumes_on_one_rank_like_uninterrupted(reference, zero3_at_cut, zero):
    # ZeRO-3 partitions the parameters themselves: DeepSpeed's converter writes its universal
    # checkpoint in a layout only the ZeRO-3 loader reads, which the checkpointer completes.
    out, ref = reference
    name = f"from_z3_to_z{zero}"
    shutil.copytree(zero3_at_cut, out / name)
    assert losses(out / name)[CUT] == pytest.approx(losses(ref)[CUT], rel=1e-5)
    (out / name / "metrics.jsonl").unlink()
    proc = train(_over(out, name, 1, zero))
    assert "through DeepSpeed's universal checkpoint" in proc.stdout, proc.stdout[-2000:]
    _assert_continues(out / name, ref)
