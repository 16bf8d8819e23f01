"""Each benchmark's core on tiny dims: it runs, writes the fields the results promise, and its
ratios are positive. No timing is asserted (the machine is shared); what is asserted beyond
"it runs" is the sanity each benchmark relies on: HF starts from our weights with the same
loss, MoD's FLOP counter sees less work, SP=2 reproduces SP=1's losses."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from benchmarks import activation_memory, run_all, ulysses_memory
from tests.helpers import ROOT

TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 256, "seq_len": 32}
TINY_MOD = {**TINY, "n_layers": 4, "seq_len": 64}
NAME_AM = activation_memory.NAME


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """throughput, mod and activation_memory through their real `main`, tiny dims, in one child
    process (each builds a gloo group and DeepSpeed engines, which must not leak into the test
    process). Throughput's compiled step is left out here (inductor compile time); tests/test_speed.py
    checks compiled training against eager."""
    out = tmp_path_factory.mktemp("bench")
    script = (
        "import sys; from benchmarks import throughput, mod, activation_memory\n"
        f"throughput.main(['--dims', {json.dumps(json.dumps(TINY))}, '--batch', '2', '--warmup', '0', '--reps', '2',"
        f" '--probe-n', '128', '--no-compile', '--out', {str(out)!r}])\n"
        f"activation_memory.main(['--dims', {json.dumps(json.dumps(TINY))}, '--warmup', '0', '--reps', '2',"
        f" '--out', {str(out)!r}])\n"
        f"mod.main(['--dims', {json.dumps(json.dumps(TINY_MOD))}, '--batch', '1', '--warmup', '0', '--reps', '2',"
        f" '--out', {str(out)!r}])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: json.loads((out / f"{name}.json").read_text()) for name in ("throughput", "mod", NAME_AM)}


@pytest.mark.slow
def test_throughput_reports_ratios_against_hf_started_from_our_weights(results):
    out = results["throughput"]
    for key in ("ratio_vs_hf", "ratio_vs_hf_wall", "ratio_vs_hf_plain_loop", "mfu", "hf_mfu", "peak_flops"):
        assert out[key] > 0, key
    assert out["config"]["hf_attn_implementation"] == "sdpa"
    losses = list(out["first_step_loss"].values())
    assert max(losses) - min(losses) < 1e-4, out["first_step_loss"]
    assert all(len(r["wall_s"]) == 2 and len(r["cpu_s"]) == 2 for r in out["raw"].values())
    assert out["profile"]["ours_vs_hf_plain"]["largest_differences_ours_plain_vs_hf_plain"]
    assert {"cpu_model", "cores", "torch", "deepspeed", "hostname"} <= set(out["machine"])
    assert out["command"].startswith("python -m benchmarks.throughput --dims")


@pytest.mark.slow
def test_mod_speedup_is_dense_over_mod_step_time_and_flop_ideal_counts_8_of_64_tokens_in_blocks_2_and_4(results):
    out = results["mod"]
    med = {name: statistics.median(r["cpu_s"]) for name, r in out["raw"].items()}
    # speedup > 1 means MoD is faster: dense's median step time over MoD's, not the reverse.
    assert out["speedup"] == pytest.approx(med["dense_engine"] / med["mod_engine"])
    assert out["speedup_plain"] == pytest.approx(med["dense_plain"] / med["mod_plain"])
    assert out["speedup_wall"] > 0
    # The FLOP ideal from the dims alone (6 = forward + backward, 2 FLOPs a multiply-add): a
    # block is 6·(4d² + 3d·ffn) per token plus causal attention 6·d·(tokens+1); a routed block
    # runs k = 8 of T = 64 tokens plus a d→1 router on every token; the LM head is 6·d·V.
    d, V, T, k, ffn = TINY_MOD["d_model"], TINY_MOD["vocab_size"], TINY_MOD["seq_len"], 8, out["config"]["ffn_dim"]
    block = lambda tokens: 6 * (4 * d * d + 3 * d * ffn) + 6 * d * (tokens + 1)  # noqa: E731
    dense = 6 * d * V + 4 * block(T)
    mod = 6 * d * V + 2 * block(T) + 2 * (k / T * block(k) + 6 * d)
    assert out["flop_ideal"] == pytest.approx(dense / mod)
    assert out["config"]["mod"]["routed_blocks"] == [2, 4]
    assert out["profile"]["routing_ops_mod_plain"]["by_op"], "routing operators were not seen by the profiler"


@pytest.mark.slow
def test_activation_memory_shrinks_with_more_checkpointed_blocks_at_identical_losses(results):
    out = results[NAME_AM]
    assert out["losses_identical_across_modes"]
    assert out["act_memory_ratio_full_vs_none"] < out["act_memory_ratio_every_2_vs_none"] < 1
    assert out["step_time_ratio_full_vs_none"] > 0 and "memory_method" in out


def test_a2a_bytes_constant_when_seq_and_sp_scale_together():
    table = ulysses_memory.a2a_table(ulysses_memory.DIMS)
    assert len(set(table["values"].values())) == 1 and table["values"]["seq8192_sp2"] > 0
    assert len(set(table["gqa_kv_heads_2"].values())) > 1  # k/v replication grows with sp past kv_heads


def test_rss_high_water_mark_sees_a_transient_allocation():
    if not ulysses_memory.reset_high_water_mark():
        pytest.skip("kernel does not allow resetting VmHWM")
    before = ulysses_memory.rss_bytes()
    sampler = ulysses_memory.RssSampler()
    sampler.start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    sampler.stop()
    assert ulysses_memory.high_water_mark() - before >= 60 * 2**20
    assert sampler.samples >= 1


@pytest.mark.slow
def test_ulysses_memory_two_ranks_match_one(tmp_path):
    out = ulysses_memory.measure(seq=256, steps=1, dims={**ulysses_memory.DIMS, "d_model": 64, "n_layers": 2},
                                 timeout=300)
    assert out["peak_ratio_sp2_vs_sp1"] > 0 and out["absolute_peak_ratio_sp2_vs_sp1"] > 0
    assert out["losses_match"], (out["losses_sp1"], out["losses_sp2"])
    assert len(out["summary"]["sp2"]["activation_bytes_per_rank"]) == 2


def test_run_all_finds_the_benchmarks_and_skips_the_rest():
    names = run_all.discover()
    assert names[:3] == ["throughput", "mod", "ulysses_memory"]
    assert not {"common", "run_all", "ablate", "plot_diagnostics"} & set(names)
    assert run_all.main(["--dry-run", "--only", "mod"]) == 0
    assert run_all.main(["--only", "no_such_benchmark"]) == 2
