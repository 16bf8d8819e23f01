"""Collective timeouts: `parallel.timeout_minutes` bounds how long a rank waits for a peer
that hung or died, so a stuck job ends with a clear message instead of never."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, _env, losses, tiny_overrides, train
from trainer.config import ConfigError, load_config
from trainer.dist import collective_failure

TIMEOUT_MIN = 0.5  # generous: other processes may share the CPU, and a slow peer must not trip it


@pytest.mark.parametrize("bad", ["0", "-1", ".nan"])
def test_timeout_must_be_positive(bad):
    with pytest.raises(ConfigError, match="parallel.timeout_minutes"):
        load_config("configs/tiny.yaml", [f"parallel.timeout_minutes={bad}"])
    assert load_config("configs/tiny.yaml", ["parallel.timeout_minutes=0.2"]).parallel.timeout_minutes == 0.2


def test_collective_failure_messages():
    timed_out = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 12000ms for recv operation")
    msg = collective_failure(timed_out, 0.2)
    assert "did not complete within parallel.timeout_minutes=0.2" in msg and "resume" in msg
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5000")
    assert "went away" in collective_failure(gone, 30)
    assert collective_failure(RuntimeError("shape mismatch in matmul"), 30) is None
    assert collective_failure(RuntimeError("gloo: unsupported dtype for all_reduce"), 30) is None


def test_timeout_reaches_every_process_group():
    """The world group and groups created later without a timeout (DeepSpeed's SP/ZeRO
    groups) all get parallel.timeout_minutes."""
    code = (
        "import torch, torch.distributed as d\n"
        "from trainer.dist import init_distributed\n"
        "init_distributed('gloo', 1, 0.2)\n"
        "for pg in (d.group.WORLD, d.new_group([0])):\n"
        "    print(pg._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["12.0", "12.0"], out.stdout


@pytest.mark.slow
@pytest.mark.faults
def test_hung_rank_ends_run_within_timeout_and_rerun_resumes(tmp_path):
    """Rank 1 stops answering at step 5: rank 0 waits in the step's all-reduce until the
    timeout, exits with a clear message, torchrun tears rank 1 down; the re-run resumes."""
    out, steps = tmp_path / "runs", 8
    overrides = tiny_overrides(out, "hang", **{"run.max_steps": steps, "checkpoint.every": 2,
                                               "parallel.timeout_minutes": TIMEOUT_MIN})
    proc = train(overrides, nproc=2, env={"HARNESS_FAULT_HANG": "1:5"}, check=False, timeout=600)
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

    again = train(overrides, nproc=2, timeout=600)
    assert f"resumed from {run}/checkpoints/step-4" in again.stdout + again.stderr
    assert sorted(losses(run)) == list(range(1, steps + 1))
