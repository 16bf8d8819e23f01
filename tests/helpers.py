"""Shared test helpers: tiny-run overrides, launching the real entry point, and `spawn_gloo`
for component tests that need a few ranks of one process group but not the trainer."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

from trainer.parallel.dist import free_port  # noqa: F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "benchmarks" / "data" / "tinyshakespeare.txt"  # public domain, shipped in the repo


# The data cache shared by the tests of one pytest process (an xdist worker): tests/conftest.py
# points this variable at a directory under the session's base temp. The cache is
# content-addressed (<cache>/tokenizers/<fingerprint>/, <cache>/shards/<fingerprint>/), so runs
# of one data config reuse one tokenizer and one set of shards, and runs of another get their own.
SHARED_DATA_CACHE_ENV = "TESTS_SHARED_DATA_CACHE"


def load_shipped_config(path: Path):
    """A config from configs/, loaded as a user would, except that configs/ladder/ reads the
    corpus `python -m benchmarks.ladder.corpus` generates (git-ignored, absent on a fresh
    clone): those get stand-in sources, as the ladder runner's --dry-run does."""
    from trainer.config import load_config

    stand_in = ["data.source=embedded", "data.eval.val=embedded", "data.eval.ood=embedded"]
    return load_config(path, stand_in if path.parent.name == "ladder" else [])


def tiny_overrides(out_dir: Path, name: str = "t", fresh_data: bool = False, **extra) -> list[str]:
    """A model and corpus small enough for a few-second CPU run.

    The data cache is the one shared by this pytest process's tests, so a launch that finds its
    tokenizer and shards already prepared skips preparing. `fresh_data=True` gives the run its own
    empty cache, `out_dir.parent / "cache"`, for a test that depends on preparing (asserts on what
    prepare does or leaves, kills it, or damages or counts the cache's files). Outside pytest
    (no shared cache configured) every run gets that per-directory cache too."""
    shared = os.environ.get(SHARED_DATA_CACHE_ENV)
    cache = Path(shared) if shared and not fresh_data else out_dir.parent / "cache"
    base = {
        "run.out_dir": str(out_dir), "run.name": name, "run.max_steps": 6, "run.eval_every": 0,
        "run.eval_batches": 2, "checkpoint.every": 0, "logging.wandb_mode": "disabled",
        "logging.progress": "false", "logging.every": 1, "model.d_model": 64, "model.n_layers": 2,
        "model.n_heads": 4, "model.n_kv_heads": 2, "model.vocab_size": 512, "model.max_seq_len": 64,
        "data.seq_len": 64, "data.max_docs": 60, "data.cache_dir": str(cache),
        "parallel.micro_batch": 2, "schedule.warmup_steps": 2, "logging.peak_flops": 1e12,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def selected_cases(request, test_name: str, param: str) -> list:
    """The values of `param` of the parametrized `test_name` items this session will run (after
    -k/-m deselection), in collection order: a module fixture that computes every case of such a
    test at once computes only these."""
    out = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if getattr(item, "originalname", None) == test_name and spec and spec.params[param] not in out:
            out.append(spec.params[param])
    return out


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def train(overrides: list[str], nproc: int = 1, config: str = "configs/tiny.yaml", env: dict | None = None,
          check: bool = True, timeout: int = 300, torchrun: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m trainer.train` as a user would: one process, or `nproc` ranks started as
    torchrun starts them (`launch_ranks`; `torchrun=True` runs torchrun itself)."""
    args = ["-m", "trainer.train", config, *overrides]
    if nproc > 1 and not torchrun:
        proc = launch_ranks(args, nproc, _env(env), timeout)
        cmd = [f"launch_ranks(nproc={nproc})", *args]
    else:
        cmd = [sys.executable, *args] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
             *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def launch_ranks(args: list[str], nproc: int, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`python args...` as `nproc` ranks of one host, with the variables torchrun gives its
    workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and, as
    under torchrun, one shared stdout and stderr; when a rank fails, the others get SIGTERM and,
    30 s later, SIGKILL, as torchrun's agent does. Its returncode is the rank's that failed first.

    Not torchrun itself: its agent process imports torch too, about 1.5 CPU-seconds per launch,
    which over the suite's multi-rank launches is most of a minute of a 2-core `make test`.
    torchrun itself runs under SLURM (tests/cluster) and in the hung-rank test."""
    import tempfile

    port = free_port()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=err,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                                       "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port)})
                 for r in range(nproc)]
        deadline, stop_at, first_rc = time.monotonic() + timeout, None, None
        try:
            while [p.poll() for p in procs].count(None):  # every rank polled: `any` would stop at the first
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
                if stop_at is None and any(p.returncode for p in procs):
                    first_rc = next(p.returncode for p in procs if p.returncode)
                    stop_at = time.monotonic() + 30
                    for p in procs:
                        if p.poll() is None:
                            p.terminate()
                if stop_at is not None and time.monotonic() > stop_at:
                    for p in procs:
                        p.kill()
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        out.seek(0)
        err.seek(0)
        rc = first_rc or next((p.returncode for p in procs if p.returncode), 0)
        return subprocess.CompletedProcess([sys.executable, *args], rc, out.read(), err.read())


def torchrun_module(module: str, nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc -m module args...` from the repo root, output captured
    (the multi-rank test code lives in tests/workers/)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r and not r.get("skipped")}


def _gloo_rank(rank: int, fn, world: int, port: int, args: tuple, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch
    import torch.distributed as tdist

    from trainer.parallel.dist import init_distributed

    torch.set_num_threads(1)
    init_distributed("gloo")  # the trainer's own join (DeepSpeed's comm layer too), from the env above
    try:
        # By value: a tensor sent through torch's queue is a shared-memory handle that dies with this process.
        results.put((rank, pickle.dumps(fn(rank, world, *args))))
        # Every rank's collectives are finished before any rank closes its sockets: a rank that
        # tore its group down while a peer's last gloo op was still in flight killed that peer
        # with SIGABRT ("terminate called without an active exception").
        try:
            tdist.barrier()
        except RuntimeError:
            # A peer died before the barrier: that rank reports its own traceback, and this
            # rank's "connection reset" must not be the error spawn_gloo shows first.
            pass
    finally:
        tdist.destroy_process_group()


def spawn_gloo(fn, world: int = 2, *args, timeout: float = 300) -> list:
    """Run `fn(rank, world, *args)` in `world` fresh processes that form one gloo group (CPU,
    a free localhost port, RANK, WORLD_SIZE, LOCAL_RANK and MASTER_* set as torchrun sets them,
    joined by `init_distributed`, which `fn` may call again for its `Dist`) and return each
    rank's return value in rank order. A rank that raises fails the call with its traceback; the other ranks are ended.
    `fn` must be a module-level function; its arguments and return value are pickled."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    results = mp.get_context("spawn").SimpleQueue()
    procs = mp.start_processes(_gloo_rank, args=(fn, world, free_port(), args, results), nprocs=world, join=False,
                               start_method="spawn")
    out, deadline = {}, time.monotonic() + timeout
    try:
        while True:
            while not results.empty():  # drained while waiting: a large result would block its rank's put
                rank, value = results.get()
                out[rank] = pickle.loads(value)
            if procs.join(0.05):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"spawn_gloo({fn.__name__}, world={world}): no result after {timeout} s")
    except ProcessException as e:  # ProcessRaisedException's message holds the rank's traceback
        raise AssertionError(f"spawn_gloo({fn.__name__}, world={world}): {e}") from None
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    while not results.empty():
        rank, value = results.get()
        out[rank] = pickle.loads(value)
    return [out[r] for r in range(world)]
