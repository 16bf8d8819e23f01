"""Rank code for tests/test_verified_reads.py: `torchrun -m tests.workers.rank0_wait OUT_DIR`.

The process group's timeout is 3 s; rank 0's one-off work takes 6 s. Ranks waiting in
`rank0_work` must come through (a barrier would time out), then see rank 0's failure as one
line; a plain barrier in the same place times out (the control). Each rank writes what it saw to OUT_DIR/rank{r}.json."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(out: Path) -> None:
    from trainer.checkpoint.checkpointer import rank0_work
    from trainer.errors import CheckpointError
    from trainer.parallel.dist import init_distributed

    dist = init_distributed("gloo", timeout_minutes=0.05)
    seen: dict = {}
    t0 = time.monotonic()
    rank0_work(dist, out / "slow.status", "the slow step", lambda: time.sleep(6), poll_s=0.05)
    seen["waited_s"] = time.monotonic() - t0
    dist.barrier()  # the group still works after the long wait
    seen["barrier_after"] = True

    def fail() -> None:
        raise CheckpointError("converting /x/step-4 failed: disk on fire")

    try:
        rank0_work(dist, out / "fail.status", "converting /x/step-4", fail, poll_s=0.05)
    except CheckpointError as e:
        seen["error"] = str(e)
    # Control: the same wait as a barrier under the 3 s timeout fails.
    try:
        if dist.is_main:
            time.sleep(6)
        dist.barrier()
        seen["plain_barrier"] = "ok"
    except RuntimeError as e:
        seen["plain_barrier"] = str(e).splitlines()[0]
    (out / f"rank{dist.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
