"""Offline preparation: the tokenizer and the token shards of every dataset a config needs.

`python -m trainer.prepare` calls `prepare_all`; a training job in `data.prepare=auto` mode
calls it too when something is missing. Both find their datasets with `plan`, which reads no
document, so every rank of a job can decide on its own (and identically) whether the data is
there.

Datasets of a config:
- train: `data.source`, or each `data.mix` entry. Each gets a val split by document hash
  (`data.val_fraction`) and the caps `data.max_docs` / `data.max_tokens`.
- eval: each `data.eval` entry, every document held out (val).
Next to each `index.json`, `val_manifest.json` lists the val tokens by source (file, or a
record's `source` field), so a held-out set dominated by one file shows; the embedded corpus
caps any one file's share of its val set (`sources.embedded_train_only`).
All share one tokenizer: `data.tokenizer`, or a BPE model trained on `data.tokenizer_sample_chars`
characters of train documents (split across mix sources by weight), cached by what it was
trained on.

Cache layout under `cache_dir`: `tokenizers/<key>/tokenizer.model` and
`shards/<key>/{index.json,shards/}`; keys are digests of everything that determines the bytes.
"""
from __future__ import annotations

import math
import multiprocessing
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from trainer.data import shards as sh
from trainer.data.sources import ALL_VAL, DataError, Source, digest, is_val, keyed_documents, open_source, val_threshold
from trainer.data.tokenizer import RECIPE_VERSION, TRAIN_THREADS, Tokenizer, TokenizerError

# Bytes per token assumed when sizing a streamed source from its token cap (English BPE ≈ 4).
STREAM_BYTES_PER_TOKEN = 4


@dataclass
class Dataset:
    """One source prepared (or to be prepared) into one shard directory."""

    name: str  # "train" for data.source, the mix/eval name otherwise
    role: str  # train | eval
    source: Source
    weight: float
    threshold: int  # val split threshold (ALL_VAL for eval sets)
    cap_train: int | None  # exact token caps applied when opening (None = all)
    cap_val: int | None
    max_docs: int
    directory: Path | None = None  # known once the tokenizer is
    _problem: str | None = None

    @property
    def index(self) -> dict | None:
        return sh.read_index(self.directory) if self.directory else None

    def problem(self) -> str | None:
        """None when the shards are complete and intact (checked once), else what is wrong."""
        if self._problem is None:
            index = self.index
            self._problem = "" if index is not None and sh.check_shards(self.directory, index) is None else (
                f"{self.name} shards ({self.source.spec}) are not prepared" if index is None
                else sh.check_shards(self.directory, index))
        return self._problem or None

    def est_bytes(self, max_tokens: int) -> float:
        if self.source.streaming:
            return max_tokens * STREAM_BYTES_PER_TOKEN if max_tokens else math.inf
        return self.source.n_bytes


@dataclass
class Plan:
    datasets: list[Dataset]
    tokenizer_path: Path | None  # None: to be trained
    tokenizer_key: str

    @property
    def train(self) -> list[Dataset]:
        return [d for d in self.datasets if d.role == "train"]

    @property
    def evals(self) -> list[Dataset]:
        return [d for d in self.datasets if d.role == "eval"]

    def missing(self) -> list[str]:
        """What still has to be prepared or repaired, in words (empty when everything is there)."""
        if not self.tokenizer_path.is_file():
            return ["the tokenizer is not trained"] + [f"{d.name} shards ({d.source.spec}) are not prepared"
                                                       for d in self.datasets]
        return [d.problem() for d in self.datasets if d.problem()]

    def missing_bytes(self, max_tokens: int) -> float:
        return sum(d.est_bytes(max_tokens) for d in self.datasets
                   if d.directory is None or d.problem())


def split_sizes(d: Dataset, n_train: int, n_val: int, seq_len: int, val_fraction: float) -> tuple[int, int, str]:
    """(train tokens, val tokens, split) as training opens dataset `d` whose shards hold
    n_train + n_val tokens: the caps first; then, for a train dataset whose document split holds
    less than one window of seq_len+1 tokens (a handful of documents), the stream's last
    val_fraction of tokens instead (split "tokens", else "documents"). Prepare's console and the
    run's data.json both report these numbers."""
    if d.cap_train is not None:
        n_train, n_val = min(n_train, d.cap_train), min(n_val, d.cap_val)
    if d.role == "train" and val_fraction > 0 and n_val < seq_len + 1:
        total = n_train + n_val
        n_val = math.ceil(val_fraction * total)
        return total - n_val, n_val, "tokens"
    return n_train, n_val, "documents"


def _sizes_text(d: Dataset, index: dict, cfg) -> str:
    """'X train + Y val tokens' as training will use them, saying why when it is not the
    document split the shards hold."""
    n_train, n_val, split = split_sizes(d, index["n_train_tokens"], index["n_val_tokens"], cfg.seq_len,
                                        cfg.val_fraction)
    text = f"{n_train:,} train + {n_val:,} val tokens"
    if split == "tokens":
        text += (f" (the documents held out have {index['n_val_tokens']:,} tokens, under one window of "
                 f"data.seq_len+1={cfg.seq_len + 1}, so val is the last {cfg.val_fraction:g} of the token stream)")
    return text


def _caps(max_tokens: int, val_fraction: float) -> tuple[int | None, int | None]:
    if not max_tokens:
        return None, None
    val = math.ceil(max_tokens * val_fraction) if val_fraction > 0 else 0
    return max(1, max_tokens - val), val


def plan(cfg, vocab_size: int, cache_dir: Path) -> Plan:
    """The datasets `cfg` (a DataConfig) needs and where they live; reads no documents."""
    if cfg.source.startswith("hf:") and not (cfg.max_docs or cfg.max_tokens) and not cfg.mix:
        raise DataError(f"data.source {cfg.source} is streamed and needs a bound: set data.max_tokens "
                        f"(or data.max_docs) to how much of it to pack")
    entries = [(m.name or _default_name(m.source, i), m.source, m.weight, f"data.mix[{i}].source")
               for i, m in enumerate(cfg.mix)] if cfg.mix else [("train", cfg.source, 1.0, "data.source")]
    names = [e[0] for e in entries]
    entries = [(n if names.count(n) == 1 else f"{n}{i}", *rest) for i, (n, *rest) in enumerate(entries)]
    datasets = []
    cap_train, cap_val = _caps(cfg.max_tokens, cfg.val_fraction)
    for name, spec, weight, key in entries:
        src = open_source(spec, cfg.text_field, cfg.max_docs, cfg.shard_mb, key, cfg.val_fraction)
        datasets.append(Dataset(name, "train", src, weight, val_threshold(cfg.val_fraction), cap_train, cap_val,
                                cfg.max_docs))
    for name, spec in cfg.eval.items():
        src = open_source(spec, cfg.text_field, cfg.max_docs, cfg.shard_mb, f"data.eval.{name}")
        datasets.append(Dataset(name, "eval", src, 0.0, ALL_VAL, 0 if cfg.max_tokens else None,
                                cfg.max_tokens or None, cfg.max_docs))
    if cfg.tokenizer:
        tok_path, tok_key = Path(cfg.tokenizer), ""
        if not tok_path.is_file():
            _load_tokenizer(tok_path, vocab_size)  # the one-line "does not exist" error
    else:
        tok_key = digest("tokenizer", RECIPE_VERSION, [(d.source.fingerprint, d.weight) for d in datasets
                                                       if d.role == "train"],
                         vocab_size, cfg.tokenizer_sample_chars, cfg.val_fraction)[:16]
        tok_path = cache_dir / "tokenizers" / tok_key / "tokenizer.model"
    p = Plan(datasets, tok_path, tok_key)
    if tok_path.is_file():
        _place(p, _load_tokenizer(tok_path, vocab_size), cfg, cache_dir)
    return p


def _default_name(spec: str, i: int) -> str:
    if spec == "embedded":
        return "embedded"
    base = spec[3:].split(":")[0].split("/")[-1] if spec.startswith("hf:") else Path(spec.rstrip("/*")).name
    name = base.split(".")[0] or f"source{i}"
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)


def _load_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    try:
        tok = Tokenizer.load(path)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    if tok.vocab_size != vocab_size:
        raise DataError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but model.vocab_size={vocab_size}; "
                        f"set model.vocab_size={tok.vocab_size}, or data.tokenizer='' to train one")
    return tok


def _place(p: Plan, tok: Tokenizer, cfg, cache_dir: Path) -> None:
    for d in p.datasets:
        key = digest("shards", sh.FORMAT, d.source.fingerprint, tok.fingerprint, d.threshold, d.max_docs,
                     d.cap_train, d.cap_val, cfg.shard_mb)[:16]
        d.directory = cache_dir / "shards" / key


# --------------------------------------------------------------------------- building


def prepare_all(cfg, vocab_size: int, cache_dir: Path, workers: int, log: Callable[[str], None]) -> Plan:
    """Make everything `cfg` needs exist in `cache_dir`; reuse what is already complete."""
    cache_dir = Path(cache_dir)
    p = plan(cfg, vocab_size, cache_dir)
    for d in p.datasets:
        log(f"data: {d.name}: {d.source.description}")
    if p.tokenizer_path.is_file():
        tok = _load_tokenizer(p.tokenizer_path, vocab_size)
        log(f"data: {'given' if cfg.tokenizer else 'cached'} tokenizer {tok.path} ({tok.vocab_size} pieces, "
            f"eos={tok.eos_id})")
    else:
        t0 = time.perf_counter()
        sample = tokenizer_sample(p.train, cfg.tokenizer_sample_chars)
        if not sample.strip():  # every document is val (a tiny corpus): better than no tokenizer
            sample = tokenizer_sample(p.train, cfg.tokenizer_sample_chars, include_val=True)
        if not sample.strip():
            raise DataError(f"{', '.join(d.source.spec for d in p.train)} has no non-empty documents; "
                            f"expected text in it")
        try:
            tok = Tokenizer.train(sample, vocab_size, p.tokenizer_path, threads=max(TRAIN_THREADS, workers))
        except TokenizerError as e:
            raise DataError(str(e)) from None
        log(f"data: trained tokenizer on {len(sample) / 1e6:.1f}M chars in {time.perf_counter() - t0:.1f} s "
            f"({tok.vocab_size} pieces, eos={tok.eos_id})")
    _place(p, tok, cfg, cache_dir)
    for d in p.datasets:
        prepare_dataset(d, tok, cfg, workers, log)
    return p


def tokenizer_sample(datasets: list[Dataset], n_chars: int, include_val: bool = False) -> str:
    """The first train documents of each source (in plan order), `n_chars` in all, split by weight."""
    total = sum(d.weight for d in datasets)
    pieces = []
    for d in datasets:
        want = n_chars if len(datasets) == 1 else int(n_chars * d.weight / total)
        texts, got = [], 0
        for unit in d.source.units:
            for key, text in keyed_documents(unit):
                if got >= want:
                    break
                if include_val or key in unit.train_only or not is_val(text, d.threshold):
                    texts.append(text)
                    got += len(text) + 1
            if got >= want:
                break
        pieces.append("\n".join(texts)[:want])
    return "\n".join(pieces)


def prepare_dataset(d: Dataset, tok: Tokenizer, cfg, workers: int, log: Callable[[str], None]) -> dict:
    """Shards of one dataset: cached, resumed after a crash, or built from scratch."""
    out = d.directory / "shards"
    index = d.index
    if index is not None:
        problem = sh.check_shards(d.directory, index)
        if problem is None:
            log(f"data: {d.name}: cached packed shards {d.directory}: {_sizes_text(d, index, cfg)} in "
                f"{index['n_shards']} shard(s)")
            return index
        log(f"data: {d.name}: {problem}; rebuilding the damaged shards")
        for shard in index["shards"]:
            if sh.check_shards(d.directory, {**index, "shards": [shard]}) is not None:
                (out / f"{sh.shard_name(shard['unit'], shard['part'])}.json").unlink(missing_ok=True)
        (d.directory / "index.json").unlink()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dtype = sh.token_dtype(tok.vocab_size)
    base = sh.Job(unit=None, index=0, out=str(out), tokenizer=str(tok.path), dtype=dtype.name,
                  threshold=d.threshold, shard_bytes=max(1, int(cfg.shard_mb * 2**20)))
    units = d.source.units
    done = {i: sh.complete_parts(out, i, dtype.itemsize) for i in range(len(units))}
    finished = sum(1 for parts in done.values() if parts and parts[-1]["last"])
    if finished:
        log(f"data: {d.name}: resuming: {finished} of {len(units)} unit(s) already complete")
    # Caps on the first N documents or tokens of a local source need one ordered pass (the
    # embedded corpus applies max_docs to its file list, a stream shares caps among its shards).
    serial = d.cap_train is not None and not d.source.streaming or (d.max_docs and d.source.kind == "local")
    if serial:
        _run_serial(d, base, units, done, log)
    else:
        jobs = [_resume(replace(base, unit=u, index=i), done[i], d) for i, u in enumerate(units)
                if not (done[i] and done[i][-1]["last"])]
        _run_parallel(jobs, workers, done, log, d.name, len(units))
    sidecars = [s for i in range(len(units)) for s in sh.complete_parts(out, i, dtype.itemsize)]
    n_docs = sum(s["train"]["documents"] + s["val"]["documents"] for s in sidecars)
    if n_docs == 0:
        raise DataError(f"{'data.source' if d.role == 'train' and d.name == 'train' else d.name} "
                        f"{d.source.spec} has no non-empty documents; expected text in it")
    index = sh.publish_index(d.directory, sidecars, {
        "name": d.name, "role": d.role, "source": d.source.spec, "source_fingerprint": d.source.fingerprint,
        "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "tokenizer_fingerprint": tok.fingerprint, "val_threshold": str(d.threshold), "max_docs": d.max_docs,
        "cap_train": d.cap_train, "cap_val": d.cap_val, "corpus_bytes": d.source.n_bytes,
        "seconds": round(time.perf_counter() - t0, 2)})
    log(f"data: {d.name}: packed {index['n_docs']:,} docs into {_sizes_text(d, index, cfg)}, "
        f"{index['n_shards']} shard(s), in {index['seconds']:.1f} s ({workers} worker(s))")
    if d.role == "train":
        log(f"data: {d.name}: {_val_sources_text(d.directory, index)}")
    return index


def _val_sources_text(directory: Path, index: dict) -> str:
    """'val: N sources, the largest X (Y% of val tokens)', from val_manifest.json."""
    manifest = sh.read_val_manifest(directory) or []
    if not manifest or not index["n_val_tokens"]:
        return "val: no documents held out"
    top = manifest[0]
    return (f"val: {len(manifest):,} source(s) in {directory / 'val_manifest.json'}, the largest "
            f"{top['source']} ({top['tokens'] / index['n_val_tokens']:.1%} of val tokens)")


def _resume(job: sh.Job, parts: list[dict], d: Dataset) -> sh.Job:
    if d.source.streaming and d.cap_train is not None:  # each stream shard packs its share of the cap
        n = len(d.source.units)
        job = replace(job, max_train=math.ceil(d.cap_train / n), max_val=math.ceil(d.cap_val / n))
        if parts:
            job = replace(job, max_train=max(0, job.max_train - sum(p["train"]["tokens"] for p in parts)),
                          max_val=max(0, job.max_val - sum(p["val"]["tokens"] for p in parts)))
    return replace(job, part=len(parts), skip_docs=parts[-1]["doc_end"] if parts else 0)


def _run_serial(d: Dataset, base: sh.Job, units, done: dict, log) -> None:
    left_train, left_val, left_docs = d.cap_train, d.cap_val, d.max_docs
    for i, unit in enumerate(units):
        parts = done[i]
        if not (parts and parts[-1]["last"]):
            if (left_docs is not None and d.max_docs and left_docs <= 0) or (
                    left_train is not None and left_train <= 0 and left_val <= 0):
                break
            job = _resume(replace(base, unit=unit, index=i, max_train=left_train, max_val=left_val,
                                  max_docs=left_docs if d.max_docs else 0), parts, d)
            parts = parts + sh.run_unit(job)
            log(f"data: {d.name}: unit {i + 1}/{len(units)} done")
        if left_train is not None:
            left_train -= sum(p["train"]["tokens"] for p in parts)
            left_val -= sum(p["val"]["tokens"] for p in parts)
        if d.max_docs:
            left_docs -= sum(p["train"]["documents"] + p["val"]["documents"] for p in parts)


def _run_parallel(jobs: list[sh.Job], workers: int, done: dict, log, name: str, n_units: int) -> None:
    if not jobs:
        return
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        for job in jobs:
            sh.run_unit(job)
        return
    # spawn: the caller may be a training process holding threads (torch, gloo) that fork would copy.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for n, _ in enumerate(pool.imap_unordered(sh.run_unit, jobs), 1):
            if n % max(1, len(jobs) // 10) == 0 or n == len(jobs):
                log(f"data: {name}: {n_units - len(jobs) + n}/{n_units} units done")
