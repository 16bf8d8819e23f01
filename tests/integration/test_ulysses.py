"""Ulysses SP=2 on 2 gloo ranks against a single SP=1 process with the same global batch:
per-step loss, grad norm and final weights: train_step on engines built by build_engine on
spawned gloo ranks at every ZeRO stage and reduction path, and whole trainer runs at ZeRO-2,
with MoD and learned value residual, and across a resume (the factor's table without ranks:
tests/unit/test_grad_scale.py)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import metrics, selected_cases, spawn_gloo, tiny_overrides, train
from trainer.config import load_config
from trainer.export.load import consolidated_state_dict, resolve_checkpoint

STEPS = 5


def _rows(run_dir):
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


def _assert_same_run(ref_dir, sp_dir):
    ref, got = _rows(ref_dir), _rows(sp_dir)
    assert sorted(ref) == list(range(1, STEPS + 1)) == sorted(got)
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-5), s
    w_ref = consolidated_state_dict(resolve_checkpoint(ref_dir)[1])
    w_sp = consolidated_state_dict(resolve_checkpoint(sp_dir)[1])
    assert w_ref.keys() == w_sp.keys()
    for k in w_ref:  # relative error of each tensor (Adam amplifies reduction-order noise element-wise)
        rel = ((w_sp[k] - w_ref[k]).norm() / w_ref[k].norm()).item()
        assert rel < 1e-5, (k, rel)


def _pair(tmp_path, name, **extra):
    out = tmp_path / "runs"
    base = {"run.max_steps": STEPS, "parallel.grad_accum": 2, "optim.lr": 1e-3, **extra}
    train(tiny_overrides(out, f"{name}-sp1", **base))
    train(tiny_overrides(out, f"{name}-sp2", **base, **{"parallel.sp": 2}), nproc=2)
    return out / f"{name}-sp1", out / f"{name}-sp2"


@pytest.mark.slow
def test_sp2_run_matches_sp1_loss_grad_norm_and_weights(tmp_path):
    # Through the real entry point (loader, sharding, metrics, checkpoint) at ZeRO-2; the
    # gradient factor at every ZeRO stage and reduction path: the spawn_gloo test below.
    _assert_same_run(*_pair(tmp_path, "z2", **{"parallel.zero_stage": 2}))


class _Batches:
    """train_step's data: a fixed random global batch per (step, micro-step), labels shifted."""

    def __init__(self, vocab_size: int, seq_len: int):
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def train_batch(self, step, micro, layout):
        g = torch.Generator().manual_seed(1000 * step + micro)
        b = layout.micro_batch
        ids = torch.randint(0, self.vocab_size, (layout.dp_size * b, self.seq_len + 1), generator=g)
        ids = ids[layout.dp_rank * b:(layout.dp_rank + 1) * b]
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _sp_steps(rank: int, world: int, overrides: list[str], release: bool = False
              ) -> tuple[list[tuple[float, float]], dict | None]:
    """STEPS of trainer.step.train_step on the engine the trainer builds (Ulysses core
    injected, grad_scale from build_engine): per-step (loss, grad norm), and rank 0's full
    fp32 weights. `release`: the engine is destroyed afterwards (as growth replaces one), so
    the next case in this process builds its own on a clean slate."""
    from trainer.parallel import ds_state
    from trainer.parallel.dist import init_distributed
    from trainer.parallel.engine import build_engine, build_model
    from trainer.parallel.layout import BatchLayout
    from trainer.parallel.ulysses import attention_core
    from trainer.step import train_step

    cfg = load_config("configs/tiny.yaml", overrides)
    dist = init_distributed("gloo", cfg.parallel.sp)
    model = build_model(cfg, cfg.model.n_layers, attention_core(dist, cfg.model.kv_heads))
    engine = build_engine(cfg, dist, model)
    data, layout = _Batches(cfg.model.vocab_size, cfg.data.seq_len), BatchLayout.build(cfg, dist)
    rows = []
    for step in range(1, STEPS + 1):
        r = train_step(engine, data, dist, cfg, layout, step)
        rows.append((float(r.loss), float(r.grad_norm)))
    weights = ds_state.fp32_weights(engine)  # collective under ZeRO: every rank calls it
    if release:
        ds_state.release(engine)
        del engine, model
        ds_state.free_memory()
    return rows, weights if rank == 0 else None


# (id, ZeRO stage, DeepSpeed overrides): every path by which DeepSpeed reduces gradients over dp.
# ZeRO-3 last: its engines partition parameters (and leave DeepSpeed state behind), so the
# stages before it are built in a process no ZeRO-3 engine has touched.
REDUCTION_PATHS = [
    ("z0", 0, {}), ("z1", 1, {}), ("z2", 2, {}),  # DeepSpeed's defaults at each ZeRO stage
    ("z1-predivide-world", 1, {"zero_optimization.reduce_scatter": "false",
                               "gradient_predivide_factor": 2.0}),  # averages SP: factor 2
    ("z3", 3, {}),
    # contiguous all-reduce over dp: sums SP, factor 1
    ("z3-allreduce", 3, {"zero_optimization.reduce_scatter": "false"}),
]


def _reduction_path_overrides(stage: int, deepspeed: dict) -> list[str]:
    base = [f"{k}={v}" for k, v in {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
                                    "model.n_kv_heads": 2, "model.vocab_size": 512, "model.max_seq_len": 64,
                                    "data.seq_len": 64, "parallel.micro_batch": 2, "parallel.grad_accum": 2,
                                    "optim.lr": 1e-3, "parallel.zero_stage": stage}.items()]
    return base + [f"parallel.deepspeed.{k}={v}" for k, v in deepspeed.items()]


def _sp_cases(rank: int, world: int, cases: list[tuple[str, list[str]]]) -> dict:
    """_sp_steps of every (case id, overrides) in turn in these ranks, each engine destroyed
    before the next is built: {case id: (rows, rank 0's weights)}."""
    return {case: _sp_steps(rank, world, overrides, release=True) for case, overrides in cases}


@pytest.fixture(scope="module")
def reduction_path_runs(request) -> tuple[dict, dict]:
    """Every selected reduction path at SP=1 (one process) and at SP=2 (two gloo ranks): one
    spawn per world size for all the cases, not two per case (each spawn pays for importing
    torch and DeepSpeed in every rank)."""
    wanted = selected_cases(request, "test_sp2_step_matches_sp1_loss_grad_norm_and_weights_on_every_gradient_reduction_path",
                            "case")
    cases = [(case, _reduction_path_overrides(stage, ds)) for case, stage, ds in REDUCTION_PATHS if case in wanted]
    [ref] = spawn_gloo(_sp_cases, 1, [(c, [*o, "parallel.sp=1"]) for c, o in cases])
    sp, _ = spawn_gloo(_sp_cases, 2, [(c, [*o, "parallel.sp=2"]) for c, o in cases])
    return ref, sp


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c, _, _ in REDUCTION_PATHS])
def test_sp2_step_matches_sp1_loss_grad_norm_and_weights_on_every_gradient_reduction_path(case, reduction_path_runs):
    # The gradient factor is build_engine's (grad_scale), the step is train_step: two gloo
    # ranks at SP=2 against one process at SP=1 on the same global batches, no trainer run.
    ref, sp = reduction_path_runs
    (ref_rows, w_ref), (sp_rows, w_sp) = ref[case], sp[case]
    assert len(ref_rows) == len(sp_rows) == STEPS, case
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(sp_rows, ref_rows), 1):
        assert loss == pytest.approx(ref_loss, rel=1e-5), (case, step, "loss")
        assert norm == pytest.approx(ref_norm, rel=1e-5), (case, step, "grad norm")
    assert w_ref.keys() == w_sp.keys(), case
    for k in w_ref:  # relative error of each tensor, as _assert_same_run
        rel = ((w_sp[k] - w_ref[k]).norm() / w_ref[k].norm()).item()
        assert rel < 1e-5, (case, k, rel)


@pytest.mark.slow
def test_sp2_matches_sp1_with_mod_and_learned_value_residual(tmp_path):
    # sp (2) is a multiple of n_kv_heads (1): kv heads are replicated across the SP group.
    _assert_same_run(*_pair(tmp_path, "mod", **{
        "parallel.zero_stage": 1, "model.mod.capacity": 0.25, "model.mod.route_chunks": 2,
        "model.value_residual": "learned", "model.n_kv_heads": 1}))


@pytest.mark.slow
def test_sp2_checkpoint_resumes_at_sp2_and_loads_at_sp1(tmp_path):
    out = tmp_path / "runs"
    over = tiny_overrides(out, "res", **{"run.max_steps": 8, "parallel.sp": 2, "parallel.zero_stage": 2})
    train(tiny_overrides(out, "res-full", **{"run.max_steps": 8, "parallel.sp": 2, "parallel.zero_stage": 2}), nproc=2)
    train([*over, "run.stop_at=4"], nproc=2)
    proc = train(over, nproc=2)
    assert "resumed from" in proc.stdout
    full, resumed = _rows(out / "res-full"), _rows(out / "res")
    assert {s: r["loss"] for s, r in resumed.items()} == {s: r["loss"] for s, r in full.items()}
    from trainer import load_model

    model = load_model(out / "res")  # a plain SP=1 model from the SP=2 checkpoint
    assert model(torch.randint(0, 512, (1, 64))).shape == (1, 64, 512)
