"""Stop requests: SIGTERM/SIGUSR1 (SLURM's `--signal=B:USR1@120`, `scancel`, a node
drain) or a stop file that launch scripts touch. The loop finishes the current step,
checkpoints and exits 0; the signal only sets a flag."""
from __future__ import annotations

import os
import signal
from pathlib import Path


class StopRequest:
    def __init__(self, stop_file: str | None = None, stop_at: int = 0):
        self.signal: str | None = None
        self.stop_at = stop_at  # run.stop_at: stop cleanly after this step (0 = never)
        self.stop_file = Path(stop_file) if stop_file else None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self.signal is None and self.stop_file is not None and self.stop_file.exists():
            self.signal = f"stop file {self.stop_file}"
        return self.signal is not None

    def reason(self, step: int, dist) -> str | None:
        """Why the run stops after `step`, or None. Every rank calls it and gets the same
        answer: a signal seen by any one rank stops them all, so they checkpoint together."""
        if not dist.any(self.requested) and step != self.stop_at:
            return None
        return self.signal or ("run.stop_at" if step == self.stop_at else "a stop request on another rank")

    @classmethod
    def from_env(cls, stop_at: int = 0) -> "StopRequest":
        return cls(os.environ.get("HARNESS_STOP_FILE"), stop_at)
