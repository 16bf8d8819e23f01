"""The Checkpointer: *when* and *how* a run saves (atomically, in parallel, optionally in the
background) and resumes, on the same or another layout. The layout of `checkpoints/step-N/`
and the save protocol are described in trainer/checkpoint/__init__.py."""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from trainer import faults
from trainer.checkpoint.io import HostBuffers, RankWriter
from trainer.checkpoint.manifest import (
    HASH,
    PART,
    checkpoint_size,
    complete_steps,
    fsync_dir,
    fsync_write,
    hash_file,
    verify,
)
from trainer.checkpoint.state import TrainState, read_state_blob
from trainer.checkpoint.universal import UNIVERSAL, convert_to_universal, needs_universal
from trainer.errors import CheckpointError
from trainer.parallel import ds_state
from trainer.parallel.dist import Dist, print0
from trainer.parallel.optim import param_order

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
            fsync_write(marker, json.dumps({"token": token, "error": msg}))
            raise
        fsync_write(marker, json.dumps({"token": token, "ok": True}))
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
        self._host_buffers = None  # reused by every async save (see io.HostBuffers)
        self.last_size = 0  # bytes of the newest checkpoint written or loaded: the next one's expected size

    def should_save(self, step: int, stopping: bool = False) -> bool:
        """After `step`: on a stop request, every `checkpoint.every` steps, and after the last step."""
        return stopping or bool(self.every and step % self.every == 0) or step == self.last_step

    def maybe_save(self, state: TrainState, engine, stopping: bool = False) -> Optional[Path]:
        """The loop's hook: save when `should_save(state.step, stopping)`."""
        return self.save(engine, state) if self.should_save(state.step, stopping) else None

    # ---- finding -------------------------------------------------------------------
    def complete_steps(self) -> list[Path]:
        return complete_steps(self.root)

    verify = staticmethod(verify)

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
                self._abandon(name, tmp, e)
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

    def _abandon(self, name: str, tmp: Path, error: Optional[BaseException]) -> None:
        """A failed save: remove what it wrote (rank 0) and say so in one line per rank that
        met the error. Only `tmp` can hold it: the rename to step-N is the seal's last act."""
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
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
            self._abandon(name, self.root / f"{name}.tmp", pending.error)

    def _background(self, pending: _Pending, writer, tmp: Path, final: Path, state, layout, t0: float) -> None:
        try:
            try:
                writer.flush()
                if writer.error is not None:
                    raise writer.error
            except BaseException as e:  # tell rank 0 not to wait for this part
                fsync_write(tmp / PART.format(self.dist.rank), json.dumps({"error": str(e)}))
                raise
            self._write_part(writer, tmp)
            faults.pause_mid_save()
            if self.dist.is_main:
                self._await_parts(tmp)
                self._seal(tmp, final, state, layout, t0)
        except BaseException as e:
            pending.error = e

    def _write_part(self, writer, tmp: Path) -> None:
        fsync_write(tmp / PART.format(self.dist.rank), json.dumps({"files": writer.files}, indent=1))

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
                files[rel] = {"size": p.stat().st_size, HASH: hash_file(p)}
        manifest = {"step": state.step, "n_layers": state.n_layers, "layout": layout, "hash": HASH,
                    "files": dict(sorted(files.items()))}
        fsync_write(tmp / "MANIFEST.json", json.dumps(manifest, indent=1))
        # COMPLETE goes in before the rename, so the rename is the commit: a crash at any point
        # leaves either step-N.tmp (ignored, cleared later) or a complete step-N, never a
        # step-N without its marker (which a restart would have to refuse to overwrite).
        fsync_write(tmp / "COMPLETE", f"{state.step}\n")
        fsync_dir(tmp)
        if final.exists():  # re-saving a complete step: replaced only now that the new bytes are down
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
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
        return read_state_blob(path, rank)

    def load(self, engine, path: Path) -> TrainState:
        state, rng, saved = self._read_blob(path, self.dist.rank)
        now = current_layout(self.dist, engine)
        if saved is not None and "param_order" not in saved:  # written before the order was recorded
            saved["param_order"] = param_order(engine.module, legacy=True)
        universal = saved is not None and needs_universal(path, saved, now)
        tag_dir = self._universal_dir(path) if universal else path
        load_path = ds_state.load_checkpoint(engine, tag_dir, universal)
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
                       lambda: convert_to_universal(path, out))
        return out


