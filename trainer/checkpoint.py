"""Atomic, verifiable checkpoints (DESIGN §9).

Layout: `checkpoints/step-N/` holds DeepSpeed's engine files (model, optimizer), one
`trainer_state_rank{r}.pt` per rank (step, tokens, depth, RNG), `MANIFEST.json` (size and
sha256 of every file) and finally `COMPLETE`. A save goes to `step-N.tmp/`, all ranks
barrier, rank 0 writes the manifest, renames, then writes `COMPLETE`. DeepSpeed's own
`latest` file is never written or trusted: it is updated before DeepSpeed's barrier.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from trainer import faults
from trainer.dist import Dist, print0
from trainer.errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class Checkpointer:
    def __init__(self, root: Path, keep: int, dist: Dist, every: int = 0, last_step: int = 0):
        self.root, self.keep, self.dist = Path(root), keep, dist
        self.every, self.last_step = every, last_step  # the cadence: every N steps (0 = off) and at the end
        self.loaded: Optional[Path] = None  # never deleted by retention

    def should_save(self, step: int, stopping: bool = False) -> bool:
        """After `step`: on a stop request, every `checkpoint.every` steps, and after the last step."""
        return stopping or bool(self.every and step % self.every == 0) or step == self.last_step

    # ---- finding -------------------------------------------------------------------
    def complete_steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
        return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def verify(self, path: Path) -> Optional[str]:
        """None if every file matches the manifest, else what is wrong (one line)."""
        manifest_path = path / "MANIFEST.json"
        if not manifest_path.is_file():
            return "MANIFEST.json is missing"
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            return "MANIFEST.json is unreadable"
        for rel, meta in manifest["files"].items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != meta["size"]:
                return f"{rel} has {f.stat().st_size} bytes, expected {meta['size']}"
            if _sha256(f) != meta["sha256"]:
                return f"{rel} fails its sha256 check"
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
    def save(self, engine, state: TrainState) -> Path:
        name = f"step-{state.step}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            if final.exists():  # re-saving the same step (e.g. a stop right after a periodic save)
                shutil.rmtree(final)
        self.dist.barrier()
        engine.save_checkpoint(str(self.root), tag=f"{name}.tmp", save_latest=False)
        torch.save({"state": asdict(state), "rng": _rng_state()}, tmp / f"trainer_state_rank{self.dist.rank}.pt")
        faults.pause_mid_save()
        self.dist.barrier()
        if self.dist.is_main:
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {"step": state.step, "n_layers": state.n_layers,
                        "files": {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                                  for p in files}}
            _fsync_write(tmp / "MANIFEST.json", json.dumps(manifest, indent=1))
            os.replace(tmp, final)
            _fsync_write(final / "COMPLETE", f"{state.step}\n")
            self._retain()
        self.dist.barrier()
        return final

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
        f = Path(path) / f"trainer_state_rank{rank}.pt"
        if not f.is_file():  # resuming on a different world size: rank 0's step/depth still apply
            f = Path(path) / "trainer_state_rank0.pt"
        blob = torch.load(f, map_location="cpu", weights_only=True)
        return TrainState(**blob["state"]), blob["rng"]

    def load(self, engine, path: Path) -> TrainState:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        state, rng = self.read_state(path, self.dist.rank)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.loaded = path
        return state
