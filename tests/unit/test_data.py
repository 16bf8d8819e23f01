"""Data pipeline: sources, split, tokenizer cache, packing, and the pure-function sampler.

Sharded preparation, mixtures, eval sets and offline mode: tests/test_prepare.py."""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from tests.helpers import SHAKESPEARE
from trainer.config import DataConfig
from trainer.data import EXCLUDED_STDLIB_DIRS, DataError, PackedData, open_source, prepare_data
from trainer.data.tokenizer import Tokenizer, TokenizerError
from trainer.parallel.layout import BatchLayout

VOCAB = 512


def cfg(**kw) -> DataConfig:
    base = {"seq_len": 32, "max_docs": 40, "tokenizer_sample_chars": 400_000}
    return dataclasses.replace(DataConfig(), **{**base, **kw})


def prepare(tmp: Path, data_cfg: DataConfig, vocab: int = VOCAB, seed: int = 0, run: str = "run", logs=None,
            is_main: bool = True):
    barriers = []
    data = prepare_data(data_cfg, vocab, seed, tmp / "cache", tmp / run, is_main, lambda: barriers.append(1),
                        log=(logs.append if logs is not None else lambda _: None))
    assert barriers == [1]
    return data


def stdlib_files(max_docs: int) -> tuple[Path, list[Path]]:
    source = open_source("embedded", max_docs=max_docs)
    root = Path(source.units[0].path)
    return root, [root / f for u in source.units for f in u.files]


def hash_is_val(text: str, fraction: float = 0.01) -> bool:
    """The documented split rule, written out independently of trainer.data."""
    return xxhash.xxh64_intdigest(text.encode(), 0) < int(fraction * 2**64)


def packed_bytes(data: PackedData) -> tuple[bytes, bytes]:
    return np.asarray(data._train).tobytes(), np.asarray(data._val).tobytes()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[Path, PackedData]:
    tmp = tmp_path_factory.mktemp("embedded")
    return tmp, prepare(tmp, cfg())


@pytest.fixture(scope="module")
def tokenizer_path(embedded) -> str:
    return str(embedded[0] / "run" / "tokenizer" / "tokenizer.model")


def synthetic(n_tokens: int, seq_len: int, seed: int = 0) -> PackedData:
    """Token t at position t, so a window's first input token names the window."""
    return PackedData(np.arange(n_tokens, dtype=np.uint32), np.arange(n_tokens // 4, dtype=np.uint32), None,
                      seq_len, seed)


def _on(dp_rank: int, dp_size: int, micro_batch: int, grad_accum: int) -> BatchLayout:
    """DP rank `dp_rank`'s batch layout (the loader reads the batch split, not seq_len)."""
    return BatchLayout(micro_batch=micro_batch, grad_accum=grad_accum, seq_len=8, dp_size=dp_size, dp_rank=dp_rank)


# --------------------------------------------------------------------------- embedded corpus + tokenizer


def test_embedded_corpus_is_sorted_stdlib_without_tests_or_site_packages():
    root, files = stdlib_files(0)
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any(set(r.split("/")[:-1]) & EXCLUDED_STDLIB_DIRS for r in rel)
    assert "os.py" in rel and open_source("embedded").n_bytes > 1e6
    assert stdlib_files(5)[1] == files[:5]


def test_embedded_prepare_is_deterministic(embedded, tmp_path):
    _, first = embedded
    again = prepare(tmp_path, cfg())  # fresh cache: the tokenizer is trained again
    assert packed_bytes(again) == packed_bytes(first)
    assert again.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert first.meta["n_docs"] == 40 and first.n_val_tokens > 0


def test_tokenizer_round_trips_stdlib_source_and_reserves_ids(embedded):
    tok = embedded[1].tokenizer
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files(0)[1][::60]]
    assert all(tok.decode(ids) == text for ids, text in zip(tok.encode(texts), texts))
    assert tok.vocab_size == VOCAB and (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 3)
    assert tok.encode(["\n\t"]) == [[4, 5]]


def test_tokenizer_pickles_as_its_file_for_worker_processes(embedded):
    tok = embedded[1].tokenizer
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.path == tok.path and clone.encode(["def f(x):\n\treturn x"]) == tok.encode(["def f(x):\n\treturn x"])
    assert len(pickle.dumps(tok)) < 1000


def test_packed_stream_is_documents_each_ended_by_eos(embedded):
    _, data = embedded
    stream = np.concatenate([np.asarray(data._train), np.asarray(data._val)])
    ends = np.flatnonzero(stream == data.tokenizer.eos_id)
    assert len(ends) == data.meta["n_docs"] == 40 and ends[-1] == len(stream) - 1
    corpus = {p.read_text(encoding="utf-8") for p in stdlib_files(40)[1]}
    first_doc = data.tokenizer.decode(np.asarray(data._train)[:ends[0]])
    assert first_doc in corpus


def test_tokenizer_is_cached_and_retrained_for_a_new_vocab(embedded):
    tmp, data = embedded
    [model] = (tmp / "cache" / "tokenizers").glob("*/tokenizer.model")
    mtime = model.stat().st_mtime_ns
    logs: list[str] = []
    again = prepare(tmp, cfg(), logs=logs)
    assert model.stat().st_mtime_ns == mtime
    assert any("cached tokenizer" in line for line in logs) and any("cached packed" in line for line in logs)
    assert packed_bytes(again) == packed_bytes(data)
    logs.clear()
    bigger = prepare(tmp, cfg(), vocab=640, run="run640", logs=logs)
    assert bigger.tokenizer.vocab_size == 640 and any("trained tokenizer" in line for line in logs)
    assert len(list((tmp / "cache" / "tokenizers").glob("*/tokenizer.model"))) == 2


def test_run_dir_gets_tokenizer_and_other_ranks_open_the_same_data(embedded):
    tmp, data = embedded
    assert (tmp / "run" / "tokenizer" / "tokenizer.model").read_bytes() == data.tokenizer.path.read_bytes()
    assert json.loads((tmp / "run" / "data.json").read_text())["n_train_tokens"] == data.n_train_tokens
    other = prepare(tmp, cfg(), is_main=False)
    for args in [(0, 0, _on(0, 2, 4, 1)), (7, 1, _on(1, 2, 4, 2))]:
        assert all((a == b).all() for a, b in zip(other.train_batch(*args), data.train_batch(*args)))


def test_incomplete_cached_pack_is_rebuilt_not_trusted(tmp_path, tokenizer_path):
    c = cfg(tokenizer=tokenizer_path)
    first = packed_bytes(prepare(tmp_path, c))
    [shard] = (tmp_path / "cache" / "shards").glob("*/shards/*.train.bin")
    with open(shard, "r+b") as f:
        f.truncate(100)
    logs: list[str] = []
    assert packed_bytes(prepare(tmp_path, c, logs=logs)) == first
    assert not any("cached packed" in line for line in logs) and any("rebuilding" in line for line in logs)


# --------------------------------------------------------------------------- sampling


def test_batch_is_a_pure_function_of_seed_step_micro_rank():
    a, b = synthetic(5000, 16, seed=3), synthetic(5000, 16, seed=3)
    b.train_batch(99, 0, _on(0, 1, 8, 1))  # other calls in between change nothing
    for args in [(0, 0, _on(0, 2, 4, 2)), (5, 1, _on(1, 2, 4, 2)), (1000, 0, _on(1, 2, 4, 2))]:
        assert all((x == y).all() for x, y in zip(a.train_batch(*args), b.train_batch(*args)))
    other_seed = synthetic(5000, 16, seed=4)
    assert not (other_seed.train_batch(0, 0, _on(0, 1, 8, 1))[0] == a.train_batch(0, 0, _on(0, 1, 8, 1))[0]).all()


def test_ranks_and_micro_steps_get_disjoint_windows():
    data = synthetic(10_000, 16)
    seen = [data.train_windows(3, micro, _on(rank, 4, 5, 2)) for micro in range(2) for rank in range(4)]
    flat = np.concatenate(seen)
    assert len(np.unique(flat)) == len(flat) == 40


def test_one_epoch_visits_every_window_once_then_reshuffles():
    seq_len, n_windows = 8, 21  # 21 windows, 4 per step: epochs straddle steps
    data = synthetic(n_windows * seq_len + 1, seq_len)
    assert data.n_train_windows == n_windows
    order = np.concatenate([data.train_windows(s, 0, _on(r, 2, 2, 1)) for s in range(21) for r in range(2)])
    epochs = order.reshape(4, n_windows)
    assert all(sorted(e) == list(range(n_windows)) for e in epochs)
    assert not (epochs[0] == epochs[1]).all()
    inputs, _ = data.train_batch(0, 0, _on(0, 1, 4, 1))
    assert (inputs[:, 0].numpy() // seq_len == data.train_windows(0, 0, _on(0, 1, 4, 1))).all()


def test_labels_are_inputs_shifted_by_one():
    data = synthetic(3000, 16)
    inputs, labels = data.train_batch(2, 1, _on(0, 1, 6, 2))
    assert inputs.shape == labels.shape == (6, 16) and inputs.dtype == labels.dtype == torch.long
    assert (labels == inputs + 1).all()  # token t sits at position t
    assert (labels[:, :-1] == inputs[:, 1:]).all()


def test_val_batches_are_fixed_windows_spread_over_the_val_stream():
    data = synthetic(8000, 16)  # 2000 val tokens: 124 windows
    first, second = list(data.val_batches(3, 4)), list(data.val_batches(3, 4))
    assert len(first) == 3 and all((a[0] == b[0]).all() for a, b in zip(first, second))
    starts = np.concatenate([x[:, 0].numpy() for x, _ in first])
    assert len(np.unique(starts)) == 12 and starts.max() > 1500
    everything = list(data.val_batches(100, 8))
    assert sum(len(x) for x, _ in everything) == data.n_val_windows == 124


# --------------------------------------------------------------------------- local and hub sources


def paragraphs(n: int) -> list[str]:
    return [f"Paragraph {i} says:\nline one of {i}\nline two, the {i * 7} end." for i in range(n)]


def test_local_txt_dir_loads_one_document_per_paragraph(tmp_path, tokenizer_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("\n\n".join(paragraphs(150)) + "\n")
    (tmp_path / "corpus" / "sub" / "b.txt").write_text("\n\n".join(paragraphs(50)))
    data = prepare(tmp_path, cfg(source=str(tmp_path / "corpus"), tokenizer=tokenizer_path, max_docs=0,
                                 val_fraction=0.05))
    n_val = sum(hash_is_val(p, 0.05) for p in paragraphs(150) + paragraphs(50))
    assert data.meta["n_docs"] == 200 and data.meta["split"] == "documents" and data.meta["n_val_docs"] == n_val > 0
    text = data.tokenizer.decode(np.asarray(data._train)[:400])
    assert "Paragraph" in text and "line two, the" in text


def test_local_jsonl_uses_text_field_and_few_docs_split_the_token_stream(tmp_path, tokenizer_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": p, "id": i}) for i, p in enumerate(paragraphs(90))))
    data = prepare(tmp_path, cfg(source=str(path), tokenizer=tokenizer_path, text_field="body", max_docs=0))
    assert data.meta["n_docs"] == 90 and data.meta["split"] == "tokens"  # 90 * 0.01 < 1 document
    total = data.n_train_tokens + data.n_val_tokens
    assert data.n_val_tokens == int(np.ceil(0.01 * total))
    assert data.tokenizer.decode(np.asarray(data._train)[:30]).startswith("Paragraph 0 says:\nline one")


def test_prepare_console_and_data_json_report_the_same_val_token_count(tmp_path, tokenizer_path):
    """A document split under one window falls back to a token split; the console said the
    document split's count while data.json said the token split's (issue 26)."""
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs(90)))
    logs: list[str] = []
    data = prepare(tmp_path, cfg(source=str(path), tokenizer=tokenizer_path, max_docs=0), logs=logs)
    recorded = json.loads((tmp_path / "run" / "data.json").read_text())
    assert recorded["split"] == "tokens" and recorded["n_val_tokens"] == data.n_val_tokens > 0
    said = f"{data.n_train_tokens:,} train + {data.n_val_tokens:,} val tokens"
    assert [line for line in logs if "packed 90 docs" in line and said in line], logs
    logs.clear()
    prepare(tmp_path, cfg(source=str(path), tokenizer=tokenizer_path, max_docs=0), logs=logs, run="again")
    assert json.loads((tmp_path / "again" / "data.json").read_text())["n_val_tokens"] == data.n_val_tokens


def test_local_parquet_loads_and_max_tokens_caps_the_pack(tmp_path, tokenizer_path):
    import datasets

    datasets.Dataset.from_dict({"text": paragraphs(300)}).to_parquet(str(tmp_path / "docs.parquet"))
    data = prepare(tmp_path, cfg(source=str(tmp_path / "docs.parquet"), tokenizer=tokenizer_path, max_docs=0,
                                 max_tokens=2000, val_fraction=0.1))
    assert data.meta["split"] == "documents"  # packing stops once both caps are full
    assert (data.n_train_tokens, data.n_val_tokens) == (1800, 200)


def test_tinyshakespeare_trains_its_own_tokenizer(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is not present on this machine")
    data = prepare(tmp_path, cfg(source=str(SHAKESPEARE), max_docs=0))
    assert data.meta["n_docs"] > 5000 and data.meta["split"] == "documents"
    assert data.tokenizer.vocab_size == VOCAB and data.n_train_tokens > 200_000
    speech = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert data.tokenizer.decode(data.tokenizer.encode([speech])[0]) == speech


def test_hub_source_streams_with_a_document_split(tmp_path, tokenizer_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False, **kw):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"content": paragraphs(500)}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = prepare(tmp_path, cfg(source="hf:org/corpus:sample", tokenizer=tokenizer_path, text_field="content",
                                 max_docs=0, max_tokens=4000, val_fraction=0.05))
    assert set(calls) == {("org/corpus", "sample", "train", True)}
    assert data.meta["split"] == "documents" and (data.n_train_tokens, data.n_val_tokens) == (3800, 200)
    first_train = next(p for p in paragraphs(500) if not hash_is_val(p, 0.05))
    first_val = next(p for p in paragraphs(500) if hash_is_val(p, 0.05))
    assert data.tokenizer.decode(np.asarray(data._train)[:60]).startswith(first_train)
    assert data.tokenizer.decode(np.asarray(data._val)[:60]).startswith(first_val)


# --------------------------------------------------------------------------- errors


def error_of(tmp_path: Path, data_cfg: DataConfig, vocab: int = VOCAB) -> str:
    with pytest.raises(DataError) as e:
        prepare(tmp_path, data_cfg, vocab=vocab)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_source_path_names_the_path_and_accepted_forms(tmp_path):
    message = error_of(tmp_path, cfg(source=str(tmp_path / "nope.txt")))
    assert "nope.txt" in message and "does not exist" in message and "embedded" in message and ".jsonl" in message


def test_empty_file_and_empty_dir_are_rejected(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in error_of(tmp_path, cfg(source=str(tmp_path / "empty.txt")))
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir" / "notes.md").write_text("not a corpus file")
    assert "contains no .txt/.jsonl/.json/.parquet" in error_of(tmp_path, cfg(source=str(tmp_path / "emptydir")))
    (tmp_path / "blank.txt").write_text("\n\n\n\n")
    assert "no non-empty documents" in error_of(tmp_path, cfg(source=str(tmp_path / "blank.txt")))


def test_missing_text_field_is_named(tmp_path, tokenizer_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    message = error_of(tmp_path, cfg(source=str(tmp_path / "d.jsonl"), tokenizer=tokenizer_path))
    assert "'text'" in message and "body" in message and "data.text_field" in message


def test_binary_txt_is_refused_by_its_printable_ratio(tmp_path, tokenizer_path):
    binary = tmp_path / "random.txt"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    message = error_of(tmp_path, cfg(source=str(binary), tokenizer=tokenizer_path))
    assert str(binary) in message and "does not look like UTF-8 text" in message and "% of its first" in message
    # Accented Latin-1 prose read as UTF-8 is still text (a few characters undecodable).
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("\n\n".join(f"Le café numéro {i} est très près." for i in range(200)).encode("latin-1"))
    assert prepare(tmp_path, cfg(source=str(latin), tokenizer=tokenizer_path, max_docs=0)).n_train_tokens > 0


@pytest.mark.parametrize("shard_mb", [64.0, 0.001], ids=["one-unit", "byte-range-units"])
def test_bad_jsonl_line_and_missing_field_name_the_files_real_line(tmp_path, tokenizer_path, shard_mb):
    """A byte-range unit starts mid-file; its errors still give the line number in the file."""
    good = [json.dumps({"text": p}) for p in paragraphs(100)]
    for bad, expected in [('{"text": oops}', "is not valid JSON"), ('{"body": "x"}', "has no field 'text'")]:
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(good[:70] + [""] + [bad] + good[70:]) + "\n")  # line 72
        message = error_of(tmp_path, cfg(source=str(path), tokenizer=tokenizer_path, max_docs=0, shard_mb=shard_mb))
        assert f"{path} line 72 {expected}" in message, message
    assert "its fields: body" in message and "data.text_field" in message


def test_corrupt_tokenizer_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00not a sentencepiece model" * 10)
    assert error_of(tmp_path, cfg(tokenizer=str(bad))) == f"tokenizer file {bad} is not a valid SentencePiece model"
    assert "does not exist" in error_of(tmp_path, cfg(tokenizer=str(tmp_path / "absent.model")))
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        Tokenizer.load(bad)  # outside prepare_data (export, load_model) it is still a one-line UserError


def test_tokenizer_vocab_mismatch_says_what_would_work(tmp_path, tokenizer_path):
    message = error_of(tmp_path, cfg(tokenizer=tokenizer_path), vocab=1024)
    assert "has 512 pieces" in message and "model.vocab_size=512" in message


def test_vocab_too_large_for_corpus_reports_the_maximum(tmp_path):
    (tmp_path / "small.txt").write_text("\n\n".join(paragraphs(30)))
    message = error_of(tmp_path, cfg(source=str(tmp_path / "small.txt")), vocab=4096)
    assert "too large for this corpus" in message and "at most" in message


def test_too_few_tokens_for_one_window(tmp_path, tokenizer_path):
    (tmp_path / "tiny.txt").write_text("a b c")
    message = error_of(tmp_path, cfg(source=str(tmp_path / "tiny.txt"), tokenizer=tokenizer_path, val_fraction=0))
    assert "fewer than one window" in message and "data.seq_len" in message


def test_hub_failures_are_one_line(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kw):
        raise ConnectionError("Couldn't reach 'org/corpus' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = error_of(tmp_path, cfg(source="hf:org/corpus", max_tokens=1000))
    assert "could not open hub dataset 'org/corpus'" in message and "Couldn't reach" in message
    assert "needs a bound" in error_of(tmp_path, cfg(source="hf:org/corpus", max_docs=0))


# --------------------------------------------------------------------------- val manifest and the embedded val rule


def test_val_manifest_has_one_entry_per_source_with_the_val_tokens(tmp_path, tokenizer_path):
    """Records naming their `source` (the ladder corpus: one record per chunk of a file) count
    under it, one entry per file; records without one are `<file>:<ordinal>`."""
    records = [{"text": f"chunk {c} of module {m}:\ndef f{m}_{c}(x):\n    return x * {m + c}\n",
                "source": f"pkg{m % 3}/mod{m}.py"} for m in range(40) for c in range(3)]
    records += [{"text": p} for p in paragraphs(30)]
    path = tmp_path / "ladder.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    data = prepare(tmp_path, cfg(source=str(path), tokenizer=tokenizer_path, max_docs=0, val_fraction=0.3,
                                 shard_mb=0.002))  # several units: ordinals count across them
    manifest = json.loads((Path(data.meta["dir"]) / "val_manifest.json").read_text())
    expected: dict[str, int] = {}
    for n, r in enumerate(records):
        if hash_is_val(r["text"], 0.3):
            key = r.get("source", f"{path}:{n}")
            expected[key] = expected.get(key, 0) + len(data.tokenizer.encode([r["text"]])[0]) + 1
    assert [e["source"] for e in manifest if "/mod" in e["source"]]  # some files hashed val
    assert {e["source"]: e["tokens"] for e in manifest} == expected and len(manifest) == len(expected)
    assert sum(e["tokens"] for e in manifest) == data.n_val_tokens == data.meta["n_val_tokens"]
    assert [e["tokens"] for e in manifest] == sorted((e["tokens"] for e in manifest), reverse=True)


def test_embedded_val_rule_moves_the_largest_val_files_to_train_until_none_is_over_5_percent(tmp_path):
    from trainer.data.sources import embedded_train_only

    rng = np.random.default_rng(0)
    sizes = (np.exp(rng.normal(8, 1.2, 400))).astype(int) + 1  # heavy-tailed, like the stdlib
    files = []
    for i, size in enumerate(sizes):
        (tmp_path / f"m{i}.py").write_text(f"# {i}\n" + "x" * int(size))
        files.append((f"m{i}.py", int(size) + len(f"# {i}\n")))
    moved = embedded_train_only(tmp_path, files, 0.3)
    val = {rel: size for rel, size in files if hash_is_val((tmp_path / rel).read_text(), 0.3)}
    kept = {rel: size for rel, size in val.items() if rel not in moved}
    assert moved and moved <= set(val) and len(kept) >= 20
    assert max(kept.values()) <= 0.05 * sum(kept.values())
    assert min(val[rel] for rel in moved) >= max(kept.values())  # the largest went, nothing else
    smallest_moved = min(moved, key=lambda rel: val[rel])  # a fixed point: it would break the cap
    assert val[smallest_moved] > 0.05 * (sum(kept.values()) + val[smallest_moved])
    assert embedded_train_only(tmp_path, files, 0.0) == frozenset()


def test_embedded_corpus_leaves_out_the_generated_codec_tables():
    root, files = stdlib_files(0)
    rel = {p.relative_to(root).as_posix() for p in files}
    assert (root / "encodings" / "cp861.py").exists() and "encodings/cp861.py" not in rel
    assert "encodings/utf_8.py" in rel and "encodings/idna.py" in rel  # codec code stays
    assert not [r for r in rel if r.startswith("encodings/") and b"Character Mapping Codec" in (root / r).read_bytes()]
