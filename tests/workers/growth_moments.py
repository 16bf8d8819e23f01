"""Rank code for the Adam-moment test of growth: `spawn_gloo(moment_cases_on_rank, nproc,
[(CASE, STAGE, OUT_DIR, PRECISION), ...])` on CPU (tests/integration/test_growth.py), or `torchrun -m
tests.workers.growth_moments STAGE OUT_DIR [fp32|bf16]` on CUDA (tests/gpu/test_gpu_growth.py)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from tests.helpers import ROOT, tiny_overrides


def _moment_worker(stage: int, out: Path, precision: str = "fp32") -> None:
    """Train a 2-layer engine 2 steps, grow it 2 -> 4 (interleave, with MoD and learned λ so
    some parameters are fresh and some dropped) through `grow`, and check the new
    engine's full weights and moments against the old ones, name by name. Under bf16 the
    weights are the fp32 masters (never the bf16 module copy)."""
    import torch.nn.functional as F

    from trainer.checkpoint.checkpointer import Checkpointer
    from trainer.checkpoint.state import TrainState
    from trainer.config import load_config
    from trainer.growth import due_stage, grow
    from trainer.metrics import RowBuilder
    from trainer.parallel.dist import init_distributed
    from trainer.parallel.ds_state import gather_full_state
    from trainer.parallel.engine import build_engine, build_model

    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides(out, f"m{stage}", **{
        "parallel.zero_stage": stage, "parallel.precision": precision, "model.mod.capacity": 0.5, "model.value_residual": "learned",
        "growth.stages": "[{at_step: 2, layers: 4, method: interleave}]"}))
    dist = init_distributed()
    engine = build_engine(cfg, dist, build_model(cfg, 2))
    if precision == "bf16":  # fp32 masters, moments and gradient accumulation at every stage
        assert engine.get_data_types()[1] == torch.float32
        lp = torch.float32 if stage == 0 else torch.bfloat16  # stage 0 runs under autocast
        assert next(engine.module.parameters()).dtype == lp and engine.torch_autocast_enabled() == (stage == 0)
        assert engine.communication_data_type == torch.float32  # gradients are reduced in fp32, not bf16
    g = torch.Generator().manual_seed(dist.rank)
    for _ in range(2):
        x = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=g).to(dist.device)
        loss = F.cross_entropy(engine(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
    before = gather_full_state(engine)
    if precision == "bf16":  # what growth reads holds more than bf16 precision: the masters
        assert any(not torch.equal(w, w.bfloat16().float()) for w in before.weights.values())
    state = TrainState(step=2, n_layers=2)
    ckpt = Checkpointer(out / f"m{stage}" / "checkpoints", 2, dist)
    grew = due_stage(cfg, state) is not None
    held, engine = [engine], None
    engine = grow(cfg, state, held, dist, None, ckpt, RowBuilder())
    after = gather_full_state(engine)
    fresh = dict(build_model(cfg, 4).named_parameters())

    assert grew and state.n_layers == 4 and len(engine.module.blocks) == 4
    assert float(after.step) == float(before.step) == 2.0
    assert (ckpt.root / "step-2" / "COMPLETE").is_file()
    src = {0: 0, 1: 0, 2: 1, 3: 1}
    fresh_names = {"blocks.1.router.weight", "blocks.1.attn.value.lambdas"}  # dense block 1 -> routed slot 2
    assert "blocks.2.router.weight" not in after.weights  # routed block 2 -> dense slot 3
    checked = 0
    for name, w in after.weights.items():
        parts = name.split(".")
        old_name = ".".join(["blocks", str(src[int(parts[1])]), *parts[2:]]) if parts[0] == "blocks" else name
        if name in fresh_names:
            assert torch.equal(w, fresh[name].detach().float()), name
            for k in ("exp_avg", "exp_avg_sq"):
                assert after.moments[k][name].abs().sum() == 0, (name, k)
            continue
        assert torch.equal(w, before.weights[old_name]), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert before.moments[k][old_name].abs().sum() > 0, (old_name, k)
            assert torch.equal(after.moments[k][name], before.moments[k][old_name]), (name, k)
        checked += 1
    assert checked == len(after.weights) - len(fresh_names)
    if precision == "bf16" and stage in (1, 2):  # the grown bf16 module is the rounded masters
        for name, p in engine.module.named_parameters():
            assert torch.equal(p.detach().cpu(), after.weights[name].to(p.dtype)), name
    x = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=g).to(dist.device)
    loss = F.cross_entropy(engine(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
    engine.backward(loss)
    engine.step()
    assert math.isfinite(loss.item())
    if dist.is_main:
        (out / f"moments-ok-{stage}").write_text(json.dumps({"checked": checked}))
    # The next case in this process builds its engine on a clean slate (as growth replaces one).
    from trainer.parallel import ds_state

    ds_state.release(engine)
    del engine, held
    ds_state.free_memory()


def moments_on_rank(rank: int, world: int, stage: int, out: str, precision: str = "fp32") -> None:
    """`tests.helpers.spawn_gloo` entry point: the same check on ranks of a gloo group."""
    _moment_worker(stage, Path(out), precision)


def moment_cases_on_rank(rank: int, world: int, cases: list[tuple[str, int, str, str]]) -> None:
    """`spawn_gloo` entry point for several (case id, stage, out dir, precision) in turn in
    one gloo group (one process start for all of them); a failure names its case."""
    for case, stage, out, precision in cases:
        try:
            _moment_worker(stage, Path(out), precision)
        except Exception as e:
            raise AssertionError(f"growth moments case {case}: {type(e).__name__}: {e}") from e


if __name__ == "__main__":
    _moment_worker(int(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
