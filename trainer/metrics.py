"""Where numbers go: `metrics.jsonl`, W&B and a console progress bar, rank 0 only.
Other ranks get a logger whose methods do nothing, so call sites never test the rank."""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from trainer.config import RunConfig, to_dict


def measure_peak_flops(device: torch.device) -> float:
    """Per-device peak for MFU: a datasheet value on known GPUs, else a timed fp32 matmul probe."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12)):
            if key in name:
                return peak  # dense bf16
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    reps, best = 5, math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class Metrics:
    """Rank-0 sink for training and eval rows."""

    def __init__(self, cfg: RunConfig, run_dir: Path, start_step: int):
        self.cfg, self.run_dir = cfg, run_dir
        self.path = run_dir / "metrics.jsonl"
        self._trim_after(start_step)
        self.file = open(self.path, "a")
        self.wandb = self._init_wandb()
        self.bar, self._pace_from = None, None
        if cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.run.max_steps, initial=start_step, desc=cfg.run.name, dynamic_ncols=True,
                            mininterval=1.0)

    def _trim_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint we restart from, so the file
        reads as one uninterrupted run."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if _row_step(r) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in kept))
        os.replace(tmp, self.path)

    def _init_wandb(self):
        mode = self.cfg.logging.wandb_mode
        if mode == "disabled":
            return None
        import wandb

        id_file = self.run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12] + "\n")
        return wandb.init(project=self.cfg.logging.wandb_project, name=self.cfg.run.name, id=id_file.read_text().strip(),
                          resume="allow", dir=str(self.run_dir), mode=mode, config=to_dict(self.cfg))

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({**postfix, "eta": self._eta(step)}, refresh=True)

    def _eta(self, step: int) -> str:
        """Remaining time at the mean pace since the first step shown (so start-up, data
        preparation and the first step's compilation do not count); includes eval and checkpoints."""
        now = time.perf_counter()
        if self._pace_from is None:
            self._pace_from = (step, now)
            return "?"
        step0, t0 = self._pace_from
        if step <= step0:
            return "?"
        left = (now - t0) / (step - step0) * (self.cfg.run.max_steps - step)
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f}d"

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullMetrics:
    def log(self, row: dict[str, Any]) -> None: ...
    def progress(self, step: int, postfix: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def make_metrics(cfg: RunConfig, run_dir: Path, start_step: int, is_main: bool) -> Metrics | NullMetrics:
    return Metrics(cfg, run_dir, start_step) if is_main else NullMetrics()


def _row_step(line: str) -> float:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return math.inf  # a torn final line from a crash: drop it
    # A growth event at step s happens after checkpoint s was taken; resuming from s logs it again.
    return row.get("step", -1) + (0.5 if row.get("event") == "growth" else 0)
