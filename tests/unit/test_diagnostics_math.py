"""Diagnostics maths in-process: attention entropy and the angle against closed forms and an
explicit softmax, and per-block gradient norms against the blocks' gradients (a whole row on
one process: tests/integration/test_diagnostics_row.py; rows from real runs:
tests/integration/test_diagnostics.py)."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.evaluation import diagnostics
from trainer.evaluation.diagnostics import angle_between, attention_entropy_sum


def _explicit_entropy(q, k):
    """Mean causal attention entropy with GQA by repeating kv heads, one head at a time."""
    B, T, H, Dh = q.shape
    group = H // k.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    ents = []
    for h in range(H):
        s = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / math.sqrt(Dh)
        p = s.masked_fill(~mask, float("-inf")).softmax(-1)
        ents.append(-(p * p.clamp(min=1e-30).log()).sum(-1))
    return torch.stack(ents).mean().item()


def test_attention_entropy_of_equal_scores_is_log_of_visible_keys():
    q, k = torch.zeros(2, 8, 4, 16), torch.randn(2, 8, 2, 16)
    total, count = attention_entropy_sum(q, k, q_offset=0)
    assert count == 2 * 4 * 8
    assert total.item() / count == pytest.approx(sum(math.log(i + 1) for i in range(8)) / 8, rel=1e-6)


def test_attention_entropy_matches_explicit_softmax_with_gqa_and_sequence_slices(monkeypatch):
    torch.manual_seed(0)
    q, k = 2 * torch.randn(3, 10, 6, 8), 2 * torch.randn(3, 10, 2, 8)
    total, count = attention_entropy_sum(q, k, q_offset=0)
    assert total.item() / count == pytest.approx(_explicit_entropy(q, k), rel=1e-5)
    monkeypatch.setattr(diagnostics, "SCORE_ELEMENTS", 6 * 10 * 3)  # queries in chunks of 3
    assert attention_entropy_sum(q, k, q_offset=0)[0].item() == pytest.approx(total.item(), rel=1e-6)
    # Ulysses: each rank scores its own query slice against all keys; the sums add up.
    halves = [attention_entropy_sum(q[:, lo:lo + 5], k, q_offset=lo) for lo in (0, 5)]
    assert sum(t for t, _ in halves).item() == pytest.approx(total.item(), rel=1e-6)
    assert sum(c for _, c in halves) == count


@pytest.mark.parametrize("angle", [1e-7, 1e-3, math.pi / 2, 3.0])
def test_angle_between_is_accurate_down_to_tiny_angles(angle):
    x = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[math.cos(angle), math.sin(angle), 0.0]], dtype=torch.float64) * 5
    assert angle_between(x, y).item() == pytest.approx(angle, rel=1e-9)


class _ValOnly:
    """The one data method diagnostics uses: a fixed validation batch."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def val_batches(self, n_batches, micro_batch):
        yield self.x, self.y


def _one_process_dist():
    from trainer.parallel.dist import Dist

    return Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), sp=1)


def _cfg(n_layers: int):
    from trainer.config import load_config

    return load_config("configs/tiny.yaml", ["model.d_model=32", f"model.n_layers={n_layers}", "model.n_heads=2",
                                             "model.vocab_size=64", "model.max_seq_len=16", "data.seq_len=16",
                                             "parallel.micro_batch=2"])


def test_block_grad_norms_equal_the_norm_of_the_blocks_gradients():
    from types import SimpleNamespace

    from model import Transformer

    cfg = _cfg(3)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ids = torch.randint(0, 64, (2, 17))
    row = diagnostics.depth_diagnostics(SimpleNamespace(module=model), _ValOnly(ids[:, :-1], ids[:, 1:]),
                                        _one_process_dist(), cfg, step=1)
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for layer, block in enumerate(model.blocks, start=1):
        expect = torch.cat([p.grad.flatten() for p in block.parameters() if p.grad is not None]).norm().item()
        assert row[f"diag/grad_norm/l{layer}"] == pytest.approx(expect, rel=1e-5), layer
