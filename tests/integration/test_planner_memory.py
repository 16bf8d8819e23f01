"""The `--dry-run` planner's memory arithmetic against memory measured during a real forward,
backward and AdamW step on CPU (its other numbers: tests/unit/test_summary.py). In-process,
but a few seconds a case, so not in the unit tier.

Measurement: torch's `MemTracker` (torch.distributed._tools.mem_tracker), a dispatch mode
that records every tensor storage allocated or freed (parameters, gradients, optimizer
state, activations, temporaries) and keeps the peak of their sum. It counts tensor bytes
exactly, unlike RSS, which glibc's allocator caching and the interpreter blur. The step
runs after a first step, with gradients kept between steps (zero_grad(set_to_none=False)),
as DeepSpeed keeps its gradient buffers, so the peak holds weights, gradients, AdamW state
and the activations together, which is what the planner adds up.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import Routing, Transformer
from tests.helpers import ROOT
from trainer.config import load_config
from trainer.parallel.engine import apply_activation_checkpointing
from trainer.parallel.optim import SkipNonFiniteAdamW, param_groups
from trainer.planner import memory_per_gpu

TINY = ROOT / "configs/tiny.yaml"


def _measured_peak(cfg) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = Transformer(cfg.model)
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)  # the trainer's own wrapping
    opt = SkipNonFiniteAdamW(param_groups(model, 0.1), lr=1e-3)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.parallel.micro_batch, cfg.data.seq_len))

    def step():
        routing = Routing()
        logits = model(x, None, routing)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="sum")
        del logits
        ((ce + 0.01 * routing.aux_loss()) / x.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()
    tracker = MemTracker()
    tracker.track_external(model, opt, x)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


LONG_AND_DEEP = ["model.n_layers=6", "data.seq_len=512", "model.max_seq_len=512", "parallel.micro_batch=2"]


@pytest.mark.parametrize("overrides", [
    [],  # activations dominate: 2048 tokens through a 64-wide model
    ["model.norm=peri", "model.value_residual=learned", "model.d_model=128"],
    ["model.norm=post", "model.value_residual=shared", "model.n_layers=4"],
    ["model.norm_type=layernorm", "model.embed_norm=true"],
    ["model.mod.capacity=0.25", "model.mod.route_chunks=4", "model.n_layers=4"],
    [*LONG_AND_DEEP, "parallel.activation_checkpointing=full"],
    [*LONG_AND_DEEP, "parallel.activation_checkpointing=every_2"],
    ["model.d_model=256", "data.seq_len=32", "model.max_seq_len=32", "parallel.micro_batch=2",
     "model.vocab_size=4096"],  # weights, gradients and AdamW state dominate
])
def test_memory_estimate_within_25_percent_of_measured_peak(overrides):
    cfg = load_config(TINY, ["model.d_model=64", "model.n_layers=2", "model.vocab_size=512", "data.seq_len=256",
                             "parallel.micro_batch=8", *overrides])
    n = Transformer(cfg.model).num_params()
    mode = cfg.parallel.activation_checkpointing
    predicted = memory_per_gpu(cfg, n, world=1, checkpointing=mode if mode != "none" else "full").allocated(mode != "none")
    measured = _measured_peak(cfg)
    assert abs(predicted - measured) <= 0.25 * measured, (predicted / 2**20, measured / 2**20)


def test_bf16_activation_estimate_within_25_percent_of_measured():
    """bf16 activations (norms keep fp32 copies, the loss runs in fp32): the model in bf16,
    activations and backward temporaries at the peak against the planner's activations + logits."""
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg = load_config(TINY, ["model.d_model=64", "model.n_layers=2", "model.vocab_size=512", "data.seq_len=256",
                             "parallel.micro_batch=8", "parallel.precision=bf16", "model.norm=peri",
                             "model.value_residual=learned"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(torch.bfloat16)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.parallel.micro_batch, cfg.data.seq_len))
    tracker = MemTracker()
    tracker.track_external(model, x)
    with tracker:
        F.cross_entropy(model(x).flatten(0, 1).float(), x.flatten()).backward()
    peak = {str(getattr(k, "value", k)): v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    measured = peak["Activation"] + peak["Temp"]
    mem = memory_per_gpu(cfg, model.num_params(), world=1)
    predicted = mem.activations + mem.logits
    assert abs(predicted - measured) <= 0.25 * measured, (predicted / 2**20, measured / 2**20)
