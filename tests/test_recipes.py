"""The 1B recipes are what they claim: a Chinchilla-budget 2k base, a 16k stage that can
start from the base's weights, and a half-depth-first growth run of the same model."""
from __future__ import annotations

import dataclasses

from tests.helpers import ROOT
from trainer.config import load_config
from trainer.init_from import model_diff
from trainer.summary import plan

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
