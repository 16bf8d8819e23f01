"""`python -m trainer.generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S]`.

Samples a continuation from a trained run's newest complete checkpoint (or `--step N`); the
sampling itself is trainer/export/generate.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.export.generate import generate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="run dir (newest complete checkpoint) or checkpoints/step-N dir")
    ap.add_argument("--prompt", required=True, help="text to continue ('' samples a new document)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    args = ap.parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens={args.max_new_tokens} is invalid: must be a positive integer")
        if args.temperature < 0:
            raise UserError(f"--temperature={args.temperature} is invalid: must be >= 0 (0 = greedy)")
        text = generate(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.step)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
