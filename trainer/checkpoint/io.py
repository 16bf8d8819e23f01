"""Bytes on disk for the Checkpointer: hashed, fsync'd writes, host snapshots, and the
DeepSpeed checkpoint engine that routes each rank's files through them.

Separate from manifest.py because it imports deepspeed, which finding and verifying
checkpoints (and `trainer.load_model`) do not need.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import os
from pathlib import Path
from typing import Any, Optional

import torch
import xxhash
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from trainer import faults
from trainer.checkpoint.manifest import HASH

WRITEBACK_CHUNK = 32 << 20  # bytes written between nudges to the kernel to start writeback


def _sync_file_range():
    """Linux's sync_file_range(2), or None: starts writeback of a range without waiting."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class HashingFile:
    """Write-only file that hashes the bytes passing through and fsyncs on close.

    Every WRITEBACK_CHUNK bytes it asks the kernel to start writing them to disk, so the
    disk works while torch.save serialises the rest and the closing fsync waits only for
    the tail, not for the whole file."""

    def __init__(self, path: str):
        self._f = open(path, "wb", buffering=1 << 20)
        self._h = xxhash.xxh3_128()
        self._size = 0
        self._started = 0  # bytes already handed to writeback

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        for off in range(0, len(view), WRITEBACK_CHUNK):
            piece = view[off:off + WRITEBACK_CHUNK]
            self._h.update(piece)
            self._size += self._f.write(piece)
            faults.disk_error(self._f.name)
            if self._size - self._started >= WRITEBACK_CHUNK:
                self._start_writeback()
        return len(view)

    def _start_writeback(self) -> None:
        if _SYNC_FILE_RANGE is not None:
            self._f.flush()
            _SYNC_FILE_RANGE(self._f.fileno(), self._started, self._size - self._started, _SYNC_FILE_RANGE_WRITE)
        self._started = self._size

    def flush(self) -> None:
        self._f.flush()

    def abort(self) -> None:
        """Close after a failed write (the flush of the rest may fail again: the file is closed anyway)."""
        self._f.close()

    def close(self) -> dict:
        """{"size", HASH} of what was written, once it is on disk."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return {"size": self._size, HASH: self._h.hexdigest()}


def save_hashed(obj: Any, path: str) -> dict:
    """torch.save(obj, path), fsync'd, hashing the bytes on their way out (no second read).
    A write that fails (a full disk, an I/O error) removes the partial file and raises OSError."""
    f = HashingFile(path)
    try:
        torch.save(obj, f)
        return f.close()
    except BaseException as e:
        with contextlib.suppress(OSError):
            f.abort()
        with contextlib.suppress(OSError):
            os.unlink(path)
        cause = e.__cause__ or e.__context__
        if isinstance(e, RuntimeError) and isinstance(cause, OSError):
            raise cause from None  # torch.save reports a failed write as a RuntimeError ("unexpected pos")
        raise


class HostBuffers:
    """Host storages kept from one async save to the next. Allocating (and, for a GPU,
    pinning) a checkpoint's worth of memory on every save costs more than the copy itself;
    the previous snapshot's storages are free again once its write has finished."""

    def __init__(self):
        self._free: dict[int, list] = {}
        self._lent: list = []

    def take(self, nbytes: int, pin: bool):
        pool = self._free.get(nbytes)
        buf = pool.pop() if pool else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).untyped_storage()
        self._lent.append(buf)
        return buf

    def give_back(self) -> None:
        """After the write that used them has finished."""
        for buf in self._lent:
            self._free.setdefault(buf.nbytes(), []).append(buf)
        self._lent = []


def _host_copy(obj: Any, memo: dict, buffers: HostBuffers) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        st = t.untyped_storage()
        key = (str(st.device), st.data_ptr())
        host = memo.get(key)
        if host is None:
            on_gpu = st.device.type != "cpu"
            host = buffers.take(st.nbytes(), pin=on_gpu)
            host.copy_(st, non_blocking=on_gpu)
            memo[key] = host
        return torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping type (OrderedDict, defaultdict)
        for k, v in obj.items():
            out[k] = _host_copy(v, memo, buffers)
        return out
    if isinstance(obj, list):
        return [_host_copy(v, memo, buffers) for v in obj]
    if isinstance(obj, tuple):
        items = [_host_copy(v, memo, buffers) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj  # ints, strings, DeepSpeed's config object: not changed by training


def host_snapshot(state: Any, buffers: Optional[HostBuffers] = None) -> Any:
    """`state` with every tensor copied to host memory. Tensors that share a storage share one
    copy, so saving the snapshot writes the same file as saving the live state."""
    memo: dict = {}
    out = _host_copy(state, memo, buffers or HostBuffers())
    if torch.cuda.is_available() and any(not dev.startswith("cpu") for dev, _ in memo):
        torch.cuda.synchronize()
    return out


class RankWriter(CheckpointEngine):
    """DeepSpeed calls `save(state_dict, path)` on its checkpoint engine for every file this
    rank owns. Plugged in for one save: a synchronous writer streams each file to disk at
    once; a deferred one keeps a host snapshot for `flush()` on a background thread.

    A write that fails (ENOSPC, EIO) is kept in `error`, not raised, and later writes of the
    save are skipped: DeepSpeed's save_checkpoint has barriers between its writes, and a rank
    leaving it early would leave the others waiting there. The caller checks `error`."""

    def __init__(self, root: Path, deferred: bool, buffers: Optional[HostBuffers] = None):
        super().__init__(None)
        self.name = "harness.RankWriter"
        self.root, self.deferred = Path(root), deferred
        self.buffers = buffers or HostBuffers()
        self.files: dict[str, dict] = {}  # path inside the step dir -> {"size", HASH}
        self.error: Optional[OSError] = None
        self._queue: list[tuple[str, Any]] = []

    @contextlib.contextmanager
    def plugged_into(self, engine):
        """For one `engine.save_checkpoint`: route its files through this writer, and keep an
        OSError from the recovery scripts DeepSpeed copies in itself (between its barriers)."""
        default, engine.checkpoint_engine = engine.checkpoint_engine, self
        copy_scripts = engine._copy_recovery_script

        def guarded_copy(save_path):
            if self.error is None:
                self._guard(copy_scripts, save_path)

        engine._copy_recovery_script = guarded_copy
        try:
            yield self
        finally:
            engine.checkpoint_engine = default
            del engine._copy_recovery_script  # the class's method again

    def _guard(self, fn, *args) -> Any:
        try:
            return fn(*args)
        except OSError as e:
            self.error = e
            return None

    def create(self, info) -> None:
        pass

    def makedirs(self, path, exist_ok=False) -> None:
        self._guard(os.makedirs, path, 0o777, exist_ok)

    def save(self, state_dict, path: str) -> None:
        if self.error is not None:
            return
        if self.deferred:
            self._queue.append((path, host_snapshot(state_dict, self.buffers)))
        else:
            meta = self._guard(save_hashed, state_dict, path)
            if meta is not None:
                self.files[self._rel(path)] = meta

    def flush(self) -> None:
        """Write the queued snapshots; stops at the first failed write (see `error`)."""
        while self._queue and self.error is None:
            path, blob = self._queue.pop(0)
            meta = self._guard(save_hashed, blob, path)
            if meta is not None:
                self.files[self._rel(path)] = meta
        self._queue = []
        self.buffers.give_back()

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        return True

    def _rel(self, path: str) -> str:
        return str(Path(path).relative_to(self.root))
