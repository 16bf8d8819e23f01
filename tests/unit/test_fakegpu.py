"""The fakegpu tier (`make test-fakegpu`, marker `fakegpu`): the step's loss arithmetic, eval,
the metrics reduction, the skip-step check, the collectives' device path and MoD stats, run
against a compute device that is not the CPU, so that a CPU tensor meeting a device tensor
fails here as it would on CUDA (a CUDA op takes a CPU operand only when it is 0-dim).

The device is `meta`, which applies that rule ("Tensor on device cpu is not on the expected
device meta"). torch's FakeTensorMode with a `cuda` device was tried first: on a CPU-only
torch build its indexing and attention paths abort in C++ ("not linked with support for cuda
devices"). Meta tensors hold no values, so reading one (the syncs the step is allowed) gives 1
through `_ReadsAsOne`, and the tests check devices and that the code runs, not numbers."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.checkpoint.state import TrainState
from trainer.config import load_config
from trainer.metrics import RowBuilder, Throughput
from trainer.parallel.dist import Dist
from trainer.parallel.layout import BatchLayout
from trainer.parallel.optim import SkipNonFiniteAdamW
from trainer.step import evaluate, train_step

pytestmark = pytest.mark.fakegpu

DEVICE = torch.device("meta")
TINY = ["model.d_model=32", "model.n_layers=3", "model.n_heads=2", "model.vocab_size=64", "model.max_seq_len=16",
        "data.seq_len=16", "parallel.micro_batch=2", "parallel.grad_accum=2", "run.eval_batches=3",
        "logging.every=2", "run.max_steps=10"]


class _ReadsAsOne(TorchDispatchMode):
    """A meta tensor has no value to read: `.item()`, `float()` and `bool()` give 1. So every
    skip decision says skip (torch's own AdamW update never runs on meta), and the flags the
    tests check are the Python values that the code passes on."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


class _MetaDist(Dist):
    """Two ranks (this one is rank 0) on the meta device, whose collectives run Dist's real
    device path; the reduction itself is a no-op (tdist.all_reduce is patched out)."""

    @property
    def _active(self) -> bool:
        return True


class _Engine:
    """The surface of DeepSpeed's engine that train_step and evaluate use, ZeRO-0 style, over
    a module on the meta device (DeepSpeed itself cannot take meta parameters)."""

    grad_scale = 1.0

    def __init__(self, module: torch.nn.Module, grad_accum: int, dist: Dist):
        self.module, self.grad_accum, self.micro = module, grad_accum, 0
        self.optimizer = SkipNonFiniteAdamW(module.parameters(), lr=1e-3, dist=dist)

    def __call__(self, *args):
        return self.module(*args)

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def backward(self, loss):
        loss.backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.micro == self.grad_accum - 1

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.micro = (self.micro + 1) % self.grad_accum

    def get_global_grad_norm(self):
        return None

    def zero_optimization(self) -> bool:
        return False

    def bfloat16_enabled(self) -> bool:
        return False


class _Data:
    """Host-side batches, as the loader returns them: CPU LongTensors [B, T]."""

    eval_sets: dict = {}

    @staticmethod
    def _batch(rows):
        return torch.randint(0, 64, (rows, 16)), torch.randint(0, 64, (rows, 16))

    def train_batch(self, step, micro, layout):
        return self._batch(layout.micro_batch)

    def val_batches(self, n, micro):
        return iter([self._batch(micro) for _ in range(n)])

    def log_fields(self, samples):
        return {}


@pytest.fixture
def meta(monkeypatch):
    monkeypatch.setattr(tdist, "all_reduce", lambda t, op=None, group=None: None)
    dist = _MetaDist(rank=0, world=2, local_rank=0, device=DEVICE, sp=1)
    with _ReadsAsOne():
        yield dist


def _engine(dist: Dist, *extra: str):
    from model import Transformer

    cfg = load_config("configs/tiny.yaml", [*TINY, *extra])
    model = Transformer(cfg.model).to(DEVICE)
    return cfg, _Engine(model, cfg.parallel.grad_accum, dist)


@pytest.mark.parametrize("mod", ["0", "0.5"], ids=["dense", "mod"])
def test_train_step_keeps_loss_norm_and_skip_check_on_the_device(meta, mod):
    cfg, engine = _engine(meta, f"model.mod.capacity={mod}")
    result = train_step(engine, _Data(), meta, cfg, BatchLayout.build(cfg, meta), step=0)
    assert result._loss.device == DEVICE and result._grad_norm.device == DEVICE
    assert result.skipped is True and engine.optimizer.loss_flag is None
    assert (result.loss, result.grad_norm) == (1.0, 1.0)


@pytest.mark.parametrize("mod", ["0", "0.5"], ids=["dense", "mod"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_evaluate_sums_and_counts_on_the_device(meta, mod, ranks):
    """Alone, no collective moves the sums: a CPU count meets the device total in the division
    (the first-eval crash of issue 23). With 2 ranks the sums also travel through Dist."""
    dist = meta if ranks == 2 else Dist(rank=0, world=1, local_rank=0, device=DEVICE, sp=1)
    cfg, engine = _engine(dist, f"model.mod.capacity={mod}")
    assert evaluate(engine, _Data(), dist, cfg, causal=mod != "0") == 1.0


def test_metrics_rows_reduce_on_the_device(meta, monkeypatch):
    import trainer.metrics

    monkeypatch.setattr(trainer.metrics, "peak_memory_gb", lambda device: 1.5)
    cfg, engine = _engine(meta)
    layout = BatchLayout.build(cfg, meta)
    result = train_step(engine, _Data(), meta, cfg, layout, step=0)
    metrics = RowBuilder(cfg, Throughput(cfg, meta, layout, peak_flops=1e12), _Data())
    state = TrainState(n_layers=3)
    state.advance(False, layout)
    result.skipped = False  # meta reads say "skip"; the row of a finished step is what is under test
    metrics.log_train(state, result, 0.1, engine.module, cfg.optim.lr)
    assert metrics.last["loss"] == metrics.last["mem_gb"] == 1.0  # both read back from the device
    metrics.log_skipped(state, result, limit=3)


def test_skip_decision_and_stop_flag_meet_on_the_device(meta):
    cfg, engine = _engine(meta)
    for p in engine.module.parameters():
        p.grad = torch.zeros_like(p)
    engine.optimizer.loss_flag = ~torch.zeros(1, device=DEVICE).isfinite()
    engine.optimizer.step()
    assert engine.optimizer.skipped_last_step is True
    assert meta.any(False) is True  # a bool, from a flag filled on the device (reads give 1)


def test_mod_stats_are_collected_on_the_device(meta):
    from model import Routing

    cfg, engine = _engine(meta, "model.mod.capacity=0.5")
    for causal in (False, True):
        routing = Routing(causal=causal, collect_stats=True)
        engine.module(torch.randint(0, 64, (2, 16)).to(DEVICE), torch.arange(16, device=DEVICE), routing)
        assert routing.stats and all(isinstance(v, float) for v in routing.stats.values())
