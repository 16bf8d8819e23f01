"""Finding and verifying checkpoints, without DeepSpeed: the step-dir names, the manifest's
hash, durable writes, and `verified`, which every reader of a checkpoint goes through.
Export, generate and evaluate load through this module alone (see trainer/checkpoint/__init__.py
for the layout of `checkpoints/step-N/`)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import xxhash

from trainer.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")
HASH = "xxh3_128"
PART = "manifest.rank{}.json"


def hash_file(path: Path, algo: str = HASH) -> str:
    with open(path, "rb") as f:  # sha256: manifests written before the switch to xxh3
        return hashlib.file_digest(f, "sha256" if algo == "sha256" else xxhash.xxh3_128).hexdigest()


def fsync_write(path: Path, text: str) -> None:
    """Write `text` durably and atomically: readers see no file or the whole file."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_steps(root: Path) -> list[Path]:
    """The `step-N` dirs under `root` with a COMPLETE marker, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


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
        digests = list(pool.map(lambda item: hash_file(item[1], algo), todo))
    for (rel, _, want), got in zip(todo, digests):
        if got != want:
            return f"{rel} fails its {algo} check"
    return None


def verified(path: Path) -> Path:
    """`path` when it is a complete checkpoint whose every file matches its manifest; else a
    one-line CheckpointError naming the file. Every reader of a checkpoint goes through it
    (resume through `Checkpointer.latest`, which falls back to an older one instead)."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise CheckpointError(f"checkpoint {path} has no COMPLETE marker: its save never finished; give a complete "
                              f"checkpoints/step-N dir (or the run dir, for its newest complete one)")
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; refusing to read it (give another "
                              f"checkpoint with --step N or a checkpoints/step-N dir)")
    return path


def checkpoint_size(path: Path) -> int:
    """Bytes of the files a complete checkpoint's manifest lists (0 when it has none)."""
    try:
        return sum(f["size"] for f in json.loads((Path(path) / "MANIFEST.json").read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return 0
