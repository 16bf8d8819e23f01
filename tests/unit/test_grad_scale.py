"""Ulysses SP without ranks: the all-to-all volume, and the gradient factor (`grad_scale`) on each
of DeepSpeed's reduction paths (SP=2 against SP=1 on ranks: tests/integration/test_ulysses.py)."""
from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.parallel.dist import Dist
from trainer.parallel.engine import deepspeed_config
from trainer.parallel.ulysses import all_to_all_bytes_per_layer, grad_scale


def test_all_to_all_volume_is_constant_when_sequence_and_sp_scale_together():
    a = all_to_all_bytes_per_layer(1, 4096, 2, 8, 8, 64, 2)
    assert a == all_to_all_bytes_per_layer(1, 8192, 4, 8, 8, 64, 2) == all_to_all_bytes_per_layer(1, 16384, 8, 8, 8, 64, 2)
    assert a * 2 == all_to_all_bytes_per_layer(1, 8192, 2, 8, 8, 64, 2)


# DeepSpeed 0.19.8's divisor per reduction path, at sp=2 on 4 ranks (dp=2): factor = divisor / dp.
GRAD_SCALE_CASES = {
    "z0": ({"zero_optimization": {"stage": 0}}, 1.0),
    "z0-predivide-dp": ({"zero_optimization": {"stage": 0}, "gradient_predivide_factor": 2.0}, 1.0),
    "z0-sum-op": ({"zero_optimization": {"stage": 0}, "gradient_allreduce_op": "sum"}, 0.5),
    "z1": ({"zero_optimization": {"stage": 1}}, 1.0),
    "z2": ({"zero_optimization": {"stage": 2}}, 1.0),
    "z1-no-rs": ({"zero_optimization": {"stage": 1, "reduce_scatter": False}}, 1.0),
    "z1-no-rs-predivide-world": ({"zero_optimization": {"stage": 1, "reduce_scatter": False},
                                  "gradient_predivide_factor": 4.0}, 2.0),
    # bf16 + fp32 accumulation at stage 1 is BF16_Optimizer: the ZeRO-0 all-reduce, divisor dp
    "z1-bf16-no-rs-predivide-world": ({"zero_optimization": {"stage": 1, "reduce_scatter": False},
                                       "gradient_predivide_factor": 4.0, "bf16": {"enabled": True},
                                       "data_types": {"grad_accum_dtype": "fp32"}}, 1.0),
    "z2-no-rs-predivide-world-prescale": ({"zero_optimization": {"stage": 2, "reduce_scatter": False},
                                           "gradient_predivide_factor": 4.0, "prescale_gradients": True}, 1.0),
    "z1-no-rs-noncontiguous": ({"zero_optimization": {"stage": 1, "reduce_scatter": False,
                                                      "contiguous_gradients": False},
                                "gradient_predivide_factor": 4.0}, 1.0),
    "z1-no-rs-offload": ({"zero_optimization": {"stage": 1, "reduce_scatter": False, "contiguous_gradients": False,
                                                "offload_optimizer": {"device": "cpu"}},
                          "gradient_predivide_factor": 4.0}, 2.0),
    "z3": ({"zero_optimization": {"stage": 3}}, 2.0),
    "z3-no-rs": ({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, 1.0),
    "z3-no-rs-noncontiguous": ({"zero_optimization": {"stage": 3, "reduce_scatter": False,
                                                      "contiguous_gradients": False}}, 2.0),
    "z3-no-rs-predivide": ({"zero_optimization": {"stage": 3, "reduce_scatter": False},
                            "gradient_predivide_factor": 3.0}, 1.0),
}


@pytest.mark.parametrize("name", GRAD_SCALE_CASES)
def test_grad_scale_follows_deepspeeds_reduction_path(name):
    ds, factor = GRAD_SCALE_CASES[name]
    assert grad_scale(ds, sp=2, world=4, largest_param=1000) == factor


@pytest.mark.parametrize("ds,key", [
    ({"zero_optimization": {"stage": 3, "reduce_scatter": False, "reduce_bucket_size": 100}}, "reduce_bucket_size"),
    ({"zero_optimization": {"stage": 3, "reduce_scatter": False}, "gradient_predivide_factor": 4.0},
     "gradient_predivide_factor=4"),
], ids=["z3-mixed-buckets", "z3-predivide-world"])
def test_grad_scale_refuses_paths_no_factor_corrects(ds, key):
    with pytest.raises(ConfigError, match=key):
        grad_scale(ds, sp=2, world=4, largest_param=1000)
    if "reduce_bucket_size" in key:  # without SP both paths agree, so nothing to refuse
        assert grad_scale(ds, sp=1, world=4, largest_param=1000) == 1.0


def test_grad_scale_reads_parallel_deepspeed_overrides():
    dist = Dist(rank=0, world=2, local_rank=0, device=torch.device("cpu"), sp=2)
    base = ["parallel.zero_stage=3", "parallel.sp=2"]
    plain = load_config("configs/tiny.yaml", base)
    no_rs = load_config("configs/tiny.yaml", [*base, "parallel.deepspeed.zero_optimization.reduce_scatter=false"])
    assert grad_scale(deepspeed_config(plain, dist), 2, 2, 1000) == 2.0
    assert grad_scale(deepspeed_config(no_rs, dist), 2, 2, 1000) == 1.0
