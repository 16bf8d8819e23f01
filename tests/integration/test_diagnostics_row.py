"""A whole diagnostics row on one process (in-process, but seconds a case): the
skip-last-quarter loss equals the full loss exactly when the last blocks are no-ops, the row
is computed on the device with one fetch, and compiled blocks give the eager row without
recompiling (the maths: tests/unit/test_diagnostics_math.py)."""
from __future__ import annotations

import pytest
import torch

from trainer.evaluation import diagnostics


def _series(row: dict, name: str) -> list[float]:
    """diag/<name>/l<l> by layer, from l0 when present."""
    layers = sorted(int(k.rsplit("/l", 1)[1]) for k in row if k.startswith(f"diag/{name}/l"))
    return [row[f"diag/{name}/l{layer}"] for layer in layers]


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


@pytest.mark.parametrize("no_op_tail", [True, False])
def test_skip_last_quarter_loss_equals_full_loss_exactly_when_the_last_blocks_are_no_ops(no_op_tail):
    """diag/loss_skip_last_quarter skips blocks 7..8 of 8; with their residual increments zeroed
    (pre-LN: o_proj and down_proj = 0) those blocks are the identity, so both losses agree."""
    from types import SimpleNamespace

    from model import Transformer

    cfg = _cfg(8)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    if no_op_tail:
        for block in model.blocks[6:]:
            torch.nn.init.zeros_(block.attn.o_proj.weight)
            torch.nn.init.zeros_(block.mlp.down_proj.weight)
    ids = torch.randint(0, 64, (2, 17))
    row = diagnostics.depth_diagnostics(SimpleNamespace(module=model), _ValOnly(ids[:, :-1], ids[:, 1:]),
                                        _one_process_dist(), cfg, step=1)
    expect = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()
    assert row["diag/loss"] == pytest.approx(expect, rel=1e-6)
    if no_op_tail:
        assert row["diag/loss_skip_last_quarter"] == pytest.approx(row["diag/loss"], rel=1e-6)
    else:
        assert abs(row["diag/loss_skip_last_quarter"] - row["diag/loss"]) > 1e-4
    assert len(model.blocks) == 8  # the model is restored


class _HostFetches(torch.overrides.TorchFunctionMode):
    """Records every explicit copy of a tensor to the host (`.cpu()`, `.tolist()`, `.numpy()`)
    with the number of elements copied."""

    FETCHES = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FETCHES:
            self.numels.append(args[0].numel())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_layers", [2, 8])
def test_diagnostics_compute_on_the_device_and_fetch_only_the_row(n_layers):
    """Per-layer sums and gradient norms stay on the compute device; the host gets the row in
    a fixed number of small copies, whatever the depth (not every gradient, as at 1B's 4.4 GB)."""
    from types import SimpleNamespace

    from model import Transformer

    cfg = _cfg(n_layers)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    smallest_block = min(sum(p.numel() for p in block.parameters()) for block in model.blocks)
    ids = torch.randint(0, 64, (2, 17))
    with _HostFetches() as fetches:
        row = diagnostics.depth_diagnostics(SimpleNamespace(module=model), _ValOnly(ids[:, :-1], ids[:, 1:]),
                                            _one_process_dist(), cfg, step=1)
    assert len(_series(row, "grad_norm")) == n_layers and len(_series(row, "resid_rms")) == n_layers + 1
    assert len(fetches.numels) <= 3, fetches.numels  # the sums, the block norms, the λ's
    assert max(fetches.numels) < 20 * n_layers < smallest_block, (fetches.numels, smallest_block)


def test_compiled_blocks_give_the_eager_row_without_recompiling():
    """Diagnostics run compiled blocks eagerly: the hooks fire (dynamo skips hooks added to a
    compiled module), the row equals the uncompiled model's, and training's compiled graphs
    are reused afterwards instead of recompiled for the swapped attention cores."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from model import Transformer

    cfg = _cfg(2)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ids = torch.randint(0, 64, (2, 17))
    batch = _ValOnly(ids[:, :-1], ids[:, 1:])
    eager = diagnostics.depth_diagnostics(SimpleNamespace(module=model), batch, _one_process_dist(), cfg, step=1)
    torch._dynamo.reset()
    try:
        for block in model.blocks:
            block.compile(backend="eager")  # dynamo's tracing and guards, without inductor's compile time
        model(ids[:, :-1]).sum().backward()
        frames = counters["stats"]["unique_graphs"]
        assert frames > 0
        compiled = diagnostics.depth_diagnostics(SimpleNamespace(module=model), batch, _one_process_dist(), cfg,
                                                 step=1)
        model(ids[:, :-1]).sum().backward()
        assert counters["stats"]["unique_graphs"] == frames  # nothing was traced again
        assert all(block._compiled_call_impl is not None for block in model.blocks)  # still compiled
    finally:
        torch._dynamo.reset()
    assert compiled.keys() == eager.keys()
    for key, value in eager.items():
        assert compiled[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
