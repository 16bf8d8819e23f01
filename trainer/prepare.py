"""Offline data preparation: `python -m trainer.prepare CONFIG [key=value ...] [--workers N]`.

Trains (or loads) the tokenizer and writes the token shards of every dataset the config
names (data.source or data.mix, and data.eval) into the data cache, with N worker processes.
Run it on CPU nodes before a cluster job (`sbatch slurm/prepare.sh CONFIG ...`); the job, with
`data.prepare=offline`, then only opens the shards. It is safe to kill: running it again keeps
every finished shard and redoes only the rest.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from trainer.errors import UserError


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="YAML experiment config, e.g. configs/pretrain_1b.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for trainer.train")
    ap.add_argument("--workers", type=int, default=0,
                    help="worker processes (default: the CPUs this process may use)")
    return ap.parse_intermixed_args(argv)  # overrides before or after the flags, as for trainer.train


def main(argv=None) -> int:
    # Imported here, not at the top: worker processes (spawned) import this module again and
    # need none of the config machinery (which brings in torch).
    from trainer.config import load_config
    from trainer.data import prepare_all

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        workers = args.workers if args.workers > 0 else default_workers()
        t0 = time.perf_counter()
        p = prepare_all(cfg.data, cfg.model.vocab_size, cfg.cache_dir, workers, lambda m: print(m, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens = sum((d.index or {}).get("n_train_tokens", 0) + (d.index or {}).get("n_val_tokens", 0)
                 for d in p.datasets)
    print(f"prepared {len(p.datasets)} dataset(s), {tokens:,} tokens, in {time.perf_counter() - t0:.1f} s with "
          f"{workers} worker(s); tokenizer {p.tokenizer_path}; shards under {cfg.cache_dir / 'shards'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
