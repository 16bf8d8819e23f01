"""Batches from prepared shards: the only part of the data package the training loop touches.

Sampling. The global batch of every step is a run of consecutive *global sample indices*
g = first, first+1, ...; micro step m of data-parallel rank r takes
g = first + (m*dp_size + r)*micro_batch + j, j < micro_batch (`BatchLayout.sample_indices`,
trainer/parallel/layout.py). `first` is the number of samples consumed before the step, which
the checkpoint stores (TrainState.samples). So a resume with another micro batch, accumulation
or world size continues at the next unseen sample: none skipped, none repeated.

A sample index becomes a window (seq_len+1 tokens at stride seq_len over a source's train
stream): with a mixture, `Mixture.assign` first picks the source and the index within it.
Within a source, index i is window perm(i mod n) of epoch i div n, where perm is a keyed
Feistel bijection on [0, n): a fresh order every epoch that costs no memory (an explicit
permutation of 10B tokens' windows would not fit the per-rank budget) and needs no state
beyond the index, so resume is exact.

Inputs are a window's first seq_len tokens and labels its last seq_len, shifted before any
sequence-parallel slicing.
"""
from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from trainer.data import shards as sh
from trainer.data.mixture import Mixture
from trainer.data.prepare import Dataset, Plan, _load_tokenizer, plan, prepare_all, split_sizes
from trainer.data.sources import DataError
from trainer.data.tokenizer import Tokenizer, TokenizerError
from trainer.parallel.layout import BatchLayout

# --------------------------------------------------------------------------- keyed permutation


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def permute(i: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """A pseudo-random bijection of [0, n) applied to `i`: a 4-round Feistel network on
    2h >= log2(n) bits, cycle-walked back into range (under 4 walks expected)."""
    i = np.asarray(i, np.int64)
    if n <= 1:
        return np.zeros_like(i)
    h = max(1, math.ceil((n - 1).bit_length() / 2))
    mask = np.uint64((1 << h) - 1)
    round_keys = [np.uint64(int(k)) for k in np.random.default_rng(list(key)).integers(0, 1 << 63, 4)]

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(h), x & mask
        for k in round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << np.uint64(h)) | right

    x = rounds(i.astype(np.uint64))
    while (out := x >= np.uint64(n)).any():
        x[out] = rounds(x[out])
    return x.astype(np.int64)


# --------------------------------------------------------------------------- held-out windows


class HeldOut:
    """Fixed evaluation windows of one token stream."""

    def __init__(self, tokens, seq_len: int, name: str = "val"):
        self.tokens, self.seq_len, self.name = sh.TokenStream.of(tokens), seq_len, name
        self.n_windows = (len(self.tokens) - 1) // seq_len if len(self.tokens) else 0

    def windows(self, k: int) -> np.ndarray:
        """k window ids spread evenly over the stream (all of them when there are fewer)."""
        k = min(k, self.n_windows)
        return np.arange(k) * self.n_windows // max(k, 1)

    def gather(self, windows: np.ndarray):
        return _gather(self.tokens, windows, self.seq_len)

    def val_batches(self, n_batches: int, micro_batch: int) -> Iterator:
        """The same (inputs, labels) every call: n_batches*micro_batch windows spread evenly over
        the stream, or all of them when there are fewer (then the last batch may be smaller)."""
        windows = self.windows(n_batches * micro_batch)
        for i in range(0, len(windows), micro_batch):
            yield self.gather(windows[i:i + micro_batch])


def _gather(tokens: sh.TokenStream, windows: np.ndarray, seq_len: int):
    import torch

    w = torch.from_numpy(tokens.windows(np.asarray(windows, np.int64) * seq_len, seq_len + 1))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


# --------------------------------------------------------------------------- the loader


class Loader:
    """Sample-index bookkeeping shared by single sources and mixtures."""

    seq_len: int
    eval_sets: dict[str, HeldOut]

    def __init__(self):
        self._anchor = (0, 0)  # (step, samples consumed before it)
        self.eval_sets = {}

    def seek(self, step: int, samples: int) -> None:
        """Continue from a checkpoint: `samples` were consumed before `step`."""
        self._anchor = (step, samples)

    def sample_indices(self, step: int, micro: int, layout: BatchLayout) -> np.ndarray:
        """Global sample indices [micro_batch] of this (step, micro step) on `layout`'s DP rank:
        the step's batch is the next `layout.samples_per_step` samples after the anchor."""
        step0, samples0 = self._anchor
        return layout.sample_indices(max(0, samples0 + (step - step0) * layout.samples_per_step), micro)

    def train_batch(self, step: int, micro: int, layout: BatchLayout):
        """(inputs, labels), LongTensors [micro_batch, seq_len]."""
        return self.samples(self.sample_indices(step, micro, layout))

    def samples(self, g: np.ndarray):
        raise NotImplementedError

    def log_fields(self, samples: int) -> dict:
        """Extra numbers for the step row of metrics.jsonl."""
        return {}


class PackedData(Loader):
    """One source's train windows and its val split."""

    def __init__(self, train, val, tokenizer: Tokenizer | None, seq_len: int, seed: int, meta: dict | None = None,
                 key: int = 0):
        super().__init__()
        self.tokenizer, self.seq_len, self.seed, self.meta, self.key = tokenizer, seq_len, seed, meta or {}, key
        self._train, self._val = sh.TokenStream.of(train), sh.TokenStream.of(val)
        self.n_train_tokens, self.n_val_tokens = len(self._train), len(self._val)
        self.n_train_windows = (len(self._train) - 1) // seq_len if len(self._train) else 0
        self.val = HeldOut(self._val, seq_len)
        self.n_val_windows = self.val.n_windows
        if self.n_train_windows < 1:
            raise DataError(f"the train split has {len(self._train):,} tokens, fewer than one window of "
                            f"data.seq_len+1={seq_len + 1}; use more data (data.source, data.max_docs, "
                            f"data.max_tokens) or a smaller data.seq_len")
        if len(self._val) and self.n_val_windows < 1:
            raise DataError(f"the validation split has {len(self._val):,} tokens, fewer than one window of "
                            f"data.seq_len+1={seq_len + 1}; raise data.val_fraction or lower data.seq_len")

    def windows_of(self, i: np.ndarray) -> np.ndarray:
        """Window ids of this source's sample indices `i` (epoch = i div n, a new order each)."""
        epoch, pos = np.divmod(np.asarray(i, np.int64), self.n_train_windows)
        out = np.empty_like(pos)
        for e in np.unique(epoch):
            at = epoch == e
            out[at] = permute(pos[at], self.n_train_windows, (self.seed, self.key, int(e)))
        return out

    def train_windows(self, step: int, micro: int, layout: BatchLayout) -> np.ndarray:
        return self.windows_of(self.sample_indices(step, micro, layout))

    def samples(self, g: np.ndarray):
        return _gather(self._train, self.windows_of(g), self.seq_len)

    def val_batches(self, n_batches: int, micro_batch: int) -> Iterator:
        return self.val.val_batches(n_batches, micro_batch)


class MixedData(Loader):
    """Weighted sources (data.mix): each global sample index picks its source by `Mixture`."""

    def __init__(self, parts: list[PackedData], names: list[str], weights: list[float], seed: int):
        super().__init__()
        self.parts, self.names, self.weights = parts, names, weights
        self.mixture = Mixture(weights, seed)
        self.seq_len, self.tokenizer = parts[0].seq_len, parts[0].tokenizer
        self.meta = {"mix": {n: p.meta for n, p in zip(names, parts)}}
        self.n_train_tokens = sum(p.n_train_tokens for p in parts)
        self.n_val_tokens = sum(p.n_val_tokens for p in parts)

    def samples(self, g: np.ndarray):
        import torch

        source, within = self.mixture.assign(g)
        x = torch.empty(len(g), self.seq_len, dtype=torch.long)
        y = torch.empty_like(x)
        for k in np.unique(source):
            at = np.flatnonzero(source == k)
            x[at], y[at] = self.parts[k].samples(within[at])
        return x, y

    def val_batches(self, n_batches: int, micro_batch: int) -> Iterator:
        """Each source's val windows in proportion to its weight, in fixed batches."""
        total = n_batches * micro_batch
        share = self.mixture.counts(total)
        chosen = [(p.val, p.val.windows(max(1, k) if p.val.n_windows else 0)) for p, k in zip(self.parts, share)]
        batch: list = []
        for held, windows in chosen:
            for w in windows:
                batch.append((held, w))
                if len(batch) == micro_batch:
                    yield self._stack(batch)
                    batch = []
        if batch:
            yield self._stack(batch)

    @staticmethod
    def _stack(batch: list):
        import torch

        pairs = [held.gather(np.array([w])) for held, w in batch]
        return torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])

    def log_fields(self, samples: int) -> dict:
        """Realised share of each source over all samples consumed so far."""
        counts = self.mixture.counts(samples)
        return {f"mix/{n}": c / max(1, samples) for n, c in zip(self.names, counts)}


# --------------------------------------------------------------------------- opening


def prepare_command(argv: list[str] | None = None) -> str:
    """The `prepare` command line for this job's config and overrides."""
    argv = sys.argv if argv is None else argv
    args = [a for a in argv[1:] if not a.startswith("-")] if argv and argv[0].endswith("train.py") else []
    return "python -m trainer.prepare " + (" ".join(shlex.quote(a) for a in args) if args
                                           else "CONFIG [key=value ...]")


def _open_dataset(d: Dataset, tokenizer: Tokenizer, seq_len: int, seed: int, val_fraction: float, key: int):
    index = d.index
    train, val = sh.open_streams(d.directory, index)
    if d.cap_train is not None:
        train, val = train.slice(0, min(len(train), d.cap_train)), val.slice(0, min(len(val), d.cap_val))
    # The sizes come from the function prepare's console reports them with, so both agree.
    n_train, n_val, split = split_sizes(d, len(train), len(val), seq_len, val_fraction)
    if split == "tokens":
        # Too few documents for a document split (e.g. a handful of files): hold out the
        # stream's last val_fraction of tokens instead, so there is still a val loss.
        stream = train + val
        train, val = stream.slice(0, n_train), stream.slice(n_train, n_train + n_val)
    meta = {k: v for k, v in index.items() if k != "shards"}
    meta.update({"dir": str(d.directory), "split": split, "n_train_docs": index["n_train_documents"],
                 "n_val_docs": index["n_val_documents"]})
    if d.role == "eval":
        return HeldOut(val, seq_len, d.name), meta
    meta.update({"n_train_tokens": len(train), "n_val_tokens": len(val)})
    return PackedData(train, val, tokenizer, seq_len, seed, meta, key), meta


def not_prepared(what: list[str], fix: str) -> DataError:
    return DataError(f"data is not ready ({'; '.join(what)}); run `{fix}` first (on CPU nodes: "
                     f"sbatch slurm/prepare.sh CONFIG [key=value ...])")


def prepare_data(cfg, vocab_size: int, seed: int, cache_dir: Path, run_dir: Path, is_main: bool,
                 barrier: Callable[[], None], log: Callable[[str], None] | None = None, world: int = 1,
                 any_rank: Callable[[bool], bool] | None = None) -> Loader:
    """Open the prepared data of `cfg` (a DataConfig) on every rank, preparing it first on
    rank 0 when `data.prepare=auto` allows.

    Every rank checks for itself (no documents are read), so with `offline`, or a source over
    `data.auto_prepare_mb` in a multi-rank job, all ranks fail at once with the same line.
    Rank 0 also copies the tokenizer to `run_dir/tokenizer/tokenizer.model` and records what
    was opened in `run_dir/data.json`.
    """
    cache_dir, run_dir = Path(cache_dir), Path(run_dir)
    if log is None:
        # why here: trainer.data stays torch-free for the prepare workers (dist imports torch)
        from trainer.parallel.dist import print0 as log
    fix = prepare_command()
    p = plan(cfg, vocab_size, cache_dir)
    missing = p.missing()
    if missing:
        limit = cfg.auto_prepare_mb * 2**20
        if cfg.prepare == "offline":
            damaged = [m for m in missing if m.startswith("shard ")]
            if damaged:
                raise DataError(f"{damaged[0]}; run `{fix}` to rebuild it (finished shards are kept)")
            raise not_prepared(missing, fix)
        if world > 1 and p.missing_bytes(cfg.max_tokens) > limit:
            raise not_prepared(missing + [f"over data.auto_prepare_mb={cfg.auto_prepare_mb:g} for a "
                                          f"{world}-rank job to prepare itself"], fix)
    elif is_main:
        log(f"data: cached tokenizer {p.tokenizer_path}")
        for d in p.datasets:
            log(f"data: {d.name}: cached packed shards {d.directory}")
    error = None
    if is_main:
        try:
            if missing:
                p = prepare_all(cfg, vocab_size, cache_dir, max(1, cfg.num_proc), log)
            _tokenizer(p, vocab_size).copy_to(run_dir / "tokenizer")
        except DataError as e:
            error = e
    if any_rank is not None:
        failed = any_rank(error is not None)
    else:
        barrier()
        failed = error is not None
    if error is not None:
        raise error
    if failed:
        raise DataError("preparing the data failed on rank 0 (its error is above)")
    if missing:
        p = plan(cfg, vocab_size, cache_dir)
    loader = open_plan(p, cfg, vocab_size, seed, fix)
    if is_main:
        sh.write_json(run_dir / "data.json", {"datasets": {d.name: str(d.directory) for d in p.datasets},
                                              **loader.meta})
    return loader


def _tokenizer(p: Plan, vocab_size: int) -> Tokenizer:
    return _load_tokenizer(p.tokenizer_path, vocab_size)


def open_plan(p: Plan, cfg, vocab_size: int, seed: int, fix: str) -> Loader:
    missing = p.missing()
    if missing:
        raise not_prepared(missing, fix)
    try:
        tokenizer = _tokenizer(p, vocab_size)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    parts = [_open_dataset(d, tokenizer, cfg.seq_len, seed, cfg.val_fraction, k)[0]
             for k, d in enumerate(p.train)]
    if len(parts) == 1 and not cfg.mix:
        loader = parts[0]
    else:
        loader = MixedData(parts, [d.name for d in p.train], [d.weight for d in p.train], seed)
    for d in p.evals:
        held, _ = _open_dataset(d, tokenizer, cfg.seq_len, seed, cfg.val_fraction, 0)
        if held.n_windows < 1:
            raise DataError(f"data.eval.{d.name} ({d.source.spec}) has {len(held.tokens):,} tokens, fewer than "
                            f"one window of data.seq_len+1={cfg.seq_len + 1}; give it more text")
        loader.eval_sets[d.name] = held
    return loader

