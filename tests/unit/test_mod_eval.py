"""With Mixture-of-Depths on, the headline `val_loss` is the causal routing rule's (top-k
routing looks at later tokens), `val_loss_topk` sits beside it, and the ablation table and
its deltas use the causal value."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import ablate
from trainer.config import load_config
from trainer.evaluation.evaluator import Evaluator
from trainer.parallel.dist import Dist

TINY = ["model.d_model=32", "model.n_layers=4", "model.n_heads=2", "model.vocab_size=64", "model.max_seq_len=16",
        "data.seq_len=16", "parallel.micro_batch=2", "run.eval_batches=2", "model.init_std=0.3"]


class _ValData:
    eval_sets: dict = {}

    def __init__(self, batches):
        self.batches = batches

    def val_batches(self, n, micro):
        return iter(self.batches[:n])


def _eval_row(capacity: float):
    from model import Routing, Transformer

    cfg = load_config("configs/tiny.yaml", [*TINY, f"model.mod.capacity={capacity}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
               for _ in range(2)]
    dist = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), sp=1)
    evaluator = Evaluator(cfg, dist, _ValData(batches), metrics=None)
    row = evaluator.row(model, type("S", (), {"step": 7, "n_layers": 4})())

    def reference(causal: bool) -> float:  # mean token CE, computed straight from the model
        with torch.no_grad():
            ce = [F.cross_entropy(model(x, None, Routing(causal=causal)).flatten(0, 1), y.flatten(), reduction="sum")
                  for x, y in batches]
        return (sum(ce) / sum(y.numel() for _, y in batches)).item()

    return row, reference


def test_mod_val_loss_is_the_causal_rule_and_topk_is_logged_beside_it():
    row, reference = _eval_row(0.25)
    causal, topk = reference(True), reference(False)
    assert abs(causal - topk) > 1e-4  # the two rules route differently, so the test can tell them apart
    assert row["val_loss"] == pytest.approx(causal, rel=1e-6)
    assert row["val_loss_topk"] == pytest.approx(topk, rel=1e-6)
    assert row["val_ppl"] == pytest.approx(torch.tensor(causal).exp().item(), rel=1e-6)
    assert "val_loss_causal" not in row


def test_dense_eval_row_has_no_topk_figure():
    row, reference = _eval_row(0.0)
    assert row["val_loss"] == pytest.approx(reference(False), rel=1e-6)
    assert "val_loss_topk" not in row


def _write_run(tmp_path, name, evals):
    run_dir = tmp_path / name
    run_dir.mkdir()
    rows = [{"step": 1, "loss": 5.0, "tokens_per_s": 10.0}, {"step": 2, "loss": 4.0, "tokens_per_s": 10.0}, *evals]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"run_name": name, "budget": "iso-token", "steps": 2, "flops_per_token": 1.0, "config": name}


def test_ablation_summaries_use_the_causal_value(tmp_path):
    """The ablation tables and their deltas read each run's `final_val_loss` (ablation_stats.METRIC)."""
    from benchmarks import ablation_stats

    mod = ablate.summarise(_write_run(tmp_path, "mod", [{"step": 1, "val_loss": 3.9, "val_loss_topk": 3.1},
                                                        {"step": 2, "val_loss": 3.5, "val_loss_topk": 3.0}]),
                           tmp_path, 8)
    # Rows written before val_loss became causal (val_loss = top-k, val_loss_causal beside it) read the same way.
    old = ablate.summarise(_write_run(tmp_path, "old_mod", [{"step": 2, "val_loss": 3.0, "val_loss_causal": 3.5,
                                                            "mod_rule": "topk"}]), tmp_path, 8)
    dense = ablate.summarise(_write_run(tmp_path, "pre_ln", [{"step": 2, "val_loss": 4.0}]), tmp_path, 8)
    assert ablation_stats.METRIC == "final_val_loss"
    assert (mod["final_val_loss"], mod["final_val_loss_topk"], mod["best_val_loss"]) == (3.5, 3.0, 3.5)
    assert [p["val_loss"] for p in mod["curve"]] == [3.9, 3.5]
    assert (old["final_val_loss"], old["final_val_loss_topk"]) == (3.5, 3.0)
    assert dense["final_val_loss"] == 4.0 and "final_val_loss_topk" not in dense
