"""Progressive depth growth (docs/design.md §6) past the mapping (that is pinned at model level
in tests/unit/test_growth_mapping.py): Adam moments carried through a real DeepSpeed engine
at ZeRO 0-3, and growth through the real entry point (event, depth, exact resume across
growth, ZeRO parity).

The moment test runs tests/workers/growth_moments.py on gloo ranks (`spawn_gloo`), and under
torchrun on CUDA (tests/gpu/test_gpu_growth.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import ROOT, losses, metrics, selected_cases, spawn_gloo, tiny_overrides, train

# ---------------------------------------------------------------- Adam moments through an engine

# (case id, stage, nproc, precision). bf16 keeps fp32 masters and moments, and growth maps those
# (2 steps: bf16 is slow on CPU). The ZeRO-3 cases come last in their process (see the fixture).
MOMENT_CASES = [("0-1-fp32", 0, 1, "fp32"), ("bf16-zero0", 0, 1, "bf16"),
                ("1-2-fp32", 1, 2, "fp32"), ("2-2-fp32", 2, 2, "fp32"), ("bf16-zero1", 1, 2, "bf16"),
                ("bf16-zero2", 2, 2, "bf16"), ("3-2-fp32", 3, 2, "fp32"), ("bf16-zero3", 3, 2, "bf16")]
MOMENT_TEST = "test_adam_moments_of_copied_params_are_carried_and_fresh_ones_zero"


@pytest.fixture(scope="module")
def moment_runs(request, tmp_path_factory) -> dict:
    """The selected moment cases, one spawn per world size running its cases in turn (each
    engine destroyed before the next is built): {case: (out dir, stage, the spawn's error)}.
    A failing case ends its spawn, so the cases after it in that spawn have no result."""
    from tests.workers.growth_moments import moment_cases_on_rank

    wanted = selected_cases(request, MOMENT_TEST, "case")
    runs = {}
    for nproc in (1, 2):
        cases = [(c, stage, str(tmp_path_factory.mktemp(f"moments-{c}")), precision)
                 for c, stage, n, precision in MOMENT_CASES if n == nproc and c in wanted]
        if not cases:
            continue
        try:
            spawn_gloo(moment_cases_on_rank, nproc, cases)
            err = None
        except AssertionError as e:
            err = str(e)
        runs.update({c: (Path(out), stage, err) for c, stage, out, _ in cases})
    return runs


@pytest.mark.parametrize("case", [c for c, *_ in MOMENT_CASES])
@pytest.mark.slow
def test_adam_moments_of_copied_params_are_carried_and_fresh_ones_zero(case, moment_runs):
    out, stage, err = moment_runs[case]
    ok = out / f"moments-ok-{stage}"
    assert ok.is_file(), f"{case}: no result; the spawn that ran it failed: {err}"
    assert json.loads(ok.read_text())["checked"] > 20, case


# ---------------------------------------------------------------- the real entry point

# Row fields that measure the machine (time, memory), not the training: they differ run to run.
MEASURED = ("tokens_per_s", "mfu", "hfu", "mem_gb")
GROW = {"run.max_steps": 8, "growth.stages": "[{at_step: 4, layers: 4, method: stack}]"}


@pytest.mark.slow
def test_growth_run_logs_event_deepens_and_keeps_training(tmp_path):
    out = tmp_path / "runs"
    proc = train(tiny_overrides(out, "g", **GROW))
    rows = metrics(out / "g")
    events = [r for r in rows if r.get("event") == "growth"]
    assert events == [{"step": 4, "event": "growth", "n_layers_from": 2, "n_layers": 4, "method": "stack"}]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["n_layers"] for r in train_rows] == [2, 2, 2, 2, 4, 4, 4, 4]
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert "grew 2 -> 4 layers" in proc.stdout and "4 layers" in proc.stdout.splitlines()[-1]
    manifest = json.loads((out / "g/checkpoints/step-4/MANIFEST.json").read_text())
    assert manifest["n_layers"] == 2  # the growth-step checkpoint holds the depth before growth


@pytest.mark.slow
def test_identity_growth_keeps_the_loss_of_the_ungrown_model_at_the_first_step_after_growth(tmp_path):
    """The first loss after growth is computed by the deeper model before its first update:
    with identity growth it must equal the shallow run's loss at that step."""
    out = tmp_path / "runs"
    peri = {"run.max_steps": 6, "model.norm": "peri", "model.ln_scaling": "true", "model.value_residual": "learned"}
    train(tiny_overrides(out, "shallow", **peri))
    train(tiny_overrides(out, "identity", **peri, **{"growth.stages": "[{at_step: 3, layers: 5, method: identity}]"}))
    ref, got = losses(out / "shallow"), losses(out / "identity")
    assert [got[s] for s in (1, 2, 3)] == [ref[s] for s in (1, 2, 3)]
    assert got[4] == pytest.approx(ref[4], abs=1e-6)
    assert got[6] != ref[6]  # after its first update the deeper model is a different model


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [4, 6])
def test_resume_across_growth_is_bit_identical(tmp_path, stop_at):
    """Stopped exactly at the growth step (the checkpoint predates growth, which runs again
    on resume) and after it (the checkpoint is already deep)."""
    out = tmp_path / "runs"
    train(tiny_overrides(out, "full", **GROW))
    part = tiny_overrides(out, "part", **GROW)
    train([*part, f"run.stop_at={stop_at}"])
    proc = train(part)
    assert f"step {stop_at}, {2 if stop_at == 4 else 4} layers" in proc.stdout
    assert losses(out / "part") == losses(out / "full")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]  # noqa: E731
    assert strip(metrics(out / "part")) == strip(metrics(out / "full"))


GROW_ZERO = {"run.max_steps": 6, "growth.stages": "[{at_step: 3, layers: 4, method: stack}]"}


@pytest.fixture(scope="module")
def growth_zero0_ref(tmp_path_factory) -> dict[int, float]:
    """The ZeRO-0 two-rank growth reference's losses, trained once for every stage compared with it."""
    out = tmp_path_factory.mktemp("growth_zero0_ref") / "runs"
    train(tiny_overrides(out, "z0", **GROW_ZERO, **{"parallel.zero_stage": 0}), nproc=2)
    return losses(out / "z0")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_growth_at_zero_stage_matches_zero0_on_two_ranks(tmp_path, stage, growth_zero0_ref):
    out = tmp_path / "runs"
    train(tiny_overrides(out, f"z{stage}", **GROW_ZERO, **{"parallel.zero_stage": stage}), nproc=2)
    ref, got = growth_zero0_ref, losses(out / f"z{stage}")
    assert list(ref) == [1, 2, 3, 4, 5, 6]
    assert [r["n_layers"] for r in metrics(out / f"z{stage}") if "loss" in r] == [2, 2, 2, 4, 4, 4]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-5), (s, ref, got)


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), pytest.param(2, "fp32", marks=pytest.mark.slow),
                                             pytest.param(1, "bf16", marks=pytest.mark.slow)])
def test_growth_frees_the_old_engine_before_building_the_deeper_one(tmp_path, stage, precision):
    """Through the real loop, with evaluation and diagnostics on at every step: when growth
    collects garbage, the replaced engine is already unreachable (a weakref to it is dead).
    bf16 ZeRO-1 is BF16_Optimizer, with its own gradient hooks."""
    import subprocess
    import sys

    from tests.helpers import _env

    proc = subprocess.run([sys.executable, "-m", "tests.workers.growth_release", str(tmp_path), str(stage),
                           precision],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((tmp_path / f"release-{stage}.json").read_text())
    assert got == {"engines": 2, "alive": [[False]]}  # one growth, before the deeper engine existed
