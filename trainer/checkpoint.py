"""Atomic, verifiable, parallel checkpoints, optionally written in the background, and
resumable on another world size or ZeRO stage.

Layout of `checkpoints/step-N/`:
- DeepSpeed's engine files (`mp_rank_00_model_states.pt`, `*zero_pp_rank_*_optim_states.pt`);
- `trainer_state_rank{r}.pt`: step, tokens, depth, RNG, and the layout (world size, DP, SP,
  ZeRO stage) the checkpoint was saved with;
- `manifest.rank{r}.json`: size and xxh3-128 of every file rank r wrote;
- `MANIFEST.json`: the union of the rank parts, merged by rank 0;
- `COMPLETE`, written last, once every rank's bytes are fsync'd;
- `universal/`, only after a resume on another layout: DeepSpeed's universal checkpoint,
  converted from the files above (which stay untouched).

Saving. Every rank writes and hashes its own files at the same time. DeepSpeed hands each
state dict to its checkpoint engine; ours (`RankWriter`) streams torch.save's bytes through
xxh3 into the file and fsyncs it, so the hash costs no second read. Files go to
`step-N.tmp/`; rank 0 merges the parts, renames the directory to `step-N/`, then writes
`COMPLETE`. DeepSpeed's own `latest` file is never written or trusted (it is updated
before DeepSpeed's barrier).

Async (`checkpoint.async: true`). The engine copies each state dict to host memory and a
background thread per rank writes it; the loop waits only for the copy. Rank 0's thread
seals the checkpoint once every rank's manifest part is on disk. The next save and the end
of the run (a preemption stop included) wait for a pending save. DeepSpeed 0.19.8's
DecoupledCheckpointEngine is not used: it needs the `deepspeed` launcher's CROSS_SIZE, fails
without a model-parallel unit ('UniversalParallelInfo' has no 'dp_rank') as in our pure-DP
runs, and moves live tensors into /dev/shm for a spawned writer process.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import xxhash

from trainer import faults
from trainer.dist import Dist, print0
from trainer.errors import UserError
from trainer.optim import param_order

STEP_DIR = re.compile(r"^step-(\d+)$")
HASH = "xxh3_128"
PART = "manifest.rank{}.json"
UNIVERSAL = "universal"


class CheckpointError(UserError):
    """A user-facing, one-line checkpoint problem."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0
    samples: int = 0  # global samples consumed: the data position, whatever the batch layout was
    n_layers: int = 0  # depth the checkpoint was saved at (growth)
    bad_steps: int = 0  # consecutive non-finite steps

    def advance(self, skipped: bool, samples: int, tokens: int) -> None:
        """One optimizer step done (a skipped step still consumed its batch)."""
        self.step += 1
        self.samples += samples
        self.tokens += tokens
        self.bad_steps = self.bad_steps + 1 if skipped else 0


def _hash_file(path: Path, algo: str = HASH) -> str:
    with open(path, "rb") as f:  # sha256: manifests written before the switch to xxh3
        return hashlib.file_digest(f, "sha256" if algo == "sha256" else xxhash.xxh3_128).hexdigest()


def _fsync_write(path: Path, text: str) -> None:
    """Write `text` durably and atomically: readers see no file or the whole file."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verified(path: Path) -> Path:
    """`path` when it is a complete checkpoint whose every file matches its manifest; else a
    one-line CheckpointError naming the file. Every reader of a checkpoint goes through it
    (resume through `Checkpointer.latest`, which falls back to an older one instead)."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise CheckpointError(f"checkpoint {path} has no COMPLETE marker: its save never finished; give a complete "
                              f"checkpoints/step-N dir (or the run dir, for its newest complete one)")
    problem = Checkpointer.verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; refusing to read it (give another "
                              f"checkpoint with --step N or a checkpoints/step-N dir)")
    return path


# Rank 0's long one-off work (the universal-checkpoint conversion, the init_from
# consolidation) can outlast parallel.timeout_minutes, which bounds every collective: the
# other ranks wait for a marker file instead of in a barrier.
RANK0_WORK_TIMEOUT_S = 6 * 3600


def rank0_work(dist: Dist, marker: Path, what: str, work: Callable[[], None],
               timeout_s: float = RANK0_WORK_TIMEOUT_S, poll_s: float = 0.5) -> None:
    """Rank 0 runs `work()`; every other rank returns once it has finished, or raises the
    one-line CheckpointError rank 0 met. `marker` (a file on the run's shared filesystem)
    carries the outcome, tagged with a token broadcast first, so a marker left by an earlier
    attempt is never mistaken for this one's."""
    if dist.world == 1:
        work()
        return
    token = dist.broadcast_object(uuid.uuid4().hex if dist.is_main else None)
    if dist.is_main:
        try:
            work()
        except BaseException as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _fsync_write(marker, json.dumps({"token": token, "error": msg}))
            raise
        _fsync_write(marker, json.dumps({"token": token, "ok": True}))
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            outcome = json.loads(marker.read_text())
        except (OSError, ValueError):
            outcome = {}
        if outcome.get("token") == token:
            if "error" in outcome:
                raise CheckpointError(f"rank 0 failed {what}: {outcome['error']}")
            return
        if time.monotonic() > deadline:
            raise CheckpointError(f"rank 0 did not finish {what} within {timeout_s / 3600:g} h (no {marker}); "
                                  f"see rank 0's log")
        time.sleep(poll_s)


# ---- layout (for resuming elsewhere) ---------------------------------------------------
def current_layout(dist: Dist, engine) -> dict:
    # ZeRO partitions over every rank (DeepSpeed's sequence-data-parallel group), so the
    # world size, not DP alone, fixes how the optimizer files are split.
    return {"world_size": dist.world, "dp": dist.dp_size, "sp": dist.sp, "zero_stage": engine.zero_optimization_stage(),
            "param_order": param_order(engine.module)}


def estimated_size(engine) -> int:
    """Bytes a checkpoint of `engine` takes when none was written yet: per parameter the
    module's copy (at most 4 B), the fp32 master (4 B) and Adam's two moments (8 B), an upper
    bound at every ZeRO stage and precision. ZeRO-3 parameters report their full size in
    `ds_numel`."""
    return 16 * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def checkpoint_size(path: Path) -> int:
    """Bytes of the files a complete checkpoint's manifest lists (0 when it has none)."""
    try:
        return sum(f["size"] for f in json.loads((Path(path) / "MANIFEST.json").read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return 0


def _mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@dataclass
class _Pending:
    step: int
    thread: Optional[threading.Thread] = None
    error: Optional[BaseException] = None


class Checkpointer:
    def __init__(self, root: Path, keep: int, dist: Dist, every: int = 0, last_step: int = 0,
                 async_save: bool = False, seal_timeout_s: float = 1800):
        self.root, self.keep, self.dist = Path(root), keep, dist
        self.every, self.last_step = every, last_step  # the cadence: every N steps (0 = off) and at the end
        self.async_save, self.seal_timeout_s = async_save, seal_timeout_s
        self.loaded: Optional[Path] = None  # never deleted by retention
        self._pending: Optional[_Pending] = None
        self._host_buffers = None  # reused by every async save (see checkpoint_io.HostBuffers)
        self.last_size = 0  # bytes of the newest checkpoint written or loaded: the next one's expected size

    def should_save(self, step: int, stopping: bool = False) -> bool:
        """After `step`: on a stop request, every `checkpoint.every` steps, and after the last step."""
        return stopping or bool(self.every and step % self.every == 0) or step == self.last_step

    # ---- finding -------------------------------------------------------------------
    def complete_steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
        return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    @staticmethod
    def verify(path: Path) -> Optional[str]:
        """None if every file matches the manifest, else what is wrong (one line). Files are
        hashed in parallel threads (xxhash and file reads release the GIL)."""
        manifest_path = path / "MANIFEST.json"
        if not manifest_path.is_file():
            return "MANIFEST.json is missing"
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            return "MANIFEST.json is unreadable"
        algo = manifest.get("hash", "sha256")
        todo = []
        for rel, meta in manifest["files"].items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != meta["size"]:
                return f"{rel} has {f.stat().st_size} bytes, expected {meta['size']}"
            todo.append((rel, f, meta[algo]))
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
            digests = list(pool.map(lambda item: _hash_file(item[1], algo), todo))
        for (rel, _, want), got in zip(todo, digests):
            if got != want:
                return f"{rel} fails its {algo} check"
        return None

    def latest(self) -> Optional[Path]:
        """Newest complete checkpoint that passes verification; rank 0 decides for all."""
        choice = None
        if self.dist.is_main:
            for path in reversed(self.complete_steps()):
                problem = self.verify(path)
                if problem is None:
                    choice = str(path)
                    break
                print0(f"checkpoint {path.name} is damaged ({problem}); falling back to the previous complete one")
        choice = self.dist.broadcast_object(choice)
        return Path(choice) if choice else None

    # ---- saving --------------------------------------------------------------------
    def save(self, engine, state: TrainState) -> Optional[Path]:
        """Collective. Returns once the files are on disk and sealed (sync), or once the
        state is copied to host memory (async; `wait()` seals). Returns None, after one
        line saying why, when the save is skipped for lack of space or a write fails (a full
        disk, an I/O error): its partial files are removed, every complete checkpoint is
        untouched, and training goes on to the next save."""
        name = f"step-{state.step}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        if self._pending is not None and self._pending.step == state.step:
            self.wait()  # e.g. growth re-saving the step just checkpointed
            return final
        self.wait()
        if not self._room_for(engine, name):
            return None
        t0 = time.perf_counter()
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            if final.exists() and not (final / "COMPLETE").is_file():  # an unfinished dir of a forced restart
                shutil.rmtree(final)
        self.dist.barrier()
        from trainer.checkpoint_io import HostBuffers, RankWriter

        if self.async_save and self._host_buffers is None:
            self._host_buffers = HostBuffers()
        layout = current_layout(self.dist, engine)
        writer = RankWriter(tmp, deferred=self.async_save, buffers=self._host_buffers)
        with writer.plugged_into(engine):
            engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
        writer.save({"state": asdict(state), "rng": _rng_state(), "layout": layout},
                    str(tmp / f"trainer_state_rank{self.dist.rank}.pt"))
        if self.async_save:
            # daemon: a crash must not hang on a part another rank will never write
            pending = _Pending(state.step)
            pending.thread = threading.Thread(name=f"checkpoint-{name}", daemon=True,
                                              target=self._background, args=(pending, writer, tmp, final, state, layout, t0))
            pending.thread.start()
            self._pending = pending
            return final
        if writer.error is None:
            try:
                self._write_part(writer, tmp)
            except OSError as e:
                writer.error = e
        faults.pause_mid_save()
        if self.dist.any(writer.error is not None):  # also the barrier before sealing: every part is down
            self._abandon(name, tmp, writer.error)
            return None
        error = None
        if self.dist.is_main:
            try:
                self._seal(tmp, final, state, layout, t0)
            except OSError as e:
                error = e
                self._abandon(name, tmp, e, final)
        self.dist.barrier()
        return None if error else final

    def _room_for(self, engine, name: str) -> bool:
        """Collective: whether the free space where checkpoints go holds the expected size
        (the last checkpoint's, else an estimate); rank 0 decides and warns in one line."""
        fits = True
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            need = self.last_size or estimated_size(engine)
            free = faults.free_bytes(shutil.disk_usage(self.root).free)
            if free < need:
                fits = False
                print0(f"warning: skipping checkpoint {name}: it needs about {_mb(need)} and {self.root} has "
                       f"{_mb(free)} free; training continues (free space, or lower checkpoint.keep)", file=sys.stderr)
        return self.dist.broadcast_object(fits)

    def _abandon(self, name: str, tmp: Path, error: Optional[BaseException], final: Optional[Path] = None) -> None:
        """A failed save: remove what it wrote (rank 0) and say so in one line per rank that
        met the error. `final` is removed too when the rename happened but COMPLETE was not
        written (it is then not a checkpoint)."""
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            if final is not None and final.exists() and not (final / "COMPLETE").is_file():
                shutil.rmtree(final, ignore_errors=True)
        why = str(error) if error is not None else "a write failed on another rank"
        if error is not None or self.dist.is_main:
            prefix = "" if self.dist.is_main else f"rank {self.dist.rank}: "
            print(f"{prefix}warning: checkpoint {name} not saved: {why}; removed {tmp.name}, the complete "
                  f"checkpoints are untouched; training continues to the next save", file=sys.stderr, flush=True)

    def wait(self) -> None:
        """Block until this rank's pending async save is written (and, on rank 0, sealed).
        A background save that failed is abandoned like a failed synchronous one."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.thread.join()
        if pending.error is not None:
            name = f"step-{pending.step}"
            self._abandon(name, self.root / f"{name}.tmp", pending.error, self.root / name)

    def _background(self, pending: _Pending, writer, tmp: Path, final: Path, state, layout, t0: float) -> None:
        try:
            try:
                writer.flush()
                if writer.error is not None:
                    raise writer.error
            except BaseException as e:  # tell rank 0 not to wait for this part
                _fsync_write(tmp / PART.format(self.dist.rank), json.dumps({"error": str(e)}))
                raise
            self._write_part(writer, tmp)
            faults.pause_mid_save()
            if self.dist.is_main:
                self._await_parts(tmp)
                self._seal(tmp, final, state, layout, t0)
        except BaseException as e:
            pending.error = e

    def _write_part(self, writer, tmp: Path) -> None:
        _fsync_write(tmp / PART.format(self.dist.rank), json.dumps({"files": writer.files}, indent=1))

    def _await_parts(self, tmp: Path) -> None:
        deadline = time.monotonic() + self.seal_timeout_s
        for r in range(self.dist.world):
            part = tmp / PART.format(r)
            while not part.is_file():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {r} did not finish writing {tmp.name} in {self.seal_timeout_s:.0f} s")
                time.sleep(0.02)
            err = json.loads(part.read_text()).get("error")
            if err:
                raise OSError(f"rank {r} failed writing {tmp.name}: {err}")

    def _seal(self, tmp: Path, final: Path, state: TrainState, layout: dict, t0: float) -> None:
        """Rank 0: merge the per-rank manifests, rename into place, then COMPLETE, and say so
        in one line."""
        files: dict[str, dict] = {}
        for r in range(self.dist.world):
            files.update(json.loads((tmp / PART.format(r)).read_text())["files"])
        for p in sorted(tmp.rglob("*")):  # small extras DeepSpeed copies in directly (zero_to_fp32.py)
            rel = str(p.relative_to(tmp))
            if p.is_file() and rel not in files and not p.name.startswith("manifest.rank"):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files[rel] = {"size": p.stat().st_size, HASH: _hash_file(p)}
        manifest = {"step": state.step, "n_layers": state.n_layers, "layout": layout, "hash": HASH,
                    "files": dict(sorted(files.items()))}
        _fsync_write(tmp / "MANIFEST.json", json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # re-saving a complete step: replaced only now that the new bytes are down
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _fsync_write(final / "COMPLETE", f"{state.step}\n")
        _fsync_dir(final)
        self.last_size = sum(f["size"] for f in files.values())
        print0(f"saved checkpoint {final.name} ({_mb(self.last_size)}) in {time.perf_counter() - t0:.2f} s")
        self._retain()

    def _retain(self) -> None:
        complete = self.complete_steps()
        protected = {p.resolve() for p in complete[-self.keep:]}
        if self.loaded is not None:
            protected.add(self.loaded.resolve())
        for path in complete:
            if path.resolve() not in protected:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob("step-*.tmp"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------
    @staticmethod
    def read_state(path: Path, rank: int = 0) -> tuple[TrainState, dict]:
        state, rng, _ = Checkpointer._read_blob(path, rank)
        return state, rng

    @staticmethod
    def _read_blob(path: Path, rank: int = 0) -> tuple[TrainState, dict, Optional[dict]]:
        f = Path(path) / f"trainer_state_rank{rank}.pt"
        if not f.is_file():  # resuming on a larger world: rank 0's step/depth still apply
            f = Path(path) / "trainer_state_rank0.pt"
        blob = torch.load(f, map_location="cpu", weights_only=True)
        return TrainState(**blob["state"]), blob["rng"], blob.get("layout")

    def load(self, engine, path: Path) -> TrainState:
        state, rng, saved = self._read_blob(path, self.dist.rank)
        now = current_layout(self.dist, engine)
        if saved is not None and "param_order" not in saved:  # written before the order was recorded
            saved["param_order"] = param_order(engine.module, legacy=True)
        universal = saved is not None and _needs_universal(path, saved, now)
        tag_dir = self._universal_dir(path) if universal else path
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
        engine._config.load_universal_checkpoint = universal
        try:
            load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        finally:
            engine._config.load_universal_checkpoint = False
        if universal:
            _repair_after_universal_load(engine, hyper)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        if universal:
            print0(f"resumed {path.name} saved on {saved['world_size']} ranks at ZeRO-{saved['zero_stage']} "
                   f"on {now['world_size']} ranks at ZeRO-{now['zero_stage']} through DeepSpeed's universal checkpoint")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.loaded = path
        self.last_size = checkpoint_size(path)
        return state

    def _universal_dir(self, path: Path) -> Path:
        """`path/universal`, converted once by rank 0 (into a temp dir, then renamed) and
        reused by later resumes; the original files are not touched."""
        out = path / UNIVERSAL
        if not (out / "COMPLETE").is_file():  # the same answer on every rank: rank 0 has not started
            rank0_work(self.dist, path / f"{UNIVERSAL}.status", f"converting {path} to a universal checkpoint",
                       lambda: _convert_to_universal(path, out))
        return out


def _repair_after_universal_load(engine, hyper: list[dict]) -> None:
    """Undo two side effects of DeepSpeed's ZeRO-3 universal loader: it copies group 0's
    hyperparameters into every group (weight decay into the no-decay group; they come from our
    config, so put them back), and it stores one `step` tensor in every parameter's Adam
    state, which AdamW then increments once per group each step (wrong bias correction)."""
    from trainer.engine import base_optimizer

    for group, values in zip(engine.optimizer.param_groups, hyper):
        group.update(values)
    for st in base_optimizer(engine).state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()


def _needs_universal(path: Path, saved: dict, now: dict) -> bool:
    """False when DeepSpeed can load the files as they are; raises for unsupported combinations."""
    reordered = saved.get("param_order", now.get("param_order")) != now.get("param_order")
    if reordered and 0 in (saved["zero_stage"], now["zero_stage"]):
        raise CheckpointError(
            f"checkpoint {path} lists the optimizer's parameters in another order than this version of the harness "
            f"(odd-sized parameters now go last, for 16-byte alignment), and at ZeRO-0 DeepSpeed restores the "
            f"optimizer state by position: resume it with the commit that wrote it, or start from its weights with "
            f"run.init_from")
    if saved["zero_stage"] == 0 and now["zero_stage"] == 0:
        return False  # replicated weights and optimizer: any world size reads mp_rank_00
    if saved["world_size"] == now["world_size"] and saved["zero_stage"] == now["zero_stage"] and not reordered:
        return False  # the same flat layout; a reordered one is read by name through the universal checkpoint
    if saved["zero_stage"] == 0 or now["zero_stage"] == 0:
        raise CheckpointError(
            f"checkpoint {path} was saved at parallel.zero_stage={saved['zero_stage']} on {saved['world_size']} ranks "
            f"and cannot be resumed at parallel.zero_stage={now['zero_stage']} on {now['world_size']} ranks: "
            f"resharding needs ZeRO 1-3 on both sides (or ZeRO-0 on both); resume with "
            f"parallel.zero_stage={saved['zero_stage']}" + ("" if saved["zero_stage"] else " or start a new run"))
    return True


def _convert_to_universal(path: Path, out: Path) -> None:
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    tmp = path / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"converting {path} to DeepSpeed's universal checkpoint failed: {e!r}") from None
    (path / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; we pass the tag
    # Weights and moments come from zero/; the model-states file only carries metadata, but
    # DeepSpeed looks for it under the *target* stage's name (mp_rank_00_... at ZeRO 1-2,
    # zero_pp_rank_0_mp_rank_00_... at ZeRO-3), and the converter keeps the source's names.
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    have = [n for n in names if (tmp / n).is_file()]
    for n in names:
        if have and not (tmp / n).exists():
            shutil.copyfile(tmp / have[0], tmp / n)
    _add_stage3_optimizer_header(tmp / "zero")
    _add_stage12_optimizer_state(tmp / "zero", path)
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_write(tmp / "COMPLETE", "universal\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _fsync_dir(path)


def _add_stage12_optimizer_state(zero_dir: Path, source: Path) -> None:
    """The converse, for a ZeRO-3 source loaded at ZeRO 1/2. The converter writes a ZeRO-3
    source in ZeRO-3's own dialect, which only the ZeRO-3 loader reads: each parameter's
    fp32/exp_avg/exp_avg_sq as a bare flat tensor (the ZeRO 1/2 loader wants {"param":
    tensor of the parameter's shape}, which the ZeRO-3 loader reads too), Adam's step only in
    the header (the ZeRO 1/2 loader takes it from each parameter's step.pt; without one the
    resumed AdamW would restart its bias correction at step 0), and no `ds_version` in the
    header (ZeRO-3 saves it beside its optimizer state; the ZeRO 1/2 loader asserts on it).
    Add all three from the source. Its rank-0 flat fp32 partition (`fp32_flat_groups`),
    copied into the header, is dropped: the weights are in the per-parameter files."""
    from deepspeed.checkpoint.constants import PARAM

    path = zero_dir / "optimizer_state.pt"
    sd = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's own files (pickled config)
    if "ds_version" in sd or "optimizer_state_dict" not in sd or sd.get("zero_stage") != 3:
        return
    sd["ds_version"] = torch.load(source / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                                  weights_only=False)["ds_version"]
    sd.pop("fp32_flat_groups", None)
    states = [state for state in sd["optimizer_state_dict"]["state"].values() if "step" in state]
    if len({float(state["step"]) for state in states}) > 1:
        raise CheckpointError(f"{source}: its parameter groups are at different Adam steps")
    torch.save(sd, path)
    model = torch.load(source / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shapes = {name: shape for group in model["param_shapes"] for name, shape in group.items()}
    for param in (d for d in zero_dir.iterdir() if d.is_dir() and d.name in shapes):
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            f = param / f"{state}.pt"
            flat = torch.load(f, map_location="cpu", weights_only=True)
            if torch.is_tensor(flat):
                torch.save({PARAM: flat.view(shapes[param.name])}, f)
        if states and not (param / "step.pt").exists():
            torch.save(states[0]["step"], param / "step.pt")


def _add_stage3_optimizer_header(zero_dir: Path) -> None:
    """Converted from ZeRO 1/2, `zero/optimizer_state.pt` holds the hyperparameters at the top
    level, where the ZeRO 1/2 loader reads them; the ZeRO-3 loader reads the Adam step and the
    hyperparameters under `optimizer_state_dict` (the layout a ZeRO-3 source gives). Add that
    view so one universal checkpoint loads at any stage."""
    path = zero_dir / "optimizer_state.pt"
    sd = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's own file (pickled config)
    if "optimizer_state_dict" in sd or "param_groups" not in sd:
        return
    step_file = next(zero_dir.glob("*/step.pt"), None)
    step = torch.load(step_file, map_location="cpu", weights_only=False) if step_file else 0
    sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    torch.save(sd, path)
