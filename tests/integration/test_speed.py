"""Speed and memory features through real runs, against the run without them: activation
checkpointing with SP=2, MoD and growth, torch.compile (losses within 1e-5 of eager), the fused
AdamW of a real engine, and the memory / profiler fields of the rows (in-process checks:
tests/unit/test_speed_components.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, metrics, spawn_gloo, tiny_overrides, train
from trainer.config import load_config
from trainer.export.load import consolidated_state_dict, resolve_checkpoint
from trainer.parallel.engine import build_model

MOD_VR = {"model.mod.capacity": 0.5, "model.mod.route_chunks": 2, "model.value_residual": "learned"}


def _rows(run_dir: Path) -> dict:
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


GROWTH_SP = {**MOD_VR, "model.n_kv_heads": 1, "parallel.zero_stage": 1,
             "growth.stages": "[{at_step: 3, layers: 4, method: interleave}]"}


@pytest.mark.slow
def test_checkpointing_with_sp2_mod_and_growth_matches_the_run_without(tmp_path):
    out = tmp_path / "runs"
    base = {"run.max_steps": 6, "parallel.sp": 2, **GROWTH_SP}
    train(tiny_overrides(out, "none", **base), nproc=2)
    train(tiny_overrides(out, "full", **base, **{"parallel.activation_checkpointing": "full"}), nproc=2)
    ref, got = _rows(out / "none"), _rows(out / "full")
    assert sorted(ref) == sorted(got) == list(range(1, 7)) and got[6]["n_layers"] == 4
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6, abs=0), s
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-6, abs=0), s
    w_ref = consolidated_state_dict(resolve_checkpoint(out / "none")[1])
    w_got = consolidated_state_dict(resolve_checkpoint(out / "full")[1])
    for k in w_ref:
        assert torch.allclose(w_got[k], w_ref[k], rtol=1e-6, atol=0), k


# ---------------------------------------------------------------- torch.compile

@pytest.mark.slow
def test_compiled_blocks_match_eager_over_10_steps_across_growth_with_mod_and_sp2(tmp_path):
    """Eager SP=1 against compiled SP=2 (MoD, learned value residual, growth 2 -> 4 at step 3
    and so a recompile): the train losses and the final eval under both MoD rules."""
    out = tmp_path / "runs"
    base = {"run.max_steps": 10, **GROWTH_SP}
    train(tiny_overrides(out, "eager", **base), timeout=600)
    train(tiny_overrides(out, "compiled", **base, **{"parallel.compile": "true", "parallel.sp": 2}), nproc=2,
          timeout=900)
    rows = {n: metrics(out / n) for n in ("eager", "compiled")}
    ref, got = _rows(out / "eager"), _rows(out / "compiled")
    assert sorted(ref) == sorted(got) == list(range(1, 11)) and got[10]["n_layers"] == 4
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s
    ev = {n: next(r for r in rs if "val_loss" in r) for n, rs in rows.items()}
    for key in ("val_loss", "val_loss_topk"):
        assert ev["compiled"][key] == pytest.approx(ev["eager"][key], rel=1e-5), key


# ---------------------------------------------------------------- AdamW kernel of a real engine

def _engine_adamw_flags(rank: int, world: int) -> list[tuple[str, bool, bool]]:
    """(optimizer class, fused, foreach) of every param group of a real 1-rank ZeRO-0 engine,
    through whatever DeepSpeed wraps around the optimizer."""
    from trainer.parallel.dist import init_distributed
    from trainer.parallel.engine import build_engine

    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                                                   "model.n_kv_heads=2", "model.vocab_size=64", "parallel.zero_stage=0",
                                                   "parallel.precision=fp32"])
    engine = build_engine(cfg, init_distributed("gloo"), build_model(cfg, 1))
    opt = engine.optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return [(type(opt).__name__, g["fused"], g["foreach"]) for g in opt.param_groups]


def test_build_engine_picks_fused_adamw_on_cpu_and_cuda_and_foreach_elsewhere():
    from trainer.parallel.engine import adamw_kernel

    [groups] = spawn_gloo(_engine_adamw_flags, 1)  # a DeepSpeed engine needs a process group
    assert groups and all(g == ("SkipNonFiniteAdamW", True, False) for g in groups), groups
    assert adamw_kernel(torch.device("cpu")) == {"foreach": False, "fused": True}
    assert adamw_kernel(torch.device("cuda")) == {"foreach": False, "fused": True}
    assert adamw_kernel(torch.device("meta")) == {"foreach": True, "fused": False}


# ---------------------------------------------------------------- observability

@pytest.mark.slow
def test_rows_carry_mem_gb_progress_shows_eta_and_profile_steps_write_a_trace(tmp_path):
    out = tmp_path / "runs"
    proc = train(tiny_overrides(out, "obs", **{"run.max_steps": 4, "logging.profile_steps": "[2, 3]",
                                                 "logging.progress": "true"}))
    rows = [r for r in metrics(out / "obs") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # GiB of the trainer's resident memory: torch alone is above 0.1 GiB, and a unit slip (MiB or
    # KiB read as GiB) lands outside. (This process's own peak grows with the tests run before.)
    assert all(0.1 < r["mem_gb"] < 64 for r in rows), [r["mem_gb"] for r in rows]
    assert "eta=" in proc.stderr
    trace = json.loads((out / "obs/profile/steps_2-3_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names
    assert "wrote profiler trace" in proc.stdout
