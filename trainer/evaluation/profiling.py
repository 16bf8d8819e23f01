"""Where time and memory go: peak memory for the metrics rows and a `torch.profiler` trace of
the training steps named by `logging.profile_steps`."""
from __future__ import annotations

import resource
from pathlib import Path
from typing import Optional, Sequence

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process since the previous call, in GiB.

    CUDA: peak allocated tensor bytes (`torch.cuda.max_memory_allocated`, then reset).
    CPU: peak resident set size, the kernel's high-water mark VmHWM, then reset by writing
    5 to /proc/self/clear_refs; where /proc does not allow that, the process's lifetime peak
    RSS (`getrusage`), which cannot be reset.
    """
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    try:
        hwm = next(int(line.split()[1]) for line in _STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
        _CLEAR_REFS.write_text("5")
        return hwm * 1024 / 2**30
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


class StepProfiler:
    """Traces training steps [first, last] (1-based, as in metrics rows) with torch.profiler and
    writes one chrome trace per rank, `<run_dir>/profile/steps_<first>-<last>_rank<r>.json`
    (open in chrome://tracing or https://ui.perfetto.dev). No-op when `steps` is empty."""

    def __init__(self, steps: Sequence[int], run_dir: Path, rank: int, device: torch.device, done: int):
        """`done`: steps already completed (the resume point)."""
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.path = run_dir / "profile" / f"steps_{self.first}-{self.last}_rank{rank}.json"
        self.device = device
        self.prof: Optional[torch.profiler.profile] = None
        self.after_step(done)

    def after_step(self, done: int) -> Optional[Path]:
        """Call after each step with the number of completed steps; returns the trace path
        when one was written."""
        if self.prof is None and self.first <= done + 1 <= self.last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.start()
        elif self.prof is not None and done >= self.last:
            return self.close()
        return None

    def close(self) -> Optional[Path]:
        """Stop and write the trace (a run that stops inside the window keeps what it traced)."""
        if self.prof is None:
            return None
        self.prof.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.path))
        self.prof = None
        return self.path
