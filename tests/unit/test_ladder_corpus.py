"""The ladder corpus builder (benchmarks/ladder/corpus.py) on a small synthetic site-packages tree:
distributions found through their RECORD files, duplicates collapsed, a held-out package only in
ood, splits disjoint, the 2%-of-val cap, and a content hash that is stable and sensitive."""
from __future__ import annotations

import json

import pytest

from benchmarks.ladder import corpus


def word(i: int) -> str:
    """A letters-only name per integer: numbers are normalised away by the near-dup key, names are not."""
    return "".join("abcdefghij"[int(d)] for d in str(i))


def module(tag: str, n: int = 3) -> str:
    body = "".join(f"def {tag}_{word(i)}(value):\n    return value * {i}\n\n\n" for i in range(n))
    return f'"""Module {tag}."""\n{body}'


def install(root, name: str, files: dict[str, str], version: str = "1.0") -> None:
    """A distribution as pip leaves it: its files plus NAME-VERSION.dist-info with METADATA and RECORD."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    script = "/".join([".."] * 3 + ["bin", "tool.py"])  # scripts climb out of site-packages (spelt so
    # that the repository's no-path-outside-the-repo test does not read it as one)
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,", f"{script},,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """alpha and beta (in distribution), heldout (ood), pip (excluded). Val targets 20 kB, so its
    per-file cap is 400 bytes: the small modules fit, the 20 big ones never do."""
    monkeypatch.setattr(corpus, "VAL_MIN_BYTES", 20_000)
    monkeypatch.setattr(corpus, "VAL_FRACTION", 0.01)
    root = tmp_path / "site-packages"
    shared = module("shared", 6)
    alpha = {f"alpha/m{word(i)}.py": module(f"alpha{word(i)}") for i in range(150)}
    alpha |= {f"alpha/big{word(i)}.py": module(f"alphabig{word(i)}", 30) for i in range(20)}
    alpha |= {"alpha/shared.py": shared, "alpha/tests/test_x.py": module("testx"),
              "alpha/empty.py": "\n", "alpha/table.py": "T = [\n" + "".join(f"    {i}, {i * 7}, {i * 13},\n" for i in range(300)) + "]\n",
              "alpha/wide.py": "X = '" + "y" * 2000 + "'\n",
              "alpha/repeat.py": "".join(f"    {i}: Likelihood.NEGATIVE,  # c\n" for i in range(200)),
              "alpha/huge.py": module("huge", 1) + "# padding line\n" * 70_000}
    beta = {f"beta/m{word(i)}.py": module(f"beta{word(i)}") for i in range(150)}
    # Near copy of alpha/shared.py: other whitespace, case, numbers, hex literals and comments.
    near = shared.upper().replace("    ", "\t").replace("* 1", "* 0x1F") + "# a licence comment\n"
    beta |= {"beta/shared_copy.py": shared, "beta/shared_near.py": near, "beta/_vendor/heldout/x.py": module("vend")}
    held = {f"heldout/h{word(i)}.py": module(f"held{word(i)}", 4) for i in range(60)}
    install(root, "alpha", alpha)
    install(root, "beta", beta, "2.0")
    install(root, "heldout", held)
    install(root, "aaa_copier", {"aaa/held_copy.py": held["heldout/ha.py"]})  # sorts before heldout
    install(root, "pip", {"pip/core.py": module("pipcore")})
    return root


def build(site, out):
    info = corpus.build(out, root=site, ood=("heldout",))
    splits = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
              for name in corpus.SPLITS}
    return info, splits


def sources(splits, name):
    return {r["source"] for r in splits[name]}


def test_distributions_come_from_records_and_stay_inside_the_root(site):
    dists = {d.name: d for d in corpus.distributions(site)}
    assert set(dists) == {"aaa-copier", "alpha", "beta", "heldout", "pip"}
    assert dists["beta"].version == "2.0"
    assert all(not f.startswith("..") and f.endswith(".py") for d in dists.values() for f in d.files)


def test_rules_drop_duplicates_tests_excluded_and_pathological_files(site, tmp_path):
    info, splits = build(site, tmp_path / "out")
    everything = set().union(*(sources(splits, n) for n in corpus.SPLITS))
    assert "alpha/alpha/shared.py" in everything  # first by sorted source
    assert not {"beta/beta/shared_copy.py", "beta/beta/shared_near.py"} & everything
    assert info["dropped"]["duplicate_exact"] == 1 + 1  # beta's copy, and aaa's copy of a held-out file
    assert info["dropped"]["duplicate_near"] == 1
    for name, reason in [("empty", "empty"), ("table", "not_text"), ("wide", "long_lines"),
                         ("repeat", "repetitive"), ("huge", "too_big")]:
        assert f"alpha/alpha/{name}.py" not in everything
        assert info["dropped"][reason] == 1, reason
    assert info["dropped"]["test_dir"] == 1 and info["dropped"]["ood_vendored"] == 1
    assert not any(s.startswith("pip/") for s in everything)
    assert info["excluded_packages"] == {"pip": "1.0"} and "pip" not in info["packages"]


def test_held_out_package_only_in_ood_and_splits_disjoint(site, tmp_path):
    info, splits = build(site, tmp_path / "out")
    assert sources(splits, "ood") and all(s.startswith("heldout/") for s in sources(splits, "ood"))
    assert "heldout/heldout/ha.py" in sources(splits, "ood")  # kept over aaa's earlier-sorted copy
    assert not any(s.startswith("heldout/") or "held" in s for n in ("train", "val") for s in sources(splits, n))
    assert info["ood_packages"] == {"heldout": "1.0"} and "heldout" not in info["packages"]
    train, val, ood = (sources(splits, n) for n in corpus.SPLITS)
    assert not (train & val or train & ood or val & ood)
    assert sum(len(splits[n]) for n in corpus.SPLITS) == len(train | val | ood)
    assert {n: len(splits[n]) for n in corpus.SPLITS} == info["files"]
    assert {n: sum(len(r["text"].encode()) for r in splits[n]) for n in corpus.SPLITS} == info["bytes"]


def test_val_reaches_its_target_and_no_val_file_exceeds_two_percent(site, tmp_path):
    info, splits = build(site, tmp_path / "out")
    val_bytes = info["bytes"]["val"]
    assert 20_000 <= val_bytes < 21_000
    assert max(len(r["text"].encode()) for r in splits["val"]) <= corpus.VAL_FILE_CAP * val_bytes
    # The cap did bind: some big file's coin is below the last val file's, yet it is in train.
    last = max(corpus.unit(s, "val") for s in sources(splits, "val"))
    skipped = [s for s in sources(splits, "train") if "/big" in s and corpus.unit(s, "val") < last]
    assert skipped
    # And val is exactly the small files below that coin: a file's side depends on its own path.
    small_below = {s for s in sources(splits, "train") if "/big" not in s and corpus.unit(s, "val") < last}
    assert not small_below


def test_hash_is_stable_and_changes_with_one_file(site, tmp_path):
    first, _ = build(site, tmp_path / "a")
    second, _ = build(site, tmp_path / "b")
    assert first["hash"] == second["hash"]
    assert (tmp_path / "a" / "corpus.json").read_bytes() == (tmp_path / "b" / "corpus.json").read_bytes()
    for name in corpus.SPLITS:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    corpus.main(["--out", str(tmp_path / "a"), "--check"])

    path = site / "beta" / "mbc.py"
    path.write_text(path.read_text() + "\n# one more line\n")
    third, _ = build(site, tmp_path / "c")
    assert third["hash"] != first["hash"] and third["files"] == first["files"]


def test_check_names_what_differs_in_one_line(site, tmp_path):
    out = tmp_path / "out"
    build(site, out)
    val = out / "val.jsonl"
    lines = val.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["text"] += "x"
    val.write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    with pytest.raises(SystemExit) as e:
        corpus.main(["--out", str(out), "--check"])
    message = str(e.value)
    assert "\n" not in message and "val: " in message and "python -m benchmarks.ladder.corpus" in message
    (out / "corpus.json").unlink()
    with pytest.raises(SystemExit, match="no corpus.json"):
        corpus.main(["--out", str(out), "--check"])


def test_a_missing_held_out_package_is_a_one_line_error(site, tmp_path):
    with pytest.raises(corpus.UserError, match="not installed"):
        corpus.build(tmp_path / "out", root=site, ood=("networkx",))


def test_the_record_defines_the_corpus_extras_are_ignored_and_a_version_off_record_is_named(site, tmp_path):
    record, _ = build(site, tmp_path / "a")
    # A dev tool installed after the record was made: not in the record, so it cannot move the corpus.
    install(site, "gamma", {f"gamma/m{word(i)}.py": module(f"gamma{word(i)}") for i in range(40)})
    assert corpus.build(tmp_path / "b", root=site, ood=("heldout",))["hash"] != record["hash"]
    again = corpus.build(tmp_path / "c", root=site, ood=("heldout",), record=record)
    assert again["hash"] == record["hash"] and "gamma" not in again["packages"]

    # beta upgraded by a fresh resolve: a one-line error naming the pin, and --pins' list.
    dists = [corpus.Dist(d.name, "2.1" if d.name == "beta" else d.version, d.files)
             for d in corpus.distributions(site)]
    assert corpus.off_record(dists, record) == {"beta": "2.0"}
    with pytest.raises(corpus.UserError, match=r"beta==2\.0 \(installed: 2\.1\)") as e:
        corpus.build(tmp_path / "d", root=site, dists=dists, ood=("heldout",), record=record)
    assert "\n" not in str(e.value) and not (tmp_path / "d").exists()

    # Same versions, an edited file: the hash check refuses to write a corpus that is not the record.
    path = site / "beta" / "mbc.py"
    path.write_text(path.read_text() + "\n# edited in place\n")
    with pytest.raises(corpus.UserError, match="not the record's"):
        corpus.build(tmp_path / "e", root=site, ood=("heldout",), record=record)
    assert not (tmp_path / "e").exists()
