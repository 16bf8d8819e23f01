"""Where numbers go: `metrics.jsonl`, W&B and a console progress bar, rank 0 only.
Other ranks get a logger whose methods do nothing, so call sites never test the rank."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from trainer.config import RunConfig, to_dict
from trainer.evaluation.profiling import peak_memory_gb
from trainer.parallel.dist import print0
from trainer.parallel.layout import BatchLayout
from trainer.parallel.ulysses import all_to_all_bytes_per_layer

# Dense (no sparsity) peak FLOP/s of one GPU from the vendor datasheets, per precision:
# bf16 tensor core; tf32 tensor core; fp32 without tensor cores. Matched on the tokens of
# torch.cuda.get_device_name(), most specific first: "NVIDIA H100 80GB HBM3" is the SXM
# part, "NVIDIA L40" (not listed) must not match L4. A100 40/80 GB, SXM and PCIe, share
# their peaks. A10G (AWS only) follows AWS/Baseten's figures; NVIDIA publishes none.
# B200 is the HGX B200 (1,000 W) column of NVIDIA's Blackwell table, whose tensor-core rows
# are with sparsity: BF16 4.5 and TF32 2.2 PFLOP/s, so 2.25 and 1.1 dense; FP32 75 TFLOP/s.
# The 5 / 2.5 PFLOP/s and 80 TFLOP/s quoted elsewhere are the 1,200 W GB200 part's.
PEAK_FLOPS_TABLE: tuple[tuple[tuple[str, ...], str, dict[str, float]], ...] = (
    (("h100", "nvl"), "H100 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (("h100", "pcie"), "H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (("h100",), "H100 SXM", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    (("h200", "nvl"), "H200 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (("h200",), "H200 SXM", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    (("b200",), "B200", {"bf16": 2250e12, "tf32": 1100e12, "fp32": 75e12}),
    (("a100",), "A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (("l40s",), "L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (("l4",), "L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (("a10g",), "A10G", {"bf16": 70e12, "tf32": 35e12, "fp32": 35e12}),
)


def datasheet_peak(device_name: str, precision: str) -> tuple[float, str] | None:
    """(peak FLOP/s, label) for a GPU in PEAK_FLOPS_TABLE, else None. `precision` is
    parallel.precision; fp32 training uses the tf32 column when torch lets fp32 matmuls run
    on tensor cores (`torch.set_float32_matmul_precision("high")`), else the fp32 column."""
    tokens = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    column = precision
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        column = "tf32"
    for keys, label, peaks in PEAK_FLOPS_TABLE:
        if all(k in tokens for k in keys):
            return peaks[column], f"{label} {column} datasheet"
    return None


def matmul_probe(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 0, reps: int = 7) -> dict:
    """[n, n] @ [n, n] in `dtype` on `device`: 2n³ FLOPs over the best of `reps` timings.

    The best (not the median) is the peak, since contention only ever slows a matmul down.
    `peak_flops_wall` divides by wall time; on CPU `peak_flops` divides by process CPU time
    (unaffected by other processes taking turns on our cores), on a GPU it equals the wall
    figure. The inputs come from a forked RNG, so a restored RNG state is left untouched.
    """
    n = n or (1024 if device.type == "cpu" else 8192)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    wall, cpu = [], []
    for i in range(reps + 1):  # the first is a warm-up
        if cuda:
            torch.cuda.synchronize(device)
        w, c = time.perf_counter(), time.process_time()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        if i:
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
    flops = 2 * n**3
    peak_wall = flops / min(wall)
    return {"device": str(device), "matmul_n": n, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "reps": reps, "wall_s": wall, "cpu_s": cpu,
            "peak_flops": flops / max(min(cpu), 1e-9) if not cuda else peak_wall, "peak_flops_wall": peak_wall}


def peak_flops_per_device(device: torch.device, precision: str, override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device for MFU, where it came from): `logging.peak_flops` when set;
    a listed GPU's datasheet value; an unlisted GPU's measured matmul in the training dtype
    (with a warning: a guess, and below the datasheet peak, so MFU reads high); on CPU a measured fp32 matmul, by wall
    time like the training step it divides."""
    if override:
        return override, "logging.peak_flops"
    if device.type != "cuda":
        return matmul_probe(device, torch.float32)["peak_flops_wall"], "measured fp32 matmul"
    name = torch.cuda.get_device_name(device)
    known = datasheet_peak(name, precision)
    if known is not None:
        return known
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_probe(device, dtype)["peak_flops_wall"]
    print0(f"warning: {name!r} is not in the peak-FLOPs table; MFU divides by a measured {precision} matmul "
           f"({peak / 1e12:.0f} TFLOP/s), a guess that reads high; set logging.peak_flops to the datasheet value")
    return peak, f"measured {precision} matmul (guess)"


# How long wandb.init may wait for W&B's server (wandb's default is 90 s). A reachable server
# answers in seconds; a run falls back to offline rather than stall its start.
WANDB_INIT_TIMEOUT_S = 15.0
# How long the reachability probe before wandb.init waits for a TCP connection (DNS included).
WANDB_PROBE_TIMEOUT_S = 3.0


def wandb_online_problem() -> str | None:
    """Why `logging.wandb_mode=online` cannot work from here, or None. Without an API key
    wandb.init raises (or prompts at a terminal); without a route to the server it retries for
    init_timeout and then raises. Both are found here in seconds, so the run logs offline."""
    import wandb
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth  # wandb's own netrc lookup (wandb is pinned in pyproject.toml)

    settings = wandb_setup.singleton().settings  # WANDB_BASE_URL, WANDB_API_KEY and settings files
    try:
        key = (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or settings.api_key
               or wbauth.read_netrc_auth(host=settings.base_url))
    except wandb.errors.Error as e:
        return f"the W&B API key is unreadable ({' '.join(str(e).split())[:200]})"
    if not key:
        return "no W&B API key (set WANDB_API_KEY, or run `wandb login`)"
    return _unreachable(settings.base_url)


def _unreachable(url: str) -> str | None:
    """Why a TCP connection to `url`'s host fails within WANDB_PROBE_TIMEOUT_S, or None. Behind
    a proxy a direct connection proves nothing, so it is not tried."""
    import socket
    import threading
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return None
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)
    failure: list[str] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=WANDB_PROBE_TIMEOUT_S).close()
        except OSError as e:
            failure.append(e.strerror or str(e) or type(e).__name__)

    # A thread bounds the DNS lookup too, which create_connection's timeout does not cover.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(WANDB_PROBE_TIMEOUT_S)
    if probe.is_alive():
        return f"no answer from the W&B server {host}:{port} within {WANDB_PROBE_TIMEOUT_S:g} s"
    return f"cannot reach the W&B server {host}:{port} ({failure[0]})" if failure else None


class Throughput:
    """What a training row derives from the batch layout: tokens/s, MFU and HFU against the
    per-device peak, the Ulysses all-to-all bytes per layer, and peak memory."""

    def __init__(self, cfg: RunConfig, dist, layout: BatchLayout, peak_flops: float):
        p = cfg.parallel
        self.dist, self.seq_len, self.peak = dist, layout.seq_len, peak_flops
        self.tokens_per_step = layout.tokens_per_step
        self._flops_key, self._flops_value = None, (0.0, 0.0)
        # A CPU peak is a matmul timed at start-up, maybe while other processes held the cores;
        # it is re-measured whenever a step beats it (see _raise_peak).
        self.peak_is_probe = dist.device.type == "cpu" and not cfg.logging.peak_flops
        self.announce = lambda text: None  # the console (Metrics on rank 0 sets it)
        self.a2a = all_to_all_bytes_per_layer(layout.micro_batch, layout.seq_len, p.sp, cfg.model.n_heads,
                                              cfg.model.kv_heads, cfg.model.head_dim, 2 if p.precision == "bf16" else 4)

    def fields(self, dt: float, model) -> dict:
        model_flops, hardware_flops = self._flops(model)
        self._raise_peak(hardware_flops * self.tokens_per_step / dt / self.dist.world)
        per_s = self.tokens_per_step / dt / (self.peak * self.dist.world)
        return {"tokens_per_s": self.tokens_per_step / dt, "mfu": model_flops * per_s, "hfu": hardware_flops * per_s,
                "a2a_bytes_per_layer": self.a2a}

    def _raise_peak(self, achieved: float) -> None:
        """Keep MFU and HFU <= 1 on CPU. A step that does more FLOP/s per device than the probed
        peak proves the probe was slowed (a busy machine), not that the step beat the hardware:
        probe again and keep the best probe; if the step still beats that, the step's own rate is
        the best this device has shown, and so the tightest lower bound on its peak there is."""
        if not self.peak_is_probe or achieved <= self.peak:
            return
        was = self.peak
        self.peak = max(self.peak, matmul_probe(self.dist.device, torch.float32)["peak_flops_wall"], achieved)
        self.announce(f"MFU peak raised from {was / 1e9:.1f} to {self.peak / 1e9:.1f} GFLOP/s: a step ran at "
                      f"{achieved / 1e9:.1f} GFLOP/s, above the probed matmul (timed while the CPU was busier)")

    def _flops(self, model) -> tuple[float, float]:
        """FLOPs per token, counted over the module tree (ms at depth) once per model: the
        model only changes when growth rebuilds it, which changes its depth."""
        key = (id(model), len(model.blocks))
        if self._flops_key != key:
            self._flops_key = key
            self._flops_value = (model.flops_per_token(self.seq_len), model.hardware_flops_per_token(self.seq_len))
        return self._flops_value

    def mem_gb(self) -> float:
        """The largest peak memory over ranks since the previous row (a collective: every
        rank builds every row)."""
        peak = torch.tensor([peak_memory_gb(self.dist.device)], device=self.dist.device)
        return self.dist.all_reduce(peak, "max").item()


class RowBuilder:
    """Builds the metrics rows, on every rank: some fields are collectives (the peak memory over
    ranks), so every rank computes every row. It writes them nowhere; ranks other than 0 use it
    as it is, rank 0 its subclass `Metrics`, and call sites never test the rank."""

    def __init__(self, cfg: RunConfig | None = None, throughput: Throughput | None = None, data=None):
        self.cfg, self.throughput, self.data = cfg, throughput, data
        self.first_loss: float | None = None
        self.last: dict = {}
        self.last_eval: dict = {}  # the latest eval row (val_loss ...), for the console and the summary

    def log_train(self, state, result, dt: float, model, lr: float) -> None:
        """The row of a finished (not skipped) step, logged every logging.every steps and at
        step 1; the progress bar every step. `lr` is the rate the loop set for the update that
        produced this row. The loss and grad norm are read (a host sync each) only for a logged
        row, the first step and the last one (the summary's figures); between rows the bar shows
        the last row's loss."""
        if result.skipped:
            return
        fields = self.throughput.fields(dt, model)
        logged = state.step % self.cfg.logging.every == 0 or state.step == 1
        if logged or self.first_loss is None or state.step == self.cfg.run.max_steps:
            self.first_loss = result.loss if self.first_loss is None else self.first_loss
            self.last = {"step": state.step, "loss": result.loss, "lr": lr,
                         "grad_norm": result.grad_norm, **fields,
                         "n_layers": state.n_layers, "tokens": state.tokens,
                         **(self.data.log_fields(state.samples) if self.data is not None else {})}
        if logged:
            self.last["mem_gb"] = self.throughput.mem_gb()
            self.log(self.last)
        self.progress(state.step, {"loss": f"{self.last['loss']:.3f}", "tok/s": f"{fields['tokens_per_s']:.0f}"})

    def log_skipped(self, state, result, limit: int) -> None:
        self.message(f"step {state.step}: non-finite loss/grad norm ({result.loss}, {result.grad_norm}); "
                     f"update skipped ({state.bad_steps}/{limit})")
        self.log({"step": state.step, "skipped": True, "loss": _num(result.loss), "grad_norm": _num(result.grad_norm),
                  "n_layers": state.n_layers, "mem_gb": self.throughput.mem_gb()})

    def summary(self, state, stopped_by: str | None, run_dir: Path) -> str:
        head = f"stopped by {stopped_by} after step {state.step}" if stopped_by else f"finished {state.step} steps"
        loss = (f"loss {self.first_loss:.4f} -> {self.last.get('loss', float('nan')):.4f}"
                if self.first_loss is not None else "no steps run")
        if "val_loss" in self.last_eval:
            loss += f", val loss {self.last_eval['val_loss']:.4f} at step {self.last_eval['step']}"
        return (f"{head}: {loss}, {state.tokens:,} tokens, {state.n_layers} layers, "
                f"{self.last.get('tokens_per_s', 0):.0f} tok/s; run dir {run_dir} (metrics.jsonl, checkpoints/)")

    def log(self, row: dict[str, Any]) -> None: ...
    def progress(self, step: int, postfix: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class Metrics(RowBuilder):
    """Rank 0: the rows go to metrics.jsonl, W&B and the progress bar."""

    def __init__(self, cfg: RunConfig, run_dir: Path, start_step: int, throughput: Throughput, data=None):
        super().__init__(cfg, throughput, data)
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self._trim_after(start_step)
        self.file = open(self.path, "a")
        self.wandb = self._init_wandb()
        self.bar, self._pace_from = None, None
        if cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.run.max_steps, initial=start_step, desc=cfg.run.name, dynamic_ncols=True,
                            mininterval=1.0)
        throughput.announce = self.message

    def _trim_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint we restart from, so the file
        reads as one uninterrupted run."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if _row_step(r) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in kept))
        os.replace(tmp, self.path)

    def _init_wandb(self):
        mode = self.cfg.logging.wandb_mode
        if mode == "disabled":
            return None
        import wandb

        id_file = self.run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12] + "\n")
        kw = dict(project=self.cfg.logging.wandb_project, name=self.cfg.run.name, id=id_file.read_text().strip(),
                  resume="allow", dir=str(self.run_dir), config=to_dict(self.cfg))
        if mode == "online":
            problem = wandb_online_problem()
            if problem is None:
                try:
                    return wandb.init(mode="online", settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S), **kw)
                except wandb.errors.Error as e:  # the server refused us or answered too slowly
                    problem = " ".join(str(e).split())[:200]
                    wandb.teardown()  # its service still holds the failed run's id
            print(f"warning: logging.wandb_mode=online: {problem}; logging to W&B offline instead "
                  f"(upload later with `wandb sync {self.run_dir / 'wandb'}/offline-run-*`)", file=sys.stderr, flush=True)
        return wandb.init(mode="offline" if mode == "online" else mode, **kw)

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if "val_loss" in row:  # an eval row: one console line, and the summary's val loss
            self.last_eval = row
            self.message(eval_line(row))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({**postfix, "eta": self._eta(step)}, refresh=True)

    def _eta(self, step: int) -> str:
        """Remaining time at the mean pace since the first step shown (so start-up, data
        preparation and the first step's compilation do not count); includes eval and checkpoints."""
        now = time.perf_counter()
        if self._pace_from is None:
            self._pace_from = (step, now)
            return "?"
        step0, t0 = self._pace_from
        if step <= step0:
            return "?"
        left = (now - t0) / (step - step0) * (self.cfg.run.max_steps - step)
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f}d"

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def eval_line(row: dict) -> str:
    """The console line of an eval row: val loss and perplexity, MoD's top-k figure and each
    data.eval held-out set."""
    text = f"step {row['step']}: val loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.2f})"
    if "val_loss_topk" in row:
        text += f", top-k routing {row['val_loss_topk']:.4f}"
    held = [f"{k[len('val/'):-len('_loss')]} {v:.4f}" for k, v in row.items() if k.startswith("val/")]
    return text + (f"; held-out: {', '.join(held)}" if held else "")


def make_metrics(cfg: RunConfig, run_dir: Path, start_step: int, dist, layout: BatchLayout, data=None,
                 peak_flops: float = 0.0) -> Metrics | RowBuilder:
    throughput = Throughput(cfg, dist, layout, peak_flops)
    return Metrics(cfg, run_dir, start_step, throughput, data) if dist.is_main else RowBuilder(cfg, throughput)


def _num(x: float):
    """A float for JSON, or its string when non-finite (JSON has no NaN/inf)."""
    return x if x == x and abs(x) != float("inf") else str(x)


def _row_step(line: str) -> float:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return math.inf  # a torn final line from a crash: drop it
    # A growth event at step s happens after checkpoint s was taken; resuming from s logs it again.
    return row.get("step", -1) + (0.5 if row.get("event") == "growth" else 0)
