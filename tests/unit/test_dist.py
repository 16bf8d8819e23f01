"""Collectives the harness issues itself go through `trainer.parallel.dist.Dist`, which runs them on
the compute device (an NCCL group serves CUDA tensors only) and hands results back on the
caller's device and dtype. CPU tests run gloo, which accepts CPU tensors, so they cannot see
a CPU tensor reaching NCCL: these tests pin the contract with a stubbed `torch.distributed`
and a pretend GPU, and forbid direct `torch.distributed` calls anywhere else."""
from __future__ import annotations

import ast
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as real_tdist
from torch.overrides import TorchFunctionMode

import trainer.parallel.dist as dist_module
from trainer.errors import UserError
from trainer.parallel.dist import Dist

ROOT = Path(__file__).resolve().parents[2]
GPU = torch.device("cuda", 0)

# Modules that talk to process groups; only trainer/parallel/dist.py may use them.
BANNED = ("torch.distributed", "deepspeed.comm", "deepspeed.init_distributed")


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def distributed_uses(source: str) -> list[str]:
    """Names from `torch.distributed` / `deepspeed.comm` a module imports or reaches for."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            names = [_dotted(node) or ""]
        found += [n for n in names if n.startswith(BANNED)]
    return found


def test_the_source_scan_catches_every_spelling():
    for bad in ("import torch.distributed as tdist", "from torch import distributed",
                "from torch.distributed import all_reduce", "import deepspeed.comm as dc",
                "from deepspeed import comm", "torch.distributed.all_reduce(t)", "deepspeed.init_distributed()"):
        assert distributed_uses(bad), bad
    for fine in ('cmd = ["-m", "torch.distributed.run"]', "dist.all_reduce(t)",
                 "from deepspeed.sequence.layer import DistributedAttention"):
        assert not distributed_uses(fine), fine


def test_no_module_but_trainer_dist_calls_torch_distributed():
    offenders = {}
    for folder in ("trainer", "model", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel != "trainer/parallel/dist.py" and (uses := distributed_uses(path.read_text())):
                offenders[rel] = uses
    assert not offenders, f"collectives must go through trainer.parallel.dist.Dist: {offenders}"


class PretendGPU(TorchFunctionMode):
    """`.to(GPU)` returns a CPU copy remembered as living on the GPU, as does a factory
    (`torch.full`, ...) asked for the GPU; `empty_like` and `contiguous` of such a tensor live
    there too. The stubbed collectives below refuse any
    tensor that is not on it, as NCCL does."""

    def __init__(self):
        super().__init__()
        self._on_gpu: list[torch.Tensor] = []

    def on_gpu(self, t: torch.Tensor) -> bool:
        return any(t is g for g in self._on_gpu)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") == GPU and func in (torch.full, torch.zeros, torch.ones, torch.empty, torch.tensor):
            out = func(*args, **{**kwargs, "device": "cpu"})  # a factory filling the tensor on the GPU
            self._on_gpu.append(out)
            return out
        if func is torch.Tensor.to:
            target = next((a for a in args[1:] if isinstance(a, torch.device)), kwargs.get("device"))
            if target == GPU:
                out = args[0].detach().clone()
                self._on_gpu.append(out)
                return out
            if target is not None and self.on_gpu(args[0]):
                return args[0].detach().clone()
        out = func(*args, **kwargs)
        if func in (torch.empty_like, torch.Tensor.contiguous) and self.on_gpu(args[0]):
            self._on_gpu.append(out)
        return out


@pytest.fixture
def nccl_like(monkeypatch):
    """A 2-rank `torch.distributed` stub whose collectives accept pretend-GPU tensors only."""
    gpu, calls = PretendGPU(), []

    def need_gpu(*tensors):
        for t in tensors:
            assert gpu.on_gpu(t), "collective given a tensor that is not on dist.device"

    def all_reduce(t, op=None, group=None):
        need_gpu(t)
        calls.append(("all_reduce", op, t.dtype))
        if op == real_tdist.ReduceOp.SUM:
            t.mul_(2)  # the other rank holds the same values

    def all_gather(parts, t, group=None):
        need_gpu(t, *parts)
        calls.append(("all_gather", len(parts)))
        for i, p in enumerate(parts):
            p.copy_(t + 10 * i)

    stub = SimpleNamespace(
        is_initialized=lambda: True, get_world_size=lambda group=None: 2, ReduceOp=real_tdist.ReduceOp,
        all_reduce=all_reduce, all_gather=all_gather,
        barrier=lambda **kw: calls.append(("barrier", kw)),
        broadcast_object_list=lambda box, src=0, device=None: calls.append(("broadcast", device)))
    monkeypatch.setattr(dist_module, "tdist", stub)
    with gpu:
        yield Dist(rank=0, world=2, local_rank=0, device=GPU, sp=1), calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_reduce_runs_on_the_device_and_returns_in_place_on_the_callers(nccl_like, dtype):
    d, calls = nccl_like
    t = torch.tensor([1.0, 2.5], dtype=dtype)
    out = d.all_reduce(t)
    assert out is t and t.device.type == "cpu" and t.dtype == dtype
    assert t.tolist() == [2.0, 5.0]
    assert calls == [("all_reduce", real_tdist.ReduceOp.SUM, dtype)]


def test_any_agrees_through_a_max_on_the_device(nccl_like):
    d, calls = nccl_like
    assert d.any(True) is True and d.any(False) is False
    assert [c[:2] for c in calls] == [("all_reduce", real_tdist.ReduceOp.MAX)] * 2


def test_all_gather_returns_every_rank_on_the_callers_device(nccl_like):
    d, calls = nccl_like
    parts = d.all_gather(torch.arange(3.0).reshape(1, 3))
    assert [p.tolist() for p in parts] == [[[0.0, 1.0, 2.0]], [[10.0, 11.0, 12.0]]]
    assert all(p.device.type == "cpu" for p in parts)
    assert calls == [("all_gather", 2)]


def test_barrier_and_object_broadcast_name_the_device(nccl_like):
    d, calls = nccl_like
    d.barrier()
    assert d.broadcast_object({"step": 3}) == {"step": 3}
    assert calls == [("barrier", {"device_ids": [0]}), ("broadcast", GPU)]


def test_harness_reductions_reach_the_collective_on_the_device(nccl_like):
    """The callers the issue names: the step's CE total, evaluation's sums, the optimizer's
    skip decision, the SP gather of the key mask; each hands Dist a CPU or device tensor."""
    from trainer.parallel.optim import SkipNonFiniteAdamW
    from trainer.parallel.ulysses import gather_sequence

    d, calls = nccl_like
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.tensor([float("nan"), 0.0])
    opt = SkipNonFiniteAdamW([w], lr=0.1, dist=d)
    opt.step()
    assert opt.skipped_last_step and w.tolist() == [1.0, 1.0]
    mask = gather_sequence(torch.tensor([[True, False]]).float(), Dist(0, 2, 0, GPU, sp=2))
    assert mask.tolist() == [[1.0, 0.0, 11.0, 10.0]]
    assert [c[0] for c in calls] == ["all_reduce", "all_gather"]


def test_without_a_process_group_nothing_is_called(monkeypatch):
    monkeypatch.setattr(dist_module, "tdist", SimpleNamespace(is_initialized=lambda: False))
    d = Dist(rank=0, world=2, local_rank=0, device=GPU, sp=1)
    t = torch.ones(2)
    assert d.all_reduce(t) is t and d.all_gather(t) == [t] and d.broadcast_object(5) == 5 and not d.any(False)
    d.barrier()


@pytest.mark.parametrize("env, prints", [({"RANK": "0"}, True), ({"RANK": "1"}, False),
                                         ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, False),
                                         ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, True), ({}, True)])
def test_print0_knows_rank_0_before_the_process_group_exists(monkeypatch, capsys, env, prints):
    # Start-up warnings print before init_distributed sets RANK; a bare srun sets only SLURM_*.
    for key in ("RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dist_module.print0("hello")
    assert (capsys.readouterr().out == "hello\n") is prints


@pytest.mark.parametrize("local_rank, visible, index", [(3, 1, 0), (3, 8, 3), (9, 8, 1), (0, 1, 0)])
def test_each_rank_takes_local_rank_modulo_the_visible_gpus(monkeypatch, local_rank, visible, index):
    # `srun --gpus-per-task=1` shows each task one GPU while SLURM_LOCALID still runs 0..7.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert dist_module.compute_device(local_rank) == torch.device("cuda", index)


def test_without_cuda_every_rank_computes_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist_module.compute_device(5) == torch.device("cpu")


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_NNODES", "SLURM_STEP_NUM_NODES", "SLURM_JOB_NODELIST",
                "SLURM_STEP_NODELIST", "SLURM_JOB_ID")


@pytest.fixture
def bare_srun(monkeypatch):
    """Rank 5 of a bare `srun -N2 --ntasks-per-node=4 python -m trainer.train`: SLURM_* only."""
    for key in _LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
                       "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "4242"}.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def _scontrol(monkeypatch, hosts: str | None):
    seen = []

    def run(cmd, **kw):
        seen.append(cmd)
        if hosts is None:
            raise FileNotFoundError(2, "No such file or directory", "scontrol")
        return SimpleNamespace(stdout=hosts)

    monkeypatch.setattr(dist_module.subprocess, "run", run)
    return seen


def test_bare_multi_node_srun_meets_on_the_first_node_not_on_localhost(bare_srun):
    seen = _scontrol(bare_srun, "gpu03\ngpu04\n")
    env = dist_module.launcher_env()
    assert seen == [["scontrol", "show", "hostnames", "gpu[03-04]"]]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu03"
    assert env["MASTER_PORT"] == str(20000 + 4242 % 20000)  # every task derives the same port


def test_bare_multi_node_srun_prefers_the_steps_own_nodes(bare_srun):
    bare_srun.setenv("SLURM_STEP_NODELIST", "gpu04")
    bare_srun.setenv("SLURM_STEP_NUM_NODES", "1")
    seen = _scontrol(bare_srun, "never\n")
    assert dist_module.launcher_env()["MASTER_ADDR"] == "127.0.0.1" and not seen


def test_bare_multi_node_srun_keeps_a_master_addr_it_was_given(bare_srun):
    bare_srun.setenv("MASTER_ADDR", "10.0.0.7")
    seen = _scontrol(bare_srun, "gpu03\n")
    assert dist_module.launcher_env()["MASTER_ADDR"] == "10.0.0.7" and not seen


def test_bare_multi_node_srun_without_scontrol_fails_in_one_line(bare_srun):
    _scontrol(bare_srun, None)
    with pytest.raises(UserError, match=r"multi-node srun without MASTER_ADDR.*set MASTER_ADDR") as e:
        dist_module.launcher_env()
    assert "\n" not in str(e.value)


def test_single_node_srun_and_plain_python_stay_on_localhost(bare_srun):
    bare_srun.setenv("SLURM_NNODES", "1")
    seen = _scontrol(bare_srun, "gpu03\n")
    assert dist_module.launcher_env()["MASTER_ADDR"] == "127.0.0.1" and not seen
    for key in _LAUNCH_VARS:
        bare_srun.delenv(key, raising=False)
    env = dist_module.launcher_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


def test_deepspeed_is_told_the_gpu_index_not_the_launchers_local_rank(monkeypatch):
    # DeepSpeed calls set_device(LOCAL_RANK) and passes it as init_process_group's device_id.
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "n1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(real_tdist, "is_initialized", lambda: True)  # the group exists: no rendezvous
    d = dist_module.init_distributed("nccl")
    assert d.device == torch.device("cuda", 0) == chosen[0] and d.local_rank == 3
    assert os.environ["LOCAL_RANK"] == "0"


def test_an_unactivated_venv_still_finds_its_ninja_for_deepspeeds_op_build(tmp_path, monkeypatch):
    """`.venv/bin/python -m trainer.train` without activating the venv: ninja (pip's, in the
    venv's bin) is put on PATH before DeepSpeed JIT-builds its comm op, and the build folder
    defaults to the venv's (as make sets it); an explicit TORCH_EXTENSIONS_DIR is kept."""
    scripts = tmp_path / "bin"
    scripts.mkdir()
    (scripts / "ninja").write_text("#!/bin/sh\necho 1.11\n")
    (scripts / "ninja").chmod(0o755)
    monkeypatch.setattr(dist_module.sysconfig, "get_path", lambda name: str(scripts))
    monkeypatch.setattr(dist_module.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(dist_module.sys, "base_prefix", "/usr")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    dist_module.venv_build_tools()
    assert dist_module.shutil.which("ninja") == str(scripts / "ninja")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/mine")
    path = os.environ["PATH"]
    dist_module.venv_build_tools()  # ninja found now: PATH untouched; the user's folder kept
    assert os.environ["PATH"] == path and os.environ["TORCH_EXTENSIONS_DIR"] == "/mine"
