"""Real SLURM: submit slurm/pretrain_1b.sh with tiny overrides to the one-node local
cluster (`make slurm-local`), through the real sbatch/srun/torchrun path.

Skipped, with the reason, when sbatch/sinfo are missing or the cluster is not up.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import ROOT, metrics, tiny_overrides

pytestmark = pytest.mark.slurm

SCRIPT = "slurm/pretrain_1b.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
WAIT_S = 300  # hard bound on every wait; a healthy run takes well under a minute


@pytest.fixture(scope="module")
def slurm_cluster():
    for tool in ("sbatch", "sinfo", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: install and start the local cluster with `make slurm-local`")
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo timed out: slurmctld not answering (run `make slurm-local`)")
    if proc.returncode != 0:
        pytest.skip(f"SLURM cluster not up ({proc.stderr.strip() or 'sinfo failed'}): run `make slurm-local`")
    states = {s.strip().rstrip("*~#") for s in proc.stdout.split()}
    if not states & {"idle", "mixed", "allocated", "completing"}:
        pytest.skip(f"no schedulable SLURM node (states: {sorted(states) or 'none'}): run `make slurm-local`")


def _env(tmp_path: Path, nproc: int) -> dict:
    # sbatch exports the submitting environment to the job: give it a clean one.
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HARNESS_STOP_FILE"):
        env.pop(k, None)
    env.update({"NPROC_PER_NODE": str(nproc), "HARNESS_STOP_DIR": str(tmp_path / "stop"),
                "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)})
    return env


def _sbatch_args(tmp_path: Path, name: str) -> list[str]:
    # Overrides of the script's header for the GPU-less one-node CPU cluster.
    return ["sbatch", "--nodes=1", "--gres=none", f"--job-name={name}", "--time=00:15:00",
            f"--output={tmp_path}/slurm-%j.out"]


def _job(job_id: str, env: dict | None = None) -> dict[str, str]:
    """`scontrol show job -o` as a dict ({} once the record is gone); no slurmdbd needed."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30,
                          env=env)
    if proc.returncode != 0:
        return {}
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", proc.stdout))


def _log(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("slurm-*.out")))


def _cancel(name: str, env: dict | None = None) -> None:
    subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=30, env=env)


def _submit(cmd: list[str], env: dict) -> str:
    """Submit `cmd` (an sbatch command line) without waiting; the job id."""
    proc = subprocess.run([cmd[0], "--parsable", *cmd[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def _run_job(cmd: list[str], env: dict, logs: Path, name: str, bound: float = WAIT_S) -> dict[str, str]:
    """Submit `cmd` (an sbatch command line without --wait) and poll until the job has ended;
    returns its `scontrol show job` record. Not `sbatch --wait`: it polls at 2, 4, 8, then every
    10 s, which adds up to 10 s to each of these 10-second jobs."""
    job_id, info = _submit(cmd, env), {}
    deadline = time.monotonic() + bound
    try:
        while info.get("JobState") not in FINAL_STATES:
            assert time.monotonic() < deadline, f"job not finished within {bound:.0f}s: {info}\n{_log(logs)[-4000:]}"
            time.sleep(0.25)
            info = _job(job_id, env) or info
    finally:
        _cancel(name, env)
    return info


def _train_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    return [r["step"] for r in metrics(run_dir) if "loss" in r]


def test_sbatch_runs_two_ranks(slurm_cluster, tmp_path):
    out, name = tmp_path / "runs", f"harness-test-{uuid.uuid4().hex[:8]}"
    overrides = tiny_overrides(out, "sb", **{"run.max_steps": 6, "checkpoint.every": 3})
    info = _run_job([*_sbatch_args(tmp_path, name), SCRIPT, "configs/tiny.yaml", *overrides], _env(tmp_path, 2),
                    tmp_path, name)
    log = _log(tmp_path)
    assert info.get("JobState") == "COMPLETED", f"{info}\n{log[-4000:]}"
    run = out / "sb"
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 2
    assert _train_steps(run) == list(range(1, 7)), log[-3000:]
    assert (run / "checkpoints/step-6/COMPLETE").is_file()
    assert "nproc_per_node=2" in log and "done (srun exit 0)" in log


def test_usr1_checkpoints_requeues_and_finishes(slurm_cluster, tmp_path):
    out, name = tmp_path / "runs", f"harness-test-{uuid.uuid4().hex[:8]}"
    max_steps = 200
    # No periodic checkpoints: the only one before the end is the one the signal causes.
    overrides = tiny_overrides(out, "pre", **{"run.max_steps": max_steps, "checkpoint.every": 1000})
    run = out / "pre"
    try:
        job_id = _submit([*_sbatch_args(tmp_path, name), SCRIPT, "configs/tiny.yaml", *overrides], _env(tmp_path, 2))

        # 1. Wait for training to make progress, then signal the batch shell only, as
        #    SLURM's --signal=B:USR1@120 does before the time limit.
        deadline = time.monotonic() + WAIT_S
        while len(_train_steps(run)) < 3:
            state = _job(job_id).get("JobState", "")
            assert state not in FINAL_STATES, f"job ended ({state}) before making progress\n{_log(tmp_path)[-4000:]}"
            assert time.monotonic() < deadline, f"no training progress within {WAIT_S}s\n{_log(tmp_path)[-4000:]}"
            time.sleep(0.5)
        signalled_at = max(_train_steps(run))
        sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True,
                             timeout=30)
        assert sig.returncode == 0, sig.stderr

        # 2. Poll until the job has finished for good (a requeued job passes through
        #    PENDING and RUNNING again; no sacct without slurmdbd, so use scontrol).
        deadline = time.monotonic() + WAIT_S
        info: dict[str, str] = {}
        while True:
            info = _job(job_id) or info
            if info.get("JobState") in FINAL_STATES and int(info.get("Restarts", "0")) >= 1:
                break
            if info.get("JobState") in FINAL_STATES and "requeueing" not in _log(tmp_path):
                break  # ended without a requeue: the asserts below say what went wrong
            assert time.monotonic() < deadline, f"job not finished within {WAIT_S}s: {info}\n{_log(tmp_path)[-4000:]}"
            time.sleep(1)
    finally:
        _cancel(name)

    log = _log(tmp_path)
    assert info.get("JobState") == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert int(info.get("Restarts", "0")) >= 1, f"job was not requeued: {info}\n{log[-4000:]}"
    assert log.count("] start job=") >= 2 and "requeueing job" in log, log[-4000:]

    # The stop left a complete checkpoint mid-run, and the requeued start resumed from it.
    ckpts = sorted(int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*/COMPLETE"))
    mid = [s for s in ckpts if s < max_steps]
    assert mid and mid[-1] >= signalled_at, f"no mid-run checkpoint: {ckpts}\n{log[-4000:]}"
    assert f"resumed from {run}/checkpoints/step-{mid[-1]}" in log, log[-4000:]
    assert max_steps in ckpts
    steps = _train_steps(run)
    assert max(steps) == max_steps and set(steps) == set(range(1, max_steps + 1)), log[-3000:]
    assert not list((tmp_path / "stop").glob("stop-*")), "stale stop file left behind"


def test_scancel_cancels_without_requeue(slurm_cluster, tmp_path):
    """scancel sends TERM: the job must end CANCELLED, not be requeued by the batch script."""
    out, name = tmp_path / "runs", f"harness-test-{uuid.uuid4().hex[:8]}"
    run = out / "cx"
    overrides = tiny_overrides(out, "cx", **{"run.max_steps": 5000, "checkpoint.every": 0})
    try:
        job_id = _submit([*_sbatch_args(tmp_path, name), SCRIPT, "configs/tiny.yaml", *overrides], _env(tmp_path, 2))
        deadline = time.monotonic() + WAIT_S
        while len(_train_steps(run)) < 2:
            assert _job(job_id).get("JobState", "") not in FINAL_STATES, _log(tmp_path)[-4000:]
            assert time.monotonic() < deadline, f"no training progress within {WAIT_S}s\n{_log(tmp_path)[-4000:]}"
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=True)
        # The batch shell logs its decision once srun is gone; then the state must stay put.
        deadline = time.monotonic() + 90
        while "not requeueing" not in _log(tmp_path) and _job(job_id).get("JobState") != "CANCELLED":
            assert time.monotonic() < deadline, f"job not cancelled: {_job(job_id)}\n{_log(tmp_path)[-4000:]}"
            time.sleep(1)
        time.sleep(5)
        info = _job(job_id)
    finally:
        _cancel(name)
    log = _log(tmp_path)
    assert info.get("JobState") == "CANCELLED" and info.get("Restarts") == "0", f"{info}\n{log[-4000:]}"
    assert "requeueing job" not in log, log[-4000:]
