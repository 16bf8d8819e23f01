"""Speed and memory features in-process, against the model without them: activation
checkpointing (bit-identical losses and gradients with MoD and value residual, exactly blocks
k, 2k, ... recomputed), the AdamW kernels against the per-parameter loop (the skip-non-finite
rule kept) and the peak-memory reading (through real runs: tests/integration/test_speed.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import Routing
from tests.helpers import ROOT
from trainer.config import load_config
from trainer.evaluation.profiling import peak_memory_gb
from trainer.parallel.engine import build_model
from trainer.parallel.optim import SkipNonFiniteAdamW, param_groups

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
