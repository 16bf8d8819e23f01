"""What produced a run or a result: the git commit (with `-dirty` when the tree has
uncommitted changes, since then the commit alone does not reproduce it) and versions."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD of the checkout at `root`, suffixed `-dirty` when it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def compute_device() -> str:
    """The processor the math ran on: the GPU's name, or the CPU's model and the instruction set
    torch's kernels were chosen for. fp32 results are bit-reproducible only on the same kind:
    another CPU's kernels round differently, which seeds a chaotic divergence like a new seed's."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def run_info(world: int) -> dict:
    """The run dir's run_info.json: commit, command line, world size, library versions, host
    and the device that computed."""
    import deepspeed
    import torch

    return {"git_commit": git_commit(), "argv": sys.argv, "world_size": world, "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "host": platform.node(),
            "device": compute_device()}
