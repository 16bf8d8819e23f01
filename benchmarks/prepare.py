"""Offline preparation throughput: `python -m benchmarks.prepare [--mb 100] [--vocab 8192]`.

Writes benchmarks/results/prepare.json. On a local corpus of at least `--mb` MB, generated in
the system temp directory from the embedded stdlib corpus and tinyshakespeare (never in the
repository), it measures in one run:
- raw `SentencePieceProcessor.encode` (one process, one thread) over the corpus's documents;
- `python -m trainer.prepare` with 1 and with 2 worker processes (fresh cache each, the same
  tokenizer file), wall time and the CPU time of the process tree;
- opening a synthetic 10B-token shard set (sparse files): seconds and RSS.
Targets: 2 workers >= 1.7x one worker (wall), and one worker >= 0.8x raw encode. The machine's
load average is recorded, because wall-time speedups on a shared machine depend on it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, SHAKESPEARE, command_line, machine_info, print_summary, write_result

N_FILES = 8


def make_corpus(directory: Path, mb: float) -> dict:
    """N_FILES .txt files of stdlib source and Shakespeare paragraphs, `mb` MB in all (reused)."""
    from trainer.data import open_source
    from trainer.data.sources import stdlib_files

    stamp = directory / "corpus.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("mb") == mb:
        return json.loads(stamp.read_text())
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "text").mkdir(parents=True)
    texts = [p.read_text(encoding="utf-8", errors="replace") for u in open_source("embedded").units
             for p in stdlib_files(u)]
    play = SHAKESPEARE if SHAKESPEARE.is_file() else None
    if play is not None:
        texts.append(play.read_text())
    per_file, k = int(mb * 2**20 / N_FILES) + 1, 0
    for i in range(N_FILES):
        size = 0
        with open(directory / "text" / f"part{i}.txt", "w") as f:
            while size < per_file:
                t = texts[k % len(texts)]
                k += 1
                f.write(t + "\n\n")
                size += len(t.encode()) + 2
    info = {"mb": mb, "files": N_FILES, "bytes": sum(p.stat().st_size for p in directory.glob("text/*.txt")),
            "from": ["embedded stdlib corpus"] + (["tinyshakespeare.txt"] if play else [])}
    stamp.write_text(json.dumps(info))
    return info


def tokenizer_for(directory: Path, vocab: int) -> Path:
    from trainer.data.tokenizer import Tokenizer

    path = directory / f"tokenizer-{vocab}.model"
    if not path.is_file():
        sample = (directory / "text" / "part0.txt").read_text()[:10_000_000]
        Tokenizer.train(sample, vocab, path, threads=2)
    return path


def raw_encode(corpus: Path, tokenizer: Path) -> dict:
    """SentencePiece alone: the same documents, batches of 512, one thread, one process."""
    import sentencepiece as spm

    from trainer.data.sources import _paragraphs

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = [d for p in sorted(corpus.glob("text/*.txt")) for d in _paragraphs(iter([p.read_text()]))]
    tokens = 0
    w, c = time.perf_counter(), time.process_time()
    for i in range(0, len(docs), 512):
        tokens += sum(map(len, sp.encode(docs[i:i + 512], out_type=int, num_threads=1)))
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return {"documents": len(docs), "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall,
            "tokens_per_cpu_s": tokens / cpu}


def run_prepare(corpus: Path, tokenizer: Path, vocab: int, workers: int, cache: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    args = [sys.executable, "-m", "trainer.prepare", "configs/tiny.yaml", f"data.source={corpus / 'text'}",
            f"data.tokenizer={tokenizer}", f"model.vocab_size={vocab}", f"data.cache_dir={cache}",
            "data.max_docs=0", "data.shard_mb=16", "--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    [index] = [json.loads(p.read_text()) for p in cache.glob("shards/*/index.json")]
    tokens = index["n_train_tokens"] + index["n_val_tokens"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # index["seconds"]: the dataset's build (worker start, read, hash, encode, write, index), without
    # the command's fixed start-up (Python, the config's imports, tokenizer load: ~3 s here).
    return {"workers": workers, "tokens": tokens, "documents": index["n_docs"], "shards": index["n_shards"],
            "wall_s": wall, "cpu_s": cpu, "build_s": index["seconds"], "tokens_per_s": tokens / index["seconds"],
            "tokens_per_s_end_to_end": tokens / wall, "tokens_per_cpu_s": tokens / cpu}


def open_10b(directory: Path) -> dict:
    """Open 100 sparse shards of 100M uint16 tokens the way a rank does, in a fresh process."""
    probe = f"""
import json, resource, sys, time
sys.path.insert(0, {str(ROOT)!r})
import numpy, torch
from pathlib import Path
from trainer.data.shards import check_shards, open_streams, publish_index, write_json
from trainer.data.loader import PackedData
from trainer.parallel.layout import BatchLayout
d = Path({str(directory)!r}); (d / "shards").mkdir(parents=True, exist_ok=True)
sides = []
for i in range(100):
    side = {{"unit": i, "part": 0, "last": True, "source": "synthetic"}}
    for s, n in (("train", 10**8), ("val", 10**6)):
        f = d / "shards" / f"{{i:05d}}-0000.{{s}}.bin"
        with open(f, "wb") as fh:
            fh.truncate(n * 2)
        side[s] = {{"file": f.name, "tokens": n, "documents": 1, "xxh3_64": ""}}
    sides.append(side)
publish_index(d, sides, {{"dtype": "uint16"}})
def rss(): return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
before, t = rss(), time.perf_counter()
index = json.loads((d / "index.json").read_text())
assert check_shards(d, index) is None
train, val = open_streams(d, index)
data = PackedData(train, val, None, 2048, 0)
x, _ = data.train_batch(10**6, 0, BatchLayout(micro_batch=8, grad_accum=1, seq_len=2048, dp_size=1))
print(json.dumps({{"tokens": data.n_train_tokens + data.n_val_tokens, "shards": 100,
                  "seconds": time.perf_counter() - t, "rss_mb": (rss() - before) / 2**20}}))
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    shutil.rmtree(directory, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size (MB)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; the best of each is reported")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    work = Path(tempfile.gettempdir()) / "harness-prepare-bench"
    corpus = work / f"corpus-{args.mb:g}mb"
    info = make_corpus(corpus, args.mb)
    tokenizer = tokenizer_for(corpus, args.vocab)
    load_before = list(os.getloadavg())
    # Interleaved repetitions (1, 2, 2, 1, ...), best of each: on a machine shared with other jobs
    # the fastest run is the one least disturbed by them.
    raws, ones, twos = [], [], []
    for r in range(args.reps):
        raws.append(raw_encode(corpus, tokenizer))
        for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
            (ones if workers == 1 else twos).append(
                run_prepare(corpus, tokenizer, args.vocab, workers, work / f"cache{workers}"))
    load_after = list(os.getloadavg())
    raw = max(raws, key=lambda x: x["tokens_per_s"])
    one = min(ones, key=lambda x: x["build_s"])
    two = min(twos, key=lambda x: x["build_s"])
    assert one["tokens"] == two["tokens"] == raw["tokens"] + raw["documents"]  # + one EOS per document
    opened = open_10b(work / "open10b")
    for cache in ("cache1", "cache2"):
        shutil.rmtree(work / cache, ignore_errors=True)
    payload = {
        "benchmark": "prepare", "device": f"CPU ({os.cpu_count()} cores; load average in loadavg_before/after)",
        "command": command_line("prepare", argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "loadavg_before": load_before, "loadavg_after": load_after,
        "corpus": {**info, "documents": raw["documents"], "vocab_size": args.vocab,
                   "location": "generated in the system temp directory"},
        "reps": args.reps, "raw_encode": raw, "prepare_1_worker": one, "prepare_2_workers": two,
        "all_reps": {"raw_encode": raws, "prepare_1_worker": ones, "prepare_2_workers": twos},
        "speedup_2_vs_1_workers": one["build_s"] / two["build_s"],
        "speedup_2_vs_1_workers_end_to_end": one["wall_s"] / two["wall_s"],
        "cpu_time_ratio_2_vs_1_workers": two["cpu_s"] / one["cpu_s"],
        "per_worker_vs_raw_encode": one["tokens_per_s"] / raw["tokens_per_s"],
        "per_worker_vs_raw_encode_end_to_end": one["tokens_per_s_end_to_end"] / raw["tokens_per_s"],
        "per_worker_vs_raw_encode_cpu_end_to_end": one["tokens_per_cpu_s"] / raw["tokens_per_cpu_s"],
        "open_10b_tokens": opened,
        "targets": {"speedup_2_vs_1_workers": ">= 1.7", "per_worker_vs_raw_encode": ">= 0.8",
                    "open_10b_tokens": "< 2 s and < 200 MB RSS"},
        "notes": ("best of `reps` interleaved runs for each side; headline speedup and per-worker ratio use the dataset build's wall time (worker start, read, "
                  "hash, encode, write, index); *_end_to_end adds the command's fixed start-up. cpu_time_ratio is "
                  "the process tree's CPU time with 2 workers over 1 (1.0 = parallelism costs no extra work), "
                  "which load from other processes does not bend. Raw encode: same documents, batches of 512, "
                  "one thread, in the benchmark process"),
    }
    path = write_result("prepare", payload, Path(args.out) if args.out else None)
    print_summary(path, ["speedup_2_vs_1_workers", "per_worker_vs_raw_encode", "cpu_time_ratio_2_vs_1_workers"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
