"""Activation memory per rank under Ulysses sequence parallelism: SP=2 against SP=1, same sample.

    python -m benchmarks.ulysses_memory [--seq 8192] [--steps 2]

One global sequence of --seq tokens (micro batch 1) trains on a small model (d_model 256,
4 layers, 8 heads, MHA, vocab 2048, fp32) through the real path: `trainer.parallel.dist.init_distributed`
("gloo", sp), `trainer.parallel.ulysses.attention_core`, `trainer.parallel.engine.build_model/build_engine`
and `trainer.step.train_step`, whose `shard_sequence` gives each rank its contiguous slice.
SP=1 is one process; SP=2 is two gloo ranks, each its own process launched here.

Measure. After a warm-up step (optimizer moments exist, one-time buffers are allocated),
each rank records its RSS just before a step, resets the kernel's high-water mark (writing
5 to /proc/self/clear_refs resets VmHWM to the current RSS) and reads VmHWM after the step:
the step's peak, exact and unsampled. A background thread also samples RSS every ~1 ms
(psutil) as a cross-check and for kernels without clear_refs. Activation memory = peak −
RSS before the step: activations, their gradients, parameter gradients and the all-to-all
buffers, all of which are freed by the end of a step.

Each rank runs with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every allocation of
64 KiB or more with its own mmap and returns it on free, so RSS follows live tensors. With
glibc's default (a dynamic threshold that rises to 32 MiB after the first large free), blocks
freed by the warm-up step stay in the heap, are already counted in "RSS before", and the
next step reuses them unseen, so the delta undercounts. `getrusage().ru_maxrss` cannot be
reset, so it cannot isolate one step after a warm-up and is not used.

Fields: `peak_ratio_sp2_vs_sp1` = max over SP=2 ranks of their activation memory ÷ SP=1's;
absolute peaks per rank; and `a2a_bytes_per_layer` from `trainer.parallel.ulysses.all_to_all_bytes_per_layer`
for (seq, sp) = (8192, 2) and (16384, 4), constant when both scale (only sp ≤ 2 can run on
this machine; the formula covers the rest). Writes benchmarks/results/ulysses_memory.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import command_line, launch_ranks, machine_info, print_summary, write_result

NAME = "ulysses_memory"
DIMS = dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=2048)
MMAP_THRESHOLD = 65536


class RssSampler(threading.Thread):
    """Peak RSS of this process, sampled every `interval` seconds until `stop()`.

    psutil reads /proc/self/statm in a few µs, and torch releases the GIL inside its kernels,
    so the thread keeps sampling while the step computes."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak, self.samples, self._done = 0, 0, threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.samples += 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def high_water_mark() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def overrides(seq: int, sp: int, dims: dict) -> dict:
    return {"model.d_model": dims["d_model"], "model.n_layers": dims["n_layers"], "model.n_heads": dims["n_heads"],
            "model.n_kv_heads": dims["n_kv_heads"], "model.vocab_size": dims["vocab_size"], "model.max_seq_len": seq,
            "data.seq_len": seq, "parallel.micro_batch": 1, "parallel.grad_accum": 1, "parallel.sp": sp,
            "parallel.zero_stage": 0, "parallel.precision": "fp32"}


def worker(seq: int, sp: int, steps: int, dims: dict, result_file: Path) -> None:
    """One rank: warm-up step, then `steps` measured steps; writes its figures to result_file,
    in which "{rank}" stands for the rank."""
    import torch

    from benchmarks.common import FixedBatch, engine_train_step, run_config, set_threads
    from trainer.parallel.dist import init_distributed
    from trainer.parallel.engine import build_engine, build_model
    from trainer.parallel.ulysses import attention_core

    set_threads(1)
    cfg = run_config(overrides(seq, sp, dims))
    dist = init_distributed("gloo", sp)
    core = attention_core(dist, cfg.model.kv_heads)
    engine = build_engine(cfg, dist, build_model(cfg, cfg.model.n_layers, core))
    step = engine_train_step(engine, FixedBatch(cfg.model.vocab_size, 1, seq), dist, cfg)
    step()  # warm-up
    rows = []
    for _ in range(steps):
        gc.collect()
        dist.barrier()
        before = rss_bytes()
        hwm_ok = reset_high_water_mark()
        sampler = RssSampler()
        sampler.start()
        t = time.perf_counter()
        step()
        wall = time.perf_counter() - t
        sampler.stop()
        hwm = high_water_mark() if hwm_ok else None
        rows.append({"rss_before": before, "peak_vmhwm": hwm, "peak_sampled": sampler.peak,
                     "activation_vmhwm": None if hwm is None else hwm - before,
                     "activation_sampled": sampler.peak - before, "samples": sampler.samples, "wall_s": wall,
                     "sample_interval_ms": 1e3 * wall / max(1, sampler.samples)})
    out = Path(str(result_file).format(rank=dist.rank))
    out.write_text(json.dumps({"rank": dist.rank, "sp_rank": dist.sp_rank, "local_tokens": seq // sp,
                               "losses": step.losses, "torch_threads": torch.get_num_threads(), "steps": rows}))
    dist.barrier()


def launch(seq: int, sp: int, steps: int, dims: dict, mmap_threshold: bool, timeout: int) -> list[dict]:
    """Run `sp` ranks of `worker` as separate processes; returns their results by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--seq", str(seq), "--sp", str(sp), "--steps", str(steps), "--dims", json.dumps(dims),
                "--result-file", str(Path(tmp) / "rank{rank}.json")]
        launch_ranks("benchmarks.ulysses_memory", sp, args, timeout,
                     env_extra={"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if mmap_threshold else None,
                     drop_env=() if mmap_threshold else ("MALLOC_MMAP_THRESHOLD_",))
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(sp)]


def summarise(ranks: list[dict], key: str) -> dict:
    """Per rank: the max over measured steps of `key`, and the peak absolute RSS."""
    per_rank = [max(s[key] for s in r["steps"]) for r in ranks]
    peaks = [max(s["peak_vmhwm"] or s["peak_sampled"] for s in r["steps"]) for r in ranks]
    return {"activation_bytes_per_rank": per_rank, "activation_bytes_max_rank": max(per_rank),
            "peak_rss_bytes_per_rank": peaks, "rss_before_bytes_per_rank": [r["steps"][-1]["rss_before"] for r in ranks]}


def a2a_table(dims: dict, points=((8192, 2), (16384, 4), (32768, 8))) -> dict:
    from trainer.parallel.ulysses import all_to_all_bytes_per_layer

    head_dim = dims["d_model"] // dims["n_heads"]

    def row(kv_heads):
        return {f"seq{seq}_sp{sp}": all_to_all_bytes_per_layer(1, seq, sp, dims["n_heads"], kv_heads, head_dim, 4)
                for seq, sp in points}

    return {"bytes_per_el": 4, "batch": 1, "n_heads": dims["n_heads"], "head_dim": head_dim,
            "kv_heads": dims["n_kv_heads"], "values": row(dims["n_kv_heads"]),
            "gqa_kv_heads_2": row(2),
            "note": "bytes each rank sends into one attention layer's forward all-to-alls (q, k, v in, output "
                    "back). Constant when seq and sp scale together while kv_heads >= sp; with fewer kv heads "
                    "(gqa_kv_heads_2) attention_core replicates k/v up to sp heads, so the volume grows with sp."}


def measure(seq: int, steps: int, mmap_threshold: bool = True, timeout: int = 600, dims: dict = DIMS) -> dict:
    runs = {sp: launch(seq, sp, steps, dims, mmap_threshold, timeout) for sp in (1, 2)}
    exact = all(s["activation_vmhwm"] is not None for ranks in runs.values() for r in ranks for s in r["steps"])
    basis = "activation_vmhwm" if exact else "activation_sampled"
    summary = {f"sp{sp}": summarise(r, basis) for sp, r in runs.items()}
    sampled = {f"sp{sp}": summarise(r, "activation_sampled") for sp, r in runs.items()}
    ratio = summary["sp2"]["activation_bytes_max_rank"] / summary["sp1"]["activation_bytes_max_rank"]
    a2a = a2a_table(dims)
    return {
        "peak_ratio_sp2_vs_sp1": ratio,
        "peak_ratio_sp2_vs_sp1_sampled": sampled["sp2"]["activation_bytes_max_rank"]
        / sampled["sp1"]["activation_bytes_max_rank"],
        "absolute_peak_ratio_sp2_vs_sp1": max(summary["sp2"]["peak_rss_bytes_per_rank"])
        / max(summary["sp1"]["peak_rss_bytes_per_rank"]),
        "a2a_bytes_per_layer": a2a["values"],
        "losses_sp1": runs[1][0]["losses"],
        "losses_sp2": runs[2][0]["losses"],
        "losses_match": all(abs(a - b) <= 1e-4 * abs(a) for r in runs[2] for a, b in zip(runs[1][0]["losses"], r["losses"])),
        "a2a": a2a,
        "basis": f"{basis}: peak RSS during one train_step (after a warm-up step) minus RSS just before it, "
                 "max over measured steps, max over ranks",
        "summary": summary,
        "summary_sampled": sampled,
        "config": {**dims, "seq_len": seq, "micro_batch": 1, "dtype": "float32", "device": "cpu", "backend": "gloo",
                   "zero_stage": 0, "measured_steps": steps, "threads_per_rank": 1,
                   "malloc_mmap_threshold": MMAP_THRESHOLD if mmap_threshold else "glibc default"},
        "raw": {f"sp{sp}": r for sp, r in runs.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ulysses_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192, help="global sequence length")
    ap.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up step")
    ap.add_argument("--glibc-default-malloc", action="store_true",
                    help="do not set MALLOC_MMAP_THRESHOLD_ (shows why it is set)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dims", type=json.loads, default=DIMS, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.seq, args.sp, args.steps, args.dims, args.result_file)
        return 0
    result = {"benchmark": NAME, "command": command_line(NAME, argv), "machine": machine_info(),
              **measure(args.seq, args.steps, not args.glibc_default_malloc, args.timeout)}
    path = write_result(NAME, result, args.out)
    print_summary(path, ["peak_ratio_sp2_vs_sp1", "peak_ratio_sp2_vs_sp1_sampled", "absolute_peak_ratio_sp2_vs_sp1"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
