"""`accelerate launch` with the DeepSpeed launcher configs in configs/accelerate/."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, metrics, tiny_overrides

pytestmark = pytest.mark.slow  # every test launches the real trainer

CONFIGS = ROOT / "configs" / "accelerate"
# Keys that would put batch / precision / ZeRO settings in a second place: the trainer
# builds DeepSpeed's JSON from our YAML and never reads accelerate's copies.
FORBIDDEN_DS_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "zero_stage", "gradient_clipping", "deepspeed_config_file", "offload_optimizer_device",
                     "offload_param_device"}


@pytest.mark.parametrize("name, nproc", [("deepspeed_cpu.yaml", 2), ("deepspeed_gpu.yaml", 8)])
def test_accelerate_configs_load_and_keep_batch_out(name, nproc):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    cfg = ClusterConfig.from_yaml_file(str(CONFIGS / name))  # raises on unknown keys
    assert cfg.distributed_type == DistributedType.DEEPSPEED
    assert cfg.num_machines == 1 and cfg.num_processes == nproc
    assert not FORBIDDEN_DS_KEYS & set(cfg.deepspeed_config), cfg.deepspeed_config
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert "batch" not in json.dumps(raw)


def test_accelerate_launch_two_ranks(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    exe = str(accelerate) if accelerate.exists() else shutil.which("accelerate")
    if exe is None:
        pytest.skip("accelerate CLI not installed")
    out = tmp_path / "runs"
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_CONFIG_FILE"):
        env.pop(k, None)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"})
    cmd = [exe, "launch", "--config_file", str(CONFIGS / "deepspeed_cpu.yaml"), "--num_processes", "2",
           "-m", "trainer.train", "configs/tiny.yaml",
           *tiny_overrides(out, "acc", **{"run.max_steps": 6, "checkpoint.every": 3})]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run = out / "acc"
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 2
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, 7))
    assert (run / "checkpoints/step-6/COMPLETE").is_file()
