"""The training loop: build the parts once, then compose them step by step. Each part owns
its cadence (when to grow, evaluate, run diagnostics, log, stop and checkpoint), so the
loop below only says in which order they act."""
from __future__ import annotations

import json
import sys
import time

from trainer.checkpoint import init_from
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.manifest import STEP_DIR
from trainer.checkpoint.preemption import StopRequest
from trainer.checkpoint.state import TrainState
from trainer.config import ConfigError, RunConfig, config_changes, from_yaml_text, resume_diff, to_yaml, validate
from trainer.data import prepare_data
from trainer.evaluation.diagnostics import Diagnostics
from trainer.evaluation.evaluator import Evaluator
from trainer.evaluation.profiling import StepProfiler
from trainer.growth import Grower
from trainer.metrics import make_metrics, peak_flops_per_device
from trainer.parallel.dist import init_distributed, print0
from trainer.parallel.engine import build_engine, build_model, set_lr
from trainer.parallel.layout import BatchLayout
from trainer.parallel.ulysses import attention_core
from trainer.provenance import run_info
from trainer.schedule import lr_at
from trainer.step import train_step


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dist = init_distributed(cfg.parallel.backend, cfg.parallel.sp, cfg.parallel.timeout_minutes)
        validate(cfg, world_size=self.dist.world)
        self.layout = BatchLayout.build(cfg, self.dist)
        self.run_dir = cfg.run_dir
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.dist,
                                 every=cfg.checkpoint.every, last_step=cfg.run.max_steps,
                                 async_save=cfg.checkpoint.async_save)
        self.stop = StopRequest.from_env(cfg.run.stop_at, lambda: (self.ckpt.complete_steps() or [None])[-1])
        self.resume_from = self.ckpt.latest()
        if self.resume_from is None:
            self._refuse_silent_restart()
        # run.init_from: only a fresh run starts from another run's weights; a run with its
        # own checkpoints resumes from them.
        self.init_src = init_from.resolve_init_source(cfg, self.dist) if self.resume_from is None and cfg.run.init_from else None
        self._check_or_record_config()
        self.state = TrainState(n_layers=cfg.model.n_layers)
        if self.resume_from is not None:
            self.state = Checkpointer.read_state(self.resume_from)[0]

    def _refuse_silent_restart(self) -> None:
        """Checkpoint dirs exist but none can be resumed (no COMPLETE marker, or damaged):
        starting from step 0 would overwrite them, so that takes run.force_restart=true."""
        root = self.ckpt.root
        found = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: int(p.name[5:])) \
            if root.is_dir() else []
        if not found or self.cfg.run.force_restart:
            return
        what = ", ".join(f"{p.name} ({'damaged' if (p / 'COMPLETE').is_file() else 'no COMPLETE marker'})"
                         for p in found)
        raise ConfigError(f"{root} holds {what} and no complete checkpoint to resume from; starting again from "
                          f"step 0 would overwrite them. Set run.force_restart=true to do that, or use a new run.name")

    def _check_or_record_config(self) -> None:
        saved = self.run_dir / "config.yaml"
        if saved.exists() and self.resume_from is not None:
            first = from_yaml_text(saved.read_text())
            changed = resume_diff(first, self.cfg)
            if changed and not self.cfg.run.force_resume:
                raise ConfigError(f"run {self.run_dir} was started with different values for {', '.join(changed)}; "
                                  f"resuming would change the model or data. Use a new run.name, or run.force_resume=true")
            self._record_changes(first)
        if self.dist.is_main and (self.resume_from is None or not saved.exists()):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved.write_text(to_yaml(self.cfg))
            info = run_info(self.dist.world)
            if self.init_src is not None:
                info["init_from"] = str(self.init_src.checkpoint)
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=1))
        self.dist.barrier()

    def _record_changes(self, first: RunConfig) -> None:
        """config.yaml keeps the config the run started with; a resume whose config differs
        from it (an LR, a schedule, run.max_steps) says so, and appends the differences to
        config_changes.jsonl unless they are the same as the last row's."""
        changes = config_changes(first, self.cfg)
        if not changes or not self.dist.is_main:
            return
        print0("resuming with changed config (recorded in config_changes.jsonl): "
               + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        changed = json.loads(json.dumps({k: {"was": a, "now": b} for k, (a, b) in changes.items()}, default=str))
        log = self.run_dir / "config_changes.jsonl"
        rows = log.read_text().splitlines() if log.exists() else []
        if rows and json.loads(rows[-1])["changed"] == changed:
            return  # the same command again (a preemption's resume): nothing new to record
        with open(log, "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resume_from": str(self.resume_from),
                                "changed": changed}) + "\n")

    def fit(self) -> int:
        cfg, dist, layout = self.cfg, self.dist, self.layout
        if self.resume_from is not None and self.state.step >= cfg.run.max_steps:
            # Before the data and the engine: re-running a finished command costs seconds.
            print0(f"run {self.run_dir} already finished at step {self.state.step} (run.max_steps="
                   f"{cfg.run.max_steps}, {self.resume_from}); nothing to do. Raise run.max_steps to train on")
            return 0
        data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.run.seed, cfg.cache_dir, self.run_dir,
                            dist.is_main, dist.barrier, world=dist.world, any_rank=dist.any)
        core = attention_core(dist, cfg.model.kv_heads)
        engine = self._build_engine(core)
        # The peak probe runs before the checkpoint restores the RNG (it also forks the RNG).
        peak, _ = peak_flops_per_device(dist.device, cfg.parallel.precision, cfg.logging.peak_flops)
        state = self._resume(engine, data)
        metrics = make_metrics(cfg, self.run_dir, state.step, dist, layout, data, peak_flops=peak)
        profiler = StepProfiler(cfg.logging.profile_steps, self.run_dir, dist.rank, dist.device, state.step)
        grower = Grower(cfg, dist, core, self.ckpt, metrics)
        evaluator = Evaluator(cfg, dist, data, metrics)
        diagnostics = Diagnostics(cfg, dist, data, metrics)

        stopped_by = None
        while state.step < cfg.run.max_steps and stopped_by is None:
            if grower.due(state):
                held, engine = [engine], None  # growth frees the old engine: keep no reference here
                engine = grower.grow(state, held)
            lr = lr_at(cfg, state.step)
            set_lr(engine, lr)
            t0 = time.perf_counter()
            result = train_step(engine, data, dist, cfg, layout, state.step)
            state.advance(result.skipped, layout)
            if trace := profiler.after_step(state.step):
                metrics.message(f"step {state.step}: wrote profiler trace {trace}")
            if result.skipped and self._too_many_bad_steps(result, state, metrics):
                self.ckpt.wait()
                profiler.close()
                metrics.close()
                return 3
            metrics.log_train(state, result, time.perf_counter() - t0, engine.module, lr)
            evaluator.maybe_run(state, engine)
            diagnostics.maybe_run(state, engine)
            stopped_by = self.stop.reason(state.step, dist)
            self.ckpt.maybe_save(state, engine, stopping=stopped_by is not None)

        self.ckpt.wait()  # an async save (the final or preemption one included) is sealed before exit
        profiler.close()
        metrics.close()
        print0(metrics.summary(state, stopped_by, self.run_dir))
        return 0

    def _build_engine(self, core):
        """The engine for the state we start from, with run.init_from's weights in a fresh run."""
        model = build_model(self.cfg, self.state.n_layers, core)
        if self.init_src is None:
            return build_engine(self.cfg, self.dist, model)
        init_from.check_tokenizer(self.init_src, self.run_dir)
        weights = init_from.shared_source_weights(self.init_src, self.run_dir, self.dist)
        init_from.load_into_model(model, weights)
        engine = build_engine(self.cfg, self.dist, model)
        init_from.load_into_engine(engine, weights)
        del weights  # the mapping, before its file goes
        init_from.release_shared_weights(self.run_dir, self.dist)
        print0(f"initialised from {self.init_src.checkpoint} (weights only: step 0, fresh optimizer and schedule)")
        return engine

    def _resume(self, engine, data) -> TrainState:
        state = self.state
        if self.resume_from is not None:
            state = self.ckpt.load(engine, self.resume_from)
            print0(f"resumed from {self.resume_from} (step {state.step}, {state.n_layers} layers)")
        if state.step and not state.samples:  # a checkpoint from before samples were recorded
            state.samples = state.step * self.layout.samples_per_step
        data.seek(state.step, state.samples)
        return state

    def _too_many_bad_steps(self, result, state, metrics) -> bool:
        """Log a skipped (non-finite) step; True when run.max_bad_steps in a row means stop."""
        limit = self.cfg.run.max_bad_steps
        metrics.log_skipped(state, result, limit)
        if state.bad_steps < limit:
            return False
        self.ckpt.wait()
        done = self.ckpt.complete_steps()
        print0(f"error: {state.bad_steps} non-finite steps in a row (run.max_bad_steps={limit}); stopping. "
               f"The last good checkpoint is intact: {done[-1] if done else 'none'}", file=sys.stderr)
        return True
