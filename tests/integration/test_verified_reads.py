"""Nothing reads a checkpoint unverified (docs/design.md §21): every reader refuses a file
damaged in place (size kept) in one line naming it; a run dir whose checkpoints are all
unusable does not silently restart from step 0; a finished run re-run returns at once.
Also: exports are readable by others, lm_eval runs as one process under torchrun, and
rank 0's long one-off work does not trip the collective timeout.

One trained tiny run is shared (module fixture); each test damages its own copy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, _env, free_port, tiny_overrides, torchrun_module, train

TINY = ROOT / "configs/tiny.yaml"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WEIGHTS = "mp_rank_00_model_states.pt"  # ZeRO-0 on one rank: the weights and the optimizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(out_dir, overrides) of a finished 2-step tiny run with checkpoints/step-2."""
    out = tmp_path_factory.mktemp("verified") / "runs"
    # Its own cache, out.parent / "cache": two tests copy it or point a rerun at it.
    over = tiny_overrides(out, "src", fresh_data=True, **{"run.max_steps": 2})
    proc = train(over)
    assert "saved checkpoint step-2 (" in proc.stdout and " MB) in " in proc.stdout  # one line per save
    return out, over


def _copy(trained, tmp_path, name="run"):
    out, _ = trained
    run = tmp_path / name
    shutil.copytree(out / "src", run)
    return run


def _flip_in_place(path):
    """Change one byte in the middle, keeping the size (and a valid-looking file)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_line_naming(text: str, name: str) -> str:
    text = text.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert name in text, text
    return text


@pytest.mark.parametrize("reader", ["load_model", "export", "generate", "evaluate", "init_from"])
def test_every_reader_refuses_a_weight_file_damaged_in_place_naming_it(trained, tmp_path, capsys, reader):
    from trainer.errors import CheckpointError

    run = _copy(trained, tmp_path)
    _flip_in_place(run / "checkpoints/step-2" / WEIGHTS)
    if reader == "load_model":
        from trainer.export.load import load_model

        with pytest.raises(CheckpointError) as e:
            load_model(run)
        msg = _one_line_naming(str(e.value), WEIGHTS)
    elif reader == "init_from":
        from trainer.checkpoint.init_from import resolve_init_source
        from trainer.config import ConfigError, load_config

        with pytest.raises(ConfigError) as e:
            resolve_init_source(load_config(TINY, tiny_overrides(tmp_path, "dst", **{"run.init_from": str(run)})))
        msg = _one_line_naming(str(e.value), WEIGHTS)
    else:
        import importlib

        main = importlib.import_module(f"trainer.{reader}").main
        args = {"export": [str(tmp_path / "hf")], "generate": ["--prompt", "x"],
                "evaluate": ["--tasks", "harness_smoke"]}[reader]
        assert main([str(run), *args]) == 2
        msg = _one_line_naming(capsys.readouterr().err, WEIGHTS)
        assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert "damaged" in msg and "xxh3_128" in msg


def test_init_from_a_complete_checkpoint_missing_a_file_is_one_line(trained, tmp_path):
    run = _copy(trained, tmp_path)
    (run / "checkpoints/step-2" / WEIGHTS).unlink()
    proc = train(tiny_overrides(tmp_path / "runs", "dst", **{"run.init_from": str(run)}), check=False)
    assert proc.returncode == 2
    msg = _one_line_naming(proc.stderr, f"{WEIGHTS} is missing")
    assert msg.startswith("error: run.init_from=")


def test_run_dir_whose_checkpoints_are_all_incomplete_refuses_to_restart_without_force_restart(trained, tmp_path):
    out, over = trained
    shutil.copytree(out / "src", tmp_path / "src")
    (tmp_path / "src/checkpoints/step-2/COMPLETE").unlink()
    over = tiny_overrides(tmp_path, "src", **{"run.max_steps": 2, "data.cache_dir": str(out.parent / "cache")})
    proc = train(over, check=False)
    assert proc.returncode == 2
    msg = _one_line_naming(proc.stderr, "step-2 (no COMPLETE marker)")
    assert "run.force_restart=true" in msg
    assert not (tmp_path / "src/checkpoints/step-2/COMPLETE").exists()  # nothing was overwritten
    proc = train([*over, "run.force_restart=true"])
    assert "saved checkpoint step-2" in proc.stdout and (tmp_path / "src/checkpoints/step-2/COMPLETE").is_file()


def test_finished_run_rerun_says_so_before_touching_data_or_engine(trained):
    out, over = trained
    proc = train(over)
    assert "already finished at step 2" in proc.stdout
    # No wall-time bound (a shared machine makes any number flaky): what makes it quick is that
    # it stops before preparing data, building an engine or loading the checkpoint.
    assert not [line for line in proc.stdout.splitlines() if line.startswith(("data:", "resumed from", "finished"))]


def test_export_is_readable_by_others(trained, tmp_path):
    from trainer.export import main

    old = os.umask(0o022)
    try:
        assert main([str(trained[0] / "src"), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_lm_eval_runs_as_one_process_under_a_torchrun_environment(trained, tmp_path, monkeypatch):
    """Rank 1 of 2 by the launcher's variables: given a path, HFLM would build an
    Accelerator that joins the job's world; given our model object it is rank 0 of 1."""
    from trainer.evaluation.lm_eval_runner import single_process_lm
    from trainer.export.hf import write_export
    from trainer.export.load import load_model

    run = trained[0] / "src"
    export = write_export(load_model(run), run / "tokenizer/tokenizer.model", tmp_path / "hf")
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port()), **OFFLINE}.items():
        monkeypatch.setenv(k, v)
    lm = single_process_lm(export, batch_size=2)
    assert (lm.rank, lm.world_size) == (0, 1) and getattr(lm, "accelerator", None) is None


@pytest.mark.slow
def test_rank0_long_work_outlasts_the_collective_timeout_and_its_failure_reaches_every_rank(tmp_path):
    proc = torchrun_module("tests.workers.rank0_wait", 2, str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["waited_s"] > 5 and seen["barrier_after"]  # 6 s of rank-0 work under a 3 s timeout
    assert ranks[1]["error"] == "rank 0 failed converting /x/step-4: converting /x/step-4 failed: disk on fire"
    assert "Timed out" in ranks[1]["plain_barrier"]  # the control: a barrier in its place times out


def test_prepare_verify_names_a_shard_damaged_in_place(trained, tmp_path):
    """A shard damaged with its size and mtime kept passes opening (by design: only files
    whose mtime changed are re-hashed); `prepare --verify` re-hashes every one."""
    out, over = trained
    cache = tmp_path / "cache"
    shutil.copytree(out.parent / "cache", cache)
    over = [*over, f"data.cache_dir={cache}"]
    cmd = [sys.executable, "-m", "trainer.prepare", str(TINY), *over, "--verify"]
    ok = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "all match their sidecars" in ok.stdout, ok.stdout + ok.stderr
    shard = max(cache.glob("shards/*/shards/*.train.bin"), key=lambda p: p.stat().st_size)
    st = shard.stat()
    _flip_in_place(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    bad = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    lines = [line for line in bad.stdout.splitlines() if line.startswith("bad: ")]
    assert len(lines) == 1 and shard.name in lines[0] and "checksum" in lines[0], bad.stdout
    assert "Traceback" not in bad.stderr
