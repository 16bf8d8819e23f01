"""`python -m trainer.export RUN_DIR OUT_DIR [--step N]`: HF-format weights.

A Llama-compatible model (pre-LN RMSNorm, no LNS, no value residual, no MoD, no embed
norm) becomes a `LlamaForCausalLM` that `transformers` loads as is. Any other option set is
exported with our parameter names and a config.json that names the options
(`architectures: ["HarnessTransformer"]`); load it back with `trainer.load_model`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

from model import ModelConfig, Transformer
from trainer.errors import UserError

LLAMA_NAMES = [
    (r"embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"blocks\.(\d+)\.attn_in\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blocks\.(\d+)\.attn\.(q|k|o)_proj\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"blocks\.(\d+)\.attn\.value\.v_proj\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blocks\.(\d+)\.mlp_in\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]


def is_llama_compatible(cfg: ModelConfig) -> bool:
    return (cfg.norm == "pre" and cfg.norm_type == "rmsnorm" and not cfg.ln_scaling and not cfg.embed_norm
            and cfg.value_residual == "none" and cfg.mod.capacity == 0)


def llama_config(cfg: ModelConfig, tok_ids: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        torch_dtype="float32", **tok_ids)


def to_llama_state_dict(state: dict) -> dict:
    out = {}
    for name, tensor in state.items():
        for pattern, repl in LLAMA_NAMES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, repl, name)] = tensor
                break
        else:
            raise UserError(f"parameter {name} has no Llama equivalent")
    return out


def export(run_dir: Path, out_dir: Path, step: int | None = None) -> Path:
    from safetensors.torch import save_file

    from trainer.api import load_model, resolve_checkpoint

    model: Transformer = load_model(run_dir, step)
    cfg = model.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = resolve_checkpoint(run_dir, step)[0] / "tokenizer"
    tok_ids = {}
    for src in sorted(tok.glob("*.model")):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(src))
        tok_ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
                   "pad_token_id": sp.pad_id() if sp.pad_id() >= 0 else None}
        shutil.copy(src, out_dir / "tokenizer.model")
        (out_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
             "bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
             "unk_token": sp.id_to_piece(sp.unk_id()), "legacy": False}, indent=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    if is_llama_compatible(cfg):
        llama_config(cfg, tok_ids).save_pretrained(out_dir)
        save_file(to_llama_state_dict(state), out_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        (out_dir / "config.json").write_text(json.dumps(
            {"architectures": ["HarnessTransformer"], "model_type": "harness",
             "harness_model_config": dataclasses.asdict(cfg), **tok_ids}, indent=1))
        save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    args = ap.parse_args(argv)
    try:
        out = export(args.run_dir, args.out_dir, args.step)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
