"""Checkpoint bytes: hashed-while-written files equal plain torch.save, async snapshots hold the
state at save time, and verification names a damaged file."""
from __future__ import annotations

import io
import json
import shutil
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import xxhash

import trainer.checkpoint.checkpointer as ck
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.io import RankWriter, save_hashed
from trainer.checkpoint.manifest import HASH, verified
from trainer.checkpoint.state import TrainState


def _state() -> dict:
    flat = torch.arange(24, dtype=torch.float32)
    return {"module": OrderedDict(a=flat[:8].view(2, 4), b=flat[8:]),  # views of one storage, like ZeRO's flat buffers
            "optimizer": {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(5.0)}},
                          "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "step": 7}


def test_hashed_write_is_plain_torch_save_and_its_xxh3(tmp_path):
    state = _state()
    meta = save_hashed(state, str(tmp_path / "f.pt"))
    plain = io.BytesIO()
    torch.save(state, plain)  # a stream, as ours: the zip root is then "archive", not the file's stem
    data = (tmp_path / "f.pt").read_bytes()
    assert data == plain.getvalue()
    assert meta == {"size": len(data), HASH: xxhash.xxh3_128(data).hexdigest()}


def test_async_snapshot_holds_the_state_at_save_time(tmp_path):
    state = _state()
    (tmp_path / "sync").mkdir()
    (tmp_path / "async").mkdir()
    sync = RankWriter(tmp_path / "sync", deferred=False)
    sync.save(state, str(tmp_path / "sync/f.pt"))
    deferred = RankWriter(tmp_path / "async", deferred=True)
    deferred.save(state, str(tmp_path / "async/f.pt"))
    state["module"]["a"].add_(100.0)  # the next optimizer step, before the background write
    state["optimizer"]["state"][0]["exp_avg"].mul_(0)
    deferred.flush()
    assert deferred.files["f.pt"] == sync.files["f.pt"], "same bytes as writing synchronously at save time"
    loaded = torch.load(tmp_path / "async/f.pt", weights_only=True)
    assert loaded["module"]["a"][0, 0].item() == 0.0
    assert loaded["module"]["a"].untyped_storage().data_ptr() == loaded["module"]["b"].untyped_storage().data_ptr()


def test_verify_names_the_truncated_or_flipped_file(tmp_path):
    files = {name: save_hashed({"w": torch.randn(64)}, str(tmp_path / name)) for name in ("x.pt", "y.pt")}
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"hash": HASH, "files": files}))
    assert Checkpointer.verify(tmp_path) is None
    data = (tmp_path / "y.pt").read_bytes()
    (tmp_path / "y.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert Checkpointer.verify(tmp_path) == f"y.pt fails its {HASH} check"
    (tmp_path / "x.pt").write_bytes((tmp_path / "x.pt").read_bytes()[:100])
    assert Checkpointer.verify(tmp_path) == f"x.pt has 100 bytes, expected {files['x.pt']['size']}"


def test_the_rename_is_the_commit_so_a_crash_never_leaves_a_step_dir_without_complete(tmp_path, monkeypatch):
    """kill -9 between the rename and the marker used to leave `step-4/` with no COMPLETE, and
    the restart then refused to overwrite it (seen in CI: test_faults' async kill -9)."""
    root = tmp_path / "checkpoints"
    tmp = root / "step-4.tmp"

    def written_by_every_rank():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        name = "mp_rank_00_model_states.pt"
        (tmp / ck.PART.format(0)).write_text(json.dumps({"files": {name: save_hashed({"w": torch.randn(8)},
                                                                                         str(tmp / name))}}))

    written_by_every_rank()
    seen = []
    real_replace = ck.os.replace

    def crash_at_rename(src, dst):
        if not Path(src).is_dir():  # fsync_write's own file renames
            return real_replace(src, dst)
        seen.append((Path(src) / "COMPLETE").is_file())
        raise KeyboardInterrupt  # the process dies here: the directory rename never happens

    monkeypatch.setattr(ck.os, "replace", crash_at_rename)
    saver = Checkpointer(root, keep=2, dist=SimpleNamespace(world=1, rank=0, is_main=True))
    state = TrainState(n_layers=2)
    state.step = 4
    with pytest.raises(KeyboardInterrupt):
        saver._seal(tmp, root / "step-4", state, {}, 0.0)
    assert seen == [True], "COMPLETE is down before the rename"
    assert not (root / "step-4").exists(), "a crash before the rename leaves only step-4.tmp, which a restart ignores"
    monkeypatch.undo()
    written_by_every_rank()  # the restart's save of the same step
    saver._seal(tmp, root / "step-4", state, {}, 0.0)
    assert verified(root / "step-4") == root / "step-4" and not tmp.exists()
