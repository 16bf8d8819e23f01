"""The 1B recipes are what they claim: a Chinchilla-budget 2k base, a 16k stage that can
start from the base's weights, and a half-depth-first growth run of the same model."""
from __future__ import annotations

import dataclasses

import pytest

from tests.helpers import ROOT, load_shipped_config
from trainer.checkpoint.init_from import model_diff
from trainer.config import ConfigError, load_config
from trainer.parallel.engine import deepspeed_config
from trainer.planner import plan
from trainer.train import main

WORLD = 16  # slurm/pretrain_1b.sh: 2 nodes x 8 GPUs
BASE, LONG, GROW = (load_config(ROOT / f"configs/{n}.yaml") for n in ("pretrain_1b", "pretrain_1b_16k", "pretrain_1b_grow"))


def test_base_recipe_is_a_chinchilla_budget_at_2k_context_on_80gb_gpus():
    pl = plan(BASE, WORLD, "H100")
    assert BASE.data.seq_len in (2048, 4096) and BASE.parallel.sp == 1
    assert 1e6 <= pl.tokens_per_step <= 4e6
    assert pl.tokens_per_param >= 20 and 1.0e9 <= pl.params <= 1.2e9
    assert BASE.schedule.kind in ("cosine", "wsd") and 0 < BASE.schedule.warmup_steps < BASE.run.max_steps // 5
    assert BASE.parallel.zero_stage in (1, 2) and BASE.parallel.precision == "bf16"
    assert BASE.data.source.startswith("hf:") and 0 < pl.data_passes <= 1  # never a second epoch
    assert pl.data_passes == BASE.run.max_steps * pl.tokens_per_step / (BASE.data.max_tokens * (1 - BASE.data.val_fraction))
    assert BASE.data.prepare == "offline"  # the GPU job only opens prepared shards
    assert pl.memory.total() * 1.2 < 80 * 2**30  # fits an 80 GB card with a 20% margin, no checkpointing


def test_long_context_stage_loads_the_base_weights_with_ulysses_and_a_larger_theta():
    assert LONG.data.seq_len == LONG.model.max_seq_len == 16384 and LONG.parallel.sp > 1
    assert LONG.model.rope_theta > BASE.model.rope_theta
    assert LONG.run.init_from == str(BASE.run_dir)
    assert model_diff(dataclasses.asdict(BASE.model), dataclasses.asdict(LONG.model)) == []
    # Same data keys apart from seq_len: the base's prepared shards and tokenizer are reused.
    assert dataclasses.replace(LONG.data, seq_len=BASE.data.seq_len) == BASE.data
    assert plan(LONG, WORLD).memory.total() * 1.2 < 80 * 2**30


def test_growth_recipe_trains_half_depth_first_to_the_base_model():
    assert GROW.model.n_layers * 2 == BASE.model.n_layers == GROW.final_layers
    grown = dataclasses.replace(GROW.model, n_layers=GROW.final_layers)
    assert model_diff(dataclasses.asdict(BASE.model), dataclasses.asdict(grown)) == []
    g, b = plan(GROW, WORLD), plan(BASE, WORLD)
    assert g.params == b.params and g.total_tokens == b.total_tokens and g.total_flops < b.total_flops


# Every run config shipped in configs/ (accelerate/ holds launcher configs, not runs).
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(ROOT / "configs").as_posix() for p in SHIPPED])
def test_every_shipped_recipe_accumulates_and_reduces_gradients_in_fp32(path):
    """Read from the DeepSpeed config the engine is built with, not from our keys: bf16 runs
    accumulate micro-batch gradients in fp32 (ZeRO-0: autocast over fp32 parameters) and
    reduce them across ranks in fp32, Ulysses included."""
    cfg = load_shipped_config(path)
    ds = deepspeed_config(cfg)
    if not ds["bf16"]["enabled"] and "torch_autocast" not in ds:
        assert cfg.parallel.precision == "fp32"  # fp32 parameters, gradients and collectives
        return
    if ds["bf16"]["enabled"]:
        accumulates_fp32 = ds.get("data_types", {}).get("grad_accum_dtype") == "fp32"
        assert accumulates_fp32 or ds["gradient_accumulation_steps"] == 1, path
    else:
        assert ds["torch_autocast"]["enabled"] and ds["zero_optimization"]["stage"] == 0
    assert ds["communication_data_type"] == "fp32"
    assert ds["seq_parallel_communication_data_type"] == "fp32"  # what the engine uses when sp > 1


def test_bf16_zero1_with_ulysses_and_accumulation_is_refused_by_the_planner(capsys):
    """DeepSpeed's ZeRO-1 sums micro-batch gradients in bf16 there; one line says what to use."""
    over = ["parallel.zero_stage=1", "parallel.grad_accum=4"]
    with pytest.raises(ConfigError, match=r"zero_stage=1 .*sp=4.*grad_accum=4.*bf16.*zero_stage=2"):
        deepspeed_config(load_config(ROOT / "configs/pretrain_1b_16k.yaml", over))
    assert main(["configs/pretrain_1b_16k.yaml", "--dry-run", "--world-size", "16", *over]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.zero_stage=2" in err[0]
    # Without accumulation nothing is summed in bf16; ZeRO-2 (the recipe) accumulates in fp32.
    alone = deepspeed_config(load_config(ROOT / "configs/pretrain_1b_16k.yaml", [over[0], "parallel.grad_accum=1"]))
    assert alone["bf16"]["enabled"] and "data_types" not in alone
    assert deepspeed_config(LONG)["data_types"]["grad_accum_dtype"] == "fp32" and LONG.parallel.grad_accum > 1
