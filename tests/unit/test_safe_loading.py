"""`load_model` and export read a run dir that someone else may have handed over: a file
that pickles a callable is refused with one line, and the callable never runs."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, tiny_overrides


class _RunsShell:
    """Unpickling this calls os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _run_dir(tmp_path: Path, poisoned_file: str) -> Path:
    """A complete-looking run dir (config, tokenizer-free, checkpoint step-1) whose
    `poisoned_file` holds tensors plus a pickled os.system call."""
    from trainer.checkpoint.manifest import HASH
    from trainer.checkpoint.manifest import hash_file as _hash_file
    from trainer.checkpoint.state import TrainState
    from trainer.config import load_config, to_yaml

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-1"
    ckpt.mkdir(parents=True)
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tmp_path, "run"))
    (run / "config.yaml").write_text(to_yaml(cfg))
    torch.save({"state": dataclasses.asdict(TrainState(step=1, n_layers=2)), "rng": {"torch": torch.get_rng_state()}},
               ckpt / "trainer_state_rank0.pt")
    torch.save({"module": {"embed_tokens.weight": torch.zeros(2, 2)}}, ckpt / "mp_rank_00_model_states.pt")
    torch.save({"module": {"embed_tokens.weight": torch.zeros(2, 2)}, "hook": _RunsShell(tmp_path / "pwned")},
               ckpt / poisoned_file)
    # A manifest that matches: the files are intact, and it is their contents that are refused.
    files = {f.name: {"size": f.stat().st_size, HASH: _hash_file(f)} for f in sorted(ckpt.iterdir())}
    (ckpt / "MANIFEST.json").write_text(json.dumps({"hash": HASH, "files": files}))
    (ckpt / "COMPLETE").write_text("1\n")
    return run


@pytest.mark.parametrize("poisoned_file", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                           "trainer_state_rank0.pt"])
def test_load_model_refuses_a_checkpoint_file_that_pickles_a_callable(tmp_path, poisoned_file):
    from trainer.errors import CheckpointError
    from trainer.export.load import load_model

    run = _run_dir(tmp_path, poisoned_file)
    with pytest.raises(CheckpointError) as err:
        load_model(run)
    msg = str(err.value)
    assert "\n" not in msg and poisoned_file in msg and "system" in msg and "refusing" in msg
    assert not (tmp_path / "pwned").exists()


def test_export_refuses_it_with_one_line_and_exit_code_2(tmp_path, capsys):
    from trainer.export import main

    run = _run_dir(tmp_path, "mp_rank_00_model_states.pt")
    assert main([str(run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "refusing" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "hf" / "model.safetensors").exists()


def test_forced_weights_only_switch_is_scoped_to_the_load(tmp_path):
    """The forced weights-only switch is scoped: a refusal or a load leaves the process as it was."""
    from trainer.errors import CheckpointError
    from trainer.parallel.ds_state import fp32_state_dict

    run = _run_dir(tmp_path, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with pytest.raises(CheckpointError):
        fp32_state_dict(run / "checkpoints" / "step-1")
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before
    clean = tmp_path / "clean" / "step-1"
    clean.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3, dtype=torch.bfloat16)}}, clean / "mp_rank_00_model_states.pt")
    assert torch.equal(fp32_state_dict(clean)["w"], torch.ones(3))
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before
