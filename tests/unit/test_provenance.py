"""run_info.json and benchmark results record the commit that produced them, marked dirty
when the checkout has uncommitted changes."""
import subprocess
from pathlib import Path

from trainer.provenance import git_commit


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"})


def test_git_commit_is_head_and_marks_uncommitted_changes_dirty(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("1")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("2")
    assert git_commit(tmp_path) == head + "-dirty"


def test_git_commit_outside_a_checkout_is_none(tmp_path):
    assert git_commit(tmp_path) is None


def test_run_info_names_the_device_that_computed(monkeypatch):
    # fp32 results are bit-reproducible only on the same kind of processor, so a result that
    # spans machines (the ablation sweep) must say which one computed each run. The expected
    # strings are built here from their sources (/proc/cpuinfo, torch's kernel ISA, a GPU name).
    import re

    import torch

    from trainer.provenance import run_info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    device = run_info(1)["device"]
    assert device.endswith(f" ({torch.backends.cpu.get_cpu_capability()}, 7 threads)")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and (m := re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)):
        assert device.startswith(m.group(1).strip() + " (")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert run_info(1)["device"] == "NVIDIA H200"
