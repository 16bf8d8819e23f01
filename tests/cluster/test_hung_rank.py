"""Fault suite: a rank that hangs ends the run within `parallel.timeout_minutes` with a clear
message, and the re-run resumes from the last checkpoint."""
from __future__ import annotations

import re
import time

import pytest

from tests.helpers import losses, tiny_overrides, train

TIMEOUT_MIN = 0.25  # 15 s: a healthy step of these ranks takes milliseconds, even with other tests on the CPU


@pytest.mark.slow
@pytest.mark.faults
def test_hung_rank_ends_run_within_timeout_and_rerun_resumes(tmp_path):
    """Rank 1 stops answering at step 5: rank 0 waits in the step's all-reduce until the
    timeout, exits with a clear message, torchrun tears rank 1 down; the re-run resumes."""
    out, steps = tmp_path / "runs", 8
    overrides = tiny_overrides(out, "hang", **{"run.max_steps": steps, "checkpoint.every": 2,
                                               "parallel.timeout_minutes": TIMEOUT_MIN})
    proc = train(overrides, nproc=2, env={"HARNESS_FAULT_HANG": "1:5"}, check=False, timeout=600, torchrun=True)
    ended = time.time()
    err = proc.stderr
    assert proc.returncode != 0, err[-3000:]
    hung = re.search(r"\[fault\] rank 1 hangs at step 5 \(t=([0-9.]+)\)", err)
    assert hung, err[-3000:]
    assert f"did not complete within parallel.timeout_minutes={TIMEOUT_MIN:g}" in err, err[-3000:]
    # Ended by the timeout: not before it (less a little: rank 0 may start waiting before
    # rank 1 prints), and well within two timeouts (plus process teardown).
    waited = ended - float(hung.group(1))
    assert 0.5 * TIMEOUT_MIN * 60 <= waited <= 2 * TIMEOUT_MIN * 60 + 30, (waited, err[-3000:])
    run = out / "hang"
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]
    assert (run / "checkpoints/step-4/COMPLETE").is_file()

    again = train(overrides, nproc=2, timeout=600, torchrun=True)
    assert f"resumed from {run}/checkpoints/step-4" in again.stdout + again.stderr
    assert sorted(losses(run)) == list(range(1, steps + 1))
