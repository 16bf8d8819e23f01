"""Where documents come from, and how a source is cut into independent units of work.

A source string is one of:
- `embedded`: the interpreter's standard-library `.py` files, one document per non-empty
  file, sorted by relative path (site-packages, dist-packages and test/tests/idlelib/lib2to3
  directories excluded). `max_docs` keeps the first N files of that order. The character-map
  codec tables under `encodings/` (cp861.py, iso8859_5.py, ...: 72 files in 3.11, whose
  docstring starts "Python Character Mapping Codec", generated from one template) are excluded
  too: they are near-copies of one another, 256-entry tables more than code, so one of them
  held out for val is predicted by its siblings in train and made a val loss that measured
  nothing (one such table was ~92% of the val tokens).
  Its val split is decided per file before anything is tokenized (`embedded_train_only`): a
  file whose hash says val but which is larger than `EMBEDDED_VAL_MAX_SHARE` of the val
  set's bytes goes to train, so no single file dominates the held-out loss.
- a local `.txt` / `.jsonl` / `.json` / `.parquet` file, optionally compressed as `.gz` or
  `.zst` (not parquet, which compresses internally), a directory of them (searched
  recursively, sorted paths) or a glob (`corpus/**/*.jsonl.zst`).
  - `.txt`: one document per blank-line-separated paragraph (runs of two or more newlines
    separate documents; the paragraph is stripped of surrounding newlines).
  - `.jsonl`: one record per line, the document is field `text_field`.
  - `.json`: a list of records, or JSON lines.
  - `.parquet`: column `text_field`.
- `hf:<name>[:<config>]`: a hub dataset's train split, streamed.

A *unit* is a piece of one source that a worker process reads on its own: a byte range of an
uncompressed `.txt`/`.jsonl` file (cut just after a document separator, so the documents of
all ranges are exactly the documents of the whole file), a group of row groups of a parquet
file, a whole compressed or `.json` file, a group of stdlib files, or one shard of a hub
stream. The plan depends only on the files and `data.shard_mb`, never on the worker count,
so any number of workers produces the same documents in the same order.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import math
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import xxhash

from trainer.errors import UserError

SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSED = (".gz", ".zst")
ACCEPTED = ("'embedded', a .txt/.jsonl/.json/.parquet file (optionally .gz/.zst), a directory or glob of them, "
            "or 'hf:<name>[:<config>]'")
EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
# The first line of every generated character-map codec table in the stdlib's encodings/.
CODEC_TABLE_MARKER = b"Python Character Mapping Codec"
# The most of the embedded val set's bytes one file may hold (the larger val-hashed files
# go to train, see embedded_train_only); bytes stand in for tokens, known before tokenizing.
EMBEDDED_VAL_MAX_SHARE = 0.05
_SEPARATOR = {"text": b"\n\n", "jsonl": b"\n"}
# The train/val split rule (documented in trainer/data/shards.py): here, beside the documents it
# splits, because the embedded corpus applies it before anything is tokenised.
HASH_SEED = 0  # the val split must not depend on the run's seed: one prepared set serves every seed
ALL_VAL = 1 << 64  # threshold that makes every document val (held-out eval sets)


class DataError(UserError):
    """Bad data input: what is wrong and what would be accepted, in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def val_threshold(val_fraction: float) -> int:
    return min(ALL_VAL, int(val_fraction * ALL_VAL))


def is_val(text: str, threshold: int) -> bool:
    return xxhash.xxh64_intdigest(text.encode("utf-8", errors="replace"), HASH_SEED) < threshold


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@dataclass(frozen=True)
class Unit:
    """One independently readable piece of a source (see the module docstring)."""

    kind: str  # embedded | text | jsonl | json | parquet | hf
    path: str  # file, or hub name; for embedded the stdlib root
    start: int = 0  # byte offset / first row group / stream shard index
    stop: int = -1  # end byte / end row group / number of stream shards (-1: whole file)
    compression: str = ""  # "", ".gz" or ".zst"
    files: tuple = ()  # embedded: the files of this unit
    text_field: str = "text"
    config: str | None = None  # hub dataset config
    take: int = 0  # hub: stop after this many documents (0 = all)
    train_only: tuple = ()  # embedded: files of this unit that go to train whatever their hash

    @property
    def label(self) -> str:
        if self.kind == "embedded":
            return f"{len(self.files)} stdlib files from {self.files[0]}"
        if self.kind == "hf":
            return f"hf:{self.path} shard {self.start}/{self.stop}"
        span = f" [{self.start}, {self.stop})" if self.stop >= 0 else ""
        return f"{self.path}{span}"


@dataclass
class Source:
    """A checked, fingerprinted source and its unit plan; no document has been read yet."""

    spec: str
    kind: str  # embedded | local | hf
    fingerprint: str
    n_bytes: int  # on disk; 0 when unknown (streams)
    planner: Callable[[], list[Unit]]  # the unit plan, made only when someone prepares
    description: str = ""
    _units: list[Unit] | None = field(default=None, repr=False)

    @property
    def streaming(self) -> bool:
        return self.kind == "hf"

    @property
    def units(self) -> list[Unit]:
        if self._units is None:
            self._units = self.planner()
        return self._units


def open_source(spec: str, text_field: str = "text", max_docs: int = 0, shard_mb: float = 64.0,
                key: str = "data.source", val_fraction: float = 0.0) -> Source:
    """The source named by `spec`, checked and cut into units without reading documents.
    `val_fraction` (a train source's val split) lets the embedded corpus decide which of its
    val-hashed files are too large for val when it plans its units."""
    if spec == "embedded":
        return _embedded(max_docs, shard_mb, val_fraction)
    if spec.startswith("hf:"):
        return _hub(spec, text_field, max_docs, key)
    return _local(spec, text_field, shard_mb, key)


# --------------------------------------------------------------------------- embedded


def _is_codec_table(path: Path) -> bool:
    with open(path, "rb") as f:
        return CODEC_TABLE_MARKER in f.read(256)


def _embedded(max_docs: int, shard_mb: float, val_fraction: float = 0.0) -> Source:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_STDLIB_DIRS and d != "__pycache__"]
        codecs = Path(dirpath) == root / "encodings"
        found += [Path(dirpath, f) for f in filenames
                  if f.endswith(".py") and not (codecs and _is_codec_table(Path(dirpath, f)))]
    stats = sorted((p.relative_to(root).as_posix(), p.stat()) for p in found)
    stats = [(rel, st) for rel, st in stats if st.st_size > 0]
    if max_docs:
        stats = stats[:max_docs]
    if not stats:
        raise DataError(f"data.source=embedded: no standard-library .py files under {root}; "
                        f"use a local path or 'hf:<name>' instead")
    listing = [(rel, st.st_size, st.st_mtime_ns) for rel, st in stats]
    n_bytes = sum(st.st_size for _, st in stats)

    def units() -> list[Unit]:
        to_train = embedded_train_only(root, [(rel, st.st_size) for rel, st in stats], val_fraction)
        out, group, size = [], [], 0

        def unit() -> Unit:
            return Unit("embedded", str(root), files=tuple(group), train_only=tuple(f for f in group if f in to_train))

        for rel, st in stats:
            group.append(rel)
            size += st.st_size
            if size >= shard_mb * 2**20:
                out.append(unit())
                group, size = [], 0
        return out + ([unit()] if group else [])

    # val_fraction and the share cap decide which files are val, so they are part of what the
    # corpus is (the tokenizer and the shards of another split are cached apart).
    split = (val_fraction, EMBEDDED_VAL_MAX_SHARE) if val_fraction > 0 else ()
    return Source("embedded", "embedded", digest("embedded", sys.version, str(root), listing, *split), n_bytes,
                  units, f"embedded stdlib corpus {root}: {len(stats)} .py files, {n_bytes / 1e6:.1f} MB")


def embedded_train_only(root: Path, files: list[tuple[str, int]], val_fraction: float,
                        max_share: float = EMBEDDED_VAL_MAX_SHARE) -> frozenset:
    """The files (relative paths) whose text hashes to val but that go to train, so that no
    val file holds more than `max_share` of the val set's bytes: the largest val file moves
    to train while it is above the cap (the cap shrinks with the val set, so this repeats
    until it holds). No set of 1/max_share files or fewer can meet the cap (unless all are the
    same size), so the moves stop at that many rather than empty val. `files` are (path, bytes), known before any
    tokenizing; the hash is the one the shard writer uses."""
    if val_fraction <= 0 or max_share <= 0:
        return frozenset()

    threshold = val_threshold(val_fraction)
    val = sorted(((size, rel) for rel, size in files
                  if is_val((root / rel).read_text(encoding="utf-8", errors="replace"), threshold)),
                 key=lambda x: (-x[0], x[1]))
    total, moved, floor = sum(size for size, _ in val), [], math.ceil(1 / max_share)
    while len(val) - len(moved) > floor and val[len(moved)][0] > max_share * total:
        total -= val[len(moved)][0]
        moved.append(val[len(moved)][1])
    return frozenset(moved)


def stdlib_files(unit: Unit) -> list[Path]:
    return [Path(unit.path) / rel for rel in unit.files]


# --------------------------------------------------------------------------- local files


def file_kind(path: Path) -> tuple[str, str] | None:
    """(kind, compression) of a corpus file name, or None when it is not one."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSED if name.endswith(c)), "")
    base = Path(name[:len(name) - len(compression)] if compression else name)
    kind = SUFFIXES.get(base.suffix)
    if kind is None or (kind == "parquet" and compression):
        return None
    return kind, compression


def _list_files(spec: str, key: str) -> list[Path]:
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in files if p.is_file() and file_kind(p)]
        if not files:
            raise DataError(f"{key} {spec} matches no .txt/.jsonl/.json/.parquet files; expected {ACCEPTED}")
        return files
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{key} {spec} does not exist; expected {ACCEPTED}")
    if path.is_file():
        if file_kind(path) is None:
            raise DataError(f"{key} {path} has an unsupported extension; expected {ACCEPTED}")
        return [path]
    files = sorted((p for p in path.rglob("*") if p.is_file() and file_kind(p)
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise DataError(f"{key} {path} contains no .txt/.jsonl/.json/.parquet files; expected {ACCEPTED}")
    return files


def _local(spec: str, text_field: str, shard_mb: float, key: str) -> Source:
    files = _list_files(spec, key)
    stats = [(p, p.stat()) for p in files]
    n_bytes = sum(st.st_size for _, st in stats)
    if n_bytes == 0:
        raise DataError(f"{key} {spec} is empty; expected {ACCEPTED} with some text in it")
    chunk = max(1, int(shard_mb * 2**20))

    def units() -> list[Unit]:
        return [u for p, st in stats if st.st_size for u in _file_units(p, st.st_size, chunk, text_field, key)]

    listing = [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p, st in stats]
    return Source(spec, "local", digest("local", listing, text_field, shard_mb), n_bytes, units,
                  f"local corpus {spec}: {len(files)} file(s), {n_bytes / 1e6:.1f} MB")


def _file_units(path: Path, size: int, chunk: int, text_field: str, key: str) -> list[Unit]:
    kind, compression = file_kind(path)
    if kind == "parquet":
        return _parquet_units(path, chunk, text_field, key)
    if compression or kind == "json" or size <= chunk:
        return [Unit(kind, str(path), 0, -1, compression, text_field=text_field)]
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + chunk < size:
            cut = _next_cut(f, cuts[-1] + chunk, _SEPARATOR[kind])
            if cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    return [Unit(kind, str(path), a, b, text_field=text_field) for a, b in zip(cuts, cuts[1:])]


def _next_cut(f, pos: int, sep: bytes) -> int:
    """The offset just after the first `sep` at or after `pos` (the file size if none)."""
    f.seek(pos)
    carry = b""
    while True:
        block = f.read(1 << 20)
        if not block:
            return pos + len(carry)
        buf = carry + block
        i = buf.find(sep)
        if i >= 0:
            return pos + i + len(sep)
        keep = len(sep) - 1
        pos += len(buf) - keep
        carry = buf[len(buf) - keep:] if keep else b""


def _parquet_units(path: Path, chunk: int, text_field: str, key: str) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"could not read {path} as parquet: {first_line(e)}") from None
    units, start, size = [], 0, 0
    for i in range(meta.num_row_groups):
        size += meta.row_group(i).total_byte_size
        if size >= chunk:
            units.append(Unit("parquet", str(path), start, i + 1, text_field=text_field))
            start, size = i + 1, 0
    if start < meta.num_row_groups or not units:
        units.append(Unit("parquet", str(path), start, meta.num_row_groups, text_field=text_field))
    return units


# --------------------------------------------------------------------------- hub


def _hub(spec: str, text_field: str, max_docs: int, key: str) -> Source:
    name, _, config = spec[len("hf:"):].partition(":")
    if not name:
        raise DataError(f"{key} {spec!r} names no dataset; expected {ACCEPTED}")
    def units() -> list[Unit]:
        # One stream per data file of the dataset, read in parallel; a document cap needs one
        # ordered stream so that "the first N documents" means what it says.
        n = 1 if max_docs else _hub_shards(name, config or None)
        return [Unit("hf", name, i, n, config=config or None, text_field=text_field, take=max_docs) for i in range(n)]

    return Source(spec, "hf", digest("hub", name, config, text_field, max_docs), 0, units,
                  f"hub dataset {name}" + (f" ({config})" if config else "") + ", streamed")


def _load_stream(name: str, config: str | None):
    from datasets import load_dataset

    try:
        return load_dataset(name, config, split="train", streaming=True)
    except Exception as e:  # offline, unknown name, gated: all end the same way for the user
        raise DataError(f"could not open hub dataset {name!r}: {first_line(e)}; check the name and "
                        f"network access, or use a local path or 'embedded'") from None


def _hub_shards(name: str, config: str | None) -> int:
    return max(1, min(64, getattr(_load_stream(name, config), "n_shards", 1) or 1))


# --------------------------------------------------------------------------- reading


def documents(unit: Unit) -> Iterator[str]:
    """The non-empty documents of `unit`, in order."""
    for _, text in keyed_documents(unit):
        yield text


def keyed_documents(unit: Unit) -> Iterator[tuple[str | int, str]]:
    """(source, text) for the documents of `unit`, in order. The source is where the document
    came from when the unit says so: a stdlib file's relative path, or a record's own `source`
    field (a string); otherwise it is the document's 0-based ordinal in the unit (an int, which
    `shards.val_manifest` turns into `<file>:<ordinal in the file>`)."""
    if unit.kind == "embedded":
        for rel, p in zip(unit.files, stdlib_files(unit)):
            text = p.read_text(encoding="utf-8", errors="replace")
            if text:
                yield rel, text
        return
    if unit.kind == "text":
        docs = ((None, t) for t in _paragraphs(_text_chunks(unit)))
    elif unit.kind == "jsonl":
        docs = _records(unit, _lines(_text_chunks(unit)))
    elif unit.kind == "json":
        docs = _records(unit, _json_records(unit))
    elif unit.kind == "parquet":
        docs = _parquet(unit)
    elif unit.kind == "hf":
        docs = ((None, t) for t in _hub_documents(unit))
    else:
        raise AssertionError(unit.kind)
    for n, (source, text) in enumerate(docs):
        yield (source if source else n), text


def _source_field(item) -> str | None:
    source = item.get("source")
    return source if isinstance(source, str) else None


# The share of printable characters (whitespace counts, U+FFFD from undecodable bytes does
# not) below which a file is refused as not text. UTF-8 text of any script scores ~1.0, and
# Latin-1 prose read as UTF-8 loses only its accented letters (a few percent); random bytes
# score about 0.45, UTF-16 about 0.35.
MIN_PRINTABLE = 0.8
PRINTABLE_SAMPLE_CHARS = 1 << 16


def printable_ratio(text: str) -> float:
    if not text:
        return 1.0
    return sum(c.isprintable() and c != "\ufffd" or c in "\n\t\r" for c in text) / len(text)


def _checked_text(unit: Unit, chunk: str) -> str:
    """`chunk` (the start of a unit), or a one-line error when it is not text: a binary file
    would otherwise train (its bytes decode to U+FFFD and control characters) or fail in
    the tokenizer with a message about vocabulary size."""
    ratio = printable_ratio(chunk[:PRINTABLE_SAMPLE_CHARS])
    if ratio < MIN_PRINTABLE:
        raise DataError(f"{unit.path} does not look like UTF-8 text: only {ratio:.0%} of its first "
                        f"{min(len(chunk), PRINTABLE_SAMPLE_CHARS):,} characters are printable (at least "
                        f"{MIN_PRINTABLE:.0%} needed); remove it from the source or convert it to UTF-8 text")
    return chunk


def _text_chunks(unit: Unit, size: int = 1 << 22) -> Iterator[str]:
    if unit.compression:
        with _open_compressed(unit) as f:
            first = True
            while chunk := f.read(size):
                yield _checked_text(unit, chunk) if first else chunk
                first = False
        return
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        n = (unit.stop if unit.stop >= 0 else os.fstat(f.fileno()).st_size) - unit.start
        yield _checked_text(unit, f.read(n).decode("utf-8", errors="replace"))


def _open_compressed(unit: Unit):
    try:
        if unit.compression == ".gz":
            return gzip.open(unit.path, "rt", encoding="utf-8", errors="replace")
        import zstandard

        return io.TextIOWrapper(zstandard.open(unit.path, "rb"), encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"could not open {unit.path}: {first_line(e)}") from None


def _paragraphs(chunks: Iterator[str]) -> Iterator[str]:
    """Documents separated by runs of 2+ newlines, however the text arrives in chunks."""
    carry = ""
    try:
        for chunk in chunks:
            parts = (carry + chunk).split("\n\n")
            carry = parts.pop()
            for p in parts:
                p = p.strip("\n")
                if p.strip():
                    yield p
    except (OSError, EOFError) as e:  # truncated or corrupt .gz/.zst
        raise DataError(f"could not decompress: {first_line(e)}") from None
    carry = carry.strip("\n")
    if carry.strip():
        yield carry


def _lines(chunks: Iterator[str]) -> Iterator[str]:
    carry = ""
    try:
        for chunk in chunks:
            parts = (carry + chunk).split("\n")
            carry = parts.pop()
            yield from parts
    except (OSError, EOFError) as e:
        raise DataError(f"could not decompress: {first_line(e)}") from None
    yield carry


def _json_records(unit: Unit) -> Iterator:
    text = "".join(_text_chunks(unit))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from _lines(iter([text]))  # JSON lines in a .json file, as `datasets` accepts
        return
    if not isinstance(data, list):
        raise DataError(f"{unit.path}: expected a JSON list of records (or JSON lines), got {type(data).__name__}")
    yield from data


def _lines_before(unit: Unit) -> int:
    """Newlines in `unit.path` before the unit's first byte: a byte-range unit's line n is
    the file's line n + this. Counted only when an error needs the real line number."""
    if unit.compression or unit.start == 0:
        return 0
    count, left = 0, unit.start
    with open(unit.path, "rb") as f:
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            count, left = count + block.count(b"\n"), left - len(block)
    return count


def _where(unit: Unit, n: int, is_line: bool) -> str:
    """Item n (0-based) of a unit in the user's terms: the file's line, or a .json list's record."""
    return f"line {_lines_before(unit) + n + 1}" if is_line else f"record {n + 1}"


def _records(unit: Unit, items: Iterator) -> Iterator[str]:
    f = unit.text_field
    for n, item in enumerate(items):
        is_line = isinstance(item, str)  # a JSON line: n counts every line of the unit, blank ones too
        if is_line:
            if not item.strip():
                continue
            try:
                item = json.loads(item)
            except json.JSONDecodeError as e:
                raise DataError(f"{unit.path} {_where(unit, n, is_line)} is not valid JSON ({e.msg} at column "
                                f"{e.colno}); expected one JSON object per line") from None
        if not isinstance(item, dict) or f not in item:
            fields = ", ".join(item) if isinstance(item, dict) else type(item).__name__
            raise DataError(f"{unit.path} {_where(unit, n, is_line)} has no field {f!r} (its fields: "
                            f"{fields or 'none'}); set data.text_field to the field that holds the text")
        text = item[f]
        if text is None:
            continue
        text = text if isinstance(text, str) else str(text)
        if text:
            yield _source_field(item) if f != "source" else None, text


def _parquet(unit: Unit) -> Iterator[tuple[str | None, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    names = pf.schema_arrow.names
    if unit.text_field not in names:
        raise DataError(f"parquet records in {unit.path} have no field {unit.text_field!r} (fields: "
                        f"{', '.join(names) or 'none'}); set data.text_field")
    with_source = "source" in names and unit.text_field != "source" and pa.types.is_string(
        pf.schema_arrow.field("source").type)
    for i in range(unit.start, unit.stop):
        table = pf.read_row_group(i, columns=[unit.text_field] + (["source"] if with_source else []))
        texts = table.column(0).cast("string").to_pylist()
        sources = table.column(1).to_pylist() if with_source else [None] * len(texts)
        for text, source in zip(texts, sources):
            if text:
                yield source, text


def _hub_documents(unit: Unit) -> Iterator[str]:
    stream = _load_stream(unit.path, unit.config)
    if unit.stop > 1:
        stream = stream.shard(num_shards=unit.stop, index=unit.start)
    if unit.take:
        stream = stream.take(unit.take)
    try:
        for ex in stream:
            text = ex[unit.text_field]
            if text:
                yield text
    except KeyError as e:
        raise DataError(f"hub records have no field {e}; set data.text_field") from None
    except DataError:
        raise
    except Exception as e:  # connection drops, auth, parse errors: all reported the same way
        raise DataError(f"reading the hub dataset failed: {first_line(e)}") from None
