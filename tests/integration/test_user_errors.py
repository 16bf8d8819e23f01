"""Every failure a user can cause is one line, never a traceback (issue 26).

One table: each case is a command line (and the files or environment it needs), the line it
must print and the exit code it must end with. All fail before any training starts: the
trainer and prepare are called in-process; W&B and lm_eval, whose state is read from the
environment once per process, run as small subprocesses.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, _env

# A W&B key of the right shape that no server knows, and a local port nothing listens on.
FAKE_KEY = "f" * 40
CLOSED = "http://127.0.0.1:9"

# Builds the rank-0 metrics logger with logging.wandb_mode=online, as the trainer does at
# start, and prints how long that took.
WANDB_START = """
import sys, time
from pathlib import Path
from trainer.config import load_config
from trainer.parallel.dist import Dist
from trainer.metrics import make_metrics
from trainer.parallel.layout import BatchLayout
import torch
cfg = load_config("configs/tiny.yaml", ["logging.wandb_mode=online", "logging.progress=false"])
run = Path(sys.argv[1]); run.mkdir(parents=True)
t0 = time.perf_counter()
dist = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), sp=1)
m = make_metrics(cfg, run, 0, dist, BatchLayout.build(cfg, dist), peak_flops=1e9)
print(f"started in {time.perf_counter() - t0:.1f} s, wandb mode {m.wandb.settings.mode}")
m.close()
"""


@dataclass
class Case:
    argv: list[str]  # in-process: [module, *args]; subprocess: the python arguments
    line: str  # a substring of the one line printed
    code: int
    files: dict[str, bytes | str] = field(default_factory=dict)  # created under tmp_path first
    env: dict[str, str] = field(default_factory=dict)  # subprocess cases only
    subprocess: bool = False


def _jsonl(records: list[str]) -> str:
    return "\n".join(records) + "\n"


GOOD = [json.dumps({"text": f"Document {i} has a few words in it."}) for i in range(30)]

CASES = {
    "sp-larger-than-world": Case(
        ["train", "configs/tiny.yaml", "parallel.sp=2", "run.out_dir={tmp}/runs"],
        "parallel.sp=2 is invalid: must divide the world size 1", 2),
    "empty-config": Case(["train", "{tmp}/empty.yaml"], "config {tmp}/empty.yaml is empty", 2,
                         files={"empty.yaml": "# nothing set\n"}),
    "override-after-flag": Case(["train", "configs/tiny.yaml", "--dry-run", "parallel.sp=2"], "", 0),
    "override-before-flag": Case(["train", "configs/tiny.yaml", "parallel.sp=2", "--dry-run"], "", 0),
    "flag-first": Case(["train", "--dry-run", "configs/tiny.yaml", "parallel.sp=2"], "", 0),
    "prepare-override-after-flag": Case(
        ["prepare", "configs/tiny.yaml", "--workers", "1", "data.source={tmp}/missing.txt"],
        "data.source='{tmp}/missing.txt' is invalid: path does not exist", 2),
    "binary-txt": Case(
        ["prepare", "configs/tiny.yaml", "data.source={tmp}/random.txt", "run.out_dir={tmp}/runs"],
        "{tmp}/random.txt does not look like UTF-8 text: only", 2,
        files={"random.txt": np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()}),
    "jsonl-malformed-line": Case(
        ["prepare", "configs/tiny.yaml", "data.source={tmp}/d.jsonl", "run.out_dir={tmp}/runs"],
        "{tmp}/d.jsonl line 13 is not valid JSON", 2,
        files={"d.jsonl": _jsonl(GOOD[:10] + ["", ""] + ['{"text": "unterminated'] + GOOD[10:])}),
    "jsonl-missing-field": Case(
        ["prepare", "configs/tiny.yaml", "data.source={tmp}/d.jsonl", "run.out_dir={tmp}/runs"],
        "{tmp}/d.jsonl line 5 has no field 'text' (its fields: body, id)", 2,
        files={"d.jsonl": _jsonl(GOOD[:4] + ['{"body": "x", "id": 4}'] + GOOD[4:])}),
    "wandb-online-without-key": Case(
        ["-c", WANDB_START, "{tmp}/run"],
        "warning: logging.wandb_mode=online: no W&B API key (set WANDB_API_KEY, or run `wandb login`); "
        "logging to W&B offline instead", 0,
        env={"WANDB_API_KEY": "", "NETRC": "{tmp}/no-netrc", "HOME": "{tmp}"}, subprocess=True),
    "wandb-online-without-network": Case(
        ["-c", WANDB_START, "{tmp}/run"],
        "warning: logging.wandb_mode=online: cannot reach the W&B server 127.0.0.1:9", 0,
        env={"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": CLOSED, "HOME": "{tmp}"}, subprocess=True),
    "evaluate-task-offline": Case(
        ["-m", "trainer.evaluate", "{tmp}", "--tasks", "hellaswag"],
        "error: --tasks hellaswag: could not load its dataset", 2,
        env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": "{tmp}/hf"}, subprocess=True),
}


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def _run(case: Case, tmp: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    argv = [_fill(a, tmp) for a in case.argv]
    if case.subprocess:
        env = _env({k: _fill(v, tmp) for k, v in case.env.items()})
        env.pop("WANDB_SILENT")  # the warning must be ours, whatever wandb prints
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        return proc.returncode, proc.stdout, proc.stderr
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(ROOT)
    if argv[0] == "train":
        from trainer.train import main
    else:
        from trainer.prepare import main
    code = main(argv[1:])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_line_with_its_exit_code(name, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    for rel, content in case.files.items():
        (tmp_path / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = _run(case, tmp_path, capsys, monkeypatch)
    assert "Traceback" not in err + out, err[-3000:]
    assert code == case.code, (out[-2000:], err[-3000:])
    if case.code:
        ours = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(ours) == 1 and _fill(case.line, tmp_path) in ours[0], err[-3000:]
    elif case.line:
        ours = [line for line in err.splitlines() if line.startswith("warning:")]
        assert len(ours) == 1 and ours[0].startswith(_fill(case.line, tmp_path)), err[-3000:]
        seconds = float(out.split("started in ")[1].split(" s")[0])
        # Not a speed bound (about 1 s idle): far under wandb's own 90 s init timeout, so it
        # fails only if the fallback waited for the network instead of deciding up front.
        assert seconds < 60 and "wandb mode offline" in out, out


def test_cli_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "configs/tiny.yaml", "model.norm=bad", "--dry-run"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "model.norm='bad'" in proc.stderr
