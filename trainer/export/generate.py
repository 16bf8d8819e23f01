"""Sampling a continuation from a trained model (the logic behind `python -m trainer.generate`).

Samples a continuation from a trained run's newest complete checkpoint (or `--step N`).
Temperature 0 is greedy decoding. Mixture-of-Depths blocks route with their causal rule, so
each token's routing depends only on the tokens before it. There is no KV cache: each new
token re-runs the whole sequence, O(T²) in the sequence length, which is fine for checking a
model but not for serving one (export it and use `transformers` for that).
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.data.tokenizer import Tokenizer
from trainer.errors import UserError
from trainer.export.causal import causal_logits
from trainer.export.load import load_model, resolve_checkpoint, run_dir_or_error


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, eos_id: int | None = None) -> list[int]:
    """The new token ids after `prompt` (stopping after `eos_id` or `max_new_tokens`)."""
    limit = model.cfg.max_seq_len
    if len(prompt) >= limit:
        raise UserError(f"the prompt is {len(prompt)} tokens, but the model's max_seq_len={limit} leaves no room "
                        f"to generate; shorten the prompt to at most {limit - 1} tokens")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt])
    new: list[int] = []
    for _ in range(min(max_new_tokens, limit - len(prompt))):
        logits = causal_logits(model, ids)[0, -1]
        if temperature > 0:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        if nxt == eos_id:
            break
    return new


def generate(run_dir: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
             step: int | None = None) -> str:
    """Decoded continuation of `prompt` by the run's model. An empty prompt starts after an
    end-of-document token, i.e. samples a fresh document."""
    run_dir = resolve_checkpoint(run_dir_or_error(run_dir), step)[0]
    tok = Tokenizer.load(run_dir / "tokenizer" / "tokenizer.model")
    model = load_model(run_dir, step)
    ids = tok.encode([prompt])[0] if prompt else [tok.eos_id]
    new = generate_ids(model, ids, max_new_tokens, temperature, seed, tok.eos_id)
    return tok.decode(t for t in new if t != tok.eos_id)
