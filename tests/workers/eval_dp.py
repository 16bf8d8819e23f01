"""Rank code for tests/test_eval_dp.py: `torchrun -m tests.workers.eval_dp OUT`. Each rank
evaluates its DP share of the same validation batches and writes, to OUT.<rank>, the val
loss and how many forwards it ran."""
from __future__ import annotations

import json
import sys

from tests.integration.test_eval_dp import evaluate_fixture


def main(out: str) -> None:
    from trainer.dist import init_distributed

    dist = init_distributed("gloo")
    val_loss, forwards = evaluate_fixture(dist)
    with open(f"{out}.{dist.rank}", "w") as f:
        json.dump({"val_loss": val_loss, "forwards": forwards}, f)


if __name__ == "__main__":
    main(sys.argv[1])
