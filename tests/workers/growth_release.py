"""A training run with growth, in one process: `python -m tests.workers.growth_release OUT STAGE PRECISION`.

Every engine the loop and growth build is watched through a weakref. When growth collects
garbage (`ds_state.free_memory`), the engine it replaces must already be gone: a reference
kept anywhere (the loop's variable, a closure, a hook, DeepSpeed's wrappers) would keep its
weights, masters, moments and gradient buffers on the GPU beside the new engine's."""
from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

from tests.helpers import ROOT, tiny_overrides


def main(out: Path, stage: int, precision: str) -> None:
    from trainer import growth, loop
    from trainer.config import load_config
    from trainer.parallel import ds_state

    engines: list[weakref.ref] = []
    alive_at_collection: list[list[bool]] = []
    build = growth.build_engine

    def watched_build(*args, **kwargs):
        e = build(*args, **kwargs)
        engines.append(weakref.ref(e))
        return e

    free = ds_state.free_memory

    def checked_free():
        free()
        alive_at_collection.append([ref() is not None for ref in engines])

    # The loop and growth each imported build_engine by name.
    loop.build_engine = growth.build_engine = watched_build
    ds_state.free_memory = checked_free
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides(
        out, f"z{stage}", **{"run.max_steps": 4, "parallel.zero_stage": stage, "parallel.precision": precision,
                             "logging.diag_every": 1,
                             "run.eval_every": 1, "growth.stages": "[{at_step: 2, layers: 4, method: stack}]"}))
    assert loop.Trainer(cfg).fit() == 0
    (out / f"release-{stage}.json").write_text(json.dumps({"engines": len(engines), "alive": alive_at_collection}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
