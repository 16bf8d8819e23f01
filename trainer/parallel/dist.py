"""Process-group setup and the few collectives the harness issues itself. The only module
that reads launcher environment variables or calls `torch.distributed`; everything else
receives a `Dist` (tests/unit/test_dist.py enforces this by reading the sources). DeepSpeed's
own collectives (gradient reduction, Ulysses' all-to-all) stay inside DeepSpeed."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from trainer.errors import UserError


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    sp: int  # Ulysses degree; SP groups are contiguous ranks
    sp_group: Any = None  # torch ProcessGroup of this rank's SP group (None when sp == 1)
    mpu: Any = None  # module DeepSpeed accepts as `mpu=` for SP-aware gradient reduction

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def _active(self) -> bool:
        return tdist.is_initialized() and self.world > 1

    def barrier(self) -> None:
        if self._active:
            # NCCL's barrier is an all-reduce on a device buffer; naming the device avoids
            # torch guessing it from the rank (wrong when ranks do not map 1:1 to GPUs).
            if self.device.type == "cuda":
                tdist.barrier(device_ids=[self.device.index])
            else:
                tdist.barrier()

    def close(self) -> None:
        """End this rank's process groups together with its peers': a rank whose gloo group
        was torn down at interpreter exit while a peer's last collective was still in flight
        killed that peer with SIGABRT ("terminate called without an active exception"), so a
        finished run could exit -6. Only on a clean finish: after a failure a peer may be gone."""
        if tdist.is_initialized():
            self.barrier()
            tdist.destroy_process_group()

    def all_reduce(self, t: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
        """Reduce `t` in place over `group` (default: all ranks) and return it; op is sum|max|min.

        The collective runs on a copy on `self.device` (an NCCL group serves CUDA tensors
        only), and the result is written back into `t`, so callers keep their device and dtype.
        """
        if self._active:
            work = t.to(self.device)
            tdist.all_reduce(work, op=getattr(tdist.ReduceOp, op.upper()), group=group)
            if work is not t:
                t.copy_(work)
        return t

    def all_gather(self, t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        """Every rank's `t` (same shape everywhere) over `group`, on `t`'s device, in rank order."""
        if not self._active:
            return [t]
        work = t.to(self.device).contiguous()
        n = tdist.get_world_size(group)
        parts = [torch.empty_like(work) for _ in range(n)]
        tdist.all_gather(parts, work, group=group)
        return [p.to(t.device) for p in parts]

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (used for stop/NaN decisions).
        One host sync with several ranks (the loop asks every step), none alone."""
        if not self._active:
            return bool(flag)
        # Filled on the device, not copied there: a copy from pageable host memory waits too.
        return bool(self.all_reduce(torch.full((1,), float(flag), device=self.device), "max").item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled; for small control values, not tensors)."""
        if not self._active:
            return obj
        box = [obj]
        # The pickled bytes travel as a tensor, which under NCCL must live on our GPU.
        tdist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def free_port() -> int:
    """A TCP port free on this host now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    """Normalise torchrun/accelerate/deepspeed/srun/plain-python env to RANK/WORLD_SIZE/...

    torchrun, accelerate and the deepspeed launcher set RANK etc. themselves; under a bare
    `srun python -m trainer.train` only SLURM_* exist; a plain process gets world size 1.
    """
    env = dict(os.environ)
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env and int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1"))) > 1:
            # 127.0.0.1 would send every node to its own store and hang the rendezvous.
            env["MASTER_ADDR"] = slurm_first_node(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env and env["WORLD_SIZE"] != "1":
            # Every task of the step computes the same port; slurm/launch.sh picks it the same way.
            env["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process launch; use torchrun, accelerate or srun")
        env["MASTER_PORT"] = str(free_port())
    return env


def slurm_first_node(nodelist: str) -> str:
    """The first host of a SLURM nodelist ("gpu[03-04],gpu07" -> "gpu03"), where task 0 of
    the step runs, by `scontrol show hostnames` as slurm/launch.sh does."""
    fix = "set MASTER_ADDR to the first node's address, or launch with slurm/launch.sh (torchrun per node)"
    if not nodelist:
        raise UserError(f"multi-node srun without MASTER_ADDR and without SLURM_JOB_NODELIST: {fix}")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"multi-node srun without MASTER_ADDR: `scontrol show hostnames {nodelist}` "
                           f"failed ({e}); {fix}") from None
    if not out:
        raise UserError(f"multi-node srun without MASTER_ADDR: no host in SLURM nodelist {nodelist!r}; {fix}")
    return out[0]


def compute_device(local_rank: int) -> torch.device:
    """This process's GPU, else the CPU. LOCAL_RANK modulo the visible GPUs: under
    `srun --gpus-per-task=1` each task sees one GPU (cuda:0) while its LOCAL_RANK runs 0..7."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def venv_build_tools() -> None:
    """Let DeepSpeed's op build find the venv's tools when the venv is not activated. On a CPU
    machine deepspeed.init_distributed JIT-builds its shared-memory comm op, and torch's
    cpp_extension finds ninja only on PATH: pip's ninja sits in the venv's bin, which is on PATH
    when the venv is activated (make, the slurm scripts) but not for a bare
    `.venv/bin/python -m trainer.train`, which would then fail on a machine without a system
    ninja. The build folder defaults to the venv's, as make sets it, so both share one build."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and os.path.isfile(os.path.join(scripts, "ninja")):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    if sys.prefix != sys.base_prefix:  # a venv
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def init_distributed(backend: str = "auto", sp: int = 1, timeout_minutes: float = 30.0) -> Dist:
    """Join (or create) the process group. `timeout_minutes` bounds every collective: a
    rank whose peer died or hangs raises instead of waiting forever."""
    env = launcher_env()
    os.environ.update({k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")})
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    device = compute_device(local_rank)
    if cuda:
        torch.cuda.set_device(device)
        # DeepSpeed takes LOCAL_RANK as the GPU index (engine set_device, init_process_group's
        # device_id); with one visible GPU per task, LOCAL_RANK 3 would name a missing cuda:3.
        os.environ["LOCAL_RANK"] = str(device.index)
    venv_build_tools()
    import deepspeed

    timeout = timedelta(minutes=timeout_minutes)
    # Groups created later without an explicit timeout (DeepSpeed's ZeRO and sequence-
    # parallel groups) take torch's module default, not the world group's: point the
    # default at ours so an all-to-all in an SP group is bounded like the world all-reduce.
    from torch.distributed import distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)
    if not tdist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    d = Dist(rank=rank, world=world, local_rank=local_rank, device=device, sp=sp)
    if sp > 1:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        try:
            mpu.get_sequence_parallel_group()
        except AssertionError:
            mpu.initialize_sequence_parallel(sp)
        d.sp_group, d.mpu = mpu.get_sequence_parallel_group(), mpu
    return d


_TIMED_OUT = ("Timed out", "timed out", "Watchdog caught collective operation timeout")
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
              "remote process exited", "communicator was aborted")


def collective_failure(exc: BaseException, timeout_minutes: float) -> str | None:
    """One line for a failed collective (a peer that hung past the timeout, or died), or
    None when `exc` is something else (its traceback is then worth seeing). Gloo and NCCL
    raise these as RuntimeErrors whose text names the cause; no finer exception type exists."""
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    rank = os.environ.get("RANK", "?")
    if any(k in text for k in _TIMED_OUT):
        why = (f"a collective did not complete within parallel.timeout_minutes={timeout_minutes:g} "
               f"(another rank hung or stopped answering)")
    elif any(k in text for k in _PEER_GONE):
        why = "another rank or node went away during a collective"
    else:
        return None
    return f"rank {rank}: {why}: {first[:300]}. Re-run the same command to resume from the last complete checkpoint."


def env_rank() -> int:
    """This process's global rank from the launcher's variables, also before init_distributed
    has set RANK (a bare `srun python -m trainer.train` sets only SLURM_PROCID), as
    launcher_env reads them."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return 0


def env_world_size() -> int:
    """The launch's world size from the launcher's variables, as launcher_env reads them, for
    the launch-time config checks that run before init_distributed."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return int(os.environ.get("WORLD_SIZE", "1"))


def print0(*args: Any, **kw: Any) -> None:
    """print on global rank 0 only, so call sites never test the rank; also the start-up
    messages printed before the process group exists (config warnings)."""
    if env_rank() == 0:
        print(*args, **kw, flush=True)
