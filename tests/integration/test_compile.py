"""torch.compile of the blocks: one graph per block (`fullgraph=True`) wherever the layout
allows it, so a graph break is an error instead of a silent slowdown. In-process, but each
case waits on inductor's code generation (seconds), so it sits outside the unit tier."""
from __future__ import annotations

import pytest
import torch

from model import Routing
from trainer.config import load_config
from trainer.parallel.engine import build_model

TINY = ["model.d_model=32", "model.n_layers=3", "model.n_heads=2", "model.vocab_size=64", "model.max_seq_len=16",
        "data.seq_len=16", "parallel.compile=true"]


@pytest.fixture
def compiled_with(monkeypatch):
    """Records what each block was compiled with, and compiles with dynamo's tracing and
    guards only (backend="eager"): graph breaks are dynamo's, not inductor's, business."""
    calls = []
    real = torch.nn.Module.compile

    def compile(module, **kwargs):
        calls.append(kwargs)
        real(module, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


@pytest.mark.parametrize("extra", [[], ["model.mod.capacity=0.5", "model.value_residual=learned"],
                                   ["parallel.activation_checkpointing=every_1"]],
                         ids=["dense", "mod+learned-vr", "checkpointed"])
def test_blocks_compile_to_one_graph_each_in_training_and_both_eval_rules(compiled_with, extra):
    cfg = load_config("configs/tiny.yaml", [*TINY, *extra])
    model = build_model(cfg, cfg.model.n_layers)
    assert compiled_with == [{"fullgraph": True}] * 3
    ids = torch.randint(0, 64, (2, 16))
    model(ids, None, Routing()).sum().backward()  # a graph break would raise under fullgraph
    with torch.no_grad():
        model.eval()
        for causal in (False, True):
            model(ids, None, Routing(causal=causal))


def test_ulysses_blocks_compile_with_graph_breaks_allowed(compiled_with):
    """The MoD eval key mask's all-gather runs eager under SP (trainer.parallel.ulysses.gather_sequence)."""
    cfg = load_config("configs/tiny.yaml", [*TINY, "parallel.sp=2"])
    build_model(cfg, cfg.model.n_layers)
    assert compiled_with == [{"fullgraph": False}] * 3


def test_routed_blocks_share_their_graphs_at_any_depth_and_keep_the_eager_aux_loss(compiled_with):
    """Dynamo specialises on what a block reads. A routed block that appended its aux loss to
    the caller's list compiled once per routed block before it (the list's length): at 8 layers
    (4 routed blocks) training and both eval rules passed the recompile limit (8), an error under
    fullgraph. It returns the loss instead (model.mod.Routing)."""
    from torch._dynamo.utils import counters

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    graphs, aux = {}, {}
    for n_layers in (4, 8):  # routed blocks 2, 4 and 2, 4, 6, 8
        over = [*TINY, f"model.n_layers={n_layers}", "model.mod.capacity=0.5"]
        torch.manual_seed(0)
        eager = build_model(load_config("configs/tiny.yaml", [*over, "parallel.compile=false"]), n_layers)
        torch.manual_seed(0)
        model = build_model(load_config("configs/tiny.yaml", over), n_layers)
        torch._dynamo.reset()
        counters.clear()
        for m in (eager, model):
            routing = Routing()
            m(ids, None, routing).sum().backward()
            aux[n_layers, m is model] = routing.aux_loss()
            with torch.no_grad():
                for causal in (False, True):
                    m(ids, None, Routing(causal=causal))
        graphs[n_layers] = counters["stats"]["unique_graphs"]
        assert torch.equal(aux[n_layers, True], aux[n_layers, False]) and aux[n_layers, True] > 0
    assert graphs[4] == graphs[8] > 0, graphs
