"""Training entry point: `python -m trainer.train CONFIG [key=value ...] [--dry-run]`.

The same command works under plain python, torchrun, accelerate launch, the deepspeed
launcher and srun, and re-running it resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from trainer.config import ConfigError, RunConfig, from_yaml_text, load_config, resume_diff, to_yaml, validate
from trainer.dist import print0
from trainer.errors import UserError
from trainer.provenance import run_info


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="YAML experiment config, e.g. configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, values parsed as YAML")
    ap.add_argument("--dry-run", action="store_true", help="validate and plan: size, FLOPs, token budget, memory per GPU, wall time; then exit")
    ap.add_argument("--world-size", type=int, default=0,
                    help="GPUs assumed by --dry-run (default: one SP group, parallel.sp)")
    ap.add_argument("--gpu", default="H100", help="GPU model for --dry-run's peak FLOPs and memory (default H100)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed by --dry-run (default 0.4)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from trainer.summary import dry_run

            dry_run(cfg, args.world_size, args.gpu, args.mfu)
            return 0
        return Trainer(cfg).fit()
    except UserError as e:
        print0(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors
        from trainer.dist import collective_failure

        msg = collective_failure(e, cfg.parallel.timeout_minutes) if cfg is not None else None
        if msg is None:
            raise
        # Every rank that notices says so (not only rank 0: rank 0 may be the one that hung).
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 4


class Trainer:
    """Composes the components; each owns its cadence."""

    def __init__(self, cfg: RunConfig):
        from trainer.checkpoint import Checkpointer, TrainState
        from trainer.dist import init_distributed
        from trainer.preemption import StopRequest

        self.cfg = cfg
        self.dist = init_distributed(cfg.parallel.backend, cfg.parallel.sp, cfg.parallel.timeout_minutes)
        validate(cfg, world_size=self.dist.world)
        self.run_dir = cfg.run_dir
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.dist)
        self.stop = StopRequest.from_env()
        self.resume_from = self.ckpt.latest()
        self.init_src = None  # run.init_from: only a fresh run starts from another run's weights
        if self.resume_from is None and cfg.run.init_from:
            from trainer.init_from import resolve_init_source

            self.init_src = resolve_init_source(cfg)
        self._check_or_record_config()
        self.state = TrainState(n_layers=cfg.model.n_layers)
        if self.resume_from is not None:
            self.state = Checkpointer.read_state(self.resume_from)[0]

    def _check_or_record_config(self) -> None:
        saved = self.run_dir / "config.yaml"
        if saved.exists() and self.resume_from is not None:
            changed = resume_diff(from_yaml_text(saved.read_text()), self.cfg)
            if changed and not self.cfg.run.force_resume:
                raise ConfigError(f"run {self.run_dir} was started with different values for {', '.join(changed)}; "
                                  f"resuming would change the model or data. Use a new run.name, or run.force_resume=true")
        if self.dist.is_main and (self.resume_from is None or not saved.exists()):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved.write_text(to_yaml(self.cfg))
            info = run_info(self.dist.world)
            if self.init_src is not None:
                info["init_from"] = str(self.init_src.checkpoint)
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=1))
        self.dist.barrier()

    def fit(self) -> int:
        from trainer import growth
        from trainer.data import prepare_data
        from trainer.diagnostics import depth_diagnostics
        from trainer.engine import build_engine, build_model, set_lr
        from trainer.metrics import make_metrics, peak_flops_per_device
        from trainer.profiling import StepProfiler
        from trainer.schedule import lr_at
        from trainer.step import evaluate, train_step
        from trainer.ulysses import all_to_all_bytes_per_layer, attention_core

        cfg, dist, state = self.cfg, self.dist, self.state
        data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.run.seed, cfg.cache_dir, self.run_dir,
                            dist.is_main, dist.barrier, world=dist.world, any_rank=dist.any)
        core = attention_core(dist, cfg.model.kv_heads)
        model = build_model(cfg, state.n_layers, core)
        if self.init_src is not None:
            from trainer import init_from

            init_from.check_tokenizer(self.init_src, self.run_dir)
            weights = init_from.source_weights(self.init_src)
            init_from.load_into_model(model, weights)
        engine = build_engine(cfg, dist, model)
        if self.init_src is not None:
            init_from.load_into_engine(engine, weights)
            del weights
            print0(f"initialised from {self.init_src.checkpoint} (weights only: step 0, fresh optimizer and schedule)")
        # Before the checkpoint restores the RNG (the probe also forks it, belt and braces).
        peak, _ = peak_flops_per_device(dist.device, cfg.parallel.precision, cfg.logging.peak_flops)
        if self.resume_from is not None:
            state = self.ckpt.load(engine, self.resume_from)
            print0(f"resumed from {self.resume_from} (step {state.step}, {state.n_layers} layers)")
        samples_per_step = cfg.parallel.micro_batch * cfg.parallel.grad_accum * dist.dp_size
        if state.step and not state.samples:  # a checkpoint from before samples were recorded
            state.samples = state.step * samples_per_step
        data.seek(state.step, state.samples)
        metrics = make_metrics(cfg, self.run_dir, state.step, dist.is_main)
        tokens_per_step = cfg.parallel.micro_batch * cfg.parallel.grad_accum * dist.dp_size * cfg.data.seq_len
        a2a = all_to_all_bytes_per_layer(cfg.parallel.micro_batch, cfg.data.seq_len, cfg.parallel.sp, cfg.model.n_heads,
                                         cfg.model.kv_heads, cfg.model.head_dim, 2 if cfg.parallel.precision == "bf16" else 4)
        profiler = StepProfiler(cfg.logging.profile_steps, self.run_dir, dist.rank, dist.device, state.step)
        first_loss, last = None, {}
        exit_code, stopped_by = 0, None

        while state.step < cfg.run.max_steps:
            engine, _ = growth.maybe_grow(cfg, state, engine, dist, core, self.ckpt, metrics)
            set_lr(engine, lr_at(cfg, state.step))
            t0 = time.perf_counter()
            out = train_step(engine, data, dist, cfg, state.step)
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens += tokens_per_step
            state.samples += samples_per_step
            state.bad_steps = state.bad_steps + 1 if out.skipped else 0
            if trace := profiler.after_step(state.step):
                metrics.message(f"step {state.step}: wrote profiler trace {trace}")
            if out.skipped:
                if self._bad_step(out, state, metrics):
                    exit_code = 3
                    break
            else:
                first_loss = out.loss if first_loss is None else first_loss
                last = {"step": state.step, "loss": out.loss, "lr": lr_at(cfg, state.step - 1),
                        "grad_norm": out.grad_norm, "tokens_per_s": tokens_per_step / dt,
                        "mfu": engine.module.flops_per_token(cfg.data.seq_len) * tokens_per_step / dt / (peak * dist.world),
                        "hfu": engine.module.hardware_flops_per_token(cfg.data.seq_len) * tokens_per_step / dt
                        / (peak * dist.world),
                        "n_layers": state.n_layers, "tokens": state.tokens, "a2a_bytes_per_layer": a2a,
                        **data.log_fields(state.samples)}
                if state.step % cfg.logging.every == 0 or state.step == 1:
                    last["mem_gb"] = self._mem_gb()
                    metrics.log(last)
                metrics.progress(state.step, {"loss": f"{out.loss:.3f}", "tok/s": f"{last['tokens_per_s']:.0f}"})
            if (cfg.run.eval_every and state.step % cfg.run.eval_every == 0) or state.step == cfg.run.max_steps:
                metrics.log(self._eval_row(engine, data, state, evaluate))
            if cfg.logging.diag_every and state.step % cfg.logging.diag_every == 0:
                metrics.log(depth_diagnostics(engine, data, dist, cfg, state.step))
            stop = dist.any(self.stop.requested) or state.step == cfg.run.stop_at
            if stop or (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) \
                    or state.step == cfg.run.max_steps:
                self.ckpt.save(engine, state)
            if stop:
                stopped_by = self.stop.signal or ("run.stop_at" if state.step == cfg.run.stop_at
                                                  else "a stop request on another rank")
                break

        profiler.close()
        metrics.close()
        if exit_code == 0:
            print0(_summary(cfg, state, first_loss, last, stopped_by, self.run_dir))
        return exit_code

    def _bad_step(self, out, state, metrics) -> bool:
        """Log a skipped (non-finite) step; True when run.max_bad_steps in a row means stop."""
        limit = self.cfg.run.max_bad_steps
        metrics.message(f"step {state.step}: non-finite loss/grad norm ({out.loss}, {out.grad_norm}); "
                        f"update skipped ({state.bad_steps}/{limit})")
        metrics.log({"step": state.step, "skipped": True, "loss": _num(out.loss), "grad_norm": _num(out.grad_norm),
                     "n_layers": state.n_layers, "mem_gb": self._mem_gb()})
        if state.bad_steps < limit:
            return False
        done = self.ckpt.complete_steps()
        print0(f"error: {state.bad_steps} non-finite steps in a row (run.max_bad_steps={limit}); stopping. "
               f"The last good checkpoint is intact: {done[-1] if done else 'none'}", file=sys.stderr)
        return True

    def _mem_gb(self) -> float:
        """The largest peak memory over ranks since the previous row (a collective: every rank
        builds every row)."""
        import torch

        from trainer.profiling import peak_memory_gb

        return self.dist.all_reduce(torch.tensor([peak_memory_gb(self.dist.device)]), "max").item()

    def _eval_row(self, engine, data, state, evaluate) -> dict:
        # MoD's top-k routing picks a block's tokens by looking at the whole sequence, later
        # tokens included, so its loss is not a causal LM's. The headline val_loss uses the
        # causal rule (what generation runs); the top-k figure (as trained) sits beside it.
        mod = self.cfg.model.mod.capacity > 0
        row = {"step": state.step, "val_loss": evaluate(engine, data, self.dist, self.cfg, causal=mod),
               "n_layers": state.n_layers}
        row["val_ppl"] = float(min(1e30, 2.718281828459045 ** row["val_loss"]))
        if mod:
            row["val_loss_topk"] = evaluate(engine, data, self.dist, self.cfg)
        for name, held_out in data.eval_sets.items():  # data.eval: extra held-out sets, same rule
            row[f"val/{name}_loss"] = evaluate(engine, held_out, self.dist, self.cfg, causal=mod)
        return row


def _num(x: float):
    return x if x == x and abs(x) != float("inf") else str(x)


def _summary(cfg, state, first_loss, last, stopped_by, run_dir) -> str:
    head = f"stopped by {stopped_by} after step {state.step}" if stopped_by else f"finished {state.step} steps"
    loss = f"loss {first_loss:.4f} -> {last.get('loss', float('nan')):.4f}" if first_loss is not None else "no steps run"
    return (f"{head}: {loss}, {state.tokens:,} tokens, {state.n_layers} layers, "
            f"{last.get('tokens_per_s', 0):.0f} tok/s; run dir {run_dir} (metrics.jsonl, checkpoints/)")


if __name__ == "__main__":
    sys.exit(main())
