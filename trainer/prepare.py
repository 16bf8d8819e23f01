"""Offline data preparation: `python -m trainer.prepare CONFIG [key=value ...] [--workers N]`.

Trains (or loads) the tokenizer and writes the token shards of every dataset the config
names (data.source or data.mix, and data.eval) into the data cache, with N worker processes.
Run it on CPU nodes before a cluster job (`sbatch slurm/prepare.sh CONFIG ...`); the job, with
`data.prepare=offline`, then only opens the shards. It is safe to kill: running it again keeps
every finished shard and redoes only the rest. `--verify` prepares nothing: it re-hashes every
shard against its sidecar (opening a dataset re-hashes only files whose mtime changed).
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
    ap.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides, as for trainer.train")
    ap.add_argument("--workers", type=int, default=0,
                    help="worker processes (default: the CPUs this process may use)")
    ap.add_argument("--verify", action="store_true",
                    help="prepare nothing: re-hash every shard against its sidecar, print one line per bad one, "
                         "exit 1 if any")
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
        if args.verify:
            return verify(cfg, workers)
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


def verify(cfg, workers: int) -> int:
    """`--verify`: 0 when every dataset the config names is prepared and every shard file
    matches its sidecar's xxh3-64, else 1 after one line per problem."""
    # why here: as in main(), the spawned workers re-import this module and need none of it
    from trainer.data.prepare import plan
    from trainer.data.shards import read_index, verify_shards

    p = plan(cfg.data, cfg.model.vocab_size, cfg.cache_dir)
    checked, bad = 0, []
    for d in p.datasets:
        index = read_index(d.directory) if d.directory is not None else None
        if index is None:
            bad.append(f"{d.name} shards ({d.source.spec}) are not prepared: run without --verify")
            continue
        n, problems = verify_shards(d.directory, index, workers)
        checked += n
        bad += problems
    for line in bad:
        print(f"bad: {line}", flush=True)
    print(f"verified {checked} shard file(s) of {len(p.datasets)} dataset(s): "
          + (f"{len(bad)} bad" if bad else "all match their sidecars"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
