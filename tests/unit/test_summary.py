"""The `--dry-run` planner: its numbers against the model and the config. Its memory
arithmetic against memory measured during a real forward, backward and AdamW step on CPU
takes seconds a case: tests/integration/test_planner_memory.py.
"""
from __future__ import annotations

import dataclasses
import re

import pytest

from model import Transformer
from tests.helpers import ROOT
from trainer.config import load_config
from trainer.metrics import datasheet_peak
from trainer.planner import memory_per_gpu, plan
from trainer.train import main

TINY = ROOT / "configs/tiny.yaml"


def test_plan_counts_match_the_model_and_the_config():
    cfg = load_config(TINY, ["parallel.sp=2", "parallel.micro_batch=3", "parallel.grad_accum=5", "run.max_steps=700",
                             "model.value_residual=learned", "model.mod.capacity=0.5", "model.mod.route_chunks=2"])
    pl = plan(cfg, world_size=8, gpu="A100", mfu=0.5)
    model = Transformer(cfg.model)  # a real CPU model, built independently of the planner's meta one
    assert pl.params == model.num_params() == sum(p.numel() for p in model.parameters())
    assert pl.params_non_embedding == model.num_params(non_embedding=True)
    assert pl.dp == 4 and pl.tokens_per_step == 3 * 5 * 4 * 256
    assert pl.steps == 700 and pl.total_tokens == 700 * 3 * 5 * 4 * 256
    assert pl.tokens_per_param == pytest.approx(pl.total_tokens / model.num_params())
    assert pl.total_flops == pytest.approx(pl.total_tokens * model.flops_per_token(256))
    assert pl.hours * 3600 == pytest.approx(pl.total_flops / (8 * 19.5e12 * 0.5))  # fp32 run: A100's fp32 peak

def test_plan_sums_flops_over_growth_stages_and_states_shard_by_zero_stage():
    cfg = load_config(TINY, ["run.max_steps=100", "growth.stages=[{at_step: 40, layers: 8, method: stack}]",
                             "parallel.precision=bf16", "parallel.zero_stage=2"])
    pl = plan(cfg, world_size=4)
    small, big = (Transformer(dataclasses.replace(cfg.model, n_layers=n)) for n in (4, 8))
    per_step = cfg.parallel.micro_batch * 4 * 256
    assert pl.params == big.num_params() and pl.params_initial == small.num_params()
    assert pl.total_flops == pytest.approx(per_step * (40 * small.flops_per_token(256) + 60 * big.flops_per_token(256)))
    n = big.num_params()
    by_stage = {z: memory_per_gpu(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=z)),
                                  n, 4) for z in range(4)}
    assert [by_stage[z].weights for z in range(4)] == [2 * n, 2 * n, 2 * n, 2 * n / 4]
    assert [by_stage[z].grads for z in range(4)] == [4 * n, 4 * n, n, n]
    assert [by_stage[z].optimizer for z in range(4)] == [12 * n, 3 * n, 3 * n, 3 * n]


def test_bf16_zero1_counts_bf16_optimizers_module_gradients_and_every_plan_the_gpu_context():
    """BF16_Optimizer (bf16 ZeRO-1, fp32 accumulation) keeps every parameter's bf16 `.grad`
    beside its fp32 accumulation buffer; the other layouts do not. The CUDA context and NCCL
    buffers are on the GPU but outside torch's allocator."""
    from trainer.planner import CONTEXT_BYTES

    n = 1000
    mems = {(prec, z): memory_per_gpu(load_config(TINY, [f"parallel.precision={prec}", f"parallel.zero_stage={z}"]),
                                      n, 4) for prec in ("bf16", "fp32") for z in range(4)}
    assert {k: m.bf16_grads for k, m in mems.items()} == {k: 2 * n if k == ("bf16", 1) else 0 for k in mems}
    for m in mems.values():
        assert m.context == CONTEXT_BYTES > 2**30
        assert m.total() == m.allocated() + m.context and m.total(True) == m.allocated(True) + m.context
    z1 = mems[("bf16", 1)]
    assert z1.allocated() - mems[("bf16", 2)].allocated() == z1.grads - mems[("bf16", 2)].grads + 2 * n
    # Offloading the optimizer leaves BF16_Optimizer: DeepSpeed's ZeRO-1 optimizer runs it.
    off = load_config(TINY, ["parallel.precision=bf16", "parallel.zero_stage=1",
                             "parallel.deepspeed.zero_optimization.offload_optimizer.device=cpu"])
    assert memory_per_gpu(off, n, 4).bf16_grads == 0


def test_dry_run_shows_the_bf16_gradients_and_the_context(capsys):
    assert main(["configs/pretrain_1b.yaml", "--dry-run", "--world-size", "16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"grads 4\.18 GiB \+ 2\.09 GiB bf16 \(BF16_Optimizer\)", out)
    assert "CUDA/NCCL context 1.5 GiB" in out


def test_dry_run_prints_the_plan(capsys):
    assert main(["configs/tiny.yaml", "--dry-run", "--world-size", "2", "--gpu", "h100", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    pl = plan(load_config(TINY), world_size=2, gpu="H100", mfu=0.5)
    assert f"{pl.params:,} total" in out and f"{pl.tokens_per_step:,} tokens per step" in out
    assert f"{pl.total_tokens:,} tokens" in out and f"{pl.tokens_per_param:.1f} tokens/parameter" in out
    assert re.search(r"on 2 x H100 at MFU 0.5 \(peak 67 TFLOP/s, H100 SXM fp32 datasheet\)", out)


# --gpu names the planner has always accepted, the name torch reports for that part, its memory.
PLANNER_GPUS = [("H100", "NVIDIA H100 80GB HBM3", 80), ("H100-PCIE", "NVIDIA H100 PCIe", 80),
                ("H100-NVL", "NVIDIA H100 NVL", 94), ("H200", "NVIDIA H200", 141), ("B200", "NVIDIA B200", 180),
                ("A100", "NVIDIA A100-SXM4-80GB", 80), ("A100-40GB", "NVIDIA A100-SXM4-40GB", 40),
                ("H200-NVL", "NVIDIA H200 NVL", 141), ("L40S", "NVIDIA L40S", 48), ("L4", "NVIDIA L4", 24),
                ("A10G", "NVIDIA A10G", 24)]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("gpu,device_name,memory_gib", PLANNER_GPUS, ids=[g[0] for g in PLANNER_GPUS])
def test_planner_divides_by_the_peak_mfu_uses_for_that_gpu(gpu, device_name, memory_gib, precision):
    """One GPU table: the wall-time estimate and MFU in training use the same peak."""
    pl = plan(load_config(TINY, [f"parallel.precision={precision}"]), world_size=2, gpu=gpu, mfu=0.5)
    spec = pl.gpu_spec
    assert (spec.peak_flops, spec.peak_source) == datasheet_peak(device_name, precision)
    assert spec.memory_gib == memory_gib
    assert pl.hours * 3600 == pytest.approx(pl.total_flops / (2 * spec.peak_flops * 0.5))


def test_dry_run_unknown_gpu_is_one_line(capsys):
    assert main(["configs/tiny.yaml", "--dry-run", "--gpu", "V1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "V1000" in err[0] and "H100" in err[0]


def test_every_k_checkpointing_lies_between_none_and_full():
    cfg = load_config(TINY, ["model.n_layers=8"])
    n = Transformer(cfg.model).num_params()
    none, full = memory_per_gpu(cfg, n, 1), memory_per_gpu(cfg, n, 1, "full")
    half = memory_per_gpu(cfg, n, 1, "every_2")
    assert full.activations_ckpt < half.activations_ckpt < none.activations
    # every_2 checkpoints blocks 2, 4, 6, 8; the blocks are alike, so it keeps half of each
    assert half.activations_ckpt == pytest.approx((none.activations + full.activations_ckpt) / 2)
    assert half.recompute == full.recompute > 0
