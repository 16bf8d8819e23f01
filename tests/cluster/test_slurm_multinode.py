"""Real two-node SLURM: slurm/pretrain_1b.sh on the local n1/n2 cluster
(`make slurm-local NODES=2`), through the real sbatch/srun/torchrun path: one torchrun
per node, world size 2 across the nodes, the rendezvous hosted on the first node.

Both "nodes" are this machine (one filesystem, one set of CPUs); what these tests cover is
the multi-node wiring: rendezvous, per-node torchrun, the shared stop file, requeue of a
multi-node job, and what happens when one node's trainer dies.

Skipped, with the reason, when the two-node cluster is not up.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.cluster.test_slurm import FINAL_STATES, _cancel, _job, _log, _run_job, _submit, _train_steps
from tests.helpers import ROOT, losses, tiny_overrides, train

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CONF = Path(os.environ.get("HARNESS_SLURM2_CONF", "/etc/slurm-local2/slurm.conf"))
SCRIPT = "slurm/pretrain_1b.sh"
STEPS = 10
TIMEOUT_MIN = 1.0  # parallel.timeout_minutes of these runs
WAIT_S = 480  # hard bound on every wait; sbatch's own --time below is the job's bound


@pytest.fixture(scope="module")
def slurm_env() -> dict:
    """The environment a test submits with: the two-node cluster's SLURM_CONF, no stray
    launcher variables, one process per node."""
    for tool in ("sbatch", "sinfo", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: start the two-node cluster with `make slurm-local NODES=2`")
    if not CONF.is_file():
        pytest.skip(f"{CONF} not found: start the two-node cluster with `make slurm-local NODES=2`")
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HARNESS_STOP_FILE",
              "HARNESS_FAULT_HANG", "HARNESS_FAULT_STEP_SLEEP", "HARNESS_MASTER_PORT"):
        env.pop(k, None)
    env.update({"SLURM_CONF": str(CONF), "NPROC_PER_NODE": "1", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1"})
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30,
                              env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo timed out: the two-node slurmctld is not answering (`make slurm-local NODES=2`)")
    states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
    usable = {n for n, s in states.items() if s.rstrip("*~#") in {"idle", "mixed", "allocated", "completing"}}
    if proc.returncode != 0 or len(usable) < 2:
        pytest.skip(f"two-node cluster not up ({proc.stderr.strip() or states}): run `make slurm-local NODES=2`")
    return env


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    # One directory for the module: every run shares the tokenizer/packing cache.
    return tmp_path_factory.mktemp("slurm2")


def _overrides(work: Path, name: str, **extra) -> list[str]:
    return tiny_overrides(work / "runs", name, **{"run.max_steps": STEPS, "checkpoint.every": 2,
                                                   "parallel.timeout_minutes": TIMEOUT_MIN, **extra})


@pytest.fixture(scope="module")
def torchrun_ref(work) -> dict[int, float]:
    """The reference: the same config as 2 ranks on one host (`train(nproc=2)`)."""
    train(_overrides(work, "ref"), nproc=2)
    return losses(work / "runs" / "ref")


def _sbatch(env: dict, logs: Path, name: str, overrides: list[str], extra_env: dict | None = None):
    """The sbatch command line for a two-node job, and its environment."""
    logs.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--nodes=2", "--gres=none", f"--job-name={name}", "--time=00:10:00",
           f"--output={logs}/slurm-%j.out", SCRIPT, "configs/tiny.yaml", *overrides]
    return cmd, {**env, "HARNESS_STOP_DIR": str(logs / "stop"), **(extra_env or {})}


def _start(env: dict, logs: Path, name: str, overrides: list[str], extra_env: dict | None = None) -> str:
    """Submit without waiting; the job id."""
    return _submit(*_sbatch(env, logs, name, overrides, extra_env))


def _run(env: dict, logs: Path, name: str, overrides: list[str]) -> tuple[dict[str, str], str]:
    """Submit and wait until the job has ended: its scontrol record and the log."""
    cmd, full_env = _sbatch(env, logs, name, overrides)
    info = _run_job(cmd, full_env, logs, name, WAIT_S)
    return info, _log(logs)


def _wait_for_steps(env: dict, job_id: str, run: Path, logs: Path, n: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while len(_train_steps(run)) < n:
        state = _job(job_id, env).get("JobState", "")
        assert state not in FINAL_STATES, f"job ended ({state}) before step {n}\n{_log(logs)[-4000:]}"
        assert time.monotonic() < deadline, f"no training progress within {WAIT_S}s\n{_log(logs)[-4000:]}"
        time.sleep(0.5)


def _assert_same_losses(got: dict[int, float], ref: dict[int, float], steps) -> None:
    for s in steps:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), (s, got, ref)


def _complete_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*/COMPLETE"))


def _trainer_pids_on(node: str) -> list[int]:
    """Trainer processes (torchrun's workers, not torchrun) that SLURM started on `node`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"trainer.train" in cmd and env.get(b"SLURMD_NODENAME") == node.encode() and b"LOCAL_RANK" in env:
            pids.append(int(proc.name))
    return pids


def test_two_nodes_train_like_torchrun(slurm_env, work, torchrun_ref):
    logs, name = work / "train", f"harness-2n-{uuid.uuid4().hex[:8]}"
    info, log = _run(slurm_env, logs, name, _overrides(work, "two"))
    assert info.get("JobState") == "COMPLETED", f"{info}\n{log[-4000:]}"
    # One torchrun per node, the first node hosting the rendezvous.
    assert "node n1: torchrun (SLURM node 0), rendezvous host=true" in log, log[-4000:]
    assert "node n2: torchrun (SLURM node 1), rendezvous host=false" in log, log[-4000:]
    assert "master (rendezvous host) is node n1" in log and "nproc_per_node=1" in log, log[-4000:]
    got = losses(work / "runs" / "two")
    assert sorted(got) == list(range(1, STEPS + 1)), log[-3000:]
    _assert_same_losses(got, torchrun_ref, range(1, STEPS + 1))


def test_two_nodes_usr1_checkpoint_requeue_resume(slurm_env, work, torchrun_ref):
    logs, name = work / "preempt", f"harness-2n-{uuid.uuid4().hex[:8]}"
    run = work / "runs" / "pre"
    # Slow steps (the numbers are unchanged) so the signal lands mid-run.
    overrides = _overrides(work, "pre", **{"checkpoint.every": 0})
    job_id = _start(slurm_env, logs, name, overrides, extra_env={"HARNESS_FAULT_STEP_SLEEP": "0.5"})
    try:
        _wait_for_steps(slurm_env, job_id, run, logs, 3)
        sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True,
                             timeout=30, env=slurm_env)
        assert sig.returncode == 0, sig.stderr
        deadline, info = time.monotonic() + WAIT_S, {}
        while True:
            info = _job(job_id, slurm_env) or info
            if info.get("JobState") in FINAL_STATES and (int(info.get("Restarts", "0")) >= 1
                                                        or "requeueing" not in _log(logs)):
                break
            assert time.monotonic() < deadline, f"job not finished within {WAIT_S}s: {info}\n{_log(logs)[-4000:]}"
            time.sleep(1)
    finally:
        _cancel(name, slurm_env)
    log = _log(logs)
    assert info.get("JobState") == "COMPLETED" and int(info.get("Restarts", "0")) >= 1, f"{info}\n{log[-4000:]}"
    # Both starts ran one torchrun on each node; the second resumed from the stop's checkpoint.
    assert log.count("node n1: torchrun") >= 2 and log.count("node n2: torchrun") >= 2, log[-4000:]
    mid = [s for s in _complete_steps(run) if s < STEPS]
    assert mid, f"no checkpoint from the stop: {_complete_steps(run)}\n{log[-4000:]}"
    assert f"resumed from {run}/checkpoints/step-{mid[-1]}" in log, log[-4000:]
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)), log[-3000:]
    _assert_same_losses(got, torchrun_ref, range(1, STEPS + 1))


def test_node_failure_ends_job_and_resubmit_resumes(slurm_env, work, torchrun_ref):
    logs, name = work / "nodefail", f"harness-2n-{uuid.uuid4().hex[:8]}"
    run = work / "runs" / "fail"
    overrides = _overrides(work, "fail")
    job_id = _start(slurm_env, logs, name, overrides, extra_env={"HARNESS_FAULT_STEP_SLEEP": "0.5"})
    try:
        _wait_for_steps(slurm_env, job_id, run, logs, 5)  # step-4 checkpoint is complete by then
        victims = _trainer_pids_on("n2")
        assert len(victims) == 1, f"expected one trainer on n2, found {victims}"
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        # The job must end by itself, within the process-group timeout (plus teardown).
        bound = TIMEOUT_MIN * 60 + 90
        while _job(job_id, slurm_env).get("JobState") not in FINAL_STATES:
            assert time.monotonic() - killed_at < bound, \
                f"job still {_job(job_id, slurm_env)} {bound:.0f}s after the n2 trainer died\n{_log(logs)[-4000:]}"
            time.sleep(1)
    finally:
        _cancel(name, slurm_env)
    log = _log(logs)
    assert _job(job_id, slurm_env).get("JobState") == "FAILED", log[-4000:]
    assert "FAILED (srun exit" in log and "Re-submit the same command to resume" in log, log[-4000:]
    assert "requeueing" not in log, log[-4000:]
    done = _complete_steps(run)
    assert done and 4 <= done[-1] < STEPS, done

    # Re-submitting the same command resumes from the last complete checkpoint.
    info, log = _run(slurm_env, logs, name, overrides)
    assert info.get("JobState") == "COMPLETED", f"resubmission ended {info}\n{log[-4000:]}"
    assert f"resumed from {run}/checkpoints/step-{done[-1]}" in log, log[-4000:]
    got = losses(run)
    assert set(range(1, STEPS + 1)) <= set(got), log[-3000:]
    _assert_same_losses(got, torchrun_ref, range(done[-1] + 1, STEPS + 1))


def test_two_nodes_sequence_parallel_matches_sp1(slurm_env, work):
    """SP=2 across the two nodes (the all-to-alls cross nodes) vs one process at SP=1:
    the same global batch (DP=1), so the same losses up to summation order."""
    logs, name = work / "sp", f"harness-2n-{uuid.uuid4().hex[:8]}"
    info, log = _run(slurm_env, logs, name, _overrides(work, "sp2", **{"parallel.sp": 2}))
    assert info.get("JobState") == "COMPLETED", f"{info}\n{log[-4000:]}"
    train(_overrides(work, "sp1"), nproc=1)
    got, ref = losses(work / "runs" / "sp2"), losses(work / "runs" / "sp1")
    assert sorted(got) == list(range(1, STEPS + 1)), log[-3000:]
    _assert_same_losses(got, ref, range(1, STEPS + 1))
