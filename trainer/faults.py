"""Test-only fault injection, driven by environment variables so no config key exists for
it. tests/cluster/test_faults.py uses these to reproduce what real runs meet."""
from __future__ import annotations

import errno
import os
import signal
import sys
import time


def nan_steps() -> set[int]:
    """HARNESS_FAULT_NAN_STEPS=5,6: those steps' loss becomes NaN (0-based step index)."""
    raw = os.environ.get("HARNESS_FAULT_NAN_STEPS", "")
    return {int(s) for s in raw.split(",") if s.strip()}


def pause_mid_save() -> None:
    """HARNESS_FAULT_SLOW_SAVE=30: sleep after DeepSpeed wrote its files and before the
    checkpoint is sealed, so a test can kill -9 the process mid-save."""
    seconds = float(os.environ.get("HARNESS_FAULT_SLOW_SAVE", "0"))
    if seconds:
        time.sleep(seconds)


def disk_error(path: str) -> None:
    """HARNESS_FAULT_DISK_ERROR=ENOSPC:step-4 (or EIO:...): writing any checkpoint file whose
    path contains `step-4.tmp/` fails with that errno after its first bytes, as a disk that
    fills up (or fails) mid-save does."""
    spec = os.environ.get("HARNESS_FAULT_DISK_ERROR", "")
    if spec:
        code, _, where = spec.partition(":")
        if f"{where}.tmp/" in path:
            err = getattr(errno, code)
            raise OSError(err, os.strerror(err), path)


def free_bytes(free: int) -> int:
    """HARNESS_FAULT_FREE_BYTES=1000000: the checkpoint filesystem reports that much free
    space (instead of `free`, the real figure), so a test can fill the disk without one."""
    return int(os.environ.get("HARNESS_FAULT_FREE_BYTES", free))


def pause_mid_shard() -> None:
    """HARNESS_FAULT_SLOW_SHARD=2: sleep inside every shard, after its first tokens are written
    and before its sidecar, so a test can kill -9 a prepare while a shard is half done."""
    seconds = float(os.environ.get("HARNESS_FAULT_SLOW_SHARD", "0"))
    if seconds:
        time.sleep(seconds)


def at_step(step: int, rank: int) -> None:
    """Called at the start of every train step (0-based index).

    HARNESS_FAULT_HANG=1:5: rank 1 stops answering at step 5, as a rank stuck in a kernel
    or a dead NIC would: its peers then wait in the step's collectives until
    parallel.timeout_minutes. It keeps SIGTERM's default action, so the launcher's cleanup
    kills it at once (a real stuck process may need SIGKILL; the test is about its peers).
    HARNESS_FAULT_STEP_SLEEP=0.5: every step takes that much longer, so a test can signal
    or kill a short run mid-way (the numbers are unchanged).
    """
    pause = float(os.environ.get("HARNESS_FAULT_STEP_SLEEP", "0"))
    if pause:
        time.sleep(pause)
    spec = os.environ.get("HARNESS_FAULT_HANG", "")
    if not spec:
        return
    hang_rank, hang_step = (int(x) for x in spec.split(":"))
    if (rank, step) == (hang_rank, hang_step):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"[fault] rank {rank} hangs at step {step} (t={time.time():.3f})", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
