"""Stop requests: SIGTERM/SIGUSR1 (SLURM's `--signal=B:USR1@120`, `scancel`, a node
drain) or a stop file that launch scripts touch. The loop finishes the current step,
checkpoints and exits 0; the signal only sets a flag."""
from __future__ import annotations

import os
import signal
from pathlib import Path


class StopRequest:
    def __init__(self, stop_file: str | None = None):
        self.signal: str | None = None
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

    @classmethod
    def from_env(cls) -> "StopRequest":
        return cls(os.environ.get("HARNESS_STOP_FILE"))
