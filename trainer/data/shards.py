"""Token shards on disk: the worker that writes them and the read-only view that opens them.

A prepared dataset directory holds:
- `shards/UUUUU-PPPP.train.bin` and `.val.bin`: flat token ids (uint16 when the vocab fits,
  else uint32), every document followed by EOS. Unit UUUUU of the source plan writes parts
  PPPP = 0, 1, ... (a new part every `data.shard_mb` of input text).
- `shards/UUUUU-PPPP.json`: the sidecar. Tokens, documents and xxh3-64 checksum of both files,
  the unit (input file and range) and the documents of the unit it covers. It is written
  atomically, and only once both token files are durable, so a sidecar is proof that its
  shard is complete: a prepare killed with -9 and run again keeps every part with a sidecar
  and restarts each unfinished unit after its last complete part.
- `index.json`, written last: the shards in plan order, with what produced them.
- `val_manifest.json`, written just before it: the val tokens by source (`val_manifest`),
  merged from the sidecars, which each record what their val documents' sources gave.

Train/val split by document hash: a document is val when xxh64(its UTF-8 bytes) falls below
`val_fraction * 2**64`. That depends on nothing but the text, so it is the same for any
worker count or order, never puts one document in both splits, and sends exact duplicates to
the same side.

Opening is O(number of shards): the index is read, each file is stat'ed, and token files are
memory-mapped on first touch. A file whose size differs from its sidecar is refused; one whose
mtime changed since the index was written is re-hashed and refused on a checksum mismatch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import xxhash

from trainer import faults
from trainer.data.sources import HASH_SEED, Unit, keyed_documents

FORMAT = 3  # bump when the shard layout or the split rule changes
ENCODE_BATCH = 512  # documents per SentencePiece call


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_json(path: Path, obj, text: str | None = None) -> None:
    """Atomic and durable: a reader sees the old file, or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1) if text is None else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(unit: int, part: int) -> str:
    return f"{unit:05d}-{part:04d}"


# --------------------------------------------------------------------------- writing (worker side)


@dataclass(frozen=True)
class Job:
    """What one worker process needs to write (the rest of) one unit's shards. Picklable."""

    unit: Unit
    index: int  # position in the plan
    out: str  # shards directory
    tokenizer: str  # SentencePiece .model path
    dtype: str
    threshold: int  # val_threshold(val_fraction)
    shard_bytes: int  # start a new part after this much input text
    part: int = 0  # first part to write (earlier ones are complete)
    skip_docs: int = 0  # documents of this unit already in complete parts
    max_train: int | None = None  # tokens this unit may still add to each split (None = no cap)
    max_val: int | None = None
    max_docs: int = 0  # documents this unit may still read (0 = all)


class _SplitFile:
    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.f = open(path, "wb")
        self.hash = xxhash.xxh3_64()
        self.tokens = self.docs = 0

    def write(self, arr: np.ndarray, docs: int) -> None:
        data = np.ascontiguousarray(arr, self.dtype).data
        self.f.write(data)
        self.hash.update(data)
        self.tokens += len(arr)
        self.docs += docs

    def close(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"file": self.path.name, "tokens": self.tokens, "documents": self.docs,
                "xxh3_64": self.hash.hexdigest()}


def _batches(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def run_unit(job: Job) -> list[dict]:
    """Tokenize the rest of `job.unit` into shards; returns the sidecars it wrote."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=job.tokenizer)
    eos, dtype, out = sp.eos_id(), np.dtype(job.dtype), Path(job.out)
    docs = keyed_documents(job.unit)
    for _ in range(job.skip_docs):
        next(docs, None)
    part, doc_at, written = job.part, job.skip_docs, []
    left = {"train": job.max_train, "val": job.max_val}
    docs_left = job.max_docs
    train_only = frozenset(job.unit.train_only)

    def capped(name: str) -> bool:
        return left[name] is not None and left[name] <= 0

    def open_part():
        base = out / shard_name(job.index, part)
        return ({s: _SplitFile(base.with_name(f"{base.name}.{s}.bin"), dtype) for s in ("train", "val")}, 0, doc_at,
                {})

    files, in_bytes, part_start, val_sources = open_part()
    done = False
    for batch in _batches(docs, ENCODE_BATCH):
        if job.max_docs:
            batch = batch[:docs_left]
            docs_left -= len(batch)
        keys = [k for k, _ in batch]
        texts = [t for _, t in batch]
        raw = [t.encode("utf-8", errors="replace") for t in texts]
        val = [xxhash.xxh64_intdigest(b, HASH_SEED) < job.threshold and k not in train_only
               for k, b in zip(keys, raw)]
        ids = sp.encode(texts, out_type=int, num_threads=1)
        for name, want in (("train", False), ("val", True)):
            chosen = [(k, x) for k, x, v in zip(keys, ids, val) if v == want]
            if not chosen or capped(name):
                continue
            n = sum(len(x) for _, x in chosen) + len(chosen)
            arr = np.empty(n, dtype)
            pos = 0
            for _, x in chosen:  # document, then EOS
                arr[pos:pos + len(x)] = x
                arr[pos + len(x)] = eos
                pos += len(x) + 1
            if left[name] is not None:
                arr = arr[:left[name]]
                left[name] -= len(arr)
            if want:  # what each source gave val, up to a cap that cut the batch short
                room = len(arr)
                for k, x in chosen:
                    if room <= 0:
                        break
                    val_sources[k] = val_sources.get(k, 0) + min(room, len(x) + 1)
                    room -= len(x) + 1
            files[name].write(arr, len(chosen))
        if doc_at == part_start:
            faults.pause_mid_shard()
        doc_at += len(batch)
        in_bytes += sum(map(len, raw))
        done = (job.max_docs and docs_left <= 0) or (capped("train") and capped("val"))
        if done:
            break
        if in_bytes >= job.shard_bytes:
            written.append(_seal(job, part, files, part_start, doc_at, in_bytes, val_sources, last=False))
            part += 1
            files, in_bytes, part_start, val_sources = open_part()
    written.append(_seal(job, part, files, part_start, doc_at, in_bytes, val_sources, last=True))
    return written


def _seal(job: Job, part: int, files: dict, doc_start: int, doc_end: int, in_bytes: int, val_sources: dict,
          last: bool) -> dict:
    u = job.unit
    sidecar = {"format": FORMAT, "unit": job.index, "part": part, "last": last, "source": u.path,
               "range": list(u.files[:1] + u.files[-1:]) if u.kind == "embedded" else [u.start, u.stop],
               "kind": u.kind, "doc_start": doc_start, "doc_end": doc_end, "input_bytes": in_bytes,
               "train": files["train"].close(), "val": files["val"].close(),
               "val_sources": [[k, n] for k, n in val_sources.items()]}
    write_json(Path(job.out) / f"{shard_name(job.index, part)}.json", sidecar)  # last: the shard's commit
    return sidecar


def complete_parts(out: Path, index: int, itemsize: int) -> list[dict]:
    """The consecutive complete parts of unit `index` already on disk (sidecar present and
    both token files of the size it states)."""
    parts = []
    while True:
        side = out / f"{shard_name(index, len(parts))}.json"
        try:
            meta = json.loads(side.read_text())
            ok = all((out / meta[s]["file"]).stat().st_size == meta[s]["tokens"] * itemsize for s in ("train", "val"))
        except (OSError, ValueError, KeyError, TypeError):
            return parts
        if not ok:
            return parts
        parts.append(meta)
        if meta["last"]:
            return parts


# --------------------------------------------------------------------------- reading (every rank)


class _Mapped:
    """One token file, memory-mapped on first use (opening many shards costs no memory)."""

    def __init__(self, path: Path, dtype: np.dtype, n: int):
        self.path, self.dtype, self.n = path, dtype, n
        self._arr = None

    def __getitem__(self, key):
        if self._arr is None:
            self._arr = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n,))
        return self._arr[key]

    def __len__(self) -> int:
        return self.n


class TokenStream:
    """A read-only concatenation of token arrays (shards), addressed as one flat stream."""

    def __init__(self, pieces: list, dtype: np.dtype | None = None):
        self.pieces = [p for p in pieces if len(p)]
        self.dtype = np.dtype(dtype or (self.pieces[0].dtype if self.pieces else np.uint32))
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.pieces], dtype=np.int64)])

    @classmethod
    def of(cls, arr) -> "TokenStream":
        return arr if isinstance(arr, TokenStream) else cls([arr], getattr(arr, "dtype", None))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) as one array (a copy when the range spans shards)."""
        out, at = [], lo
        i = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        while at < hi:
            base = int(self.offsets[i])
            end = min(hi, int(self.offsets[i + 1]))
            out.append(np.asarray(self.pieces[i][at - base:end - base]))
            at, i = end, i + 1
        return out[0] if len(out) == 1 else np.concatenate(out) if out else np.zeros(0, self.dtype)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] int64: tokens [s, s+length) for each start."""
        return np.stack([self.read(int(s), int(s) + length).astype(np.int64) for s in starts]) \
            if len(starts) else np.zeros((0, length), np.int64)

    def slice(self, lo: int, hi: int) -> "TokenStream":
        return TokenStream([_View(self, lo, hi)], self.dtype) if hi > lo else TokenStream([], self.dtype)

    def __add__(self, other: "TokenStream") -> "TokenStream":
        return TokenStream(self.pieces + other.pieces, self.dtype)

    def __array__(self, dtype=None, copy=None):
        arr = self.read(0, len(self))
        return arr.astype(dtype) if dtype is not None else arr


class _View:
    def __init__(self, stream: TokenStream, lo: int, hi: int):
        self.stream, self.lo, self.hi = stream, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, key: slice):
        start, stop, _ = key.indices(len(self))
        return self.stream.read(self.lo + start, self.lo + stop)


def file_checksum(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _file_problem(path: Path, meta: dict, itemsize: int, rehash: bool) -> str | None:
    """What is wrong with one token file against its sidecar entry `meta`, or None. The
    checksum is re-computed when `rehash`, or when the file's mtime is not the one recorded."""
    try:
        st = path.stat()
    except OSError:
        return f"shard {path} is missing"
    if st.st_size != meta["tokens"] * itemsize:
        return f"shard {path} has {st.st_size} bytes, its sidecar says {meta['tokens'] * itemsize}"
    if (rehash or st.st_mtime_ns != meta.get("mtime_ns")) and file_checksum(path) != meta["xxh3_64"]:
        return f"shard {path} fails its xxh3-64 checksum (expected {meta['xxh3_64']})"
    return None


def check_shards(directory: Path, index: dict) -> str | None:
    """None when every shard file matches the index, else one line naming the first bad one.
    Files unchanged (size and mtime) since the index was written are not re-read."""
    itemsize = np.dtype(index["dtype"]).itemsize
    for shard in index["shards"]:
        for s in ("train", "val"):
            problem = _file_problem(directory / "shards" / shard[s]["file"], shard[s], itemsize, rehash=False)
            if problem:
                return problem
    return None


def verify_shards(directory: Path, index: dict, workers: int = 8) -> tuple[int, list[str]]:
    """(files checked, one line per bad one): every token file re-hashed against its shard's
    sidecar, whatever its mtime (a file damaged in place with its size and mtime kept)."""
    from concurrent.futures import ThreadPoolExecutor

    itemsize = np.dtype(index["dtype"]).itemsize
    todo, problems = [], []
    for shard in index["shards"]:
        side = directory / "shards" / f"{shard_name(shard['unit'], shard['part'])}.json"
        try:
            sidecar = json.loads(side.read_text())
        except (OSError, ValueError):
            problems.append(f"sidecar {side} is missing or unreadable")
            continue
        todo += [(directory / "shards" / sidecar[s]["file"], sidecar[s]) for s in ("train", "val")]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # xxhash and reads release the GIL
        found = pool.map(lambda item: _file_problem(item[0], item[1], itemsize, rehash=True), todo)
        problems += [p for p in found if p]
    return len(todo), problems


def read_index(directory: Path) -> dict | None:
    try:
        index = json.loads((directory / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if index.get("format") == FORMAT else None


def open_streams(directory: Path, index: dict) -> tuple[TokenStream, TokenStream]:
    dtype = np.dtype(index["dtype"])
    streams = []
    for s in ("train", "val"):
        files = [(directory / "shards" / sh[s]["file"], sh[s]["tokens"]) for sh in index["shards"]]
        streams.append(TokenStream([_Mapped(p, dtype, n) for p, n in files if n], dtype))
    return streams[0], streams[1]


def val_manifest(sidecars: list[dict]) -> list[dict]:
    """Where the val tokens of the finished sidecars (in plan order) came from: one
    {"source", "tokens"} per source, most tokens first. A document that named its source (a
    stdlib file, a record's `source` field) counts under it, so a file split into several
    documents is one entry; any other document is `<file>:<n>`, the file's n-th document
    (0-based: paragraph of a .txt, non-empty record of a .jsonl/.json/.parquet), or a hub
    stream's `<name>:<n>` (`<name>:<shard>:<n>` when the stream is read in several shards)."""
    offset, before, tokens = {}, {}, {}
    for side in sidecars:
        path, unit = side["source"], side["unit"]
        if unit not in offset:  # documents of the same file in the units before this one
            offset[unit] = before.get(path, 0)
        if side["last"]:
            before[path] = offset[unit] + side.get("doc_end", 0)
        for key, n in side.get("val_sources", []):
            if isinstance(key, int):
                at = key if side["kind"] == "hf" else offset[unit] + key
                multi = side["kind"] == "hf" and side["range"][1] > 1
                key = f"{path}:{side['range'][0]}:{at}" if multi else f"{path}:{at}"
            tokens[key] = tokens.get(key, 0) + n
    return [{"source": k, "tokens": n} for k, n in sorted(tokens.items(), key=lambda kv: (-kv[1], kv[0]))]


def write_val_manifest(directory: Path, manifest: list[dict]) -> None:
    """`val_manifest.json`: one entry per line, so a reader can grep or diff it."""
    write_json(directory / "val_manifest.json", manifest,
               "[\n" + ",\n".join(json.dumps(e) for e in manifest) + "\n]\n" if manifest else "[]\n")


def read_val_manifest(directory: Path) -> list[dict] | None:
    try:
        return json.loads((directory / "val_manifest.json").read_text())
    except (OSError, ValueError):
        return None


def publish_index(directory: Path, sidecars: list[dict], meta: dict) -> dict:
    """Write `val_manifest.json`, then `index.json`, over the finished sidecars (in plan
    order); the index is the dataset's commit point."""
    write_val_manifest(directory, val_manifest(sidecars))
    shards = []
    for side in sidecars:
        entry = dict(side)
        for s in ("train", "val"):
            entry[s] = {**side[s], "mtime_ns": (directory / "shards" / side[s]["file"]).stat().st_mtime_ns}
        shards.append(entry)
    totals = {f"n_{s}_{k}": sum(sh[s][k] for sh in shards) for s in ("train", "val") for k in ("tokens", "documents")}
    index = {"format": FORMAT, **meta, **totals, "n_docs": totals["n_train_documents"] + totals["n_val_documents"],
             "n_shards": len(shards), "shards": shards}
    write_json(directory / "index.json", index)
    return index
