"""The option ladder's corpus: `python -m benchmarks.ladder.corpus [--out benchmarks/data/ladder] [--check]`.

The ladder trains models of ~0.1M-2.3M non-embedding parameters at >= 8 tokens per parameter,
so its largest rung needs ~20M training tokens a run, more than tinyshakespeare or the embedded
stdlib corpus hold. This module builds a Python-code corpus from files inside the repository
only: the `.py` files of the project's installed dependencies in `.venv/lib/python*/site-packages`,
found through `importlib.metadata` (each distribution's RECORD), so the source of every file is a
named `dist==version` and a clone rebuilds the same corpus from the record (below).

Rules (all recorded under "rules" in corpus.json):
- Excluded distributions: the project itself (`harness`: it is what is being studied, and an
  editable install points outside the venv anyway), `pip` and `setuptools` (with its
  `_distutils_hack`): packaging tools that vendor whole copies of other libraries (requests,
  rich, urllib3, packaging...), which would be near-copies of code already in the corpus.
- Excluded directories: any path with a `tests` or `test` component. Test suites are dominated
  by fixtures, expected-output literals and parametrised near-repeats of one call; library code
  is what the ladder should model, and there is plenty of it without them.
- Pathological files are dropped: over 1,000,000 bytes; not UTF-8; whitespace only; any line
  over 1,000 characters or a mean line over 100 characters (minified or generated data);
  fewer than 25% of characters alphabetic (numeric tables); 50+ non-blank lines of which fewer
  than 10% are distinct once normalised as below (generated tables such as chardet's language
  models: one `N: Likelihood.X,  # 'c'` line shape, thousands of times). These are Codex/StarCoder-
  style filters: such files are data that happens to be in a .py file and would skew a small
  model's loss toward memorising tables.
- Duplicates are dropped, keeping the first in (held-out first, then sorted source) order:
  exact (sha256 of the bytes) and near-exact (sha256 of the text with `#` comments removed,
  lowercased, every number or hex literal replaced by `0`, all whitespace removed), so
  vendored copies, generated tables that differ only in numbers and files that differ only in a
  licence comment collapse. The key is only a dedup key: a `#` inside a string also cuts the
  rest of its line, which at worst merges two files that differ only there. Held-out files
  are kept first so a duplicate of a held-out file can never survive in train. Docstrings are
  kept in the key: two modules with different documentation are different text.
- Out-of-distribution set (ood.jsonl): whole distributions held out of train and val, picked
  mid-sized and of distinct domains: networkx (graph algorithms), jinja2 (a template
  compiler), nltk (natural-language processing); sympy, torch, transformers are too big to
  spare. In-distribution files with a path component equal to a held-out top-level package
  (a vendored copy) are dropped too. Capped at OOD_MAX_BYTES by a deterministic subset (hash
  order of the source); held-out files past the cap are dropped, never trained on.
- Train/val split, per file, never splitting a file: files are ordered by a hash of their source
  id and taken into val in that order until val holds max(VAL_FRACTION of the in-distribution
  bytes, VAL_MIN_BYTES); a file over VAL_FILE_CAP (2%) of that target is skipped (train), so no
  val file outweighs 2% of val's bytes (one big file would otherwise dominate the mean val
  loss). So a file is in val when its hash is below the last one taken: its side depends on its
  own path and one threshold, and adding a package moves at most the files near the threshold.
  The same cap and the same hash-order subset make ood.jsonl. Bytes stand in for tokens here.

Outputs, in `--out`: train.jsonl, val.jsonl, ood.jsonl (records {"text", "source"}, where
source is "<dist>/<path inside site-packages>", the id the prepare step's val manifest uses;
written in hash order so any prefix mixes packages) and corpus.json: packages included and
excluded, held-out packages, rules, drop counts, files and bytes per split, and "hash", a
sha256 over the sorted (split, source, sha256(text)) triples. Every ladder run row records
that hash and rows with different hashes are never pooled. The same JSON (it holds no
absolute path) is written to benchmarks/results/ladder_corpus.json, the definition on record.
Once that record exists it defines the corpus: a build takes exactly the distributions it names,
each at its recorded version, and must reproduce its hash, else a one-line error and nothing is
written. The venv alone cannot: `make setup` pins the project's direct dependencies, and a fresh
resolve moves unpinned transitive ones (idna, regex), and a dev tool added later (pytest-xdist)
would join the corpus. `--pins` prints the name==version list to install (make ladder installs
it); `--redefine` builds from everything installed and replaces the record (a new hash: old rows
never pool with new). `--check` recomputes the hash of an existing build and compares it with
its corpus.json.

Measured on the project's venv (122 packages; see the record for the hash): train 12,373 files,
205.5 MB; val 320 files, 3.14 MB; ood 522 files, 8.01 MB. A 2048-piece BPE trained on 6 MB of
train gives ~2.7 bytes per token, so train is ~75M tokens, several times the largest rung's
~20M. A build takes ~22 s of CPU (about a minute of wall time on a shared 2-core machine).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import os
import re
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "data" / "ladder"
RECORD = ROOT / "benchmarks" / "results" / "ladder_corpus.json"
REBUILD = "python -m benchmarks.ladder.corpus"
SPLITS = ("train", "val", "ood")

EXCLUDED_DISTS = ("harness", "pip", "setuptools")
EXCLUDED_TOP = ("_distutils_hack",)  # setuptools' import hook, installed as its own top-level package
EXCLUDED_DIRS = ("test", "tests")
OOD_DISTS = ("jinja2", "networkx", "nltk")
OOD_MAX_BYTES = 8_000_000
MAX_FILE_BYTES = 1_000_000
MAX_LINE_CHARS = 1000
MAX_MEAN_LINE_CHARS = 100
MIN_ALPHA_FRACTION = 0.25
REPEAT_MIN_LINES = 50
MIN_DISTINCT_LINES = 0.1
VAL_FRACTION = 0.015
VAL_MIN_BYTES = 3_000_000
VAL_FILE_CAP = 0.02

_COMMENT = re.compile(r"#[^\n]*")
_NUMBER = re.compile(r"0x[0-9a-f_]+|0o[0-7_]+|0b[01_]+|\d[\d_]*")  # applied after lower(); "1.5e3" -> "0.0e0"
_SPACE = re.compile(r"\s+")
_ALPHA = re.compile(r"[A-Za-z]")


def canonical(name: str) -> str:
    """PEP 503 name: `Jinja2` and `jinja2`, `typing_extensions` and `typing-extensions` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Dist:
    name: str  # canonical
    version: str
    files: list[str] = field(default_factory=list)  # posix paths relative to the site-packages root


def site_packages() -> Path:
    """The running interpreter's site-packages, which must be the repository's .venv."""
    for key in ("purelib", "platlib"):
        path = Path(sysconfig.get_paths()[key]).resolve()
        if path.is_relative_to(ROOT) and path.is_dir():
            return path
    raise UserError(f"site-packages of {sys.executable} is outside the repository; run {REBUILD} with .venv/bin/python")


def distributions(root: Path) -> list[Dist]:
    """Every distribution installed in `root`, with its .py files that lie under `root`."""
    root = root.resolve()
    found: dict[str, Dist] = {}
    for d in metadata.distributions(path=[str(root)]):
        name = canonical(d.metadata["Name"] or "")
        if not name or name in found:  # a stale second dist-info of one name: the first found wins
            continue
        files = []
        for f in d.files or []:
            if f.suffix != ".py":
                continue
            path = Path(d.locate_file(f)).resolve()  # RECORD entries may climb out (scripts in bin/)
            if path.is_relative_to(root) and path.is_file():
                files.append(path.relative_to(root).as_posix())
        found[name] = Dist(name, d.version, sorted(files))
    return [found[n] for n in sorted(found)]


def unit(source: str, salt: str) -> float:
    """A deterministic number in [0, 1) from `source`: the split's coin, the same on every machine."""
    return int(hashlib.sha256(f"{salt}:{source}".encode()).hexdigest()[:16], 16) / 2**64


def examine(data: bytes) -> tuple[str | None, str, str]:
    """(reason to drop or None, text, near-duplicate key) of one file's bytes."""
    if len(data) > MAX_FILE_BYTES:
        return "too_big", "", ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8", "", ""
    if not text.strip():
        return "empty", text, ""
    lines = text.splitlines()
    if max(map(len, lines)) > MAX_LINE_CHARS or len(text) / len(lines) > MAX_MEAN_LINE_CHARS:
        return "long_lines", text, ""
    if len(_ALPHA.findall(text)) < MIN_ALPHA_FRACTION * len(text):
        return "not_text", text, ""
    norm = [s for s in (_SPACE.sub("", line) for line in _NUMBER.sub("0", _COMMENT.sub("", text.lower())).splitlines()) if s]
    if len(norm) >= REPEAT_MIN_LINES and len(set(norm)) < MIN_DISTINCT_LINES * len(norm):
        return "repetitive", text, ""
    return None, text, hashlib.sha256("".join(norm).encode()).hexdigest()


def take(files: list[dict], target: float, limit: float) -> tuple[list[dict], list[dict]]:
    """(taken, rest): files in coin order, skipping any over `limit` x `target` bytes, until `target`
    bytes are taken. Should all the small files fall short of `target`, files over `limit` of what
    was taken are put back until none is (the cap then binds the actual, smaller total)."""
    taken, total = [], 0
    for f in files:
        if total >= target:
            break
        if f["bytes"] <= limit * target:
            taken.append(f)
            total += f["bytes"]
    while (big := [f for f in taken if f["bytes"] > limit * sum(g["bytes"] for g in taken)]):
        taken = [f for f in taken if f not in big]
    ids = {id(f) for f in taken}
    return taken, [f for f in files if id(f) not in ids]


def corpus_hash(triples) -> str:
    h = hashlib.sha256()
    for split, source, digest in sorted(triples):
        h.update(f"{split}\t{source}\t{digest}\n".encode())
    return h.hexdigest()


def rules() -> dict:
    return {"excluded_dists": list(EXCLUDED_DISTS), "excluded_top_level": list(EXCLUDED_TOP),
            "excluded_dirs": list(EXCLUDED_DIRS), "ood_dists": list(OOD_DISTS), "ood_max_bytes": OOD_MAX_BYTES,
            "max_file_bytes": MAX_FILE_BYTES, "max_line_chars": MAX_LINE_CHARS,
            "max_mean_line_chars": MAX_MEAN_LINE_CHARS, "min_alpha_fraction": MIN_ALPHA_FRACTION,
            "repeat_min_lines": REPEAT_MIN_LINES, "min_distinct_lines": MIN_DISTINCT_LINES,
            "val_fraction": VAL_FRACTION, "val_min_bytes": VAL_MIN_BYTES, "val_file_cap": VAL_FILE_CAP,
            "dedup": "exact sha256 of bytes; near: sha256 of text without # comments, lowercased, "
                     "numbers and hex literals -> 0, whitespace removed; first kept (held-out first, then source)",
            "split": "val: files in sha256('val:'+source) order, skipping any over val_file_cap x the target, "
                     "until max(val_fraction x in-distribution bytes, val_min_bytes); ood: the same in "
                     "sha256('ood:'+source) order up to ood_max_bytes"}


def select(root: Path, dists: list[Dist], ood: tuple[str, ...] = OOD_DISTS) -> dict:
    """Apply the rules to `dists` under `root`: {"splits": {split: [file...]}, "info": corpus.json's body}.
    Each file is {"source", "text", "bytes", "sha256"}."""
    ood = tuple(canonical(n) for n in ood)
    missing = [n for n in ood if n not in {d.name for d in dists}]
    if missing:
        raise UserError(f"held-out package(s) {', '.join(missing)} not installed in {shown(root)}; "
                        f"install the project's dependencies (.venv) or change OOD_DISTS")
    excluded = {canonical(n) for n in EXCLUDED_DISTS}
    ood_tops = {f.split("/")[0] for d in dists if d.name in ood for f in d.files if "/" in f}
    dropped: dict[str, int] = {}

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    candidates, claimed = [], set()
    for d in dists:
        if d.name in excluded:
            continue
        for rel in d.files:
            if rel in claimed:  # two RECORDs naming one file: the first (sorted) distribution owns it
                continue
            claimed.add(rel)
            parts = rel.split("/")
            if parts[0] in EXCLUDED_TOP:
                drop("excluded_top_level")
            elif any(p in EXCLUDED_DIRS for p in parts[:-1]):
                drop("test_dir")
            elif d.name not in ood and any(p in ood_tops for p in parts[:-1]):
                drop("ood_vendored")
            else:
                candidates.append((d.name not in ood, f"{d.name}/{rel}", rel))
    candidates.sort()  # held-out first, so dedup keeps the held-out copy of a shared file

    seen_exact, seen_near, kept = set(), set(), []
    for in_dist, source, rel in candidates:
        data = (root / rel).read_bytes()
        reason, text, key = examine(data)
        if reason:
            drop(reason)
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen_exact:
            drop("duplicate_exact")
            continue
        if key in seen_near:
            drop("duplicate_near")
            continue
        seen_exact.add(digest)
        seen_near.add(key)
        kept.append({"in_dist": in_dist, "source": source, "text": text, "bytes": len(data), "sha256": digest})

    held = sorted((f for f in kept if not f["in_dist"]), key=lambda f: unit(f["source"], "ood"))
    ood_files, rest = take(held, min(OOD_MAX_BYTES, sum(f["bytes"] for f in held)), VAL_FILE_CAP)
    for _ in rest:  # held out but past the cap: dropped, never trained on
        drop("ood_not_taken")

    # Val: the first files in coin order (so in val exactly when their coin is below the last
    # one taken), skipping files over the per-file cap, until the target; the rest is train.
    in_dist = sorted((f for f in kept if f["in_dist"]), key=lambda f: unit(f["source"], "val"))
    target = max(VAL_FRACTION * sum(f["bytes"] for f in in_dist), VAL_MIN_BYTES)
    val, train = take(in_dist, target, VAL_FILE_CAP)

    splits = {"train": train, "val": val, "ood": ood_files}
    for name, files in splits.items():
        files.sort(key=lambda f: unit(f["source"], name))
    triples = [(name, f["source"], f["sha256"]) for name, files in splits.items() for f in files]
    info = {
        "built_by": REBUILD,
        "hash": corpus_hash(triples),
        "files": {name: len(files) for name, files in splits.items()},
        "bytes": {name: sum(f["bytes"] for f in files) for name, files in splits.items()},
        "val_target_bytes": round(target),
        "packages": {d.name: d.version for d in dists if d.name not in excluded and d.name not in ood},
        "ood_packages": {d.name: d.version for d in dists if d.name in ood},
        "excluded_packages": {d.name: d.version for d in dists if d.name in excluded},
        "dropped": dict(sorted(dropped.items())),
        "rules": rules(),
    }
    return {"splits": splits, "info": info}


def write(out: Path, selection: dict) -> dict:
    """Write the three jsonl files and corpus.json (last, via rename: a build without it is incomplete)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.json").unlink(missing_ok=True)
    for name, files in selection["splits"].items():
        tmp = out / f"{name}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for f in files:
                fh.write(json.dumps({"text": f["text"], "source": f["source"]}, ensure_ascii=False) + "\n")
        os.replace(tmp, out / f"{name}.jsonl")
    info = selection["info"]
    tmp = out / "corpus.json.tmp"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, out / "corpus.json")
    return info


def off_record(dists: list[Dist], record: dict) -> dict[str, str]:
    """{name: recorded version} of each distribution the record names that `dists` lacks or holds
    at another version: what to install (`pip install --no-deps name==version`) to rebuild it."""
    have = {d.name: d.version for d in dists}
    want = {**record["packages"], **record["ood_packages"]}
    return {n: v for n, v in sorted(want.items()) if have.get(n) != v}


def on_record(dists: list[Dist], record: dict) -> list[Dist]:
    """The distributions the record names, at its versions. Installed extras (a dev tool added to
    the venv after the record was made) are left out, so they cannot move the corpus."""
    wrong = off_record(dists, record)
    if wrong:
        have = {d.name: d.version for d in dists}
        shown_wrong = ", ".join(f"{n}=={v} (installed: {have.get(n, 'none')})" for n, v in list(wrong.items())[:4])
        raise UserError(f"the corpus on record ({shown(RECORD)}, hash {record['hash'][:12]}) needs {len(wrong)} "
                        f"package version(s) this venv lacks: {shown_wrong}{' ...' if len(wrong) > 4 else ''}; "
                        f"install them with `.venv/bin/pip install --no-deps $({REBUILD} --pins)` (make ladder "
                        f"does), or define a new corpus with --redefine (its rows never pool with the old ones)")
    named = {*record["packages"], *record["ood_packages"], *(canonical(n) for n in EXCLUDED_DISTS)}
    return [d for d in dists if d.name in named]


def build(out: Path, root: Path | None = None, dists: list[Dist] | None = None,
          ood: tuple[str, ...] = OOD_DISTS, record: dict | None = None) -> dict:
    """Build into `out`. With `record` (a corpus.json), the corpus it defines: exactly its
    packages at its versions, and its hash, else a one-line UserError and nothing is written."""
    root = root or site_packages()
    dists = distributions(root) if dists is None else dists
    selection = select(root, on_record(dists, record) if record else dists, ood)
    if record and selection["info"]["hash"] != record["hash"]:
        raise UserError(f"the build's hash {selection['info']['hash'][:12]} is not the record's {record['hash'][:12]} "
                        f"although every recorded package is installed at its version: a file under "
                        f"{shown(root)} was edited, or the rules in {Path(__file__).name} changed "
                        f"(then define a new corpus with --redefine)")
    return write(out, selection)


def check(out: Path) -> dict:
    """Recompute the hash of the build in `out`; raise a one-line UserError if it differs from corpus.json."""
    stamp = out / "corpus.json"
    if not stamp.is_file():
        raise UserError(f"{shown(out)} has no corpus.json (no complete build); build it with {REBUILD}")
    info = json.loads(stamp.read_text())
    triples, files, nbytes = [], {}, {}
    for name in SPLITS:
        path = out / f"{name}.jsonl"
        if not path.is_file():
            raise UserError(f"{shown(path)} is missing; rebuild with {REBUILD}")
        files[name] = nbytes[name] = 0
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                data = rec["text"].encode()
                triples.append((name, rec["source"], hashlib.sha256(data).hexdigest()))
                files[name] += 1
                nbytes[name] += len(data)
    got = corpus_hash(triples)
    if got != info.get("hash"):
        what = [f"{n}: {files[n]} files/{nbytes[n]} bytes vs {info['files'].get(n)}/{info['bytes'].get(n)} recorded"
                for n in SPLITS if (files[n], nbytes[n]) != (info["files"].get(n), info["bytes"].get(n))]
        raise UserError(f"{shown(out)} differs from its corpus.json (hash {got[:12]} vs {str(info.get('hash'))[:12]} recorded"
                        f"{'; ' + '; '.join(what) if what else '; same sizes, different contents'}); "
                        f"rebuild with {REBUILD}")
    return info


def shown(path: Path) -> str:
    """`path` relative to the repository when inside it: messages name no machine's absolute paths."""
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=REBUILD, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="verify an existing build against its corpus.json")
    ap.add_argument("--pins", action="store_true",
                    help="print name==version for each package the record needs that this venv lacks, and exit")
    ap.add_argument("--redefine", action="store_true",
                    help="build from every installed package and make that the record (a new hash: the "
                         "ladder's rows of the old corpus never pool with the new one's)")
    args = ap.parse_args(argv)
    record = None if args.redefine or not RECORD.is_file() else json.loads(RECORD.read_text())
    try:
        if args.check:
            info = check(args.out)
            note = "" if record is None or record["hash"] == info["hash"] else \
                f" (not the definition on record in {RECORD.relative_to(ROOT)})"
            print(f"ok: {shown(args.out)} matches its corpus.json, hash {info['hash'][:12]}{note}")
            return
        if args.pins:
            wrong = off_record(distributions(site_packages()), record) if record else {}
            print(" ".join(f"{n}=={v}" for n, v in wrong.items()))
            return
        start = time.perf_counter()
        info = build(args.out, record=record)
        if record is None:
            RECORD.write_text(json.dumps(info, indent=1) + "\n")
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{shown(args.out)}: hash {info['hash'][:12]}{' (the record)' if record else ' (new record)'}, "
          f"files {info['files']}, bytes {info['bytes']}, {len(info['packages'])} packages, "
          f"ood {sorted(info['ood_packages'])}, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
