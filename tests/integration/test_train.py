"""The real entry point end to end: a pulse run, ZeRO parity, exact resume, export."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import losses, metrics, tiny_overrides, train

pytestmark = pytest.mark.slow  # every test launches the real trainer

def test_pulse_run_trains_logs_checkpoints_and_summarises(tmp_path):
    out = tmp_path / "runs"
    proc = train(tiny_overrides(out, "pulse", **{"run.max_steps": 12, "run.eval_every": 6, "checkpoint.every": 6,
                                                  "optim.lr": 1e-2}))
    run = out / "pulse"
    rows = metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "hfu", "n_layers"):
        assert key in train_rows[0], key
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    assert (run / "checkpoints/step-12/COMPLETE").is_file() and (run / "checkpoints/step-6/COMPLETE").is_file()
    assert (run / "config.yaml").is_file() and (run / "tokenizer").is_dir()
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 1
    assert "finished 12 steps" in proc.stdout
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    for step in (6, 12):  # one console line per eval, and the summary's val loss is the last
        assert sum(line.startswith(f"step {step}: val loss {val[step]:.4f}") for line in proc.stdout.splitlines()) == 1
    assert f"val loss {val[12]:.4f} at step 12" in proc.stdout.splitlines()[-1]


ZERO_EXTRA = {"run.max_steps": 5, "parallel.grad_accum": 2}


@pytest.fixture(scope="module")
def zero0_ref(tmp_path_factory) -> dict[int, float]:
    """The ZeRO-0 two-rank reference's losses, trained once for every stage compared with it."""
    out = tmp_path_factory.mktemp("zero0_ref") / "runs"
    train(tiny_overrides(out, "z0", **ZERO_EXTRA, **{"parallel.zero_stage": 0}), nproc=2)
    return losses(out / "z0")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_zero0_on_two_ranks(tmp_path, stage, zero0_ref):
    out = tmp_path / "runs"
    train(tiny_overrides(out, f"z{stage}", **ZERO_EXTRA, **{"parallel.zero_stage": stage}), nproc=2)
    ref, got = zero0_ref, losses(out / f"z{stage}")
    assert list(ref) == [1, 2, 3, 4, 5]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-5), (s, ref, got)


def test_resume_is_bit_identical_to_uninterrupted(tmp_path):
    out = tmp_path / "runs"
    full = {"run.max_steps": 30, "checkpoint.every": 10}
    train(tiny_overrides(out, "full", **full))
    # Same run name stopped at 20, then the same command (with the longer horizon) resumes.
    part = tiny_overrides(out, "part", **full)
    train([*part, "run.stop_at=20"])
    proc = train(part)
    assert "resumed from" in proc.stdout and "step-20" in proc.stdout
    assert losses(out / "part") == losses(out / "full")
    # config.yaml keeps the first launch's config; the resume's change is recorded beside it.
    assert "stop_at: 20" in (out / "part" / "config.yaml").read_text()
    assert "resuming with changed config (recorded in config_changes.jsonl): run.stop_at 20 -> 0" in proc.stdout
    rows = [json.loads(line) for line in (out / "part" / "config_changes.jsonl").read_text().splitlines()]
    assert [r["changed"] for r in rows] == [{"run.stop_at": {"was": 20, "now": 0}}]
    train([*part, "run.max_steps=31"])  # a second change is appended
    again = train([*part, "run.max_steps=31"])  # the same command after it (a preemption's resume) is not
    assert "resuming with changed config" in again.stdout
    rows = [json.loads(line) for line in (out / "part" / "config_changes.jsonl").read_text().splitlines()]
    assert [r["changed"] for r in rows] == [{"run.stop_at": {"was": 20, "now": 0}},
                                            {"run.max_steps": {"was": 30, "now": 31}, "run.stop_at": {"was": 20, "now": 0}}]


def test_export_round_trip_matches_hf_llama_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer import load_model

    out = tmp_path / "runs"
    train(tiny_overrides(out, "exp", **{"run.max_steps": 3, "model.tie_embeddings": "false"}))
    proc_dir = tmp_path / "hf"
    from trainer.export import main as export_main

    assert export_main([str(out / "exp"), str(proc_dir)]) == 0
    ours = load_model(out / "exp")
    hf = AutoModelForCausalLM.from_pretrained(proc_dir, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)
    assert (proc_dir / "tokenizer.model").is_file()


def test_bf16_path_trains_through_deepspeed_bf16_optimizer(tmp_path):
    """bf16 is the GPU default; on CPU it is slow, so this is a 3-step check that the path
    (DeepSpeed's bf16 optimizer, bf16 attention inputs) runs and the loss stays finite."""
    out = tmp_path / "runs"
    train(tiny_overrides(out, "bf16", **{"run.max_steps": 3, "parallel.precision": "bf16", "parallel.zero_stage": 1}))
    assert all(v == v for v in losses(out / "bf16").values()) and len(losses(out / "bf16")) == 3


def test_restarted_run_keeps_one_wandb_run_id(tmp_path):
    out = tmp_path / "runs"
    over = tiny_overrides(out, "wb", **{"run.max_steps": 4, "checkpoint.every": 2, "logging.wandb_mode": "offline"})
    train([*over, "run.stop_at=2"])
    run_id = (out / "wb/wandb_id").read_text().strip()
    train(over)
    assert (out / "wb/wandb_id").read_text().strip() == run_id
    dirs = sorted(p.name for p in (out / "wb/wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.endswith(run_id) for d in dirs), dirs
