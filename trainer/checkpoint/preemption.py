"""Stop requests: SIGTERM/SIGUSR1 (SLURM's `--signal=B:USR1@120`, `scancel`, a node
drain), Ctrl-C (SIGINT), or a stop file that launch scripts touch. The loop finishes the
current step, checkpoints and exits 0; the signal only sets a flag. A second Ctrl-C aborts
at once (exit 130), naming the last complete checkpoint."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

from trainer.parallel.dist import env_rank

# torchrun passes a Ctrl-C on to its workers, which the terminal already sent it: a SIGINT
# this soon after the first is that copy, not the user pressing Ctrl-C again.
REPEAT_WINDOW_S = 1.0


class StopRequest:
    def __init__(self, stop_file: str | None = None, stop_at: int = 0,
                 last_checkpoint: Callable[[], object] = lambda: None):
        self.signal: str | None = None
        self.stop_at = stop_at  # run.stop_at: stop cleanly after this step (0 = never)
        self.stop_file = Path(stop_file) if stop_file else None
        self.last_checkpoint = last_checkpoint  # named when a second Ctrl-C aborts
        self._interrupted_at: float | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is not None and now - self._interrupted_at > REPEAT_WINDOW_S:
                _say(f"interrupted again: aborting now without a checkpoint; the last complete checkpoint is "
                     f"{self.last_checkpoint() or 'none'}")
                os._exit(130)
            if self._interrupted_at is None:
                self._interrupted_at = now
                _say("interrupted: finishing this step and saving a checkpoint, then exiting "
                     "(Ctrl-C again to abort without one)")
        self.signal = self.signal or signal.Signals(signum).name

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
    def from_env(cls, stop_at: int = 0, last_checkpoint: Callable[[], object] = lambda: None) -> "StopRequest":
        return cls(os.environ.get("HARNESS_STOP_FILE"), stop_at, last_checkpoint)


def _say(line: str) -> None:
    """One line on rank 0's stderr from a signal handler: os.write, because the interrupted
    code may be inside a print to a buffered stream, which must not be re-entered."""
    if env_rank() == 0:
        os.write(2, (line + "\n").encode())
