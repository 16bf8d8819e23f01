"""Training entry point: `python -m trainer.train CONFIG [key=value ...] [--dry-run]`.

The same command works under plain python, torchrun, accelerate launch, the deepspeed
launcher and srun, and re-running it resumes from the newest complete checkpoint. This
module is the command line only; the loop is trainer/loop.py.
"""
from __future__ import annotations

import argparse
import sys

from trainer.config import config_warnings, load_config, validate
from trainer.errors import UserError
from trainer.parallel.dist import collective_failure, env_world_size, print0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="YAML experiment config, e.g. configs/tiny.yaml")
    # default=[]: without it, parse_intermixed_args calls a missing config "config, overrides".
    ap.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides, values parsed as YAML")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate and plan: size, FLOPs, token budget, memory per GPU, wall time; then exit")
    ap.add_argument("--world-size", type=int, default=0,
                    help="GPUs assumed by --dry-run (default: one SP group, parallel.sp)")
    ap.add_argument("--gpu", default="H100", help="GPU model for --dry-run's peak FLOPs and memory (default H100)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed by --dry-run (default 0.4)")
    # Intermixed: overrides may come before, between or after the flags (`--dry-run a.b=1`).
    return ap.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        for warning in config_warnings(cfg):
            print0(f"warning: {warning}", file=sys.stderr)
        # The planner and the loop import DeepSpeed (seconds); importing them only now keeps
        # a bad config's error instant.
        if args.dry_run:
            from trainer.planner import dry_run

            dry_run(cfg, args.world_size, args.gpu, args.mfu)
            return 0
        # The launch-time checks (parallel.sp against the world size) before any process
        # group exists: DeepSpeed's own check is a traceback from inside its group setup.
        validate(cfg, world_size=env_world_size())
        from trainer.loop import Trainer

        trainer = Trainer(cfg)
        code = trainer.fit()
        trainer.dist.close()
        return code
    except UserError as e:
        print0(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the loop's stop request took over SIGINT: nothing to save yet
        print0("interrupted while starting up; nothing was trained or saved", file=sys.stderr)
        return 130
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors
        msg = collective_failure(e, cfg.parallel.timeout_minutes) if cfg is not None else None
        if msg is None:
            raise
        # Every rank that notices says so (not only rank 0: rank 0 may be the one that hung).
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 4


if __name__ == "__main__":
    sys.exit(main())
