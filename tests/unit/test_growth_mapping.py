"""Progressive depth growth (docs/design.md §6): the weight mapping pinned at model level
(the moments through a real engine and growth through the entry point:
tests/integration/test_growth.py).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model import ModConfig, ModelConfig, Transformer
from model.growth import GrowthPlan, grow_state_dict, plan_growth, source_blocks
from model.mod import RoutedBlock, Routing
from model.norms import LayerScaledNorm
from tests.helpers import ROOT

B, T, D = 2, 16, 32


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=T), **kw})


def trained_like(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose every parameter is perturbed away from its init, so copies are
    distinguishable from fresh values (gains of 1 and λ of 0.5 would hide mistakes)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def grown(model: Transformer, new_layers: int, method: str) -> tuple[Transformer, dict]:
    """The deeper model holding `grow_state_dict`'s weights; fresh values from its own init."""
    torch.manual_seed(123)
    deeper = Transformer(dataclasses.replace(model.cfg, n_layers=new_layers))
    state, blocks = grow_state_dict(model.state_dict(), model.cfg.n_layers, new_layers, method, model.cfg,
                                    init=deeper.state_dict())
    deeper.load_state_dict(state, strict=True)
    return deeper, blocks


def q(model: Transformer, i: int) -> torch.Tensor:
    return model.blocks[i].attn.q_proj.weight


# ---------------------------------------------------------------- the mapping

def test_stack_copies_the_whole_stack_on_top():
    old = trained_like(tiny(n_layers=3))
    new, blocks = grown(old, 6, "stack")
    assert blocks == {0: 0, 1: 1, 2: 2, 3: 0, 4: 1, 5: 2}
    for i, j in blocks.items():
        assert torch.equal(q(new, i), q(old, j)), (i, j)
    assert not torch.equal(q(new, 0), q(new, 1))
    assert torch.equal(new.embed_tokens.weight, old.embed_tokens.weight)
    assert torch.equal(new.norm.weight, old.norm.weight) and torch.equal(new.lm_head.weight, old.lm_head.weight)


def test_interleave_duplicates_each_layer_in_place():
    old = trained_like(tiny(n_layers=2))
    new, blocks = grown(old, 6, "interleave")
    assert blocks == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    for i, j in blocks.items():
        assert torch.equal(q(new, i), q(old, j)), (i, j)
        assert torch.equal(new.blocks[i].mlp.down_proj.weight, old.blocks[j].mlp.down_proj.weight)


def test_source_blocks_rejects_bad_growth():
    with pytest.raises(ValueError, match="multiple"):
        source_blocks(2, 5, "interleave")
    with pytest.raises(ValueError, match="add layers"):
        source_blocks(4, 4, "stack")
    assert source_blocks(2, 5, "identity") == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("norm", ["pre", "peri"])
@pytest.mark.parametrize("new_layers", [4, 5])
def test_identity_growth_leaves_logits_unchanged(norm, new_layers):
    cfg = tiny(norm=norm, ln_scaling=True, value_residual="learned", embed_norm=norm == "peri",
               mod=ModConfig(capacity=0.5, every=2, causal="predictor"))
    old = trained_like(cfg)
    new, blocks = grown(old, new_layers, "identity")
    assert [blocks[i] for i in range(new_layers)] == [i % 2 for i in range(new_layers)]
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        for causal in (False, True):
            ref, got = old(x, routing=Routing(causal=causal)), new(x, routing=Routing(causal=causal))
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # The new blocks are no-ops only through the zeroed parameters; the rest are copies.
    zeroed = ("attn.o_proj", "mlp.down_proj") if norm == "pre" else ("attn_out", "mlp_out")
    for i in range(2, new_layers):
        for name in zeroed:
            assert new.get_submodule(f"blocks.{i}.{name}").weight.abs().sum() == 0
        assert torch.equal(q(new, i), q(old, i % 2))


def test_identity_growth_zeroes_the_moments_of_zeroed_parameters_and_copies_the_rest():
    cfg = tiny(n_layers=2)
    old = {k: torch.randn_like(v) for k, v in trained_like(cfg).state_dict().items()}
    deeper = Transformer(dataclasses.replace(cfg, n_layers=4)).state_dict()
    plan = plan_growth(old, deeper, 2, 4, "identity", cfg)
    m = plan.moments(old, deeper)
    assert m["blocks.3.mlp.down_proj.weight"].abs().sum() == 0 and m["blocks.2.attn.o_proj.weight"].abs().sum() == 0
    assert torch.equal(m["blocks.3.attn.q_proj.weight"], old["blocks.1.attn.q_proj.weight"])
    assert torch.equal(m["blocks.1.attn.o_proj.weight"], old["blocks.1.attn.o_proj.weight"])


def test_post_ln_identity_growth_is_a_config_error():
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="post-LN"):
        load_config(ROOT / "configs/tiny.yaml", ["model.norm=post", "growth.stages=[{at_step: 5, layers: 8, "
                                                 "method: identity}]"])
    with pytest.raises(ValueError, match="identity"):
        plan_growth([], [], 2, 4, "identity", tiny(norm="post"))


def test_mod_every_other_pattern_survives_stack_with_routers_copied():
    cfg = tiny(n_layers=2, mod=ModConfig(capacity=0.25, every=2, causal="predictor"))
    old = trained_like(cfg)
    new, _ = grown(old, 6, "stack")
    assert [isinstance(b, RoutedBlock) for b in new.blocks] == [False, True, False, True, False, True]
    for i in (1, 3, 5):  # every routed slot copies routed block 2
        assert torch.equal(new.blocks[i].router.weight, old.blocks[1].router.weight)
        assert torch.equal(new.blocks[i].causal_rule.fc1.weight, old.blocks[1].causal_rule.fc1.weight)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    routing = Routing(collect_stats=True)
    new(x, routing=routing)
    stats = routing.stats
    assert sorted(stats) == sorted(f"mod/block{n}/{k}" for n in (2, 4, 6)
                                   for k in ("selected_frac", "causal_acc", "mean_pos"))


def test_interleave_gives_routed_slots_fresh_routers_and_drops_routers_in_dense_slots():
    cfg = tiny(n_layers=2, mod=ModConfig(capacity=0.25, every=2))
    old = trained_like(cfg)
    torch.manual_seed(123)
    init = Transformer(dataclasses.replace(cfg, n_layers=4)).state_dict()
    state, blocks = grow_state_dict(old.state_dict(), 2, 4, "interleave", cfg, init=init)
    assert blocks == {0: 0, 1: 0, 2: 1, 3: 1}
    assert torch.equal(state["blocks.1.router.weight"], init["blocks.1.router.weight"])  # dense 1 -> routed 2: fresh
    assert "blocks.2.router.weight" not in state  # routed 2 -> dense 3: dropped
    assert torch.equal(state["blocks.3.router.weight"], old.blocks[1].router.weight)  # routed -> routed: copied
    assert torch.equal(state["blocks.1.attn.q_proj.weight"], old.blocks[0].attn.q_proj.weight)


def test_value_residual_lambdas_follow_their_block_and_block1_copies_lose_v_proj_when_shared():
    learned = trained_like(tiny(n_layers=2, value_residual="learned"))
    new, _ = grown(learned, 4, "stack")
    assert torch.equal(new.blocks[3].attn.value.lambdas, learned.blocks[1].attn.value.lambdas)
    assert torch.equal(new.blocks[2].attn.value.lambdas, torch.full((2,), 0.5))  # copy of block 1: fresh λ
    assert torch.equal(new.blocks[2].attn.value.v_proj.weight, learned.blocks[0].attn.value.v_proj.weight)

    shared = trained_like(tiny(n_layers=2, value_residual="shared"))
    state, _ = grow_state_dict(shared.state_dict(), 2, 4, "stack", shared.cfg)
    assert "blocks.0.attn.value.v_proj.weight" in state  # block 1 still produces V1
    assert not any(k.startswith(f"blocks.{i}.attn.value") for k in state for i in (1, 2, 3))
    assert torch.equal(state["blocks.0.attn.value.v_proj.weight"], shared.blocks[0].attn.value.v_proj.weight)


@pytest.mark.parametrize("method", ["stack", "interleave", "identity"])
def test_lns_factors_of_grown_model_are_one_over_sqrt_new_position(method):
    old = trained_like(tiny(n_layers=2, ln_scaling=True, norm="peri"))
    new, _ = grown(old, 4, method)
    for i, block in enumerate(new.blocks):
        for slot in (block.attn_in, block.mlp_in):
            assert isinstance(slot, LayerScaledNorm)
            assert slot.scale == torch.tensor(1 / math.sqrt(i + 1))  # fp32, as the model builds it
    assert "blocks.3.attn_in.scale" not in new.state_dict()  # non-persistent: never carried


def test_tied_embeddings_grow_with_the_head_still_tied():
    old = trained_like(tiny(n_layers=2, tie_embeddings=True))
    new, _ = grown(old, 4, "stack")
    assert new.lm_head.weight is new.embed_tokens.weight
    assert torch.equal(new.embed_tokens.weight, old.embed_tokens.weight)


def test_plan_is_a_plain_name_map():
    plan = plan_growth(["a", "blocks.0.w", "blocks.1.w"], ["a", "blocks.0.w", "blocks.1.w", "blocks.2.w",
                                                          "blocks.3.w", "blocks.3.extra"], 2, 4, "stack", tiny())
    assert isinstance(plan, GrowthPlan)
    assert plan.sources == {"a": "a", "blocks.0.w": "blocks.0.w", "blocks.1.w": "blocks.1.w",
                            "blocks.2.w": "blocks.0.w", "blocks.3.w": "blocks.1.w", "blocks.3.extra": None}
