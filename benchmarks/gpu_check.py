"""The GPU machine's one-call check (`make gpu-check`): the 1-GPU test suite, a 1B-width
probe, and one eval and one growth through the real trainer, inside one time budget.

    GPU_CHECK_OUT=benchmarks/results/gpu_check.json python -m benchmarks.gpu_check [--budget-s 450]

Stages, in this order, each recorded whatever the others do (an exception becomes the
stage's `error`, and the JSON is rewritten after every stage, so a call cut short still
returns what finished):

1. `probe`: the 1B recipe (configs/pretrain_1b.yaml: its width, options, ZeRO-1, bf16) at
   seq 2048, as many layers as the planner says fit in 60% of the GPU (up to the recipe's 22),
   through `trainer.parallel.engine.build_engine` and `trainer.step.train_step` on a fixed batch.
   Eager, then compiled (`parallel.compile`): tokens/s (median step), MFU (PaLM's convention:
   the model's `flops_per_token` ÷ the datasheet peak the trainer logs), peak allocated memory
   against the planner's estimate for the same shape (`trainer.planner.memory_per_gpu`), and
   host syncs in one optimizer step counted by `torch.cuda.set_sync_debug_mode("warn")`.
2. `train`: `python -m trainer.train configs/tiny.yaml` in bf16 at ZeRO-1 with an eval at
   step 4, depth growth 2 → 4 layers at step 4, and a checkpoint at the end: exit code, the
   val losses and layer counts it logged, and the memory rows.
3. `tests`: `pytest -m gpu tests/gpu -k "not 2gpu"` with pytest-xdist, bounded by what is
   left of the budget; per-test outcome and time from the JUnit XML.
4. `hf`: `benchmarks.gpu_throughput` (ours vs transformers' Llama through the same engine, at
   the recipe's width), if at least a minute of the budget is left; its JSON lands beside.

Without CUDA it exits 1 with one line, unless `--allow-cpu` (a plumbing check of the same
stages on a tiny fp32 model).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
RECIPE = ROOT / "configs" / "pretrain_1b.yaml"


class Report:
    """The JSON, rewritten whole after every stage."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"benchmark": "gpu_check", "stages": {}}

    def stage(self, name: str, result: dict) -> None:
        self.data["stages"][name] = result
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def run_stage(report: Report, name: str, fn, *args) -> None:
    t0 = time.time()
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 - a failed stage is recorded, and the next still runs
        result = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.time() - t0, 1)
    print(f"gpu-check: {name} done in {result['seconds']} s{' (error)' if 'error' in result else ''}",
          file=sys.stderr, flush=True)
    report.stage(name, result)


def environment() -> dict:
    import deepspeed

    from trainer.provenance import git_commit

    # A snapshot made by `make gpu-snapshot` has no .git of its own but names its commit.
    snapshot = ROOT / "COMMIT"
    commit = snapshot.read_text().strip() if snapshot.is_file() else git_commit()
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "deepspeed": deepspeed.__version__, "commit": commit}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_count=torch.cuda.device_count(),
                    memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
    else:
        info["device"] = "cpu"
    return info


# ---- stage 1: the 1B-width probe -------------------------------------------------------

def recipe_layers() -> int:
    from trainer.config import load_config

    return load_config(RECIPE, []).final_layers


def probe_config(layers: int, args):
    from trainer.config import load_config

    over = {"model.n_layers": layers, "model.max_seq_len": args.seq_len, "data.seq_len": args.seq_len,
            "parallel.micro_batch": args.batch, "parallel.grad_accum": 1, "parallel.sp": 1,
            "parallel.zero_stage": 1, "parallel.precision": args.precision, "logging.wandb_mode": "disabled",
            **{f"model.{k}": v for k, v in args.model.items()}}
    return load_config(RECIPE, [f"{k}={v}" for k, v in over.items()])


def planned_bytes(cfg) -> float:
    from trainer.planner import _meta_model, memory_per_gpu

    n = _meta_model(cfg, cfg.model.n_layers).num_params()
    return memory_per_gpu(cfg, n, world=1).total(checkpointing=False)


def layers_that_fit(args, device_bytes: float) -> int:
    """The most layers (≤ the recipe's) whose planned memory is under 60% of the device."""
    for layers in range(args.layers or recipe_layers(), 0, -1):
        if args.layers or planned_bytes(probe_config(layers, args)) <= 0.6 * device_bytes:
            return layers
    return 1


def caller_outside_torch(stack) -> str:
    """The innermost frame that is not torch's own (nor this file's hook): who asked for the sync."""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(stack[:-2]):  # the last two are this hook and warnings' machinery
        if not frame.filename.startswith(torch_dir) and "warnings" not in os.path.basename(frame.filename):
            path = frame.filename
            for base in (str(ROOT), os.path.dirname(torch_dir)):  # the repo, then site-packages
                if path.startswith(base):
                    path = os.path.relpath(path, base)
                    break
            return f"{path}:{frame.lineno} ({frame.name})"
    return "?"


def count_syncs(fn) -> dict:
    """Host syncs of one call, as CUDA's sync debug mode reports them, each by the first frame
    outside torch that caused it (torch's own frame, e.g. torch/cuda/__init__.py, says little)."""
    if not torch.cuda.is_available():
        fn()
        return {"count": None, "why": "no CUDA: sync debug mode needs it"}
    torch.cuda.synchronize()
    where: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            where[caller_outside_torch(traceback.extract_stack())] += 1

    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"count": sum(where.values()), "where": dict(where.most_common(20))}


def measure(cfg, dist, args, compiled: bool) -> dict:
    import dataclasses

    from benchmarks.common import FixedBatch
    from trainer.metrics import peak_flops_per_device
    from trainer.parallel.engine import build_engine, build_model
    from trainer.parallel.layout import BatchLayout
    from trainer.step import train_step

    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, compile=compiled))
    cuda = dist.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, cfg.model.n_layers)
    engine = build_engine(cfg, dist, model)
    data, layout = FixedBatch(cfg.model.vocab_size, args.batch, args.seq_len), BatchLayout.build(cfg, dist)
    losses, times = [], []
    state = {"step": 0}

    def step():
        result = train_step(engine, data, dist, cfg, layout, state["step"])
        state["step"] += 1
        return result

    first = time.perf_counter()
    for i in range(args.warmup + args.reps):
        t0 = time.perf_counter()
        result = step()
        losses.append(float(result.loss))  # also waits for the GPU, so the step's time is its own
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        if i == 0:
            first_step_s = time.perf_counter() - first
    syncs = count_syncs(step)
    tokens = args.batch * args.seq_len
    tps = tokens / sorted(times)[len(times) // 2]
    fpt = model.flops_per_token(args.seq_len)
    peak, source = peak_flops_per_device(dist.device, cfg.parallel.precision, cfg.logging.peak_flops)
    out = {"tokens_per_s": round(tps, 1), "mfu": round(fpt * tps / peak, 4), "step_s": [round(t, 4) for t in times],
           "first_step_s": round(first_step_s, 2), "losses": [round(x, 4) for x in losses],
           "host_syncs_per_step": syncs, "peak_flops": peak, "peak_flops_source": source, "flops_per_token": fpt}
    if cuda:
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out  # the engine goes with this frame; probe() collects it before the next build


def probe(args) -> dict:
    from trainer.parallel.dist import init_distributed

    dist = init_distributed(sp=1)
    device_bytes = torch.cuda.get_device_properties(0).total_memory if dist.device.type == "cuda" else 24 * 2**30
    layers = layers_that_fit(args, device_bytes)
    cfg = probe_config(layers, args)
    plan = planned_bytes(cfg)
    result = {"config": {"n_layers": layers, "recipe_layers": recipe_layers(),
                         "d_model": cfg.model.d_model, "n_heads": cfg.model.n_heads,
                         "n_kv_heads": cfg.model.kv_heads, "ffn_dim": cfg.model.ffn_dim,
                         "vocab_size": cfg.model.vocab_size, "seq_len": args.seq_len, "micro_batch": args.batch,
                         "zero_stage": 1, "precision": cfg.parallel.precision, "norm": cfg.model.norm,
                         "value_residual": cfg.model.value_residual, "embed_norm": cfg.model.embed_norm},
              "planned_gib": round(plan / 2**30, 2)}
    for name, compiled in (("eager", False), ("compiled", True)):
        try:
            result[name] = measure(cfg, dist, args, compiled)
        except Exception as e:  # noqa: BLE001 - eager's numbers stand if compile fails
            result[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        gc.collect()
        if "peak_allocated_gib" in result[name]:
            result[name]["measured_over_planned"] = round(result[name]["peak_allocated_gib"] * 2**30 / plan, 3)
    if "tokens_per_s" in result["eager"] and "tokens_per_s" in result["compiled"]:
        result["compiled_over_eager"] = round(result["compiled"]["tokens_per_s"] / result["eager"]["tokens_per_s"], 3)
    return result


# ---- stage 2: one eval and one growth through the trainer --------------------------------

def child_env(**extra: str) -> dict:
    """This process's environment for a child that starts its own process group: the probe's
    rendezvous variables (init_distributed exports them) would point it at our port."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(ROOT), **extra}


def train_run(args) -> dict:
    out = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    over = {"run.out_dir": out, "run.name": "evalgrow", "run.max_steps": 8, "run.eval_every": 4, "run.eval_batches": 2,
            "parallel.precision": args.precision, "parallel.zero_stage": 1, "parallel.micro_batch": 4,
            "model.d_model": 128, "model.n_heads": 4, "model.n_kv_heads": 2, "model.n_layers": 2,
            "model.vocab_size": 512, "model.max_seq_len": 64, "data.seq_len": 64, "data.max_docs": 60,
            "data.cache_dir": out / "cache", "checkpoint.every": 0, "logging.every": 1,
            "logging.wandb_mode": "disabled", "logging.progress": "false",
            "growth.stages": "[{at_step: 4, layers: 4, method: stack}]"}
    cmd = [sys.executable, "-m", "trainer.train", "configs/tiny.yaml", *[f"{k}={v}" for k, v in over.items()]]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(WANDB_SILENT="true"), capture_output=True, text=True, timeout=args.train_timeout)
    rows = []
    metrics = out / "evalgrow" / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return {"returncode": proc.returncode,
            "val_loss": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
            "n_layers": {r["step"]: r["n_layers"] for r in rows if "n_layers" in r},
            "loss": {r["step"]: r["loss"] for r in rows if "loss" in r},
            "mem_gb": {r["step"]: r["mem_gb"] for r in rows if "mem_gb" in r},
            "checkpoints": sorted(p.name for p in (out / "evalgrow" / "checkpoints").glob("step-*"))
            if (out / "evalgrow" / "checkpoints").is_dir() else [],
            "stdout_tail": proc.stdout[-1500:], "stderr_tail": proc.stderr[-3000:] if proc.returncode else ""}


# ---- stage 3: the 1-GPU tests --------------------------------------------------------------

def gpu_tests(args, deadline: float) -> dict:
    left = int(deadline - time.time())
    if left < 30:
        return {"skipped": f"only {left} s of the budget left"}
    xml = Path(tempfile.mkdtemp(prefix="gpu-check-junit-")) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-k", "not 2gpu", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *args.pytest_args]
    if args.workers > 1 and importlib.util.find_spec("xdist"):  # one process per test: the GPU is shared
        cmd += ["-n", str(args.workers)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=left)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        code, tail = "timeout", (e.stdout or b"")[-3000:].decode(errors="replace") if isinstance(e.stdout, bytes) \
            else str(e.stdout or "")[-3000:]
    tests = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            outcome = "skipped" if case.find("skipped") is not None else ("failed" if bad is not None else "passed")
            tests[name] = {"outcome": outcome, "seconds": round(float(case.get("time", 0)), 1)}
            if bad is not None:
                tests[name]["message"] = (bad.get("message") or "")[:600] + "\n" + (bad.text or "")[-1500:]
    counts = Counter(t["outcome"] for t in tests.values())
    return {"returncode": code, "counts": dict(counts), "tests": tests, "command": " ".join(cmd[1:]),
            "output_tail": tail}


# ---- stage 4: ours against HF's Llama at the 1B width -------------------------------------

def hf_ratio(args, deadline: float) -> dict:
    """benchmarks.gpu_throughput (ours vs transformers' LlamaForCausalLM through the same
    engine, 4 layers at the recipe's width) in what is left of the budget; its own JSON goes
    beside this one."""
    left = int(deadline - time.time())
    if left < 60:
        return {"skipped": f"only {left} s of the budget left"}
    cmd = [sys.executable, "-m", "benchmarks.gpu_throughput", "--out", str(args.out.parent), "--reps", "6"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=left)
    path = args.out.parent / "gpu_throughput.json"
    result = {"returncode": proc.returncode, "stderr_tail": proc.stderr[-1500:]}
    if proc.returncode == 0 and path.exists():
        got = json.loads(path.read_text())
        result.update(file=path.name, ratio_vs_hf=got["ratio_vs_hf"], tokens_per_s=got["tokens_per_s"], mfu=got["mfu"])
    return result


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT", DEFAULT_OUT)),
                    help="the JSON (default $GPU_CHECK_OUT, else benchmarks/results/gpu_check.json)")
    ap.add_argument("--budget-s", type=float, default=450, help="the whole check's wall-time budget")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="probe micro batch")
    ap.add_argument("--layers", type=int, default=0, help="probe depth (0: as many as fit, up to the recipe's)")
    ap.add_argument("--model", type=json.loads, default={}, help="JSON overriding the recipe's model keys")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=8, help="pytest-xdist workers for the GPU tests")
    ap.add_argument("--train-timeout", type=int, default=240)
    ap.add_argument("--skip", default="", help="comma-separated stages to skip: probe,train,tests,hf")
    ap.add_argument("--allow-cpu", action="store_true", help="run the stages on CPU (a plumbing check)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments for the tests stage")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu-check needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
              "`make test-gpu` skips likewise, and --allow-cpu checks the plumbing", file=sys.stderr)
        return 1
    deadline = time.time() + args.budget_s
    skip = set(filter(None, args.skip.split(",")))
    report = Report(args.out)
    report.data["environment"] = environment()
    report.data["budget_s"] = args.budget_s
    report.write()
    if "probe" not in skip:
        run_stage(report, "probe", probe, args)
    if "train" not in skip:
        run_stage(report, "train", train_run, args)
    if "tests" not in skip:
        run_stage(report, "tests", gpu_tests, args, deadline)
    if "hf" not in skip:
        run_stage(report, "hf", hf_ratio, args, deadline)
    stages = report.data["stages"]
    ok = all("error" not in s for s in stages.values()) and stages.get("train", {}).get("returncode", 0) == 0 \
        and stages.get("tests", {}).get("returncode", 0) in (0, 5) and stages.get("hf", {}).get("returncode", 0) == 0
    report.data["ok"] = ok
    report.write()
    print(f"gpu-check: wrote {args.out} ({'ok' if ok else 'problems: see the JSON'})", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
