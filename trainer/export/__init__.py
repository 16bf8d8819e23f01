"""`python -m trainer.export RUN_DIR OUT_DIR [--step N]`: a directory `transformers` loads.

A Llama-compatible model becomes a plain `LlamaForCausalLM`; any other option set (Peri-LN,
LayerNorm Scaling, value residual, Mixture-of-Depths, post-LN, LayerNorm) becomes
`HarnessForCausalLM`, loaded with
`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`. The tokenizer loads
with `AutoTokenizer.from_pretrained(OUT_DIR)`.

The package: `hf` (the conversion and the written directory), `modeling_harness`,
`configuration_harness` and `causal` (the remote code pasted into an export), `load`
(`load_model`: a trained model back from a run dir) and `generate` (sampling).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.export.hf import is_llama_compatible, llama_config, to_llama_state_dict, write_export
from trainer.export.load import load_model, resolve_checkpoint

__all__ = ["export", "is_llama_compatible", "llama_config", "main", "to_llama_state_dict"]


def run_tokenizer(run_dir: Path) -> Path | None:
    path = run_dir / "tokenizer" / "tokenizer.model"
    return path if path.is_file() else None


def export(run_dir: Path, out_dir: Path, step: int | None = None) -> Path:
    run_dir = resolve_checkpoint(run_dir, step)[0]
    return write_export(load_model(run_dir, step), run_tokenizer(run_dir), out_dir)


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

