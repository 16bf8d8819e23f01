"""Corpus → SentencePiece tokenizer → packed token files → batches (DESIGN §7).

Rank 0 builds everything into `cache_dir` (shared by the runs of an out_dir); the other
ranks wait at a barrier and open the result read-only. Steps:

1. Source (`data.source`), always read through HF `datasets`:
   - `embedded`: the interpreter's standard-library `.py` files, one document per non-empty
     file, sorted by relative path (site-packages, dist-packages and test/tests/idlelib/lib2to3
     directories excluded). `max_docs` keeps the first N files of that order.
   - a local `.txt` (one document per blank-line-separated paragraph), `.jsonl`/`.json`
     (field `text_field`) or `.parquet` file, or a directory of them (sorted paths).
   - `hf:<name>[:<config>]`: the hub dataset's train split, streamed; needs `max_docs` or
     `max_tokens` because a stream has no end we could wait for.
2. Train/val split, by document and deterministic from the seed:
   - map-style sources: `train_test_split(test_size=val_fraction, seed=seed)` when that gives
     val at least one whole document (n_docs * val_fraction >= 1);
   - streams: document i is val when (i + seed) % k == 0, k = max(2, round(1 / val_fraction));
   - otherwise (too few documents) the token stream is split: its last
     ceil(val_fraction * n_tokens) tokens are val.
   `val_fraction=0` means no val split.
3. Tokenizer: `data.tokenizer` if given (its vocab must equal model.vocab_size), else a BPE
   model (trainer/tokenizer.py) trained on the first `tokenizer_sample_chars` chars of the
   train split. Cached by (corpus fingerprint, vocab, sample size, split): its sample comes
   from the train split, which depends on the seed.
4. Packing: `Dataset.map(batched=True)` tokenizes, each document ends with EOS, and the ids
   are written flat to `train.bin` / `val.bin` (uint16 when the vocab fits, else uint32)
   with a `meta.json`. `max_tokens` caps train + val together (val gets its
   ceil(val_fraction * max_tokens) share). Each build goes to a temp dir that is renamed into
   place only when complete, so an interrupted prepare is never trusted later.
5. Sampling (PackedData): windows of seq_len+1 tokens at stride seq_len over the train
   stream, visited in a per-epoch permutation; a batch is a pure function of
   (seed, step, micro, dp_rank), so the loader state is just the step.

Cache layout: `hf/` (datasets' own cache), `tokenizers/<key>/tokenizer.model`,
`packed/<key>/{train.bin,val.bin,meta.json}`. The run dir gets `tokenizer/tokenizer.model`
and `data.json` (what was prepared, and where the ranks find it).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from trainer.errors import UserError
from trainer.tokenizer import RECIPE_VERSION, Tokenizer, TokenizerError

PACK_VERSION = 1  # bump when the packed format or the split/sampling rules change
EXTENSIONS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ACCEPTED = "'embedded', a .txt/.jsonl/.json/.parquet file or a directory of them, or 'hf:<name>[:<config>]'"
EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
MAP_BATCH = 256


class DataError(UserError):
    """Bad data input: what is wrong and what would be accepted, in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------- sources


@dataclass
class EmbeddedSource:
    """The running interpreter's standard library: real text on every machine."""

    root: Path
    files: list[Path]
    fingerprint: str
    n_bytes: int
    streaming = False

    @classmethod
    def open(cls, cfg) -> "EmbeddedSource":
        root = Path(sysconfig.get_paths()["stdlib"])
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in EXCLUDED_STDLIB_DIRS and d != "__pycache__"]
            found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
        stats = sorted((p.relative_to(root).as_posix(), p.stat()) for p in found)
        stats = [(rel, st) for rel, st in stats if st.st_size > 0]
        if cfg.max_docs:
            stats = stats[:cfg.max_docs]
        if not stats:
            raise DataError(f"data.source=embedded: no standard-library .py files under {root}; "
                            f"use a local path or 'hf:<name>' instead")
        listing = [(rel, st.st_size, st.st_mtime_ns) for rel, st in stats]
        return cls(root, [root / rel for rel, _ in stats], _digest("embedded", sys.version, str(root), listing),
                   sum(st.st_size for _, st in stats))

    def describe(self) -> str:
        return f"embedded stdlib corpus {self.root}: {len(self.files)} .py files, {self.n_bytes / 1e6:.1f} MB"

    def documents(self, hf_cache: Path):
        from datasets import Dataset

        return Dataset.from_dict({"text": [p.read_text(encoding="utf-8", errors="replace") for p in self.files]})


@dataclass
class LocalSource:
    """Local text/json/parquet files, loaded with the matching `datasets` builder."""

    path: Path
    files: list[Path]
    text_field: str
    max_docs: int
    fingerprint: str
    n_bytes: int
    streaming = False

    @classmethod
    def open(cls, cfg) -> "LocalSource":
        path = Path(cfg.source).expanduser()
        if not path.exists():
            raise DataError(f"data.source {cfg.source} does not exist; expected {ACCEPTED}")
        if path.is_file():
            if path.suffix.lower() not in EXTENSIONS:
                raise DataError(f"data.source {path} has an unsupported extension; expected {ACCEPTED}")
            files = [path]
        else:
            files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                           key=lambda p: p.relative_to(path).as_posix())
            if not files:
                raise DataError(f"data.source {path} contains no .txt/.jsonl/.json/.parquet files; expected {ACCEPTED}")
        stats = [(p, p.stat()) for p in files]
        n_bytes = sum(st.st_size for _, st in stats)
        if n_bytes == 0:
            raise DataError(f"data.source {path} is empty; expected {ACCEPTED} with some text in it")
        listing = [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p, st in stats]
        return cls(path, files, cfg.text_field, cfg.max_docs,
                   _digest("local", listing, cfg.text_field, cfg.max_docs), n_bytes)

    def describe(self) -> str:
        return f"local corpus {self.path}: {len(self.files)} file(s), {self.n_bytes / 1e6:.1f} MB"

    def documents(self, hf_cache: Path):
        from datasets import Value, concatenate_datasets, load_dataset

        parts = []
        for builder in ("text", "json", "parquet"):
            files = [str(p) for p in self.files if EXTENSIONS[p.suffix.lower()] == builder]
            if not files:
                continue
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            try:
                ds = load_dataset(builder, data_files=files, split="train", cache_dir=str(hf_cache), **extra)
            except Exception as e:  # datasets raises many types for unreadable files; all mean the same here
                if "corresponds to no data" in str(e):  # only blank lines: no paragraph survives
                    raise DataError(f"data.source {self.path} has no non-empty documents; expected {ACCEPTED} "
                                    f"with text in it") from None
                raise DataError(f"could not read {self.path} as {builder}: {_first_line(e)}") from None
            field = "text" if builder == "text" else self.text_field
            if field not in ds.column_names:
                raise DataError(f"{builder} records in {self.path} have no field {field!r} (fields: "
                                f"{', '.join(ds.column_names) or 'none'}); set data.text_field")
            ds = ds.select_columns([field])
            if field != "text":
                ds = ds.rename_column(field, "text")
            try:
                parts.append(ds.cast_column("text", Value("string")))
            except Exception as e:
                raise DataError(f"field {field!r} in {self.path} is not text: {_first_line(e)}") from None
        ds = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        ds = ds.filter(_non_empty, batched=True, desc="dropping empty documents")
        if len(ds) == 0:
            raise DataError(f"data.source {self.path} has no non-empty documents; expected {ACCEPTED} with text in it")
        return ds.select(range(min(self.max_docs, len(ds)))) if self.max_docs else ds


def _non_empty(batch: dict) -> list[bool]:
    return [bool(t) for t in batch["text"]]


@dataclass
class HubSource:
    """A hub dataset's train split, streamed; nothing is downloaded beyond what is packed."""

    name: str
    config: str | None
    text_field: str
    max_docs: int
    fingerprint: str
    n_bytes = 0
    streaming = True

    @classmethod
    def open(cls, cfg) -> "HubSource":
        name, _, config = cfg.source[len("hf:"):].partition(":")
        if not name:
            raise DataError(f"data.source {cfg.source!r} names no dataset; expected {ACCEPTED}")
        if not (cfg.max_docs or cfg.max_tokens):
            raise DataError(f"data.source {cfg.source} is streamed and needs a bound: set data.max_tokens "
                            f"(or data.max_docs) to how much of it to pack")
        return cls(name, config or None, cfg.text_field, cfg.max_docs,
                   _digest("hub", name, config, cfg.text_field, cfg.max_docs))

    def describe(self) -> str:
        return f"hub dataset {self.name}" + (f" ({self.config})" if self.config else "") + ", streamed"

    def documents(self, hf_cache: Path):
        from datasets import load_dataset

        try:
            ds = load_dataset(self.name, self.config, split="train", streaming=True, cache_dir=str(hf_cache))
        except Exception as e:  # offline, unknown name, gated: all end the same way for the user
            raise DataError(f"could not open hub dataset {self.name!r}: {_first_line(e)}; check the name and "
                            f"network access, or use a local path or 'embedded'") from None
        return ds.take(self.max_docs) if self.max_docs else ds


def open_source(cfg):
    """The source named by `data.source`, checked and fingerprinted without reading documents."""
    if cfg.source == "embedded":
        return EmbeddedSource.open(cfg)
    if cfg.source.startswith("hf:"):
        return HubSource.open(cfg)
    return LocalSource.open(cfg)


# --------------------------------------------------------------------------- split + packing


class _Encoder:
    """`map` function: documents → token ids with EOS appended. Pickles as the tokenizer's path."""

    def __init__(self, tokenizer: Tokenizer, field: str, stream_period: int = 0, seed: int = 0):
        self.tokenizer, self.field, self.stream_period, self.seed = tokenizer, field, stream_period, seed

    def __call__(self, batch: dict, indices: list[int] | None = None) -> dict:
        eos = self.tokenizer.eos_id
        out = {"ids": [ids + [eos] for ids in self.tokenizer.encode([t or "" for t in batch[self.field]])]}
        if indices is not None:
            out["is_val"] = [_stream_is_val(i, self.stream_period, self.seed) for i in indices]
        return out


def _stream_period(val_fraction: float) -> int:
    return max(2, round(1 / val_fraction)) if val_fraction > 0 else 0


def _stream_is_val(index: int, period: int, seed: int) -> bool:
    return period > 0 and (index + seed) % period == 0


def _write_tokens(path: Path, chunks: Iterable[np.ndarray], cap: int = 0) -> int:
    """Append `chunks` to a new file, stopping at `cap` tokens (0 = no cap). Returns the count."""
    n = 0
    with open(path, "wb") as f:
        for arr in chunks:
            if cap:
                arr = arr[:cap - n]
            f.write(np.ascontiguousarray(arr).data)
            n += len(arr)
            if cap and n >= cap:
                break
        f.flush()
        os.fsync(f.fileno())
    return n


def _split_tail(train: Path, val: Path, dtype: np.dtype, n: int, val_fraction: float) -> tuple[int, int]:
    """Token split for corpora with too few documents: the stream's last val_fraction goes to val."""
    n_val = math.ceil(val_fraction * n) if val_fraction > 0 else 0
    tail = np.memmap(train, dtype=dtype, mode="r")[n - n_val:] if n_val else np.zeros(0, dtype)
    _write_tokens(val, [np.asarray(tail)])
    del tail
    os.truncate(train, (n - n_val) * dtype.itemsize)
    return n - n_val, n_val


@dataclass
class _Caps:
    """`max_tokens` split into the train and val shares (0 = uncapped)."""

    train: int
    val: int
    total: int

    @classmethod
    def of(cls, max_tokens: int, val_fraction: float) -> "_Caps":
        val = math.ceil(max_tokens * val_fraction) if max_tokens and val_fraction > 0 else 0
        return cls(max(1, max_tokens - val) if max_tokens else 0, val, max_tokens)


@dataclass
class DocumentSplit:
    """A map-style corpus split by document, or (val None) kept whole for a token split."""

    train: object  # datasets.Dataset
    val: object | None
    n_docs: int
    val_fraction: float

    @classmethod
    def of(cls, ds, val_fraction: float, seed: int) -> "DocumentSplit":
        if val_fraction > 0 and len(ds) * val_fraction >= 1 and math.ceil(len(ds) * val_fraction) < len(ds):
            parts = ds.train_test_split(test_size=val_fraction, seed=seed)
            return cls(parts["train"], parts["test"], len(ds), val_fraction)
        return cls(ds, None, len(ds), val_fraction)

    def tokenizer_sample(self, n_chars: int) -> str:
        limit = n_chars
        if self.val is None and self.val_fraction > 0:  # keep the future val tail out of the sample
            total = sum(len(t) + 1 for batch in self.train.iter(batch_size=1024) for t in batch["text"])
            limit = min(n_chars, int(total * (1 - self.val_fraction)))
        return _take_chars((t for batch in self.train.iter(batch_size=1024) for t in batch["text"]), limit)

    def pack(self, tokenizer: Tokenizer, out: Path, dtype: np.dtype, caps: _Caps, num_proc: int) -> dict:
        train, val = out / "train.bin", out / "val.bin"
        if self.val is None:
            n = _write_tokens(train, _token_chunks(self.train, tokenizer, dtype, num_proc), caps.total)
            n_train, n_val = _split_tail(train, val, dtype, n, self.val_fraction)
            return {"split": "tokens", "n_docs": self.n_docs, "n_train_tokens": n_train, "n_val_tokens": n_val}
        n_train = _write_tokens(train, _token_chunks(self.train, tokenizer, dtype, num_proc), caps.train)
        n_val = _write_tokens(val, _token_chunks(self.val, tokenizer, dtype, num_proc), caps.val)
        return {"split": "documents", "n_docs": self.n_docs, "n_train_docs": len(self.train),
                "n_val_docs": len(self.val), "n_train_tokens": n_train, "n_val_tokens": n_val}


def _token_chunks(ds, tokenizer: Tokenizer, dtype: np.dtype, num_proc: int) -> Iterator[np.ndarray]:
    from datasets import Features, List, Value

    ids = ds.map(_Encoder(tokenizer, "text"), batched=True, batch_size=MAP_BATCH, remove_columns=ds.column_names,
                 num_proc=num_proc if num_proc > 1 else None, desc="tokenizing",
                 features=Features({"ids": List(Value(dtype.name))}))
    for chunk in ids.data.column("ids").chunks:  # flat arrow values: no Python loop over tokens
        yield chunk.flatten().to_numpy(zero_copy_only=False)


def _take_chars(texts: Iterable[str], n_chars: int) -> str:
    parts, total = [], 0
    for t in texts:
        if total >= n_chars:
            break
        parts.append(t)
        total += len(t) + 1
    return "\n".join(parts)[:n_chars]


@dataclass
class StreamSplit:
    """A streamed corpus split by document index as it goes past (see the module docstring)."""

    stream: object  # datasets.IterableDataset
    text_field: str
    val_fraction: float
    seed: int

    def tokenizer_sample(self, n_chars: int) -> str:
        period = _stream_period(self.val_fraction)
        texts = (ex[self.text_field] or "" for i, ex in enumerate(self.stream)
                 if not _stream_is_val(i, period, self.seed))
        return _guard_stream(lambda: _take_chars(texts, n_chars), self.text_field)

    def pack(self, tokenizer: Tokenizer, out: Path, dtype: np.dtype, caps: _Caps, num_proc: int) -> dict:
        return _guard_stream(lambda: self._pack(tokenizer, out, dtype, caps), self.text_field)

    def _pack(self, tokenizer: Tokenizer, out: Path, dtype: np.dtype, caps: _Caps) -> dict:
        period = _stream_period(self.val_fraction)
        ids = self.stream.map(_Encoder(tokenizer, self.text_field, period, self.seed), batched=True,
                              batch_size=MAP_BATCH, with_indices=True)
        counts = {"train": 0, "val": 0, "docs": 0}
        train, val = out / "train.bin", out / "val.bin"
        with open(train, "wb") as ftrain, open(val, "wb") as fval:
            for batch in ids.iter(batch_size=MAP_BATCH):
                counts["docs"] += len(batch["ids"])
                for name, f, cap in (("train", ftrain, caps.train), ("val", fval, caps.val)):
                    docs = [np.asarray(x, dtype) for x, v in zip(batch["ids"], batch["is_val"]) if v == (name == "val")]
                    if docs:
                        arr = np.concatenate(docs)[:cap - counts[name] if cap else None]
                        f.write(arr.data)
                        counts[name] += len(arr)
                if caps.train and counts["train"] >= caps.train and counts["val"] >= caps.val:
                    break
            for f in (ftrain, fval):
                f.flush()
                os.fsync(f.fileno())
        if counts["val"] == 0 and self.val_fraction > 0:  # fewer documents than one val period
            n_train, n_val = _split_tail(train, val, dtype, counts["train"], self.val_fraction)
            return {"split": "tokens", "n_docs": counts["docs"], "n_train_tokens": n_train, "n_val_tokens": n_val}
        return {"split": "documents", "n_docs": counts["docs"], "n_train_tokens": counts["train"],
                "n_val_tokens": counts["val"]}


def _guard_stream(fn: Callable, text_field: str):
    """Network and schema failures while streaming become one DataError line."""
    try:
        return fn()
    except (DataError, TokenizerError):
        raise
    except KeyError as e:
        raise DataError(f"hub records have no field {e}; set data.text_field") from None
    except Exception as e:  # connection drops, auth, parse errors: all reported the same way
        raise DataError(f"reading the hub dataset failed: {_first_line(e)}") from None


def _split(source, cfg, seed: int, hf_cache: Path):
    docs = source.documents(hf_cache)
    if source.streaming:
        return StreamSplit(docs, cfg.text_field, cfg.val_fraction, seed)
    return DocumentSplit.of(docs, cfg.val_fraction, seed)


# --------------------------------------------------------------------------- build (rank 0)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _read_meta(packed: Path) -> dict | None:
    """The cached pack's meta, or None unless it is complete (files present, sizes right)."""
    try:
        meta = json.loads((packed / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        ok = ((packed / "train.bin").stat().st_size == meta["n_train_tokens"] * itemsize
              and (packed / "val.bin").stat().st_size == meta["n_val_tokens"] * itemsize)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if ok else None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp dir into place; a concurrent builder's complete copy also wins."""
    if final.exists():
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if _read_meta(final) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_tokenizer(cfg, vocab_size: int, seed: int, source, cache_dir: Path, split_fn) -> tuple:
    """(tokenizer, how it was obtained). Trains into the cache only when no cached model exists."""
    if cfg.tokenizer:
        tok, how = Tokenizer.load(cfg.tokenizer), f"given tokenizer {cfg.tokenizer}"
    else:
        key = _digest("tokenizer", RECIPE_VERSION, source.fingerprint, vocab_size, cfg.tokenizer_sample_chars,
                      cfg.val_fraction, seed)[:16]
        path = cache_dir / "tokenizers" / key / "tokenizer.model"
        if path.is_file():
            tok, how = Tokenizer.load(path), f"cached tokenizer {path}"
        else:
            t0 = time.perf_counter()
            sample = split_fn().tokenizer_sample(cfg.tokenizer_sample_chars)
            tok = Tokenizer.train(sample, vocab_size, path)
            how = f"trained tokenizer on {len(sample) / 1e6:.1f}M chars in {time.perf_counter() - t0:.1f} s"
    if tok.vocab_size != vocab_size:
        raise DataError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but model.vocab_size={vocab_size}; "
                        f"set model.vocab_size={tok.vocab_size}, or data.tokenizer='' to train one")
    return tok, how


def build(cfg, vocab_size: int, seed: int, cache_dir: Path, log: Callable[[str], None]) -> tuple[Path, Tokenizer, dict]:
    """Rank 0's work: tokenizer and packed token files in the cache, reused when already there."""
    t0 = time.perf_counter()
    source = open_source(cfg)
    log(f"data: {source.describe()}")
    hf_cache = cache_dir / "hf"
    split = None

    def split_once():
        nonlocal split
        split = split or _split(source, cfg, seed, hf_cache)
        return split

    tok, how = _resolve_tokenizer(cfg, vocab_size, seed, source, cache_dir, split_once)
    log(f"data: {how} ({tok.vocab_size} pieces, eos={tok.eos_id})")
    dtype = token_dtype(vocab_size)
    key = _digest("packed", PACK_VERSION, source.fingerprint, tok.fingerprint, cfg.val_fraction, seed,
                  cfg.max_docs, cfg.max_tokens)[:16]
    packed = cache_dir / "packed" / key
    meta = _read_meta(packed)
    if meta is not None:
        log(f"data: cached packed tokens {packed}: {meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val")
        return packed, tok, meta
    tmp = packed.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = split_once().pack(tok, tmp, dtype, _Caps.of(cfg.max_tokens, cfg.val_fraction), cfg.num_proc)
    meta = {"format": PACK_VERSION, "dtype": dtype.name, **counts, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "tokenizer_fingerprint": tok.fingerprint, "corpus_fingerprint": source.fingerprint,
            "source": cfg.source, "corpus_bytes": source.n_bytes, "seed": seed, "val_fraction": cfg.val_fraction,
            "max_docs": cfg.max_docs, "max_tokens": cfg.max_tokens, "seconds": round(time.perf_counter() - t0, 2)}
    _write_json(tmp / "meta.json", meta)
    _publish(tmp, packed)
    log(f"data: packed {meta['n_docs']:,} docs into {meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} "
        f"val tokens ({meta['split']} split) in {meta['seconds']:.1f} s")
    return packed, tok, meta


def prepare_data(cfg, vocab_size: int, seed: int, cache_dir: Path, run_dir: Path, is_main: bool,
                 barrier: Callable[[], None], log: Callable[[str], None] | None = None) -> "PackedData":
    """Build (rank 0) or open (all ranks, after `barrier`) the packed data for `cfg` (a DataConfig).

    Rank 0 also copies the tokenizer to `run_dir/tokenizer/tokenizer.model` and records what was
    prepared in `run_dir/data.json`, which is how the other ranks find the cached files.
    """
    cache_dir, run_dir = Path(cache_dir), Path(run_dir)
    pointer = run_dir / "data.json"
    if log is None:
        from trainer.dist import print0 as log
    if is_main:
        try:
            packed, tok, meta = build(cfg, vocab_size, seed, cache_dir, log)
        except TokenizerError as e:
            raise DataError(str(e)) from None
        tok.copy_to(run_dir / "tokenizer")
        _write_json(pointer, {"packed_dir": str(packed.resolve()), **meta})
    barrier()
    info = json.loads(pointer.read_text())
    try:
        tokenizer = Tokenizer.load(run_dir / "tokenizer" / "tokenizer.model")
    except TokenizerError as e:
        raise DataError(str(e)) from None
    return PackedData.open(Path(info["packed_dir"]), tokenizer, cfg.seq_len, seed)


# --------------------------------------------------------------------------- batches


class PackedData:
    """Read-only view of packed train/val token streams and the batches drawn from them.

    Window w of a stream is tokens [w*seq_len, w*seq_len + seq_len] (seq_len+1 tokens);
    inputs are its first seq_len tokens and labels its last seq_len, shifted before any
    sequence-parallel slicing.
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, tokenizer: Tokenizer, seq_len: int, seed: int,
                 meta: dict | None = None):
        self.tokenizer, self.seq_len, self.seed, self.meta = tokenizer, seq_len, seed, meta or {}
        self._train, self._val = train, val
        self.n_train_tokens, self.n_val_tokens = len(train), len(val)
        self.n_train_windows = (len(train) - 1) // seq_len if len(train) else 0
        self.n_val_windows = (len(val) - 1) // seq_len if len(val) else 0
        if self.n_train_windows < 1:
            raise DataError(f"the train split has {len(train):,} tokens, fewer than one window of data.seq_len+1="
                            f"{seq_len + 1}; use more data (data.source, data.max_docs, data.max_tokens) or a "
                            f"smaller data.seq_len")
        if len(val) and self.n_val_windows < 1:
            raise DataError(f"the validation split has {len(val):,} tokens, fewer than one window of "
                            f"data.seq_len+1={seq_len + 1}; raise data.val_fraction or lower data.seq_len")
        self._perms: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, packed_dir: Path, tokenizer: Tokenizer, seq_len: int, seed: int) -> "PackedData":
        meta = _read_meta(packed_dir)
        if meta is None:
            raise DataError(f"packed data in {packed_dir} is missing or incomplete; delete it and run again")
        dtype = np.dtype(meta["dtype"])

        def stream(name: str, n: int) -> np.ndarray:
            return np.memmap(packed_dir / name, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)

        return cls(stream("train.bin", meta["n_train_tokens"]), stream("val.bin", meta["n_val_tokens"]),
                   tokenizer, seq_len, seed, meta)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs; keep the latest
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_train_windows)
        return self._perms[epoch]

    def train_windows(self, step: int, micro: int, dp_rank: int, dp_size: int, micro_batch: int,
                      grad_accum: int) -> np.ndarray:
        """Window ids [micro_batch] of this (step, micro, dp_rank): the global sample index
        g = ((step*grad_accum + micro)*dp_size + dp_rank)*micro_batch + j is window
        permutation(seed, g // n_windows)[g % n_windows]."""
        g = ((step * grad_accum + micro) * dp_size + dp_rank) * micro_batch + np.arange(micro_batch)
        epoch, pos = np.divmod(g, self.n_train_windows)
        windows = np.empty_like(g)
        for e in np.unique(epoch):
            at = epoch == e
            windows[at] = self._permutation(int(e))[pos[at]]
        return windows

    def train_batch(self, step: int, micro: int, dp_rank: int, dp_size: int, micro_batch: int,
                    grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), LongTensors [micro_batch, seq_len]."""
        windows = self.train_windows(step, micro, dp_rank, dp_size, micro_batch, grad_accum)
        return self._gather(self._train, windows)

    def val_batches(self, n_batches: int, micro_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same (inputs, labels) every call: n_batches*micro_batch windows spread evenly over
        the val stream, or all of them when there are fewer (then the last batch may be smaller)."""
        k = min(n_batches * micro_batch, self.n_val_windows)
        windows = np.arange(k) * self.n_val_windows // max(k, 1)
        for i in range(0, k, micro_batch):
            yield self._gather(self._val, windows[i:i + micro_batch])

    def _gather(self, tokens: np.ndarray, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = windows[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        w = torch.from_numpy(tokens[idx].astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()
