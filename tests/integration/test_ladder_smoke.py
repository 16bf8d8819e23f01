"""The ladder end to end: `python -m benchmarks.ladder.run` on a stand-in corpus (a slice of
tinyshakespeare as train/val/ood.jsonl with a valid corpus.json), one tiny run (width 16, a
few steps) through the real trainer, the probes and the row; ~30 s on one core."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

from benchmarks.ladder.corpus import corpus_hash
from tests.helpers import ROOT, SHAKESPEARE, _env


def stand_in_corpus(folder) -> str:
    """train/val/ood.jsonl of 8-paragraph documents from tinyshakespeare's first ~300 KB, and
    the corpus.json `benchmarks.ladder.corpus --check` accepts; returns the hash."""
    paras = [p for p in SHAKESPEARE.read_text()[:300_000].split("\n\n") if p.strip()]
    docs = ["\n\n".join(paras[i:i + 8]) for i in range(0, len(paras), 8)]
    n = len(docs)
    splits = {"train": docs[: int(0.8 * n)], "val": docs[int(0.8 * n): int(0.9 * n)], "ood": docs[int(0.9 * n):]}
    folder.mkdir()
    triples, files, nbytes = [], {}, {}
    for name, texts in splits.items():
        with open(folder / f"{name}.jsonl", "w") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"text": text, "source": f"shakespeare/{name}/{i}"}) + "\n")
                triples.append((name, f"shakespeare/{name}/{i}", hashlib.sha256(text.encode()).hexdigest()))
        files[name], nbytes[name] = len(texts), sum(len(t.encode()) for t in texts)
    digest = corpus_hash(triples)
    (folder / "corpus.json").write_text(json.dumps({"hash": digest, "files": files, "bytes": nbytes}))
    return digest


def test_one_tiny_run_writes_a_finite_row(tmp_path):
    digest = stand_in_corpus(tmp_path / "corpus")
    rows = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.ladder.run", "--allow-dirty", "--corpus", str(tmp_path / "corpus"),
           "--rows", str(rows), "--out", str(tmp_path / "runs"), "--sizes", "16", "--arms", "pre_ln", "--seeds", "1",
           "--ref-seeds", "1", "--lrs-per-cell", "1", "--max-extend", "0", "--tokens-per-param", "0.3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(x) for x in rows.read_text().splitlines()]
    assert (row["setting"], row["arm"], row["width"], row["n_layers"], row["seed"]) == ("width", "pre_ln", 16, 8, 0)
    assert row["corpus"] == digest and row["commit"].split("-")[0] and row["device"].startswith(("cpu", "cuda"))
    for key in ("val_loss", "ood_loss", "induction"):
        assert math.isfinite(row[key]), key
    assert len(row["loss_by_position"]) == 8 and all(math.isfinite(v) for v in row["loss_by_position"].values())
    assert row["tokens"] == row["steps"] * 8 * 256 and row["tokens"] >= 0.3 * row["params"]
    assert not (ROOT / row["run_dir"]).exists()  # only the row is kept
