"""Test-only fault injection, driven by environment variables so no config key exists for
it. tests/test_faults.py uses these to reproduce what real runs meet."""
from __future__ import annotations

import os
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


def pause_mid_shard() -> None:
    """HARNESS_FAULT_SLOW_SHARD=2: sleep inside every shard, after its first tokens are written
    and before its sidecar, so a test can kill -9 a prepare while a shard is half done."""
    seconds = float(os.environ.get("HARNESS_FAULT_SLOW_SHARD", "0"))
    if seconds:
        time.sleep(seconds)
