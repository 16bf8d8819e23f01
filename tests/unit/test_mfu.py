"""MFU's denominator: the per-device peak from the datasheet table (keyed on the device
name and the training precision), a probe for devices not in it, `logging.peak_flops` over
both, and a probe that never disturbs a restored RNG state (after a resume: tests/integration/test_mfu_resume.py)."""
from __future__ import annotations

import pytest
import torch

import trainer.metrics as metrics
from tests.helpers import ROOT
from trainer.metrics import matmul_probe, peak_flops_per_device

GPU = torch.device("cuda", 0)

# torch.cuda.get_device_name() strings as the drivers report them.
TABLE_CASES = {
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA B200": 2250e12,
    "NVIDIA L4": 121e12, "NVIDIA L40S": 362e12, "NVIDIA A10G": 70e12,
}


@pytest.fixture
def gpu_named(monkeypatch):
    probes = []

    def fake_probe(device, dtype=torch.float32, n=0, reps=7):
        probes.append((device, dtype))
        return {"peak_flops_wall": 123e12}

    monkeypatch.setattr(metrics, "matmul_probe", fake_probe)

    def name(device_name):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    return name, probes


@pytest.mark.parametrize("device_name", TABLE_CASES)
def test_bf16_peak_comes_from_the_datasheet_table(gpu_named, device_name):
    name, probes = gpu_named
    name(device_name)
    peak, source = peak_flops_per_device(GPU, "bf16")
    assert peak == TABLE_CASES[device_name] and "datasheet" in source and not probes


def test_fp32_peak_is_tf32_only_when_torch_allows_tf32_matmuls(gpu_named):
    name, _ = gpu_named
    name("NVIDIA H100 80GB HBM3")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_flops_per_device(GPU, "fp32") == (67e12, "H100 SXM fp32 datasheet")
        torch.set_float32_matmul_precision("high")
        assert peak_flops_per_device(GPU, "fp32") == (494.5e12, "H100 SXM tf32 datasheet")
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("device_name", ["NVIDIA L40", "NVIDIA GeForce RTX 4090", "NVIDIA A10"])
@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_unknown_gpu_is_probed_in_the_training_dtype_with_one_warning(gpu_named, capsys, device_name, precision,
                                                                       dtype):
    name, probes = gpu_named
    name(device_name)
    assert peak_flops_per_device(GPU, precision) == (123e12, f"measured {precision} matmul (guess)")
    assert probes == [(GPU, dtype)]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and device_name in lines[0] and "guess" in lines[0] and "logging.peak_flops" in lines[0]


def test_logging_peak_flops_overrides_table_and_probe(gpu_named):
    name, probes = gpu_named
    name("NVIDIA H100 80GB HBM3")
    assert peak_flops_per_device(GPU, "bf16", 5e14) == (5e14, "logging.peak_flops")
    assert peak_flops_per_device(torch.device("cpu"), "fp32", 5e14) == (5e14, "logging.peak_flops")
    assert not probes


def test_cpu_probe_leaves_the_rng_state_untouched():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    out = matmul_probe(torch.device("cpu"), torch.float32, n=64, reps=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert out["peak_flops_wall"] == pytest.approx(2 * 64**3 / min(out["wall_s"]))


class _FlopsModel:
    """What Throughput reads of a model: its depth and FLOPs per token."""

    blocks = [None, None]

    def flops_per_token(self, seq_len):
        return 6e6

    def hardware_flops_per_token(self, seq_len):
        return 8e6


def _cpu_throughput(peak: float, *overrides: str) -> metrics.Throughput:
    from trainer.config import load_config
    from trainer.parallel.dist import Dist
    from trainer.parallel.layout import BatchLayout

    cfg = load_config(ROOT / "configs/tiny.yaml", list(overrides))
    dist = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), sp=1)
    return metrics.Throughput(cfg, dist, BatchLayout.build(cfg, dist), peak)


@pytest.mark.parametrize("reprobe", [5e9, 1e6], ids=["quieter-machine", "still-busy"])
def test_cpu_mfu_never_exceeds_one_when_a_step_beats_the_start_up_probe(monkeypatch, reprobe):
    """A start-up probe slowed by a busy machine (1 MFLOP/s here) would give MFU far above 1.
    The step re-probes and keeps the best probe; if the step still beats it, its own rate."""
    monkeypatch.setattr(metrics, "matmul_probe", lambda device, dtype=torch.float32: {"peak_flops_wall": reprobe})
    tp = _cpu_throughput(1e6)
    said = []
    tp.announce = said.append
    dt = tp.tokens_per_step * 8e6 / 2e9  # a step doing 2 GFLOP/s of hardware FLOPs
    row = tp.fields(dt, _FlopsModel())
    assert row["mfu"] <= row["hfu"] <= 1.0
    assert tp.peak == pytest.approx(max(reprobe, 2e9))
    assert row["hfu"] == pytest.approx(2e9 / tp.peak)
    assert len(said) == 1 and "MFU peak raised from 0.0 to" in said[0]
    # A slower step later leaves the raised peak alone and probes nothing more.
    monkeypatch.setattr(metrics, "matmul_probe", lambda *a, **k: pytest.fail("probed again"))
    assert tp.fields(dt * 2, _FlopsModel())["hfu"] == pytest.approx(row["hfu"] / 2)


def test_a_configured_peak_is_never_re_probed(monkeypatch):
    monkeypatch.setattr(metrics, "matmul_probe", lambda *a, **k: pytest.fail("probed"))
    tp = _cpu_throughput(1e6, "logging.peak_flops=1e6")
    assert tp.fields(1.0, _FlopsModel())["mfu"] > 1  # the user's number stands, and MFU shows it is wrong
