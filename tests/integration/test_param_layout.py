"""Parameters keep 16-byte alignment inside DeepSpeed's flat bf16 buffers.

torch.compile compiles one graph for every block of a kind and treats parameters as static
inputs, aligned as block 0's were when it compiled, without checking later blocks'. A
parameter that DeepSpeed's flat buffer shifted off 16 bytes then crashes a compiled CUDA
kernel ("misaligned address": the 1B recipe on the H200, benchmarks/results/gpu_check.json).
CPU kernels do not care, so the layout itself is what is pinned here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, _env
from trainer.parallel.optim import ALIGN_ELEMENTS, param_groups

# Builds the 1B recipe's options (Peri-LN, learned value residual) at a tiny width on a
# 1-process bf16 engine and reports every parameter's offset from 16 bytes.
WORKER = """
import json, sys
from benchmarks.common import run_config
from trainer.parallel.dist import init_distributed
from trainer.parallel.engine import build_engine, build_model
cfg = run_config({"model.norm": "peri", "model.embed_norm": "true", "model.value_residual": "learned",
                  "model.n_layers": 4, "parallel.precision": "bf16", "parallel.zero_stage": int(sys.argv[1])})
engine = build_engine(cfg, init_distributed(), build_model(cfg, 4))
print(json.dumps({n: [p.numel(), p.data_ptr() % 16] for n, p in engine.module.named_parameters()}))
"""


@pytest.mark.parametrize("stage", [1, 2])
def test_every_whole_16_byte_parameter_is_16_byte_aligned_in_the_bf16_engine(stage):
    proc = subprocess.run([sys.executable, "-c", WORKER, str(stage)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layout = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(layout) > 20
    shifted = {n: off for n, (numel, off) in layout.items() if numel % ALIGN_ELEMENTS == 0 and off}
    assert not shifted, shifted


def test_param_groups_put_odd_sized_parameters_last_and_keep_model_order_otherwise():
    model = torch.nn.ModuleDict({"a": torch.nn.LayerNorm(16), "lam": torch.nn.ParameterList([torch.ones(2)]),
                                 "b": torch.nn.Linear(16, 16, bias=True), "c": torch.nn.LayerNorm(8)})
    groups = param_groups(model, 0.1)
    other = [p.numel() for p in groups[1]["params"]]
    assert other == [16, 16, 16, 8, 8, 2]  # a.weight, a.bias, b.bias, c.weight, c.bias, then the λ
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([16, 16])]


def test_a_checkpoint_in_the_old_parameter_order_is_read_by_name_or_refused_in_one_line(tmp_path):
    """Checkpoints written before odd-sized parameters moved last record no order: with a
    value-residual model their flat optimizer layout differs from today's, so ZeRO 1-3 read
    them through the universal checkpoint (by name) and ZeRO-0 (by position) refuses."""
    from benchmarks.common import run_config
    from model import Transformer
    from trainer.checkpoint.universal import needs_universal as _needs_universal
    from trainer.errors import CheckpointError
    from trainer.parallel.optim import param_order

    cfg = run_config({"model.value_residual": "learned", "model.n_layers": 3})
    model = Transformer(cfg.model)
    old, new = param_order(model, legacy=True), param_order(model)
    assert old != new
    plain = Transformer(run_config({"model.n_layers": 3}).model)
    assert param_order(plain, legacy=True) == param_order(plain)  # no odd-sized parameter: nothing moved

    now = {"world_size": 1, "dp": 1, "sp": 1, "param_order": new}
    assert _needs_universal(tmp_path, {**now, "zero_stage": 1, "param_order": old}, {**now, "zero_stage": 1})
    assert not _needs_universal(tmp_path, {**now, "zero_stage": 1}, {**now, "zero_stage": 1})
    with pytest.raises(CheckpointError, match="another order"):
        _needs_universal(tmp_path, {**now, "zero_stage": 0, "param_order": old}, {**now, "zero_stage": 0})
