"""What every benchmark shares: the machine record, interleaved timing, a fixed synthetic
batch for `trainer.step.train_step`, and the JSON writer. The matmul peak probe is
`trainer.metrics.matmul_probe`, the one the trainer's MFU uses.

Timing records wall time (what tokens/s means) and process CPU time side by side. On a
machine shared with other work, wall time also counts the moments the scheduler gave our
core to someone else; CPU time does not, so a wall-time ratio that agrees with the CPU-time
ratio is one that contention did not bend.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.profiler import record_function

from trainer.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAKESPEARE = ROOT / "benchmarks" / "data" / "tinyshakespeare.txt"  # public domain, shipped in the repo


def repo_relative(path: Path | str) -> str:
    """`path` as seen from the repository root (e.g. benchmarks/data/...), which is where every
    benchmark runs the trainer, so results and their commands hold no machine's absolute paths."""
    return os.path.relpath(os.path.abspath(path), ROOT)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional library is recorded as None
        return None


def machine_info() -> dict:
    """CPU, cores, library versions, host, threads and load: enough to tell two runs' machines apart."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": list(os.getloadavg()),
        "git_commit": git_commit(),
    }


def command_line(name: str, argv: Sequence[str]) -> str:
    """The command that reproduces this result, as a user types it from the repository root."""
    return " ".join(["python", "-m", f"benchmarks.{name}", *argv])


def set_threads(threads: int) -> None:
    """One intra-op thread count for every side of a comparison. On 2 cores shared with other
    processes, two OpenMP threads per process spin at barriers and ran ~2-3× slower than one."""
    torch.set_num_threads(threads)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def interleave(steps: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, dict[str, list[float]]]:
    """Run every step once per round, `warmup` rounds discarded then `reps` recorded.

    The order within a round alternates (A B C, C B A, ...), so slow drifts in the machine's
    load and any cost one step leaves behind for the next (a cold cache) fall on every side
    alike. Returns {name: {"wall_s": [...], "cpu_s": [...]}}.
    """
    names = list(steps)
    out = {n: {"wall_s": [], "cpu_s": []} for n in names}
    for r in range(warmup + reps):
        for n in names if r % 2 == 0 else reversed(names):
            wall, cpu = timed(steps[n])
            if r >= warmup:
                out[n]["wall_s"].append(wall)
                out[n]["cpu_s"].append(cpu)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def speed_ratio(times_a: Sequence[float], times_b: Sequence[float]) -> float:
    """Throughput of A over B from per-step times of equal work: median(B) / median(A)."""
    return median(times_b) / median(times_a)


def paired_ratio(times_a: Sequence[float], times_b: Sequence[float]) -> float:
    """Median over rounds of B_i / A_i: each round's two steps ran back to back, so the
    machine's load largely cancels inside each pair."""
    return median([b / a for a, b in zip(times_a, times_b)])


def speedups(raw: dict, a: str, b: str) -> dict:
    """How much faster step `a` is than step `b` (same work): by median CPU time (the
    headline basis), by median wall time, and as the median of per-round wall ratios."""
    return {"cpu_time": speed_ratio(raw[a]["cpu_s"], raw[b]["cpu_s"]),
            "wall": speed_ratio(raw[a]["wall_s"], raw[b]["wall_s"]),
            "wall_paired": paired_ratio(raw[a]["wall_s"], raw[b]["wall_s"])}


HEADLINE_BASIS = ("ratios of median CPU time per step (= tokens/s on an otherwise idle core): each process runs one "
                  "intra-op thread, so its CPU time is the step's own cost, while wall time also counts other "
                  "processes' turns on a shared core; wall-time ratios are recorded beside it")


class FixedBatch:
    """A data object for `trainer.step.train_step` that returns one fixed random sample.

    Benchmarks time the step, not the loader, and equal tokens on every side of a
    comparison keep the work identical. `train_batch` returns (inputs, labels), labels
    already shifted, as `trainer.data` does.
    """

    def __init__(self, vocab_size: int, micro_batch: int, seq_len: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), generator=g)
        self.inputs, self.labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def train_batch(self, step, micro, layout):
        return self.inputs, self.labels


def plain_train_step(model: torch.nn.Module, loss_fn: Callable, cfg) -> Callable[[], None]:
    """train_step's math without DeepSpeed: loss_fn(model) (already ÷ tokens), backward,
    clip_grad_norm_ at optim.grad_clip, torch AdamW with `param_groups`' weight-decay split and
    the engine's kernel (`adamw_kernel`). Phases are marked for the profiler. The returned
    callable keeps its losses in `.losses`."""
    from trainer.parallel.engine import adamw_kernel
    from trainer.parallel.optim import param_groups

    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            **adamw_kernel(next(model.parameters()).device))
    losses: list[float] = []

    def step():
        with record_function("phase:forward+loss"):
            loss = loss_fn(model)
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:clip+optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    step.losses = losses
    return step


def engine_train_step(engine, data, dist, cfg) -> Callable[[], None]:
    """One `trainer.step.train_step` on `engine`, as trainer.train runs it; losses in `.losses`."""
    from trainer.parallel.layout import BatchLayout
    from trainer.step import train_step

    layout = BatchLayout.build(cfg, dist)
    losses: list[float] = []

    def step():
        losses.append(train_step(engine, data, dist, cfg, layout, len(losses)).loss)

    step.losses = losses
    return step


def op_profile(steps: dict[str, Callable[[], None]], reps: int = 3, top: int = 15) -> dict:
    """Per-operator self time of two steps, profiled `reps` times each (alternating), keeping
    each operator's minimum over the reps. The profiler times ops by wall clock, so on a
    shared core every op is inflated by the share other processes take; the minimum drops
    spikes, and comparing the two steps' tables op by op stays meaningful. Also the `phase:*`
    ranges (inclusive, min) and the operators where the two steps differ most."""
    from torch.profiler import ProfilerActivity, profile

    tables: dict[str, dict[str, float]] = {n: {} for n in steps}
    phases: dict[str, dict[str, float]] = {n: {} for n in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            for e in prof.key_averages():
                table, key, ms = ((phases[name], e.key[6:], e.cpu_time_total / 1e3) if e.key.startswith("phase:")
                                  else (tables[name], e.key, e.self_cpu_time_total / 1e3))
                table[key] = min(table.get(key, math.inf), ms)
    a, b = list(tables)
    keys = set(tables[a]) | set(tables[b])
    diff = sorted(((k, tables[a].get(k, 0.0), tables[b].get(k, 0.0)) for k in keys), key=lambda t: -abs(t[1] - t[2]))
    return {
        "unit": f"wall ms per step, each operator's minimum over {reps} profiled steps (profiler overhead and "
                "other processes' share of the core included)",
        "total_self_ms": {n: round(sum(t.values()), 1) for n, t in tables.items()},
        "phases_ms": {n: {k: round(v, 1) for k, v in t.items()} for n, t in phases.items() if t},
        "top_self_ms": {n: [[k, round(v, 2)] for k, v in sorted(t.items(), key=lambda kv: -kv[1])[:top]]
                        for n, t in tables.items()},
        f"largest_differences_{a}_vs_{b}": [{"op": k, a: round(x, 2), b: round(y, 2), "diff_ms": round(x - y, 2)}
                                           for k, x, y in diff[:top]],
        "self_ms_by_op": {n: {k: round(v, 3) for k, v in t.items()} for n, t in tables.items()},
    }


def run_config(overrides: dict):
    """`configs/tiny.yaml` with `key=value` overrides, through the real loader and validation."""
    from trainer.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])


def flops_per_token(cfg) -> float:
    """Training FLOPs per token of the model a RunConfig describes (built on the meta device)."""
    from model import Transformer

    with torch.device("meta"):
        return Transformer(cfg.model).flops_per_token(cfg.data.seq_len)


def timing_parser(name: str, doc: str | None, batch_help: str = "micro batch") -> argparse.ArgumentParser:
    """The flags every in-process timing benchmark shares; scripts add their own after."""
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=(doc or "").splitlines()[0])
    ap.add_argument("--batch", type=int, default=2, help=batch_help)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for every step")
    ap.add_argument("--warmup", type=int, default=2, help="rounds discarded")
    ap.add_argument("--reps", type=int, default=8, help="rounds measured")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-operator profile")
    ap.add_argument("--dims", type=json.loads, default={}, help='JSON overriding DIMS, e.g. \'{"d_model": 64}\'')
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    return ap


def launch_ranks(module: str, n: int, args: Sequence[str], timeout: float, env_extra: dict | None = None,
                 drop_env: Sequence[str] = ()) -> None:
    """Run `python -m <module> --worker <args>` as ranks 0..n-1 of one gloo job on this host
    (one OpenMP thread each) and raise with a rank's log if any exits non-zero."""
    from trainer.parallel.dist import free_port

    port = free_port()
    procs = []
    for rank in range(n):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK")) and k not in drop_env}
        env.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
        procs.append(subprocess.Popen([sys.executable, "-m", module, "--worker", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            raise RuntimeError(f"{module} rank {rank} of {n} exited {p.returncode}:\n{log[-4000:]}")


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def print_summary(path: Path, fields: Sequence[str]) -> None:
    data = json.loads(path.read_text())
    shown = ", ".join(f"{k}={data[k]:.4g}" if isinstance(data.get(k), float) else f"{k}={data.get(k)}" for k in fields)
    print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {shown}", file=sys.stderr)
