"""With every option off, the model is Llama: copy its weights into HF transformers'
LlamaForCausalLM (an independent implementation) and the logits must agree."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model import ModelConfig, Transformer

CFG = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64,
           norm_eps=1e-6, rope_theta=500.0)


def to_hf(model: Transformer) -> LlamaForCausalLM:
    cfg = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="eager"))
    sd = {"model.embed_tokens.weight": model.embed_tokens.weight,
          "model.norm.weight": model.norm.weight, "lm_head.weight": model.lm_head.weight}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": b.attn_in.weight,
               p + "post_attention_layernorm.weight": b.mlp_in.weight,
               p + "self_attn.q_proj.weight": b.attn.q_proj.weight,
               p + "self_attn.k_proj.weight": b.attn.k_proj.weight,
               p + "self_attn.v_proj.weight": b.attn.value.v_proj.weight,
               p + "self_attn.o_proj.weight": b.attn.o_proj.weight,
               p + "mlp.gate_proj.weight": b.mlp.gate_proj.weight,
               p + "mlp.up_proj.weight": b.mlp.up_proj.weight,
               p + "mlp.down_proj.weight": b.mlp.down_proj.weight}
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf.eval()


def random_norm_gains(model: Transformer) -> None:
    """Gains of 1 would hide a swapped or missing norm."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "_in." in name:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_match_hf_llama(tie):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG, tie_embeddings=tie)).eval()
    random_norm_gains(model)
    hf = to_hf(model)
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        ours, ref = model(ids), hf(input_ids=ids, use_cache=False).logits
    assert (ours - ref).abs().max() < 1e-5


@pytest.mark.parametrize("batched", [False, True], ids=["ids[T]", "ids[B,T]"])
def test_global_position_ids_match_hf_llama(batched):
    """A sequence-parallel rank holds a slice whose global positions start past 0, and
    packed documents may reset positions. A uniform shift alone leaves RoPE attention
    unchanged, so the ids also contain a reset: then they must change the logits."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG)).eval()
    hf = to_hf(model)
    ids = torch.randint(0, 64, (2, 16))
    pos = torch.cat([torch.arange(37, 43), torch.arange(10)])
    if batched:
        pos = torch.stack([pos, torch.arange(16) + 40])
    with torch.no_grad():
        ours = model(ids, position_ids=pos)
        # An explicit all-ones mask: given position ids that reset and no mask, HF infers
        # packed documents and masks across them; our model attends causally over all.
        ref = hf(input_ids=ids, position_ids=pos.expand(2, -1), attention_mask=torch.ones_like(ids),
                 use_cache=False).logits
        contiguous = model(ids)
    assert (ours - ref).abs().max() < 1e-5
    assert (ours[0] - contiguous[0]).abs().max() > 1e-4  # float noise is ~1e-7


def test_rope_tables_stay_fp32_when_the_model_is_cast_to_bf16():
    """OLMo-core keeps RoPE in fp32: casting the module leaves the tables exact, HF's fp32
    tables bit for bit, and the bf16 model's logits stay within bf16 rounding of fp32's."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG)).eval()
    hf_cos, hf_sin = to_hf(model).model.rotary_emb(torch.zeros(1), torch.arange(64)[None])
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        ref = model(ids)
        model.to(torch.bfloat16)
        out = model(ids)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.rotary.cos.dtype == model.rotary.sin.dtype == torch.float32
    assert torch.equal(model.rotary.cos, hf_cos[0]) and torch.equal(model.rotary.sin, hf_sin[0])
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    model.to(torch.float32)
    assert torch.equal(model.rotary.cos, hf_cos[0])
