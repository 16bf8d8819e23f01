"""Speed and memory features against the run without them: activation checkpointing
(bit-identical losses and gradients, with MoD, value residual, growth and SP=2),
torch.compile (losses within 1e-5 of eager), the AdamW kernels (the skip-non-finite rule
kept), and the memory / profiler observability."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import Routing
from tests.helpers import ROOT, metrics, spawn_gloo, train, tiny_overrides
from trainer.export.load import consolidated_state_dict, resolve_checkpoint
from trainer.config import load_config
from trainer.parallel.engine import build_model
from trainer.parallel.optim import SkipNonFiniteAdamW, param_groups
from trainer.evaluation.profiling import peak_memory_gb

MOD_VR = {"model.mod.capacity": 0.5, "model.mod.route_chunks": 2, "model.value_residual": "learned"}


def _cfg(**extra):
    over = {"model.d_model": 64, "model.n_layers": 4, "model.n_heads": 4, "model.n_kv_heads": 2,
            "model.vocab_size": 256, "model.max_seq_len": 32, "data.seq_len": 32, **extra}
    return load_config(ROOT / "configs/tiny.yaml", [f"{k}={v}" for k, v in over.items()])


def _loss_and_grads(cfg, n_layers: int = 4):
    model = build_model(cfg, n_layers)
    x = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    routing = Routing()
    logits = model(x[:, :-1], None, routing)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + 0.01 * routing.aux_loss()
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


# ---------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("mode", ["full", "every_2", "every_3"])
def test_checkpointing_gives_identical_loss_and_grads_with_mod_and_value_residual(mode):
    _, ref_loss, ref = _loss_and_grads(_cfg(**MOD_VR))
    model, loss, got = _loss_and_grads(_cfg(**MOD_VR, **{"parallel.activation_checkpointing": mode}))
    assert torch.equal(loss, ref_loss)
    assert got.keys() == ref.keys() == dict(model.named_parameters()).keys()  # names unchanged
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("mode,recomputed", [("none", []), ("full", [1, 2, 3, 4, 5, 6]), ("every_2", [2, 4, 6]),
                                             ("every_4", [4])])
def test_checkpointing_recomputes_exactly_blocks_k_2k_of_a_model_built_deeper(mode, recomputed):
    """Growth rebuilds the model through build_model, so a 6-layer rebuild of a 4-layer
    config is checkpointed by the same rule; a recomputed block's attention runs twice."""
    calls = {}
    cfg = _cfg(**{"parallel.activation_checkpointing": mode})
    model = build_model(cfg, 6)
    for i, block in enumerate(model.blocks, start=1):
        block.attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    model(torch.randint(0, 256, (1, 32))).sum().backward()
    assert [i for i, n in sorted(calls.items()) if n == 2] == recomputed
    assert all(n in (1, 2) for n in calls.values()) and len(calls) == 6


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


# ---------------------------------------------------------------- AdamW kernels

def _adamw_pair(**kernel):
    torch.manual_seed(0)
    model = build_model(_cfg(), 2)
    ref_model = build_model(_cfg(), 2)
    opt = SkipNonFiniteAdamW(param_groups(model, 0.1), lr=1e-2, **kernel)
    ref_opt = torch.optim.AdamW(param_groups(ref_model, 0.1), lr=1e-2, foreach=False)
    return model, opt, ref_model, ref_opt


# The fused kernel orders its float ops differently (vectorised, with FMA): about one ulp from
# the loop per step, hence its looser bound.
@pytest.mark.parametrize("kernel,tol", [({"foreach": True}, (1e-6, 1e-7)), ({"fused": True}, (1e-5, 1e-6))],
                         ids=["foreach", "fused"])
def test_adamw_kernel_matches_the_per_parameter_loop_and_still_skips_non_finite_steps(kernel, tol):
    model, opt, ref_model, ref_opt = _adamw_pair(**kernel)
    x = torch.randint(0, 256, (2, 32))
    for _ in range(3):
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            m(x).logsumexp(-1).mean().backward()
            o.step()
        assert not opt.skipped_last_step
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=tol[0], atol=tol[1], msg=n)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    (model(x).logsumexp(-1).mean() * float("nan")).backward()
    opt.step()
    assert opt.skipped_last_step
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and torch.equal(opt.state[p]["exp_avg"], moments[n]), n


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

def test_peak_memory_sees_a_transient_allocation_and_resets():
    peak_memory_gb(torch.device("cpu"))
    x = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    del x
    first = peak_memory_gb(torch.device("cpu"))
    second = peak_memory_gb(torch.device("cpu"))
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs: the peak cannot be reset")
    assert first - second >= 0.24, (first, second)


@pytest.mark.slow
def test_rows_carry_mem_gb_progress_shows_eta_and_profile_steps_write_a_trace(tmp_path):
    out = tmp_path / "runs"
    proc = train(tiny_overrides(out, "obs", **{"run.max_steps": 4, "logging.profile_steps": "[2, 3]",
                                                 "logging.progress": "true"}))
    rows = [r for r in metrics(out / "obs") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # this test process (GiB): torch imported
    assert all(0.5 * own < r["mem_gb"] < 64 for r in rows), [r["mem_gb"] for r in rows]
    assert "eta=" in proc.stderr
    trace = json.loads((out / "obs/profile/steps_2-3_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names
    assert "wrote profiler trace" in proc.stdout
