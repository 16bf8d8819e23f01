"""The run configuration: one typed tree loaded from YAML (with `extends:`) plus
`key.sub=value` overrides, validated before anything heavy is imported.

Everything else (DeepSpeed JSON, W&B config, the run dir's config.yaml) is derived
from this tree, so a value lives in exactly one place.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.block import PLACEMENTS
from model.config import ModelConfig
from model.growth import METHODS as GROWTH_METHODS
from model.mod import CAUSAL_RULES
from model.norms import NORMS
from model.transformer import VALUE_MODULES
from trainer.errors import ConfigError
from trainer.schedule import SCHEDULES, ScheduleConfig


@dataclass
class RunSection:
    name: str = "tiny"
    out_dir: str = "runs"
    seed: int = 1337
    max_steps: int = 200  # the schedule's horizon
    stop_at: int = 0  # checkpoint and exit cleanly after this step (0 = run to max_steps); the schedule is unchanged
    eval_every: int = 50  # 0 = only at the end
    eval_batches: int = 4
    eval_tasks: List[str] = field(default_factory=list)  # lm_eval tasks run at the eval cadence (rank 0)
    eval_tasks_limit: int = 0  # at most this many examples per task in the loop; 0 = all
    max_bad_steps: int = 3  # consecutive non-finite steps tolerated before stopping
    force_resume: bool = False  # resume even if model/data keys changed since the run started
    force_restart: bool = False  # start from step 0 though checkpoint dirs exist, none of them complete
    init_from: str = ""  # run dir or checkpoints/step-N dir: a fresh run starts from its weights (not optimizer/step)


@dataclass
class MixEntry:
    source: str = ""  # any data.source form
    weight: float = 1.0  # relative share of training samples (> 0; normalised over the mix)
    name: str = ""  # label in metrics (mix/<name>); "" = derived from the source


@dataclass
class DataConfig:
    source: str = "embedded"  # embedded | local file, dir or glob (.txt/.jsonl/.json/.parquet[.gz|.zst]) | hf:<name>[:<config>]
    seq_len: int = 256
    tokenizer: str = ""  # existing SentencePiece .model; "" = train one on the corpus
    val_fraction: float = 0.01
    max_docs: int = 0  # 0 = all documents
    max_tokens: int = 0  # 0 = no cap
    text_field: str = "text"
    tokenizer_sample_chars: int = 5_000_000
    num_proc: int = 1  # prepare worker processes when the job prepares itself (`trainer.prepare --workers`)
    cache_dir: str = ""  # "" = <run.out_dir>/.cache, shared by the runs in that out_dir
    mix: List[MixEntry] = field(default_factory=list)  # weighted sources; replaces data.source when set
    eval: Dict[str, str] = field(default_factory=dict)  # extra held-out sets {name: source} -> val/<name>_loss
    prepare: str = "auto"  # auto: prepare what is missing first | offline: only open prepared shards
    auto_prepare_mb: float = 256.0  # multi-rank auto jobs prepare at most this much input; larger = offline
    shard_mb: float = 64.0  # input text per unit of work / token shard


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping


@dataclass
class ParallelConfig:
    zero_stage: int = 0
    sp: int = 1  # Ulysses sequence-parallel degree; world = dp × sp
    micro_batch: int = 8
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    # A collective that waits longer than this fails the rank instead of hanging the job
    # (a dead or stuck peer). Fractions are allowed (0.5 = 30 s).
    timeout_minutes: float = 30.0
    activation_checkpointing: str = "none"  # none | full | every_<k> (every k-th block, 1-based)
    compile: bool = False  # torch.compile each block (inductor)
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # expert pass-through, merged last


@dataclass
class GrowthStage:
    at_step: int = 0
    layers: int = 0
    method: str = "stack"  # stack | interleave | identity


@dataclass
class GrowthConfig:
    stages: List[GrowthStage] = field(default_factory=list)
    rewarm_steps: int = 0


@dataclass(init=False, repr=False, eq=False)
class CheckpointConfig:
    """`async` is a Python keyword, so the dataclass writes its own __init__/__repr__/__eq__ and
    code reads it as `cfg.checkpoint.async_save`; YAML and overrides say `checkpoint.async`."""

    every: int = 50  # 0 = only at the end and on preemption
    keep: int = 2
    # true: copy the state to host memory, write it on a background thread per rank, and
    # seal (COMPLETE) once every rank's bytes are fsync'd; the next save or exit waits for it
    __annotations__["async"] = bool
    locals()["async"] = False

    def __init__(self, every: int = 50, keep: int = 2, **kw: Any):
        self.every, self.keep = every, keep
        setattr(self, "async", kw.pop("async", False))
        if kw:
            raise TypeError(f"unknown checkpoint keys {sorted(kw)}")

    @property
    def async_save(self) -> bool:
        return getattr(self, "async")

    def __repr__(self) -> str:
        return f"CheckpointConfig(every={self.every}, keep={self.keep}, async={self.async_save})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckpointConfig) and (self.every, self.keep, self.async_save) == \
            (other.every, other.keep, other.async_save)


@dataclass
class LoggingConfig:
    every: int = 10
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "harness"
    diag_every: int = 0  # depth diagnostics cadence; 0 = off
    peak_flops: float = 0.0  # per-device peak for MFU; 0 = look up (GPU) or probe (CPU)
    progress: bool = True
    profile_steps: List[int] = field(default_factory=list)  # [first, last] step to trace; [] = off


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    @property
    def cache_dir(self) -> Path:
        return Path(self.data.cache_dir) if self.data.cache_dir else Path(self.run.out_dir) / ".cache"

    @property
    def final_layers(self) -> int:
        return self.growth.stages[-1].layers if self.growth.stages else self.model.n_layers


# Keys whose change makes an existing run's checkpoints meaningless (docs/design.md §3).
FROZEN_ON_RESUME = ("model", "data", "growth", "run.seed")
# ...except these data keys, which change how data is prepared or evaluated, not what is trained on.
RESUMABLE_DATA_KEYS = ("data.prepare", "data.auto_prepare_mb", "data.num_proc", "data.eval", "data.cache_dir")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (give a path to a YAML file, e.g. configs/tiny.yaml)")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: `extends` forms a cycle through {[str(p) for p in seen]}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:  # empty or comments only: training on the built-in defaults is never what was meant
        raise ConfigError(f"config {path} is empty; give at least one section (e.g. `extends: tiny.yaml` "
                          f"or `run: {{name: ...}}`), or configs/tiny.yaml for the defaults")
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a YAML mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _read_yaml((path.parent / parent), seen + (path.resolve(),))
    return OmegaConf.to_container(OmegaConf.merge(base, raw))


def _one_line(e: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    if "not in" in msg:
        return ConfigError(f"{origin}: unknown config key '{key}' (see the keys in docs/config.md)")
    return ConfigError(f"{origin}: bad value for '{key}': {msg}")


def _is_str_field(key: str) -> bool:
    """Whether dotted `key` names a str field of RunConfig."""
    cls: Any = RunConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        cls = typing.get_type_hints(cls).get(part)
    return cls is str


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """YAML file (+ extends) then `key=value` overrides (values parsed as YAML) → validated RunConfig."""
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        except OmegaConfBaseException as e:
            raise _one_line(e, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. optim.lr=1e-3)")
        try:
            key, value = (part.strip() for part in item.split("=", 1))
            if _is_str_field(key):
                # Verbatim (less any quotes): YAML would read run.name=on as a boolean and
                # run.name=1e-3 as a number.
                OmegaConf.update(cfg, key, yaml.safe_load(value) if value[:1] in "'\"" else value, merge=True)
                continue
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _one_line(e, f"override '{item}'") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}' is not valid YAML: {str(e).splitlines()[0]}") from None
    run_cfg: RunConfig = OmegaConf.to_object(cfg)
    validate(run_cfg)
    return run_cfg


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> RunConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), yaml.safe_load(text)))


def _need(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {accepted}")


def _choice(key: str, value: str, choices: Iterable[str]) -> None:
    """`choices` is the option's registry (its keys are the accepted values) or a tuple."""
    _need(value in choices, key, value, f"expected one of {' | '.join(choices)}")


def activation_checkpoint_every(mode: str) -> Optional[int]:
    """`parallel.activation_checkpointing` -> k (checkpoint 1-based blocks k, 2k, ...; 0 = none),
    None when the mode is not valid."""
    if mode in ("none", "full"):
        return {"none": 0, "full": 1}[mode]
    k = mode.removeprefix("every_")
    return int(k) if k != mode and k.isdigit() and int(k) > 0 else None


def validate(cfg: RunConfig, world_size: Optional[int] = None) -> None:
    """Cheap checks that need no heavy imports. `world_size` adds the launch-time checks."""
    m, d, p, r = cfg.model, cfg.data, cfg.parallel, cfg.run
    for key, v in [("model.d_model", m.d_model), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                   ("model.vocab_size", m.vocab_size), ("model.max_seq_len", m.max_seq_len),
                   ("data.seq_len", d.seq_len), ("run.max_steps", r.max_steps),
                   ("parallel.micro_batch", p.micro_batch), ("parallel.grad_accum", p.grad_accum),
                   ("parallel.sp", p.sp), ("model.mod.every", m.mod.every),
                   ("model.mod.route_chunks", m.mod.route_chunks), ("logging.every", cfg.logging.every),
                   ("checkpoint.keep", cfg.checkpoint.keep), ("run.max_bad_steps", r.max_bad_steps)]:
        _need(v > 0, key, v, "must be a positive integer")
    for key, v in [("run.eval_every", r.eval_every), ("checkpoint.every", cfg.checkpoint.every),
                   ("logging.diag_every", cfg.logging.diag_every), ("schedule.warmup_steps", cfg.schedule.warmup_steps),
                   ("growth.rewarm_steps", cfg.growth.rewarm_steps), ("data.max_docs", d.max_docs),
                   ("data.max_tokens", d.max_tokens), ("run.eval_batches", r.eval_batches),
                   ("run.eval_tasks_limit", r.eval_tasks_limit),
                   ("run.stop_at", r.stop_at)]:
        _need(v >= 0, key, v, "must be >= 0")
    _choice("model.norm", m.norm, PLACEMENTS)
    _choice("model.norm_type", m.norm_type, NORMS)
    _choice("model.value_residual", m.value_residual, VALUE_MODULES)
    _choice("model.mod.causal", m.mod.causal, CAUSAL_RULES)
    _choice("parallel.precision", p.precision, ("fp32", "bf16"))
    _choice("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
    _need(activation_checkpoint_every(p.activation_checkpointing) is not None, "parallel.activation_checkpointing",
          p.activation_checkpointing, "expected none | full | every_<k> with k a positive integer (e.g. every_2)")
    ps = list(cfg.logging.profile_steps)
    _need(ps == [] or (len(ps) == 2 and 1 <= ps[0] <= ps[1]), "logging.profile_steps", ps,
          "expected [first, last] steps with 1 <= first <= last (e.g. [5, 7]), or [] for no trace")
    _choice("schedule.kind", cfg.schedule.kind, SCHEDULES)
    _choice("logging.wandb_mode", cfg.logging.wandb_mode, ("offline", "online", "disabled"))
    _need(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", p.zero_stage, "expected 0, 1, 2 or 3")
    _need(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads, f"must divide model.d_model={m.d_model}")
    _need(m.head_dim % 2 == 0, "model.n_heads", m.n_heads, f"d_model/n_heads={m.head_dim} must be even for RoPE")
    _need(m.n_heads % m.kv_heads == 0, "model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads}")
    _need(not (m.ln_scaling and m.norm == "post"), "model.ln_scaling", m.ln_scaling,
          "LayerNorm Scaling needs model.norm=pre or peri (post-LN has no sublayer-input norm)")
    _need(math.isfinite(m.out_norm_gain) and m.out_norm_gain >= 0, "model.out_norm_gain", m.out_norm_gain,
          "must be a number >= 0")
    _need(m.out_norm_gain == 1.0 or m.norm == "peri", "model.out_norm_gain", m.out_norm_gain,
          f"sets Peri-LN's output-norm gains; model.norm={m.norm} has none (use model.norm=peri, or leave it at 1)")
    _need(m.mod.capacity == 0 or 0 < m.mod.capacity <= 1, "model.mod.capacity", m.mod.capacity,
          "must be in (0, 1], or 0 to turn Mixture-of-Depths off")
    _need(d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}")
    _need(d.seq_len % m.mod.route_chunks == 0, "model.mod.route_chunks", m.mod.route_chunks,
          f"must divide data.seq_len={d.seq_len}")
    _need(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _need(math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "must be a positive number")
    _need(cfg.optim.grad_clip >= 0, "optim.grad_clip", cfg.optim.grad_clip, "must be >= 0 (0 = off)")
    _need(0 <= cfg.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", cfg.schedule.min_lr_ratio, "must be in [0, 1]")
    _need(math.isfinite(p.timeout_minutes) and p.timeout_minutes > 0, "parallel.timeout_minutes", p.timeout_minutes,
          "must be a positive number of minutes (fractions allowed, e.g. 0.5)")
    _need(cfg.logging.peak_flops >= 0, "logging.peak_flops", cfg.logging.peak_flops, "must be >= 0 (0 = auto)")
    # Ulysses: heads are scattered over the SP group, the sequence is sliced over it.
    if p.sp > 1:
        _need(m.n_heads % p.sp == 0, "parallel.sp", p.sp, f"must divide model.n_heads={m.n_heads}")
        _need(m.kv_heads % p.sp == 0 or p.sp % m.kv_heads == 0, "parallel.sp", p.sp,
              f"must divide model.n_kv_heads={m.kv_heads} or be a multiple of it")
        _need(d.seq_len % p.sp == 0, "data.seq_len", d.seq_len, f"must be divisible by parallel.sp={p.sp}")
        _need(m.mod.capacity == 0 or m.mod.route_chunks % p.sp == 0, "model.mod.route_chunks",
              m.mod.route_chunks, f"must be a multiple of parallel.sp={p.sp} so routing is layout-independent")
    if world_size is not None:
        _need(world_size % p.sp == 0, "parallel.sp", p.sp,
              f"must divide the world size {world_size} (launch a multiple of {p.sp} processes, "
              f"e.g. torchrun --nproc-per-node {p.sp}, or lower parallel.sp)")
    _validate_growth(cfg)
    _validate_data_path(d)


def config_warnings(cfg: RunConfig) -> list[str]:
    """Settings that validate but that this project's ablation measured to hurt, each citing
    the results it rests on (benchmarks/results/ablation.md; benchmarks/README.md explains).
    trainer.train and --dry-run print them once, at start; they never stop a run."""
    m, out = cfg.model, []
    # A non-default out_norm_gain is a deliberate answer to the same scale mismatch, so it is
    # not warned about: peri_ln_small_out_gain (0.02, no embed_norm) measured as good as
    # embed_norm (benchmarks/results/ablation.md).
    if m.norm == "peri" and not m.embed_norm and m.out_norm_gain == 1.0:
        out.append("model.norm=peri without model.embed_norm: each block adds increments of RMS 1 to an embedding "
                   f"of RMS init_std={m.init_std}, and our ablation measured it worse than Pre-LN at every "
                   "learning rate (benchmarks/results/ablation.md). Set model.embed_norm=true")
    return out


def _validate_growth(cfg: RunConfig) -> None:
    prev_step, prev_layers = 0, cfg.model.n_layers
    for i, st in enumerate(cfg.growth.stages):
        key = f"growth.stages[{i}]"
        _choice(f"{key}.method", st.method, GROWTH_METHODS)
        _need(st.at_step > prev_step, f"{key}.at_step", st.at_step,
              f"must be > {prev_step} (stages must be in increasing step order)")
        _need(st.at_step < cfg.run.max_steps, f"{key}.at_step", st.at_step,
              f"must be < run.max_steps={cfg.run.max_steps}")
        _need(st.layers > prev_layers, f"{key}.layers", st.layers, f"must be > the previous depth {prev_layers}")
        if st.method in ("stack", "interleave"):
            _need(st.layers % prev_layers == 0, f"{key}.layers", st.layers,
                  f"{st.method} copies whole layers: must be a multiple of the previous depth {prev_layers}")
        _need(not (st.method == "identity" and cfg.model.norm == "post"), f"{key}.method", st.method,
              "post-LN normalises the residual stream, so no zeroed weight makes a new layer a no-op; "
              "use stack or interleave, or model.norm=pre or peri")
        if cfg.model.mod.capacity > 0 and st.method == "stack":
            _need(prev_layers % cfg.model.mod.every == 0, f"{key}.method", st.method,
                  f"stacking {prev_layers} layers breaks the every-{cfg.model.mod.every} MoD pattern; "
                  f"use a depth that is a multiple of model.mod.every, or interleave/identity")
        prev_step, prev_layers = st.at_step, st.layers


def _validate_data_path(d: DataConfig) -> None:
    _choice("data.prepare", d.prepare, ("auto", "offline"))
    _need(d.shard_mb > 0, "data.shard_mb", d.shard_mb, "must be > 0 (MB of input text per shard)")
    _need(d.auto_prepare_mb >= 0, "data.auto_prepare_mb", d.auto_prepare_mb, "must be >= 0")
    _need(d.num_proc > 0, "data.num_proc", d.num_proc, "must be a positive integer")
    if not d.mix:
        _validate_source("data.source", d.source, d)
    for i, m in enumerate(d.mix):
        _need(math.isfinite(m.weight) and m.weight > 0, f"data.mix[{i}].weight", m.weight,
              "must be a positive number (weights are relative shares and must sum to a positive number)")
        _validate_source(f"data.mix[{i}].source", m.source, d)
    names = [m.name for m in d.mix if m.name]
    _need(len(set(names)) == len(names), "data.mix", names, "names must be distinct")
    for name, source in d.eval.items():
        _need(bool(name) and all(c.isalnum() or c in "_-." for c in name), f"data.eval.{name}", source,
              "names may use letters, digits, '_', '-' and '.' (it becomes the metric val/<name>_loss)")
        _validate_source(f"data.eval.{name}", source, d)
    if d.tokenizer:
        _need(Path(d.tokenizer).is_file(), "data.tokenizer", d.tokenizer, "file does not exist (give a .model file or '')")


def _validate_source(key: str, source: str, d: DataConfig) -> None:
    _need(bool(source), key, source, "is empty: give 'embedded', a local path or glob, or hf:<name>")
    if source.startswith("hf:"):
        _need(d.max_docs > 0 or d.max_tokens > 0, key, source,
              "a streamed hub dataset needs data.max_tokens or data.max_docs (it has no end to wait for)")
    if source == "embedded" or source.startswith("hf:") or any(c in source for c in "*?["):
        return
    path = Path(source).expanduser()
    _need(path.exists(), key, source,
          "path does not exist (give a .txt/.jsonl/.json/.parquet file, optionally .gz/.zst, a directory or glob "
          "of them, 'embedded', or hf:<name>)")
    if path.is_file():
        _need(path.stat().st_size > 0, key, source, "file is empty")


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (old value, new value)} for every leaf key that differs."""
    a, b = _flatten(to_dict(old)), _flatten(to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def resume_diff(old: RunConfig, new: RunConfig) -> list[str]:
    """Frozen keys that differ between the run's saved config and this launch's."""
    def under(k: str, roots) -> bool:
        return any(k == f or k.startswith(f + ".") for f in roots)

    return [k for k in config_changes(old, new) if under(k, FROZEN_ON_RESUME) and not under(k, RESUMABLE_DATA_KEYS)]


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict) and d:
        out: dict = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


# docs/config.md's key table is generated from the dataclasses above (`make docs`), so the
# documented keys, types, defaults and comments cannot drift from the code (a test checks).
KEY_TABLE_BEGIN = "<!-- key table: generated by `make docs` from trainer/config.py; do not edit by hand -->"
KEY_TABLE_END = "<!-- end of key table -->"


def _field_comments(cls: type) -> dict[str, str]:
    """{field: its comment}: the comment on the field's line, else the comment lines just above it."""
    import inspect
    import io
    import tokenize

    src = inspect.getsource(cls)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    lines, out = src.splitlines(), {}
    for f in dataclasses.fields(cls):
        pat = re.compile(rf"^\s*(?:{f.name}\s*:|__annotations__\[\"{f.name}\"\])")
        at = next((i + 1 for i, line in enumerate(lines) if pat.match(line)), None)
        if at is None:
            continue
        if at in comments and not lines[at - 1].lstrip().startswith("#"):
            out[f.name] = comments[at]
            continue
        above, i = [], at - 1
        while i in comments and lines[i - 1].lstrip().startswith("#"):
            above.insert(0, comments[i])
            i -= 1
        if above:
            out[f.name] = " ".join(above)
    return out


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(hint)).replace("NoneType", "None")  # typing.List -> List


def _key_rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    import json

    hints, comments, rows = typing.get_type_hints(cls), _field_comments(cls), []
    for f in dataclasses.fields(cls):
        key, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += _key_rows(hint, key + ".")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((key, _type_name(hint), json.dumps(default, default=str), comments.get(f.name, "")))
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(item):
            rows += _key_rows(item, key + "[].")
    return rows


def key_table_markdown() -> str:
    """Every RunConfig key as a Markdown table: dotted key, type, default, the source's comment."""
    def cell(s: str) -> str:  # a literal | ends a cell; <name> would be read as an HTML tag
        return s.replace("|", "\\|").replace("<", "&lt;")

    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    out += [f"| `{key}` | `{cell(t)}` | `{cell(d)}` | {cell(c)} |" for key, t, d, c in _key_rows(RunConfig, "")]
    return "\n".join(out)


def with_key_table(text: str) -> str:
    """`text` (docs/config.md) with the part between the key-table markers regenerated."""
    head, sep, rest = text.partition(KEY_TABLE_BEGIN)
    _, sep2, tail = rest.partition(KEY_TABLE_END)
    if not (sep and sep2):
        raise ValueError("the key-table markers are missing from the file")
    return f"{head}{KEY_TABLE_BEGIN}\n{key_table_markdown()}\n{KEY_TABLE_END}{tail}"
