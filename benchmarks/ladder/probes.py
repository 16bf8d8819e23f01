"""Probes of a finished ladder run's final model: `python -m benchmarks.ladder.probes RUN_DIR [--out FILE]`.

Loads the final checkpoint (`trainer.load_model`: the fp32 masters, verified against their
manifest) and scores it through `causal_logits`, the inference path (MoD's causal rule), on
fixed inputs, so every arm, size and seed is probed on the same tokens:

- induction: in-context copying. Each of INDUCTION_SEQS sequences is INDUCTION_LEN tokens
  drawn uniformly from the vocabulary's ordinary pieces (ids >= FIRST_ID: past the control
  pieces) by a generator seeded INDUCTION_SEED, then repeated once (2 × 64 tokens). The score
  is (mean CE of predicting tokens 1..63 of the first copy) − (mean CE of predicting tokens
  1..63 of the second copy), in nats. Random tokens cannot be predicted the first time, so the
  first copy's loss is ~log(vocab) for any model; the second copy can be predicted only by
  looking back at the first: the score is what induction heads buy (0 = none, up to ~7.6 for
  a perfect copier at vocab 2048). Token 0 of each copy is left out of both means: it has no
  predecessor in the first copy to look up.
- loss_by_position: mean CE on the run's own val windows (data.eval "val", the tokens the
  trainer's val/val_loss used: LOSS_WINDOWS seq_len-token windows spread evenly over it) by
  context length c = position + 1, in 8 log-spaced buckets [1], [2,3], [4,7], ... [128,256]
  (keys "1", "2-3", ... "128-256"). How fast loss falls with context is the model's use of it.

OOD loss is not computed here: the trainer evaluates data.eval "ood" with the same rule as
val after the last step (val/ood_loss), and the runner records that.
Prints (or writes to --out) one JSON object {"induction", "loss_by_position"}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

INDUCTION_SEQS = 32
INDUCTION_LEN = 64
INDUCTION_SEED = 0
FIRST_ID = 3  # SentencePiece's unk, bos, eos (trainer/data/tokenizer.py) are 0..2
LOSS_WINDOWS = 64
BATCH = 8


def _ce(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-position CE [B, T-1] of predicting ids[:, 1:] from ids[:, :-1]."""
    from trainer.export.causal import causal_logits

    with torch.no_grad():
        logits = causal_logits(model, ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                             reduction="none").view(ids.shape[0], -1)


def induction_score(model, vocab_size: int) -> float:
    """First-copy minus second-copy loss in nats on the fixed repeated sequences (docstring)."""
    g = torch.Generator().manual_seed(INDUCTION_SEED)
    first = torch.randint(FIRST_ID, vocab_size, (INDUCTION_SEQS, INDUCTION_LEN), generator=g)
    ce = torch.cat([_ce(model, s) for s in torch.cat([first, first], 1).split(BATCH)])
    # ce[:, t] predicts token t+1: tokens 1..L-1 of copy 1 are t = 0..L-2, of copy 2 t = L..2L-2.
    n = INDUCTION_LEN
    return float(ce[:, : n - 1].mean() - ce[:, n: 2 * n - 1].mean())


def buckets(seq_len: int) -> list[tuple[int, int]]:
    """Context-length buckets [1,1], [2,3], [4,7], ..., the last one closed at seq_len."""
    out, lo = [], 1
    while lo <= seq_len:
        hi = min(2 * lo - 1, seq_len)
        out.append((lo, hi))
        lo = hi + 1
    if len(out) > 1 and out[-1][1] - out[-1][0] < out[-2][1] - out[-2][0]:  # a short tail joins its neighbour
        out[-2:] = [(out[-2][0], out[-1][1])]
    return out


def loss_by_position(model, tokens, seq_len: int) -> dict[str, float]:
    from trainer.data.loader import HeldOut

    held = HeldOut(tokens, seq_len)
    ce = []
    for w in np.array_split(held.windows(LOSS_WINDOWS), max(1, -(-LOSS_WINDOWS // BATCH))):
        if len(w):
            x, y = held.gather(w)
            ce.append(_ce(model, torch.cat([x, y[:, -1:]], 1)))
    per_pos = torch.cat(ce).mean(0)  # [seq_len]: index t has context length t + 1
    return {(f"{lo}" if lo == hi else f"{lo}-{hi}"): float(per_pos[lo - 1: hi].mean()) for lo, hi in buckets(seq_len)}


def val_tokens(run_dir: Path, name: str = "val"):
    """The token stream of the run's data.eval set `name`, as the trainer opened it."""
    from trainer.data import shards as sh

    directory = Path(json.loads((run_dir / "data.json").read_text())["datasets"][name])
    _, val = sh.open_streams(directory, sh.read_index(directory))
    return val


def probe(run_dir: Path) -> dict:
    from trainer.config import from_yaml_text
    from trainer.export.load import load_model

    torch.manual_seed(0)
    cfg = from_yaml_text((run_dir / "config.yaml").read_text())
    model = load_model(run_dir)
    return {"induction": induction_score(model, cfg.model.vocab_size),
            "loss_by_position": loss_by_position(model, val_tokens(run_dir), cfg.data.seq_len)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ladder.probes", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here (default: stdout)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = json.dumps(probe(args.run_dir))
    if args.out:
        args.out.write_text(result + "\n")
    else:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
