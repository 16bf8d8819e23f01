"""bf16 keeps fp32 where it matters: the first loss agrees with fp32 within bf16 rounding,
and `load_model`/export return the fp32 masters, not the bf16 module copy.

One tiny run per layout (2 steps, checkpoint at step 2; bf16 matmuls are slow on CPU),
shared by the tests below: fp32 ZeRO-0 as the reference, bf16 ZeRO-0 (autocast over fp32
parameters), bf16 ZeRO-1 (DeepSpeed's BF16_Optimizer) and bf16 ZeRO-2 (ZeRO optimizer with
fp32 gradient accumulation).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import losses, tiny_overrides, train

pytestmark = pytest.mark.slow

LAYOUTS = {"fp32-z0": ("fp32", 0), "bf16-z0": ("bf16", 0), "bf16-z1": ("bf16", 1), "bf16-z2": ("bf16", 2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bf16") / "runs"
    for name, (precision, stage) in LAYOUTS.items():
        train(tiny_overrides(out, name, **{"run.max_steps": 2, "checkpoint.every": 2, "model.d_model": 32,
                                           "parallel.precision": precision, "parallel.zero_stage": stage}))
    return {name: out / name for name in LAYOUTS}


@pytest.mark.parametrize("layout", ["bf16-z0", "bf16-z1", "bf16-z2"])
def test_bf16_first_step_loss_is_fp32_loss_within_bf16_rounding(runs, layout):
    ref, got = losses(runs["fp32-z0"])[1], losses(runs[layout])[1]
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2%); a loss summed over many
    # rounded logits stays well inside 1%, while a wrong scale or dtype is far outside it.
    assert got == pytest.approx(ref, rel=1e-2)
    assert got != ref  # the run really computed in bf16


def _flat_fp32_partition_reference(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The fp32 masters as DeepSpeed stores them on one rank at ZeRO-1/2: per parameter
    group, one flat fp32 tensor holding the group's parameters back to back in the order of
    the model file's `param_shapes` (alignment padding only at the end). Also returns the
    model file's bf16 module copy."""
    model_file = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    optim = torch.load(next(ckpt.glob("*optim_states.pt")), map_location="cpu", weights_only=False)
    flats = optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    out = {}
    for flat, shapes in zip(flats, model_file["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            out[name] = flat[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
    return out, model_file["module"]


@pytest.mark.parametrize("layout", ["bf16-z1", "bf16-z2"])
def test_load_model_and_export_return_the_fp32_masters_not_the_bf16_copy(runs, layout, tmp_path):
    from safetensors.torch import load_file

    from trainer.export import export, is_llama_compatible, to_llama_state_dict
    from trainer.export.load import load_model

    ckpt = runs[layout] / "checkpoints" / "step-2"
    masters, bf16_module = _flat_fp32_partition_reference(ckpt)
    model = load_model(runs[layout])
    got = dict(model.named_parameters())
    assert set(got) == set(masters)
    for name, p in got.items():
        assert p.dtype == torch.float32
        assert torch.equal(p.detach(), masters[name]), name
        assert torch.equal(p.detach().bfloat16(), bf16_module[name]), name  # the module file holds the rounding
    assert any(not torch.equal(p.detach(), p.detach().bfloat16().float()) for p in got.values())

    exported = load_file(export(runs[layout], tmp_path / "hf") / "model.safetensors")
    state = {k: v.detach() for k, v in got.items()}
    expected = to_llama_state_dict(state) if is_llama_compatible(model.cfg) else state
    assert set(exported) == set(expected)
    for name, t in expected.items():
        assert torch.equal(exported[name], t), name


def test_bf16_zero0_checkpoint_holds_fp32_parameters_that_load_model_returns(runs):
    """At ZeRO-0, bf16 runs under autocast: the parameters themselves are the fp32 masters."""
    from trainer.export.load import load_model

    module = torch.load(runs["bf16-z0"] / "checkpoints/step-2/mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=True)["module"]
    model = load_model(runs["bf16-z0"])
    for name, p in model.named_parameters():
        assert module[name].dtype == torch.float32 and torch.equal(p.detach(), module[name]), name
    assert any(not torch.equal(p.detach(), p.detach().bfloat16().float()) for p in model.parameters())
