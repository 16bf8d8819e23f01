"""The repository reads nothing outside itself: a clone anywhere must run its configs,
tests and benchmarks, and its stored results must name paths that exist in any clone."""
from __future__ import annotations

import re
import subprocess

from tests.helpers import ROOT, SHAKESPEARE

# A relative path that climbs out of its folder (in code, configs, docs and results).
CLIMB = re.compile(r"(?:\.\./)+[\w.-][\w./-]*")


def tracked_text_files():
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, names.split("\0")):
        path = ROOT / name
        if path.is_file() and path.stat().st_size < 5_000_000:
            try:
                yield path, path.read_text()
            except UnicodeDecodeError:
                continue  # binary (plots)


def test_no_tracked_file_names_a_path_outside_the_repository():
    """Each climbing path is read relative to its own file (config `extends:`, doc links) and to
    the repo root (commands, results); one of the two must name something inside the repo."""
    outside = []
    for path, text in tracked_text_files():
        for m in CLIMB.finditer(text):
            here = (path.parent / m.group()).resolve()
            from_root = (ROOT / m.group()).resolve()
            if not any(p.is_relative_to(ROOT) and p.exists() for p in (here, from_root)):
                outside.append(f"{path.relative_to(ROOT)}: {m.group()}")
    assert not outside, outside[:20]


def test_the_shipped_corpus_is_tracked():
    tracked = subprocess.run(["git", "ls-files", str(SHAKESPEARE.relative_to(ROOT))], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    assert tracked == str(SHAKESPEARE.relative_to(ROOT)) and SHAKESPEARE.stat().st_size > 1_000_000
