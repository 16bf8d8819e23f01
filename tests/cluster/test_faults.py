"""Fault injection (docs/design.md §9): kill -9 anywhere, damaged checkpoints, signals, NaNs, bad
input. Run alone with `make faults` (pytest -m faults)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, _env, losses, metrics, tiny_overrides, train

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # every test runs the real trainer

STEPS = 24


def _start(overrides, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer.train", "configs/tiny.yaml", *overrides], cwd=ROOT,
                            env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.02)


def _steps_logged(run: Path) -> int:
    try:
        return max((r["step"] for r in metrics(run) if "loss" in r), default=0)
    except (FileNotFoundError, ValueError):
        return 0


KILL9 = {"run.max_steps": STEPS, "checkpoint.every": 4, "checkpoint.keep": 2}


@pytest.fixture(scope="module")
def kill9_ref(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run both kill -9 cases must reproduce (sync and async saves write the
    same checkpoints, so one reference serves both)."""
    out = tmp_path_factory.mktemp("kill9") / "runs"
    train(tiny_overrides(out, "ref", **KILL9))
    return losses(out / "ref")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill9_three_times_including_mid_checkpoint_then_resume_is_bit_exact(tmp_path, async_save, kill9_ref):
    out, extra = tmp_path / "runs", KILL9
    # async: the pause is in the background writer, so the loop runs on and the kill lands
    # while the next save waits for the unsealed one
    over = tiny_overrides(out, "crashy", **extra, **{"checkpoint.async": str(async_save).lower()})
    run = out / "crashy"

    # 1) mid-training, between checkpoints
    proc = _start(over)
    _wait_for(lambda: _steps_logged(run) >= 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2) inside a checkpoint write: the save pauses after DeepSpeed's files are down
    proc = _start(over, env={"HARNESS_FAULT_SLOW_SAVE": "30"})
    _wait_for(lambda: any(run.glob("checkpoints/step-*.tmp")) and _steps_logged(run) >= 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(run.glob("checkpoints/step-*.tmp")), "the kill should have left a half-written checkpoint"
    # 3) right after resuming
    proc = _start(over)
    _wait_for(lambda: _steps_logged(run) >= 14, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    train(over)
    rows = [r["step"] for r in metrics(run) if "loss" in r]
    assert rows == list(range(1, STEPS + 1)), "every step is logged exactly once: none skipped or repeated"
    assert losses(run) == kill9_ref
    assert not any(run.glob("checkpoints/step-*.tmp"))


def _two_checkpoints(tmp_path, async_save: bool = False) -> tuple[list[str], Path]:
    out = tmp_path / "runs"
    over = tiny_overrides(out, "ck", **{"run.max_steps": 12, "checkpoint.every": 4, "checkpoint.keep": 3,
                                        "checkpoint.async": str(async_save).lower()})
    train([*over, "run.stop_at=8"])
    run = out / "ck"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-8"]
    return over, run


def test_checkpoint_without_complete_marker_is_ignored(tmp_path):
    over, run = _two_checkpoints(tmp_path)
    (run / "checkpoints/step-8/COMPLETE").unlink()
    proc = train(over)
    assert "resumed from" in proc.stdout and "step-4" in proc.stdout


@pytest.mark.parametrize("damage,async_save", [("truncate", False), ("flip", False), ("truncate", True)],
                         ids=["truncate", "flip", "truncate-async"])
def test_corrupt_newest_checkpoint_falls_back_to_previous_in_one_line(tmp_path, damage, async_save):
    over, run = _two_checkpoints(tmp_path, async_save)
    victim = max((run / "checkpoints/step-8").glob("*model_states.pt"), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 0xFF]))
    proc = train(over)
    notes = [line for line in proc.stdout.splitlines() if line.startswith("checkpoint ") and "damaged" in line]
    assert len(notes) == 1 and "step-8" in notes[0] and "falling back" in notes[0], proc.stdout
    assert "resumed from" in proc.stdout and "step-4" in proc.stdout
    assert _steps_logged(run) == 12


@pytest.mark.parametrize("sig,async_save", [(signal.SIGTERM, False), (signal.SIGUSR1, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM", "SIGUSR1", "SIGTERM-async"])
def test_signal_finishes_step_checkpoints_and_exits_zero(tmp_path, sig, async_save):
    out = tmp_path / "runs"
    over = tiny_overrides(out, "sig", **{"run.max_steps": 400, "checkpoint.every": 0,
                                         "checkpoint.async": str(async_save).lower()})
    proc = _start(over)
    run = out / "sig"
    _wait_for(lambda: _steps_logged(run) >= 3, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    text = proc.stdout.read()
    assert f"stopped by {sig.name}" in text
    done = sorted((run / "checkpoints").glob("step-*/COMPLETE"))
    assert len(done) == 1
    step = int(done[0].parent.name.split("-")[1])
    assert 3 <= step < 400 and _steps_logged(run) == step


def test_ctrl_c_checkpoints_and_exits_zero_and_a_second_one_aborts_naming_the_last_checkpoint(tmp_path):
    out = tmp_path / "runs"
    over = tiny_overrides(out, "int", **{"run.max_steps": 400, "checkpoint.every": 0})
    run = out / "int"
    proc = _start(over)
    _wait_for(lambda: _steps_logged(run) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    text = proc.stdout.read()
    assert "stopped by SIGINT" in text and "Traceback" not in text and "KeyboardInterrupt" not in text
    done = sorted((run / "checkpoints").glob("step-*/COMPLETE"))
    assert len(done) == 1 and int(done[0].parent.name[5:]) == _steps_logged(run)
    first = done[0].parent

    # Again, with 4 s steps: Ctrl-C at a step's start, then again inside the same step.
    proc = _start(over, env={"HARNESS_FAULT_STEP_SLEEP": "4"})
    at = _steps_logged(run)
    _wait_for(lambda: _steps_logged(run) > at, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # past the window in which a second SIGINT is torchrun's copy of the first
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    lines = [line for line in proc.stdout.read().splitlines() if "interrupted again" in line or "Traceback" in line]
    assert len(lines) == 1 and str(first) in lines[0], lines
    assert sorted((run / "checkpoints").glob("step-*/COMPLETE")) == done  # nothing new, nothing lost


def test_a_failed_checkpoint_write_removes_its_tmp_and_training_continues(tmp_path):
    """The save at step 4 hits ENOSPC half-way: one line, no step-4.tmp left, step-2 intact
    (it still verifies), and the step-6 save succeeds."""
    from trainer.checkpoint.checkpointer import Checkpointer

    out = tmp_path / "runs"
    run = out / "full"
    proc = train(tiny_overrides(out, "full", **{"run.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3}),
                 env={"HARNESS_FAULT_DISK_ERROR": "ENOSPC:step-4"})
    notes = [line for line in proc.stderr.splitlines() if "not saved" in line]
    assert len(notes) == 1 and "step-4" in notes[0] and "No space left on device" in notes[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-6"]
    assert Checkpointer.verify(run / "checkpoints/step-2") is None
    assert _steps_logged(run) == 6
    saved = [line for line in proc.stdout.splitlines() if line.startswith("saved checkpoint")]
    assert [line.split()[2] for line in saved] == ["step-2", "step-6"]


def test_a_save_that_cannot_fit_is_skipped_with_one_warning(tmp_path):
    out = tmp_path / "runs"
    proc = train(tiny_overrides(out, "nofit", **{"run.max_steps": 4, "checkpoint.every": 2}),
                 env={"HARNESS_FAULT_FREE_BYTES": "100000"})
    notes = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert [n.split()[3] for n in notes] == ["step-2:", "step-4:"] and "0.1 MB free" in notes[0], proc.stderr
    assert not list((out / "nofit/checkpoints").glob("step-*")) and _steps_logged(out / "nofit") == 4


def test_a_real_full_tmpfs_skips_the_save_that_cannot_fit(tmp_path):
    """Checkpoints on a tmpfs that holds one of them but not two (mounting needs root)."""
    from trainer.checkpoint.manifest import checkpoint_size

    out = tmp_path / "runs"
    over = tiny_overrides(out, "tmpfs", **{"run.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep": 2})
    ckpts = out / "tmpfs" / "checkpoints"
    ckpts.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(ckpts)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = train(over)
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"]
        assert checkpoint_size(ckpts / "step-2") > 1.5e6  # so a second one cannot fit in 3 MB
        notes = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
        assert len(notes) == 1 and "step-4" in notes[0], proc.stderr
    finally:
        subprocess.run(["umount", str(ckpts)], check=True)


def test_stop_file_requests_a_clean_stop(tmp_path):
    out = tmp_path / "runs"
    stop = tmp_path / "STOP"
    over = tiny_overrides(out, "sf", **{"run.max_steps": 400})
    proc = _start(over, env={"HARNESS_STOP_FILE": str(stop)})
    _wait_for(lambda: _steps_logged(out / "sf") >= 2, proc)
    stop.touch()
    assert proc.wait(timeout=60) == 0
    assert list((out / "sf/checkpoints").glob("step-*/COMPLETE"))


def test_non_finite_step_is_skipped_and_logged(tmp_path):
    out = tmp_path / "runs"
    train(tiny_overrides(out, "nan", **{"run.max_steps": 8}), env={"HARNESS_FAULT_NAN_STEPS": "3"})
    rows = metrics(out / "nan")
    skipped = [r for r in rows if r.get("skipped")]
    assert [r["step"] for r in skipped] == [4]  # the 4th step (index 3) was poisoned
    assert _steps_logged(out / "nan") == 8


def test_too_many_bad_steps_stop_with_message_and_keep_last_good_checkpoint(tmp_path):
    out = tmp_path / "runs"
    over = tiny_overrides(out, "bad", **{"run.max_steps": 20, "checkpoint.every": 4, "run.max_bad_steps": 3})
    proc = train(over, env={"HARNESS_FAULT_NAN_STEPS": "5,6,7,8,9"}, check=False)
    assert proc.returncode != 0
    assert "non-finite steps in a row" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    ck = out / "bad/checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-4"]
    # the checkpoint is intact: the same command resumes from it (and, without the fault, finishes)
    proc = train(over)
    assert "resumed from" in proc.stdout and "step-4" in proc.stdout


def test_resume_with_changed_model_shape_is_refused_naming_keys(tmp_path):
    out = tmp_path / "runs"
    over = tiny_overrides(out, "shape", **{"run.max_steps": 4, "checkpoint.every": 2})
    train([*over, "run.stop_at=2"])
    proc = train([*over, "model.d_model=128", "model.n_layers=3"], check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "model.d_model" in err[0] and "model.n_layers" in err[0], proc.stderr
    assert sorted(p.name for p in (out / "shape/checkpoints").iterdir()) == ["step-2"]


def test_corrupt_tokenizer_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    proc = train(tiny_overrides(tmp_path / "runs", "tok", **{"data.tokenizer": str(bad)}), check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "bad.model" in proc.stderr


def test_retention_keeps_last_k_and_never_the_only_or_loaded_one(tmp_path):
    out = tmp_path / "runs"
    over = tiny_overrides(out, "keep", **{"run.max_steps": 12, "checkpoint.every": 2, "checkpoint.keep": 1})
    train([*over, "run.stop_at=6"])
    ck = out / "keep/checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-6"]
    train(over)  # loaded step-6; keep=1 must not delete it while it is the resume source
    names = sorted(p.name for p in ck.iterdir())
    assert "step-12" in names and "step-6" in names


def test_own_state_files_load_weights_only_and_no_api_key_on_disk(tmp_path):
    import torch

    out = tmp_path / "runs"
    secret = "wandb-test-key-" + "x" * 24
    train(tiny_overrides(out, "safe", **{"run.max_steps": 2, "checkpoint.every": 2, "logging.wandb_mode": "offline"}),
          env={"WANDB_API_KEY": secret})
    run = out / "safe"
    for f in run.glob("checkpoints/step-2/trainer_state_rank*.pt"):
        torch.load(f, weights_only=True)
    for f in run.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
