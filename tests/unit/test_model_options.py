"""Each architecture option pinned to its equation, plus FLOP/parameter accounting and a
short training run per option. Tiny dims, fp32, CPU."""
import ast
import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from model import ModConfig, ModelConfig, Transformer
from model.attention import local_attention_core
from model.mod import Routing
from model.norms import LayerScaledNorm, RMSNorm

aten = torch.ops.aten
B, T, D = 2, 16, 32
MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "model"


def tiny(**kw) -> ModelConfig:
    base = dict(d_model=D, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def mod_cfg(**kw) -> ModConfig:
    return ModConfig(**{"capacity": 0.25, **kw})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # gains of 1 would hide a norm in the wrong slot
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight") and "causal_rule" not in name:
                p.uniform_(0.5, 1.5)
    return model


def run(model: Transformer, ids: torch.Tensor, causal: bool = False, collect_stats: bool = False):
    """(logits, aux loss, routing stats) through the one forward contract."""
    routing = Routing(causal=causal, collect_stats=collect_stats)
    logits = model(ids, routing=routing)
    return logits, routing.aux_loss(), routing.stats


def rms(x, weight, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def gain(slot):
    """The gain of a norm slot, whether plain or layer-scaled."""
    return slot.norm.weight if isinstance(slot, LayerScaledNorm) else slot.weight


# ---------------------------------------------------------------- norm placement

def test_peri_ln_normalises_sublayer_input_and_output_not_the_residual():
    model = build(tiny(norm="peri", ln_scaling=True))
    block, s = model.blocks[1], 1 / math.sqrt(2)  # block l = 2: LNS factor 1/sqrt(2)
    x = torch.randn(B, T, D) * 3
    rope = model.rotary(torch.arange(T))
    with torch.no_grad():
        y, _ = block(x, rope, None, Routing())
        a, _ = block.attn(rms(x, gain(block.attn_in)) * s, rope, None)
        h = x + rms(a, block.attn_out.weight)
        expected = h + rms(block.mlp(rms(h, gain(block.mlp_in)) * s), block.mlp_out.weight)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_pre_ln_normalises_only_sublayer_input():
    model = build(tiny(norm="pre"))
    block = model.blocks[1]
    x = torch.randn(B, T, D) * 3
    rope = model.rotary(torch.arange(T))
    with torch.no_grad():
        y, _ = block(x, rope, None, Routing())
        h = x + block.attn(rms(x, block.attn_in.weight), rope, None)[0]
        expected = h + block.mlp(rms(h, block.mlp_in.weight))
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_post_ln_normalises_the_residual_sum():
    model = build(tiny(norm="post"))
    block = model.blocks[1]
    x = torch.randn(B, T, D) * 3
    rope = model.rotary(torch.arange(T))
    with torch.no_grad():
        y, _ = block(x, rope, None, Routing())
        h = rms(x + block.attn(x, rope, None)[0], block.attn_post.weight)
        expected = rms(h + block.mlp(h), block.mlp_post.weight)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm", ["pre", "peri"])
def test_layernorm_scaling_factors_are_one_over_sqrt_depth_on_input_norms_only(norm):
    model = build(tiny(norm=norm, ln_scaling=True, n_layers=4, embed_norm=True))
    x = torch.randn(B, T, D)
    for layer, block in enumerate(model.blocks, start=1):
        for slot in (block.attn_in, block.mlp_in):
            assert isinstance(slot, LayerScaledNorm)
            assert slot.scale.item() == torch.tensor(1 / math.sqrt(layer)).item()
            with torch.no_grad():
                torch.testing.assert_close(slot(x), rms(x, slot.norm.weight) / math.sqrt(layer))
        for slot in (block.attn_out, block.mlp_out, block.attn_post, block.mlp_post):
            assert not isinstance(slot, LayerScaledNorm)
    assert type(model.norm) is RMSNorm and type(model.embed_norm) is RMSNorm
    assert not any("scale" in name for name in model.state_dict())  # a constant, not state


@pytest.mark.parametrize("g", [1.0, 0.02, 0.0])
def test_peri_output_norm_gains_start_at_out_norm_gain_and_other_norms_at_one(g):
    torch.manual_seed(0)
    # init_std large enough that the attention output's mean square dwarfs the norm's eps.
    model = Transformer(tiny(norm="peri", embed_norm=True, n_layers=3, out_norm_gain=g, init_std=0.5))
    for block in model.blocks:
        for slot in (block.attn_out, block.mlp_out):
            assert torch.equal(slot.weight, torch.full((D,), g))
        for slot in (block.attn_in, block.mlp_in):
            assert torch.equal(slot.weight, torch.ones(D))
    assert torch.equal(model.embed_norm.weight, torch.ones(D)) and torch.equal(model.norm.weight, torch.ones(D))
    # The attention sublayer's first increment to the residual stream has RMS g per token.
    ids = torch.randint(0, 64, (B, T))
    block = model.blocks[0]
    with torch.no_grad():
        x = model.embed_norm(model.embed_tokens(ids))
        inc = block.attn_out(block.attn(block.attn_in(x), model.rotary(torch.arange(T)), None)[0])
    rms_inc = inc.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms_inc, torch.full_like(rms_inc, g), rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- value residual

def capture_values(model, layers):
    """Forward hooks recording (input x, output v) of each layer's value module."""
    seen = {}

    def hook(layer):
        def fn(module, args, out):
            seen[layer] = (args[0], out)
        return fn

    handles = [model.blocks[i].attn.value.register_forward_hook(hook(i)) for i in layers]
    return seen, handles


def test_fixed_value_residual_mixes_half_and_half_at_kv_width():
    model = build(tiny(n_kv_heads=2, value_residual="fixed", n_layers=3))
    seen, _ = capture_values(model, [0, 1, 2])
    with torch.no_grad():
        model(torch.randint(0, 64, (B, T)))
    v1 = seen[0][1]
    kv_width = 2 * model.cfg.head_dim
    assert v1.shape == (B, T, kv_width)
    for layer in (1, 2):
        x, v = seen[layer]
        own = x @ model.blocks[layer].attn.value.v_proj.weight.T
        assert v.shape == (B, T, kv_width)
        torch.testing.assert_close(v, 0.5 * own + 0.5 * v1)


def test_learned_value_residual_lambdas_receive_gradients():
    model = build(tiny(value_residual="learned", n_layers=3))
    model(torch.randint(0, 64, (B, T))).logsumexp(-1).sum().backward()
    assert not hasattr(model.blocks[0].attn.value, "lambdas")
    for block in model.blocks[1:]:
        lambdas = block.attn.value.lambdas
        assert isinstance(lambdas, torch.nn.Parameter) and lambdas.grad.abs().min() > 0


def test_shared_value_residual_layers_after_first_have_no_v_proj_and_use_v1():
    model = build(tiny(n_kv_heads=2, value_residual="shared", n_layers=3))
    names = [n for n, _ in model.named_parameters() if "v_proj" in n]
    assert names == ["blocks.0.attn.value.v_proj.weight"]
    seen, _ = capture_values(model, [0, 1, 2])
    with torch.no_grad():
        model(torch.randint(0, 64, (B, T)))
    assert seen[1][1] is seen[0][1] and seen[2][1] is seen[0][1]


# ---------------------------------------------------------------- Mixture-of-Depths

def routed_setup(seed=0, **mod_kw):
    model = build(tiny(n_kv_heads=2, value_residual="learned", mod=mod_cfg(**mod_kw)), seed)
    block = model.blocks[1]
    x = torch.randn(B, T, D)
    v1 = torch.randn(B, T, 2 * model.cfg.head_dim)
    return model, block, x, v1


def changed_tokens(x, out):
    return (out != x).any(-1)  # [B, T]


def test_mod_block_processes_exactly_k_tokens_per_sequence():
    model = build(tiny(mod=mod_cfg()))
    shapes = []
    for sub in (model.blocks[1].attn, model.blocks[1].mlp):
        sub.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    model(torch.randint(0, 64, (B, T)))
    assert shapes == [(B, 4, D), (B, 4, D)]  # k = ceil(0.25 · 16)


def test_mod_selected_tokens_equal_dense_block_on_gathered_subsequence_at_original_positions():
    model, block, x, v1 = routed_setup()
    with torch.no_grad():
        out, _ = block(x, model.rotary(torch.arange(T)), v1, Routing())
        r = (x @ block.router.weight.T).squeeze(-1)
        idx = r.topk(4, dim=-1).indices.sort(-1).values  # [B, k]

        def g(t):
            return torch.stack([t[b, idx[b]] for b in range(B)])

        x_sel, r_sel = g(x), g(r).unsqueeze(-1)
        y_ref, _ = block.run(x_sel, model.rotary(idx), g(v1))
        y_renumbered, _ = block.run(x_sel, model.rotary(torch.arange(4)), g(v1))
    torch.testing.assert_close(g(out), x_sel + r_sel * (y_ref - x_sel), rtol=0, atol=1e-5)
    # positions 0..k-1 would give a different answer: the original positions are what count
    assert (g(out) - (x_sel + r_sel * (y_renumbered - x_sel))).abs().max() > 1e-4


def test_mod_unselected_tokens_pass_through_unchanged():
    model, block, x, v1 = routed_setup()
    with torch.no_grad():
        out, _ = block(x, model.rotary(torch.arange(T)), v1, Routing())
    r = (x @ block.router.weight.T).squeeze(-1)
    selected = torch.zeros(B, T, dtype=torch.bool).scatter(1, r.topk(4, -1).indices, True)
    assert torch.equal(out[~selected], x[~selected])
    assert torch.equal(changed_tokens(x, out), selected)


def test_mod_router_receives_gradient_through_x_plus_r_f():
    model = build(tiny(mod=mod_cfg()))
    model(torch.randint(0, 64, (B, T))).logsumexp(-1).sum().backward()  # no aux loss in it
    assert model.blocks[1].router.weight.grad.abs().sum() > 0


def test_mod_top_k_is_per_sequence_not_over_flattened_batch():
    model, block, _, v1 = routed_setup()
    with torch.no_grad():
        block.router.weight.copy_(torch.eye(D)[:1])  # r = x[..., 0]
    x = torch.randn(B, T, D)
    x[0, :, 0] += 100.0  # every logit of sequence 0 beats every logit of sequence 1
    x[1, :, 0] -= 100.0
    with torch.no_grad():
        out, _ = block(x, model.rotary(torch.arange(T)), v1, Routing())
    assert changed_tokens(x, out).sum(-1).tolist() == [4, 4]


def test_mod_route_chunks_take_top_k_inside_each_chunk():
    model, block, _, v1 = routed_setup(route_chunks=2)  # Tc = 8, k = 2 per chunk
    with torch.no_grad():
        block.router.weight.copy_(torch.eye(D)[:1])
    x = torch.randn(B, T, D)
    x[..., 0] = torch.arange(T, dtype=torch.float32)  # logits rise along the sequence
    with torch.no_grad():
        out, _ = block(x, model.rotary(torch.arange(T)), v1, Routing())
    chosen = [changed_tokens(x, out)[b].nonzero().flatten().tolist() for b in range(B)]
    assert chosen == [[6, 7, 14, 15]] * B  # a global top-4 would be 12..15


def test_local_attention_core_key_mask_is_causal_and_key_allowed():
    torch.manual_seed(0)
    H, Hkv, Dh = 4, 2, 8
    q, k, v = torch.randn(B, T, H, Dh), torch.randn(B, T, Hkv, Dh), torch.randn(B, T, Hkv, Dh)
    key_mask = torch.rand(B, T) > 0.5
    key_mask[:, 0] = True
    out = local_attention_core(q, k, v, key_mask=key_mask)
    kr, vr = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(Dh)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & key_mask[:, None, None, :]
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed, -math.inf).softmax(-1), vr)
    rows = key_mask  # rows of disallowed queries are discarded by MoD; compare allowed ones
    torch.testing.assert_close(out[rows], ref[rows], rtol=0, atol=1e-5)
    dense = local_attention_core(q, k, v)
    assert (dense[rows] - ref[rows]).abs().max() > 1e-3  # the mask matters


@pytest.mark.parametrize("rule", ["aux_loss", "predictor"])
def test_mod_causal_eval_selects_by_sigmoid_and_attends_only_among_selected(rule):
    model, block, x, v1 = routed_setup(seed=1, causal=rule)
    rope = model.rotary(torch.arange(T))
    routing = Routing(causal=True, collect_stats=True)
    with torch.no_grad():
        out, aux = block(x, rope, v1, routing)
        r = (x @ block.router.weight.T).squeeze(-1)
        selected = block.causal_rule(x, r) > 0  # σ(logit) > 0.5
        assert torch.equal(changed_tokens(x, out), selected)
        for b in range(B):
            idx = selected[b].nonzero().flatten()
            assert 2 <= len(idx) < T
            y_ref, _ = block.run(x[b:b + 1, idx], model.rotary(idx), v1[b:b + 1, idx])
            expected = x[b, idx] + r[b, idx, None] * (y_ref[0] - x[b, idx])
            torch.testing.assert_close(out[b, idx], expected, rtol=0, atol=1e-5)
    assert aux is None and routing.aux == []
    assert routing.stats["mod/block2/selected_frac"] == pytest.approx(selected.float().mean().item())
    assert set(routing.stats) == {f"mod/block2/{k}" for k in ("selected_frac", "causal_acc", "mean_pos")}


def test_mod_causal_rule_loss_is_token_summed_bce_against_top_k():
    model, block, x, v1 = routed_setup()
    routing = Routing()
    _, aux = block(x, model.rotary(torch.arange(T)), v1, routing)
    r = (x @ block.router.weight.T).squeeze(-1)
    target = torch.zeros(B, T).scatter(1, r.topk(4, -1).indices, 1.0)
    expected = F.binary_cross_entropy_with_logits(r, target, reduction="sum")
    assert routing.aux == []  # the block returns it; Transformer.forward collects it
    torch.testing.assert_close(aux, expected)


def test_mod_predictor_trains_only_itself():
    model, block, x, v1 = routed_setup(causal="predictor")
    x.requires_grad_(True)
    _, aux = block(x, model.rotary(torch.arange(T)), v1, Routing())
    aux.backward()
    assert x.grad is None and block.router.weight.grad is None
    assert block.causal_rule.fc1.weight.grad.abs().sum() > 0


def test_forward_returns_logits_and_the_routing_passed_in_collects_mod_aux_and_stats_dense_none():
    # forward(ids, pos=None, routing=None) -> logits [B, T, V]; the aux loss and the selected
    # fraction come from the Routing the caller passed in (zero aux under the causal eval rule).
    model = build(tiny(mod=mod_cfg(), n_layers=4))
    ids = torch.randint(0, 64, (B, T))
    logits, aux, stats = run(model, ids, collect_stats=True)
    assert logits.shape == (B, T, 64) and logits.dtype == torch.float32
    assert aux.dim() == 0 and aux > 0 and stats["mod/block4/selected_frac"] == 0.25
    causal_logits, causal_aux, _ = run(model, ids, causal=True)
    assert torch.isfinite(causal_logits).all() and causal_aux == 0
    dense_logits, dense_aux, dense_stats = run(build(tiny()), ids)
    assert dense_aux == 0 and dense_stats == {}


def test_injected_attention_core_is_used_by_every_layer():
    calls = []

    def core(q, k, v, key_mask=None):
        calls.append(q.shape)
        return local_attention_core(q, k, v, key_mask=key_mask)

    model = Transformer(tiny(n_layers=3), attn_core=core)
    model(torch.randint(0, 64, (B, T)))
    assert len(calls) == 3


# ---------------------------------------------------------------- accounting

def flop_counter(causal: bool = False):
    """FlopCounterMode has SDPA formulas for the CUDA kernels only; map the CPU flash kernel
    (same math, same shapes) to the same formulas. The counter counts attention over the
    full n×n square; `causal` scales each SDPA call's forward to the n(n+1)/2 query–key
    pairs a causal model needs, from the shapes the call actually ran with."""
    def forward(q, k, v, *args, out_shape=None, **kwargs):
        n = q[-2]  # the counter passes shapes: q [B, H, n, Dh]
        return sdpa_flop_count(q, k, v) * ((n + 1) / (2 * n) if causal else 1)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


FLOP_CONFIGS = {
    "baseline": tiny(),
    "gqa": tiny(n_kv_heads=2),
    "peri_lns": tiny(norm="peri", ln_scaling=True, embed_norm=True),
    "value_learned": tiny(value_residual="learned"),
    "value_shared": tiny(value_residual="shared", n_layers=3),
    "mod": tiny(mod=mod_cfg(route_chunks=2)),
    "mod_rounds_k_per_chunk": tiny(mod=mod_cfg(capacity=0.3, route_chunks=2)),  # 2·ceil(2.4) ≠ ceil(4.8)
    "all_on": tiny(n_layers=4, n_kv_heads=2, norm="peri", ln_scaling=True, value_residual="learned",
                   tie_embeddings=True, mod=mod_cfg(route_chunks=2, causal="predictor")),
}


@pytest.mark.parametrize("name", FLOP_CONFIGS)
def test_flops_per_token_is_three_causal_forwards(name):
    """PaLM's model FLOPs: 3 × the forward's matmuls, attention over causal pairs only
    (T(T+1)/2, and K(K+1)/2 inside routed blocks), no recompute."""
    model = build(FLOP_CONFIGS[name])
    ids = torch.randint(0, 64, (B, T))
    with torch.no_grad(), flop_counter(causal=True) as counter:
        run(model, ids)
    assert model.flops_per_token(T) * B * T == pytest.approx(3 * counter.get_total_flops(), rel=1e-12)


@pytest.mark.parametrize("name", FLOP_CONFIGS)
def test_hardware_flops_per_token_matches_torch_flop_counter(name):
    model = build(FLOP_CONFIGS[name])
    ids = torch.randint(0, 64, (B, T))
    with flop_counter() as counter:
        logits, aux, _ = run(model, ids)
        (logits.sum() + aux).backward()
    assert model.hardware_flops_per_token(T) * B * T == pytest.approx(counter.get_total_flops(), rel=1e-12)


def test_causal_attention_is_about_half_the_square_at_long_context():
    model = build(tiny())
    f = model.flops(4096)
    assert f.attn_causal / f.attn_full == pytest.approx(4097 / 8192)


def test_flops_are_per_whole_sequence_at_any_sp_degree():
    """Under SP each rank routes route_chunks // sp chunks of its slice; the chunks have the
    same length, so a model built for sp = 2 reports the FLOPs of the sp = 1 model."""
    cfg = tiny(n_layers=4, mod=mod_cfg(capacity=0.3, route_chunks=4, causal="predictor"))
    one, two = Transformer(cfg), Transformer(cfg, sp_degree=2)
    assert two.blocks[1].local_chunks == 2
    assert two.flops(T) == one.flops(T)
    assert two.flops_per_token(T) == one.flops_per_token(T)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_num_params_counts_unique_parameters(tie):
    model = build(tiny(tie_embeddings=tie, mod=mod_cfg(causal="predictor"), value_residual="learned"))
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    embedding = 64 * D * (1 if tie else 2)
    assert model.num_params(non_embedding=True) == model.num_params() - embedding


# ---------------------------------------------------------------- training

TRAIN_CONFIGS = {
    "baseline": tiny(),
    "post": tiny(norm="post"),
    "peri": tiny(norm="peri", embed_norm=True),
    "lns": tiny(ln_scaling=True),
    "layernorm": tiny(norm_type="layernorm"),
    "gqa": tiny(n_kv_heads=2),
    "tied": tiny(tie_embeddings=True),
    "value_fixed": tiny(value_residual="fixed"),
    "value_learned": tiny(value_residual="learned"),
    "value_shared": tiny(value_residual="shared"),
    "mod_aux_loss": tiny(mod=mod_cfg()),
    "mod_predictor": tiny(mod=mod_cfg(causal="predictor")),
    "all_on": tiny(n_layers=4, n_kv_heads=2, norm="peri", ln_scaling=True, embed_norm=True,
                   value_residual="learned", tie_embeddings=True, mod=mod_cfg(route_chunks=2)),
}


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_option_trains_with_finite_falling_loss(name):
    model = build(TRAIN_CONFIGS[name])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, T + 1), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        logits, aux, _ = run(model, ids[:, :-1])
        aux_weight = model.cfg.mod.aux_weight  # as trainer.step does
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux_weight * aux / ids[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.1


# ---------------------------------------------------------------- isolation

def test_model_package_imports_neither_torch_distributed_nor_deepspeed():
    banned = ("torch.distributed", "deepspeed")
    for path in MODEL_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                names = [f"{node.value.id}.{node.attr}"]
            assert not any(n.startswith(banned) for n in names), f"{path.name}: {names}"
    code = "import sys, model; print('deepspeed' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=MODEL_DIR.parent, check=True).stdout.strip() == "False"
