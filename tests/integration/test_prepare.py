"""Offline sharded preparation, mixtures, extra eval sets, offline mode, and the sample index
that keeps data exact when the batch layout changes on resume."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

from tests.helpers import ROOT, _env, losses, metrics, tiny_overrides, train
from trainer.config import ConfigError, DataConfig, MixEntry, load_config
from trainer.data import DataError, MixedData, Mixture, PackedData, permute, plan, prepare_all, prepare_data
from trainer.data.shards import TokenStream, read_val_manifest
from trainer.parallel.layout import BatchLayout

VOCAB = 512


def cfg(**kw) -> DataConfig:
    base = {"seq_len": 32, "max_docs": 0, "tokenizer_sample_chars": 200_000}
    return dataclasses.replace(DataConfig(), **{**base, **kw})


def paragraphs(n: int, tag: str = "") -> list[str]:
    return [f"{tag}Paragraph {i} says:\nline one of {i}\nline two, the {i * 7} end." for i in range(n)]


def is_val(text: str, fraction: float) -> bool:
    """The documented split rule, written out independently of trainer.data."""
    return xxhash.xxh64_intdigest(text.encode(), 0) < int(fraction * 2**64)


def docs_of(tokens: np.ndarray, tok) -> list[str]:
    ends = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[a:b]) for a, b in zip(starts, ends)]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Several .txt files, a .jsonl.gz and a .txt.zst, big enough for many units at a tiny data.shard_mb."""
    import gzip

    import zstandard

    root = tmp_path_factory.mktemp("corpus")
    for f in range(3):
        (root / f"part{f}.txt").write_text("\n\n".join(paragraphs(400, f"f{f} ")) + "\n")
    with gzip.open(root / "extra.jsonl.gz", "wt") as g:
        g.write("\n".join(json.dumps({"text": p}) for p in paragraphs(200, "gz ")))
    with zstandard.open(root / "zz.txt.zst", "wt") as z:
        z.write("\n\n\n".join(paragraphs(100, "zst ")))
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("tok")
    p = prepare_all(cfg(source="embedded", max_docs=40, tokenizer_sample_chars=400_000), VOCAB, tmp, 1, quiet)
    return str(p.tokenizer_path)


def streams(p) -> tuple[np.ndarray, np.ndarray]:
    [d] = p.train
    from trainer.data.shards import open_streams

    train, val = open_streams(d.directory, d.index)
    return np.asarray(train), np.asarray(val)


def all_docs() -> list[str]:
    return [p for f in range(3) for p in paragraphs(400, f"f{f} ")] + paragraphs(200, "gz ") + paragraphs(100, "zst ")


# --------------------------------------------------------------------------- prepare


def test_one_and_two_workers_give_identical_shards_and_a_hash_val_split(corpus, tokenizer, tmp_path):
    c = cfg(source=str(corpus), tokenizer=tokenizer, shard_mb=0.01, val_fraction=0.05)
    one = prepare_all(c, VOCAB, tmp_path / "w1", 1, quiet)
    two = prepare_all(c, VOCAB, tmp_path / "w2", 2, quiet)
    whole = prepare_all(dataclasses.replace(c, shard_mb=64), VOCAB, tmp_path / "whole", 1, quiet)
    assert one.train[0].index["n_shards"] > 8  # the .txt files really were cut into byte ranges
    (t1, v1), (t2, v2), (tw, vw) = streams(one), streams(two), streams(whole)
    assert t1.tobytes() == t2.tobytes() == tw.tobytes() and v1.tobytes() == v2.tobytes() == vw.tobytes()
    tok = one.train[0].index
    from trainer.data.tokenizer import Tokenizer

    sp = Tokenizer.load(tokenizer)
    train_docs, val_docs = docs_of(t1, sp), docs_of(v1, sp)
    assert tok["n_docs"] == len(all_docs()) == len(train_docs) + len(val_docs)
    assert sorted(val_docs) == sorted(d for d in all_docs() if is_val(d, 0.05))  # the documented rule
    assert not set(val_docs) & set(train_docs) and 0 < len(val_docs) < len(train_docs)
    # val_manifest.json: each val paragraph is `<file>:<its ordinal in the file>`, however the
    # file was cut into units and whichever worker packed them
    manifests = [read_val_manifest(p.train[0].directory) for p in (one, two, whole)]
    assert manifests[0] == manifests[1] == manifests[2]
    files = {f"{corpus / 'part0.txt'}": paragraphs(400, "f0 "), f"{corpus / 'part1.txt'}": paragraphs(400, "f1 "),
             f"{corpus / 'part2.txt'}": paragraphs(400, "f2 "), f"{corpus / 'extra.jsonl.gz'}": paragraphs(200, "gz "),
             f"{corpus / 'zz.txt.zst'}": paragraphs(100, "zst ")}
    expected = {f"{path}:{n}": len(sp.encode([doc])[0]) + 1 for path, docs in files.items()
                for n, doc in enumerate(docs) if is_val(doc, 0.05)}
    assert {e["source"]: e["tokens"] for e in manifests[0]} == expected and len(manifests[0]) == len(expected)
    assert sum(expected.values()) == tok["n_val_tokens"]


def test_val_manifest_of_the_default_corpus_is_many_files_none_dominant(tmp_path):
    """`make pretrain`'s data (configs/tiny.yaml, the embedded stdlib): its held-out loss is
    measured on many files, none of them most of it (it was 2 files, one codec table 92%)."""
    c = load_config("configs/tiny.yaml", [f"data.cache_dir={tmp_path}"])
    p = prepare_all(c.data, c.model.vocab_size, tmp_path, 2, quiet)
    [d] = p.train
    manifest = read_val_manifest(d.directory)
    tokens = [e["tokens"] for e in manifest]
    assert len(manifest) >= 20 and len({e["source"] for e in manifest}) == len(manifest)
    assert sum(tokens) == d.index["n_val_tokens"] and max(tokens) <= 0.05 * sum(tokens)
    assert all(e["source"].endswith(".py") and not e["source"].startswith("encodings/cp") for e in manifest)


def test_tokenizer_file_does_not_depend_on_training_threads(tmp_path):
    from trainer.data.tokenizer import Tokenizer

    sample = "\n\n".join(paragraphs(3000)) + "\n".join(p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py")))
    one = Tokenizer.train(sample, 400, tmp_path / "one.model", threads=1)
    three = Tokenizer.train(sample, 400, tmp_path / "three.model", threads=3)
    assert one.path.read_bytes() == three.path.read_bytes()


def test_sidecars_describe_their_shard(corpus, tokenizer, tmp_path):
    p = prepare_all(cfg(source=str(corpus), tokenizer=tokenizer, shard_mb=0.01), VOCAB, tmp_path, 1, quiet)
    d = p.train[0]
    side = json.loads(next((d.directory / "shards").glob("00002-0000.json")).read_text())
    data = (d.directory / "shards" / side["train"]["file"]).read_bytes()
    assert side["train"]["tokens"] * 2 == len(data) and side["train"]["xxh3_64"] == xxhash.xxh3_64_hexdigest(data)
    assert side["source"].endswith("part0.txt") and side["range"][0] > 0 and side["train"]["documents"] > 0
    text = (corpus / "part0.txt").read_bytes()[side["range"][0]:side["range"][1]].decode()
    assert text.startswith("f0 Paragraph") and text.endswith("\n\n")  # cut just after a separator


@pytest.mark.slow
def test_kill_9_mid_prepare_then_rerun_redoes_only_unfinished_shards(corpus, tokenizer, tmp_path):
    args = [sys.executable, "-m", "trainer.prepare", "configs/tiny.yaml", f"data.source={corpus}",
            f"data.tokenizer={tokenizer}", f"model.vocab_size={VOCAB}", "data.shard_mb=0.01",
            f"data.cache_dir={tmp_path / 'cache'}", "data.max_docs=0", "data.val_fraction=0.05", "--workers", "1"]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env({"HARNESS_FAULT_SLOW_SHARD": "0.5"}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while len(list((tmp_path / "cache").glob("shards/*/shards/*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # now inside the next shard's pause: its token files exist, its sidecar not
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shard_dir = next((tmp_path / "cache").glob("shards/*/shards"))
    done = {p: p.stat().st_mtime_ns for p in shard_dir.iterdir()
            if (shard_dir / f"{p.name.split('.')[0]}.json").exists()}
    half = [p for p in shard_dir.glob("*.train.bin") if not (shard_dir / f"{p.name.split('.')[0]}.json").exists()]
    assert len(done) >= 9 and half and not (shard_dir.parent / "index.json").exists()
    rerun = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "already complete" in rerun.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished shards untouched
    clean = prepare_all(cfg(source=str(corpus), tokenizer=tokenizer, shard_mb=0.01, val_fraction=0.05), VOCAB,
                        tmp_path / "clean", 1, quiet)
    resumed = json.loads((shard_dir.parent / "index.json").read_text())
    assert [(s["train"]["xxh3_64"], s["val"]["xxh3_64"]) for s in resumed["shards"]] == \
        [(s["train"]["xxh3_64"], s["val"]["xxh3_64"]) for s in clean.train[0].index["shards"]]
    manifest = read_val_manifest(shard_dir.parent)  # merged from the sidecars of both runs
    assert manifest and manifest == read_val_manifest(clean.train[0].directory)


def test_corrupt_shard_is_caught_at_open_naming_it_and_only_it_is_rebuilt(corpus, tokenizer, tmp_path):
    c = cfg(source=str(corpus), tokenizer=tokenizer, shard_mb=0.01)
    p = prepare_all(c, VOCAB, tmp_path, 1, quiet)
    shard_dir = p.train[0].directory / "shards"
    victim = shard_dir / "00002-0000.train.bin"
    before = {f: f.stat().st_mtime_ns for f in shard_dir.glob("*.bin") if not f.name.startswith("00002-0000")}
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF  # same size, different bytes: only the checksum can tell
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        prepare_data(dataclasses.replace(c, prepare="offline"), VOCAB, 0, tmp_path, tmp_path / "run", True,
                     lambda: None, log=quiet)
    msg = str(e.value)
    assert "\n" not in msg and str(victim) in msg and "checksum" in msg and "python -m trainer.prepare" in msg
    logs: list[str] = []
    prepare_all(c, VOCAB, tmp_path, 1, logs.append)  # the rerun the message asks for
    assert any("rebuilding" in m for m in logs)
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())
    clean = prepare_all(c, VOCAB, tmp_path / "clean", 1, quiet)
    assert streams(p)[0].tobytes() == streams(clean)[0].tobytes()


def test_offline_mode_names_the_prepare_command_and_creates_nothing(corpus, tokenizer, tmp_path):
    c = cfg(source=str(corpus), tokenizer=tokenizer, prepare="offline")
    with pytest.raises(DataError) as e:
        prepare_data(c, VOCAB, 0, tmp_path / "cache", tmp_path / "run", True, lambda: None, log=quiet)
    assert "\n" not in str(e.value) and "not prepared" in str(e.value) and "python -m trainer.prepare" in str(e.value)
    # auto in a multi-rank job: over data.auto_prepare_mb it fails the same way, on every rank
    big = dataclasses.replace(c, prepare="auto", auto_prepare_mb=0.01)
    for rank in (0, 1):
        with pytest.raises(DataError, match="data.auto_prepare_mb=0.01"):
            prepare_data(big, VOCAB, 0, tmp_path / "cache", tmp_path / "run", rank == 0, lambda: None, log=quiet,
                         world=2)
    assert not (tmp_path / "cache").exists()
    # under the limit a multi-rank auto job prepares on rank 0 and opens everywhere
    small = dataclasses.replace(big, auto_prepare_mb=1)
    data = prepare_data(small, VOCAB, 0, tmp_path / "cache", tmp_path / "run", True, lambda: None, log=quiet, world=2)
    other = prepare_data(small, VOCAB, 0, tmp_path / "cache", tmp_path / "run", False, lambda: None, log=quiet,
                         world=2)
    assert (data.train_batch(3, 0, _on(1, 2, 4, 1))[0] == other.train_batch(3, 0, _on(1, 2, 4, 1))[0]).all()


def test_bad_sources_and_mixtures_are_one_line_and_lose_nothing(corpus, tokenizer, tmp_path):
    good = cfg(source=str(corpus), tokenizer=tokenizer)
    p = prepare_all(good, VOCAB, tmp_path, 1, quiet)
    index = p.train[0].directory / "index.json"
    stamp = index.stat().st_mtime_ns
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n" + json.dumps({"text": ""}) + "\n")
    cases = {str(tmp_path / "empty.jsonl"): "is empty", str(tmp_path / "blank.jsonl"): "no non-empty documents",
             str(tmp_path / "none" / "*.txt"): "matches no", str(tmp_path / "absent.txt"): "does not exist"}
    for source, words in cases.items():
        for c in (cfg(source=source, tokenizer=tokenizer), cfg(mix=[MixEntry(str(corpus)), MixEntry(source)],
                                                               tokenizer=tokenizer)):
            with pytest.raises(DataError) as e:
                prepare_all(c, VOCAB, tmp_path, 1, quiet)
            assert words in str(e.value) and "\n" not in str(e.value)
    overrides = {"data.mix=[{source: embedded, weight: 0}]": "data.mix[0].weight=0",
                 "data.mix=[{source: embedded, weight: 1}, {source: embedded, weight: -2}]": "data.mix[1].weight=-2",
                 "data.mix=[{source: embedded, weight: .nan}]": "data.mix[0].weight=nan",
                 f"data.eval={{held: {tmp_path / 'nope.txt'}}}": "data.eval.held="}
    (tmp_path / "notes.md").write_text("not a corpus")
    for override, words in overrides.items():
        with pytest.raises(ConfigError) as e:
            load_config("configs/tiny.yaml", [override])
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(DataError, match="data.eval.held .* unsupported extension"):
        prepare_all(cfg(source=str(corpus), tokenizer=tokenizer, eval={"held": str(tmp_path / "notes.md")}),
                    VOCAB, tmp_path, 1, quiet)
    assert index.stat().st_mtime_ns == stamp and p.train[0].problem() is None


def test_eval_sets_are_whole_held_out_streams(corpus, tokenizer, tmp_path):
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in paragraphs(60, "held ")))
    c = cfg(source=str(corpus / "part0.txt"), tokenizer=tokenizer, eval={"held": str(tmp_path / "held.jsonl")})
    data = prepare_data(c, VOCAB, 0, tmp_path / "cache", tmp_path / "run", True, lambda: None, log=quiet)
    held = data.eval_sets["held"]
    from trainer.data.tokenizer import Tokenizer

    assert docs_of(np.asarray(held.tokens), Tokenizer.load(tokenizer)) == paragraphs(60, "held ")
    x, y = next(held.val_batches(1, 2))
    assert x.shape == (2, 32) and (x[:, 1:] == y[:, :-1]).all()


# --------------------------------------------------------------------------- opening at scale


def test_opening_10b_tokens_of_shards_is_o_shards(corpus, tokenizer, tmp_path):
    """100 sparse shards of 100M uint16 tokens: open costs stats, not reads, and little memory."""
    c = cfg(source=str(corpus / "part0.txt"), tokenizer=tokenizer, prepare="offline", val_fraction=0.01,
            cache_dir=str(tmp_path))
    from trainer.data.shards import publish_index, write_json

    p = plan(c, VOCAB, tmp_path)
    d = p.train[0]
    (d.directory / "shards").mkdir(parents=True)
    sides, n = [], 100_000_000
    for i in range(100):
        side = {"unit": i, "part": 0, "last": True, "doc_start": 0, "doc_end": 1, "source": "synthetic"}
        for s, tokens in (("train", n), ("val", n // 100)):
            f = d.directory / "shards" / f"{i:05d}-0000.{s}.bin"
            with open(f, "wb") as fh:
                fh.truncate(tokens * 2)
            side[s] = {"file": f.name, "tokens": tokens, "documents": 1, "xxh3_64": "unused"}
        write_json(d.directory / "shards" / f"{i:05d}-0000.json", side)
        sides.append(side)
    publish_index(d.directory, sides, {"dtype": "uint16", "vocab_size": VOCAB, "eos_id": 2})
    probe = f"""
import resource, sys, time, dataclasses
sys.path.insert(0, {str(ROOT)!r})
import torch, numpy
from pathlib import Path
from trainer.config import DataConfig
from trainer.data import prepare_data
from trainer.parallel.layout import BatchLayout
def rss(): return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
c = dataclasses.replace(DataConfig(), **{dataclasses.asdict(c)!r})
before = rss(); t = time.perf_counter()
data = prepare_data(c, {VOCAB}, 0, Path({str(tmp_path)!r}), Path({str(tmp_path / 'run')!r}), True, lambda: None,
                    log=lambda m: None)
seconds = time.perf_counter() - t
x, _ = data.train_batch(10**7, 0, BatchLayout(micro_batch=8, grad_accum=1, seq_len=c.seq_len, dp_size=1))
print(seconds, (rss() - before) / 2**20, data.n_train_tokens, x.shape[0])
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    seconds, rss_mb, tokens, rows = out.stdout.split()
    print(f"opened {int(tokens):,} tokens in {float(seconds):.2f} s, RSS +{float(rss_mb):.0f} MB")
    assert int(tokens) == 10**10 and int(rows) == 8 and float(rss_mb) < 200


# --------------------------------------------------------------------------- sampling


def test_feistel_permutation_is_a_bijection_that_changes_with_its_key():
    for n in (1, 2, 3, 17, 1000, 4097):
        assert sorted(permute(np.arange(n), n, (0, 0, 0))) == list(range(n))
    a, b = permute(np.arange(1000), 1000, (0, 0, 0)), permute(np.arange(1000), 1000, (0, 0, 1))
    assert (a != b).mean() > 0.9 and abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.2


def synthetic(n_tokens: int, seq_len: int = 8, seed: int = 0, key: int = 0, offset: int = 0) -> PackedData:
    """Token t at position t (+offset), so a window's first input token names the window."""
    return PackedData(np.arange(offset, offset + n_tokens, dtype=np.uint32),
                      np.arange(offset, offset + n_tokens // 4, dtype=np.uint32), None, seq_len, seed, key=key)


def _on(dp_rank: int, dp_size: int, micro_batch: int, grad_accum: int) -> BatchLayout:
    """DP rank `dp_rank`'s batch layout (the loader reads the batch split, not seq_len)."""
    return BatchLayout(micro_batch=micro_batch, grad_accum=grad_accum, seq_len=8, dp_size=dp_size, dp_rank=dp_rank)


def indices(data, first_step: int, last_step: int, dp: int, micro_batch: int, accum: int) -> np.ndarray:
    return np.concatenate([data.sample_indices(s, m, _on(r, dp, micro_batch, accum))
                           for s in range(first_step, last_step) for m in range(accum) for r in range(dp)])


def test_resume_on_another_batch_layout_sees_every_sample_exactly_once():
    data = synthetic(10_000)
    first = indices(data, 0, 10, dp=2, micro_batch=4, accum=1)  # 2 ranks x micro 4: global batch 8
    data.seek(10, 80)  # what the checkpoint at step 10 stores
    second = indices(data, 10, 20, dp=1, micro_batch=4, accum=2)  # 1 rank x micro 4 x accum 2
    assert sorted(np.concatenate([first, second])) == list(range(20 * 8))
    doubled = synthetic(10_000)
    doubled.seek(10, 80)
    after = indices(doubled, 10, 20, dp=2, micro_batch=4, accum=2)  # global batch 16
    assert sorted(np.concatenate([first, after])) == list(range(80 + 160))
    # and the same sample index is the same window whatever the layout
    x, _ = data.train_batch(10, 1, _on(0, 1, 4, 2))
    assert (x == data.samples(np.arange(84, 88))[0]).all()


def test_mixture_shares_stay_within_one_point_over_every_10k_samples():
    weights = [0.5, 0.3, 0.15, 0.05]
    mix = Mixture(weights, seed=3)
    source, within = mix.assign(np.arange(300_000))
    for k, w in enumerate(weights):
        hits = np.concatenate([[0], np.cumsum(source == k)])
        share = (hits[10_000:] - hits[:-10_000]) / 10_000  # every window of 10k consecutive samples
        assert np.abs(share - w).max() < 0.01
        assert (within[source == k] == np.arange((source == k).sum())).all()  # each source's samples in order
    assert mix.counts(123_457) == [int((source[:123_457] == k).sum()) for k in range(4)]
    part, part_within = mix.assign(np.array([299_999, 5, 77_777]))
    assert (part == source[[299_999, 5, 77_777]]).all() and (part_within == within[[299_999, 5, 77_777]]).all()
    assert not (Mixture(weights, seed=4).assign(np.arange(1000))[0] == source[:1000]).all()


def test_mixed_loader_is_exact_on_resume_and_reports_shares():
    def mixed():
        parts = [synthetic(4000, key=0), synthetic(4000, key=1, offset=1_000_000)]
        return MixedData(parts, ["a", "b"], [3.0, 1.0], seed=5)

    data = mixed()  # 2 ranks x micro 4 x accum 2; rows come out in global sample order
    straight = np.concatenate([data.train_batch(s, m, _on(r, 2, 4, 2))[0].numpy()
                               for s in range(6) for m in range(2) for r in range(2)])
    resumed = mixed()  # resumed at step 3 on 1 rank x micro 8 x accum 2
    resumed.seek(3, 3 * 16)
    tail = np.concatenate([resumed.train_batch(s, m, _on(0, 1, 8, 2))[0].numpy()
                           for s in range(3, 6) for m in range(2)])
    assert (tail == straight[48:]).all() and (straight == data.samples(np.arange(96))[0].numpy()).all()
    from_b = straight[:, 0] >= 1_000_000
    assert abs(from_b.mean() - 0.25) < 0.02
    assert data.log_fields(10_000) == pytest.approx({"mix/a": 0.75, "mix/b": 0.25}, abs=1e-3)
    val = list(data.val_batches(2, 4))
    assert sum(len(x) for x, _ in val) == 8 and (np.concatenate([x[:, 0] for x, _ in val]) >= 1_000_000).sum() == 2


def test_token_stream_reads_across_shard_boundaries():
    pieces = [np.arange(0, 10, dtype=np.uint16), np.arange(10, 13, dtype=np.uint16), np.arange(13, 40, dtype=np.uint16)]
    s = TokenStream(pieces)
    assert len(s) == 40 and (s.read(8, 15) == np.arange(8, 15)).all()
    assert (s.windows(np.array([0, 9, 30]), 5) == np.array([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13],
                                                              [30, 31, 32, 33, 34]])).all()
    view = s.slice(5, 35) + TokenStream([np.arange(100, 105, dtype=np.uint16)])
    assert (np.asarray(view) == np.concatenate([np.arange(5, 35), np.arange(100, 105)])).all()


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_resume_on_one_rank_with_accumulation_continues_a_two_rank_run(tmp_path):
    """2 ranks x micro 4 to step 10, then 1 rank x micro 4 x accum 2 to step 20: every step
    sees the same 8 samples as an uninterrupted 1 x 4 x 2 run, so the losses agree."""
    common = {"run.max_steps": 20, "parallel.micro_batch": 4, "checkpoint.every": 10, "model.d_model": 32,
              "data.seq_len": 32, "model.max_seq_len": 32}
    train(tiny_overrides(tmp_path / "runs", "base", **common, **{"parallel.grad_accum": 2}))
    split = tiny_overrides(tmp_path / "runs", "split", **common)
    train(split + ["run.stop_at=10"], nproc=2)
    train(split + ["parallel.grad_accum=2"])
    base, resumed = losses(tmp_path / "runs" / "base"), losses(tmp_path / "runs" / "split")
    assert sorted(resumed) == list(range(1, 21))
    np.testing.assert_allclose([resumed[s] for s in range(1, 21)], [base[s] for s in range(1, 21)], rtol=1e-4)
    import torch

    state = torch.load(tmp_path / "runs" / "split" / "checkpoints" / "step-20" / "trainer_state_rank0.pt",
                       weights_only=True)["state"]
    assert state["samples"] == 160


@pytest.mark.slow
def test_mixture_and_eval_sets_in_a_real_run(tmp_path):
    (tmp_path / "prose.txt").write_text("\n\n".join(paragraphs(300, "prose ")))
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in paragraphs(80, "held ")))
    mix = f"[{{source: embedded, weight: 3}}, {{source: {tmp_path / 'prose.txt'}, weight: 1, name: prose}}]"
    train(tiny_overrides(tmp_path / "runs", "mix", **{"data.mix": mix, "data.eval": f"{{held: {tmp_path / 'held.jsonl'}}}",
                                                        "run.max_steps": 4, "run.eval_every": 2}))
    rows = metrics(tmp_path / "runs" / "mix")
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["val/held_loss"] != r["val_loss"] for r in evals)
    step = next(r for r in rows if r.get("step") == 4 and "loss" in r)
    assert step["mix/embedded"] + step["mix/prose"] == pytest.approx(1.0)
    assert step["mix/prose"] == pytest.approx(0.25, abs=0.07)  # 4 steps x 2 samples: 8 samples


@pytest.mark.slow
def test_offline_job_fails_on_every_rank_with_the_prepare_command(tmp_path):
    # Its own cache: the job must find nothing prepared, and the prepare below must fill it.
    out = train(tiny_overrides(tmp_path / "runs", "noprep", fresh_data=True, **{"data.prepare": "offline"}), nproc=2,
                check=False, timeout=300)
    assert out.returncode != 0
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "python -m trainer.prepare" in ln]
    assert lines and "configs/tiny.yaml" in lines[0] and not (tmp_path / "cache" / "shards").exists()
    prep = subprocess.run([sys.executable, "-m", "trainer.prepare", "configs/tiny.yaml",
                           *tiny_overrides(tmp_path / "runs", "noprep", fresh_data=True), "--workers", "2"], cwd=ROOT,
                          env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr
    train(tiny_overrides(tmp_path / "runs", "noprep", fresh_data=True, **{"data.prepare": "offline", "run.max_steps": 2}))
    assert os.path.exists(tmp_path / "runs" / "noprep" / "checkpoints" / "step-2" / "COMPLETE")


@pytest.mark.slow
def test_prepare_benchmark_measures_the_same_tokens_three_ways(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.prepare", "--mb", "1", "--vocab", "512", "--reps", "1", "--out",
                           str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "prepare.json").read_text())
    raw, one, two = res["raw_encode"], res["prepare_1_worker"], res["prepare_2_workers"]
    assert one["tokens"] == two["tokens"] == raw["tokens"] + raw["documents"]  # + one EOS per document
    assert res["open_10b_tokens"]["tokens"] == 10_100_000_000 and len(res["loadavg_before"]) == 3
    assert res["command"].startswith("python -m benchmarks.prepare --mb 1")
