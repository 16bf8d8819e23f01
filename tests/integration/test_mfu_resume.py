"""The MFU probe never disturbs a restored RNG state: the first step after a resume starts from
the RNG state the checkpoint saved (the probe's own unit test: tests/unit/test_mfu.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, _env, tiny_overrides, train

# The resumed trainer's first train_step records the RNG state and stops the run.
RESUME_SCRIPT = """
import sys, torch
import trainer.loop
from trainer.config import load_config
from trainer.loop import Trainer

class Seen(Exception):
    pass

def first_step(*args, **kwargs):
    torch.save(torch.get_rng_state(), sys.argv[1])
    raise Seen

trainer.loop.train_step = first_step
try:
    Trainer(load_config("configs/tiny.yaml", sys.argv[2:])).fit()
except Seen:
    pass
"""


@pytest.mark.slow
def test_rng_state_after_resume_equals_the_saved_one(tmp_path):
    out = tmp_path / "runs"
    over = tiny_overrides(out, "rng", **{"run.max_steps": 4, "checkpoint.every": 2, "logging.peak_flops": 0})
    train([*over, "run.stop_at=2"])
    seen = tmp_path / "rng_at_resume.pt"
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(seen), *over], cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=300)
    saved = torch.load(out / "rng" / "checkpoints" / "step-2" / "trainer_state_rank0.pt")["rng"]["torch"]
    assert torch.equal(torch.load(seen), saved)
