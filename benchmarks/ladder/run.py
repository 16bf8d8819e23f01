"""The option ladder (issue 24): does each option's gain grow or shrink with model size?

    python -m benchmarks.ladder.run [--sizes 32,48,80] [--depths 6,12,24] [--arms a,b] [--settings width,depth]
                                    [--seeds 2] [--ref-seeds 3] [--lrs-per-cell 3] [--control-lrs N] [--jobs N]
                                    [--tokens-per-param 8] [--max-runs K] [--dry-run]
    make ladder [JOBS=2] [ARGS='...']

Protocol. A cell is (setting, arm, width, depth, LR, seed); the arms, settings, shapes and
budgets are benchmarks/ladder/arms.py's. Each cell is one `python -m trainer.train
configs/ladder/base.yaml key=value...` (OMP_NUM_THREADS=1, one run per --jobs slot), then its
final model is probed (benchmarks/ladder/probes.py), then ONE row is appended to
benchmarks/results/ladder_runs.jsonl (flushed and fsync'd; the file is never rewritten) and the
run dir is deleted: the row is the result, and hundreds of run dirs would not fit.

Rungs run smallest first, one rung's cells (and their LR extensions) before the next, so a
rung's LR grid can lean on the finished smaller ones:
- LRs: --lrs-per-cell (3) LRs ×2 apart, on the lattice 1e-3·2^k, centred on
  benchmarks.ladder.fit.predict_lr(rows of the smaller rungs, arm, params) snapped to the
  lattice, or on CENTRE_LR when no smaller rung has rows (or fit cannot say); the fit sees
  the rows written before the arm's first row at the rung, so rows a smaller rung gains later
  do not move a started grid. LRs a cell already ran stay in its grid. --control-lrs gives
  the controls fewer LRs (a cut).
- Bracketing: when every (LR, seed) of an arm's grid has a row and its best LR (lowest mean
  val loss over seeds; a diverged run counts as +inf) is the grid's smallest or largest, the
  next lattice LR beyond it is added, round after round, until bracketed or --max-extend
  LRs were added. The reference's grid too.
- Seeds: run.seed = seed. It seeds the init (torch.manual_seed before the model is built) and
  the data order (the loader's Feistel permutation keyed by (seed, source, epoch) over the
  train windows). Every arm opens the same prepared shards (same corpus, tokenizer and
  seq_len) with the same micro batch, so seed s feeds every arm the same windows in the same
  order; arms that train more steps (mod, shallow) see the same sequence and then more of it.
  The init draws differ between arms only where their parameters differ.
- Extra seeds: the reference (Pre-LN) gets seeds up to --ref-seeds (3) at every LR of its grid
  that did not diverge, once the grid is finished and bracketed. Every comparison of the report
  but the controls' is against a reference, and Pre-LN is by far the noisier of the two (seed σ
  near its best LR 0.28 at widths 32-48, Pre-LN + embed_norm's 0.04), so its seeds buy the
  most interval for the fewest runs (3-6 per rung, about 10% more). The whole grid, not just
  the best LR and its neighbours: Pre-LN's curve is flat and noisy, so nearly every LR is a
  contender for its best (stats.contenders), and the comparison's bound takes the fewest seeds
  among the contenders. The rule is fixed and looks at no comparison's Δ: a third seed "where a
  verdict hinges", chosen by the verdict, would be optional stopping. The bracketing uses
  every seed, as the report does: when the extra seeds move Pre-LN's best to an edge, the grid
  is extended there (2 seeds, then the extra ones) until the report's best is bracketed.

Resumable: a cell whose (setting, corpus, arm, width, n_layers, tokens_per_param, lr, seed)
has a row is skipped; a run killed mid-way has no row, and the next invocation trains it again
from scratch (its run dir is removed first: no mid-run checkpoints are written). A run whose
loss went non-finite (the trainer's exit 3) gets a row with null losses and diverged: true, so
it is not retried and the LR search sees it. A run that fails otherwise gets no row; its log
stays in the runs folder and the next invocation retries it.

Exactness: the runner refuses to start when what the runs import or read (CODE_PATHS) has
uncommitted changes, so each row's `commit` is the code that trained it; and
each run checks, before it trains and before its row is written, that the code it imports
(CODE_PATHS) still equals that commit, so work can go on in the tree during a sweep (tests,
docs) but a change to what the runs import stops the sweep instead of mislabelling rows.
`--dry-run` prints the plan (cells, steps, tokens, FLOPs) and its CPU core-hours from a quick
measured CPU time per token of each arm's model at each rung, without training anything.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, cpu_model, repo_relative
from benchmarks.ladder.arms import ARMS, REFERENCE, SETTINGS, Budget, budgets, model_overrides, schedule_overrides

BASE = ROOT / "configs" / "ladder" / "base.yaml"
# What a run imports or reads, and what places its cells (fit and stats pick LR centres);
# the report is not among them, so it can be fixed while a sweep runs.
CODE_PATHS = ("trainer", "model", "configs/ladder", "benchmarks/common.py",
              *(f"benchmarks/ladder/{m}.py" for m in ("run", "arms", "probes", "corpus", "fit", "stats")))
CORPUS = ROOT / "benchmarks" / "data" / "ladder"
ROWS = RESULTS / "ladder_runs.jsonl"
OUT = ROOT / "runs" / "ladder"  # scratch run dirs (git-ignored runs/): only the rows are results
LR_UNIT = 1e-3  # the LR lattice is LR_UNIT · 2^k, so grids of different rungs and invocations line up
CENTRE_LR = 4e-3  # the first rung's centre: best LRs at width 128 in benchmarks/results/ablation.md were 1.5e-3..6e-3
KEY = ("setting", "corpus", "arm", "width", "n_layers", "tokens_per_param", "lr", "seed")
DIVERGED_EXIT = 3  # trainer.loop: run.max_bad_steps non-finite steps in a row
RUN_OVERHEAD_CPU_S = 15.0  # start-up (imports, DeepSpeed), the final save and the probes, measured ~10-20 s
EVAL_TOKEN_COST = 1 / 3  # a forward-only token costs ~1/3 of a trained one


# --------------------------------------------------------------------------- cells and LRs


@dataclass(frozen=True)
class Cell:
    setting: str
    arm: str
    width: int
    n_layers: int  # the rung's depth (grow ends there; shallow trains budget.n_layers)
    lr: float
    seed: int
    budget: Budget = field(compare=False)
    tokens_per_param: float = 8.0
    size: int = field(default=0, compare=False)  # the rung's N: the reference's non-embedding params there

    @property
    def name(self) -> str:
        return (f"{self.setting}-{self.arm}-w{self.width}-l{self.n_layers}-tpp{self.tokens_per_param:g}"
                f"-lr{self.lr:g}-s{self.seed}")

    def key(self, corpus: str) -> tuple:
        return (self.setting, corpus, self.arm, self.width, self.budget.n_layers, float(self.tokens_per_param),
                float(self.lr), self.seed)

    def overrides(self) -> list[str]:
        keys = {**{f"model.{k}": v for k, v in model_overrides(self.arm, self.width, self.n_layers).items()},
                **schedule_overrides(self.arm, self.budget.steps, self.n_layers),
                "optim.lr": self.lr, "run.seed": self.seed, "run.name": self.name}
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]


def row_key(row: dict) -> tuple:
    return tuple(float(row[k]) if k in ("tokens_per_param", "lr") else row[k] for k in KEY)


def snap(lr: float) -> float:
    """The nearest LR of the lattice LR_UNIT · 2^k (6 significant digits: stable as a key)."""
    return float(f"{LR_UNIT * 2.0 ** round(math.log2(lr / LR_UNIT)):.6g}")


def lr_grid(centre: float, n: int) -> list[float]:
    """n lattice LRs ×2 apart around `centre` (the extra one below when n is even)."""
    c = snap(centre)
    return [snap(c * 2.0 ** k) for k in range(-(n // 2), n - n // 2)]


def centre_lr(rows: list[dict], setting: str, corpus: str, arm: str, size: int) -> float:
    """fit.predict_lr from the rows of smaller rungs (same setting, corpus), else CENTRE_LR.
    A rung is its `size` (the reference's params there), not a row's own `params`: the arms of
    one rung differ by a few hundred parameters, and a lighter arm's rows of this very rung
    would otherwise count as a smaller rung and move the grid mid-rung."""
    smaller = [r for r in rows if r["setting"] == setting and r["corpus"] == corpus
               and r.get("size", r["params"]) < size and r.get("val_loss") is not None]
    if not smaller:
        return CENTRE_LR
    try:
        from benchmarks.ladder.fit import predict_lr

        lr = predict_lr(smaller, arm, size, setting=setting, corpus=corpus)
    except Exception as e:  # noqa: BLE001 - no fit yet (too few LRs, the module absent): the fixed centre
        print(f"{setting}/{arm}: no LR prediction ({type(e).__name__}: {str(e)[:80]}); centring on {CENTRE_LR:g}",
              flush=True)
        return CENTRE_LR
    return lr if math.isfinite(lr) and lr > 0 else CENTRE_LR


def mean_losses(cell_rows: list[dict]) -> dict[float, float]:
    """{lr: mean val loss over its rows}; a diverged row (val_loss null or not finite) is +inf."""
    by_lr: dict[float, list[float]] = {}
    for r in cell_rows:
        v = r.get("val_loss")
        by_lr.setdefault(float(r["lr"]), []).append(float(v) if v is not None and math.isfinite(v) else math.inf)
    return {lr: sum(v) / len(v) for lr, v in by_lr.items()}


def grid_best(cell_rows: list[dict], grid: list[float], seeds: int) -> float | None:
    """The grid's best LR (lowest mean val loss over all its seeds, the reference's extra ones
    included, as the report selects it; a diverged run is +inf) once every (LR, seed < seeds)
    of it has a row; else None (unfinished, or every LR diverged)."""
    done = {(float(r["lr"]), r["seed"]) for r in cell_rows}
    if any((lr, s) not in done for lr in grid for s in range(seeds)):
        return None
    means = mean_losses([r for r in cell_rows if float(r["lr"]) in grid])
    best = min(means, key=means.get)
    return best if math.isfinite(means[best]) else None


def extension(cell_rows: list[dict], grid: list[float], seeds: int) -> float | None:
    """The next LR beyond the grid's edge when the finished grid's best LR sits there; else
    None (bracketed, unfinished, or every LR diverged)."""
    best = grid_best(cell_rows, grid, seeds)
    if best is not None and best == min(grid):
        return snap(best / 2)
    if best is not None and best == max(grid):
        return snap(best * 2)
    return None


def extra_seed_lrs(cell_rows: list[dict], grid: list[float], seeds: int) -> list[float]:
    """The LRs that get the reference's extra seeds: every LR of its settled grid that did not
    diverge (module docstring: Seeds); none while the grid is unfinished or still to be extended."""
    if grid_best(cell_rows, grid, seeds) is None:
        return []
    means = mean_losses([r for r in cell_rows if r["seed"] < seeds])
    return [lr for lr in grid if math.isfinite(means[lr])]


def rung_rows(rows: list[dict], setting: str, corpus: str, arm: str, width: int, n_layers: int,
              tpp: float) -> list[dict]:
    """An arm's rows at one rung (n_layers: the arm's own, budget.n_layers)."""
    return [r for r in rows if (r["setting"], r["corpus"], r["arm"], r["width"], r["n_layers"],
                                float(r["tokens_per_param"])) == (setting, corpus, arm, width, n_layers, tpp)]


def arm_lrs(rows: list[dict], setting: str, corpus: str, arm: str, width: int, budget: Budget, tpp: float,
            seeds: int, n_lrs: int, max_extend: int, size: int) -> list[float]:
    """An arm's LR grid at the rung of `size`: the centred grid, the LRs already run, and one
    extension when the finished grid's best is at an edge (module docstring). The centre comes
    from the rows as they stood when the arm's first row here was written (`rows` is in file
    order, and the file is append-only), so rows a smaller rung gains later (its third seeds,
    an extension) cannot start a second grid beside one that is already running or done."""
    mine = rung_rows(rows, setting, corpus, arm, width, budget.n_layers, tpp)
    first = next((i for i, r in enumerate(rows) if mine and r is mine[0]), len(rows))
    base = lr_grid(centre_lr(rows[:first], setting, corpus, arm, size), n_lrs)
    grid = sorted(set(base) | {float(r["lr"]) for r in mine})
    if len(set(grid) - set(base)) < max_extend and (lr := extension(mine, grid, seeds)) is not None:
        grid = sorted({*grid, lr})
    return grid


def rungs(setting: str, sizes: list[int], depths: list[int]) -> list[tuple[int, int]]:
    """(width, n_layers) of a setting, smallest first: its widths or its depths vary."""
    s = SETTINGS[setting]
    if len(s.depths) == 1:
        return [(w, s.depths[0]) for w in sorted(sizes)]
    return [(s.widths[0], d) for d in sorted(depths)]


def plan_rung(base_cfg, setting: str, width: int, n_layers: int, arms: list[str], args, rows: list[dict],
              corpus: str) -> list[Cell]:
    """Every cell of one rung, done or not, in arm, LR, seed order (the arms of `arms` that the
    setting has)."""
    found = budgets(base_cfg, width, n_layers, args.tokens_per_param, SETTINGS[setting].arms)
    size, cells = found[REFERENCE].params, []
    for arm in (a for a in arms if a in SETTINGS[setting].arms):
        n = args.control_lrs if ARMS[arm].control_for else args.lrs_per_cell
        grid = arm_lrs(rows, setting, corpus, arm, width, found[arm], args.tokens_per_param, args.seeds, n,
                       args.max_extend, size)
        cells += [Cell(setting, arm, width, n_layers, lr, seed, found[arm], args.tokens_per_param, size)
                  for lr in grid for seed in range(args.seeds)]
        if arm == REFERENCE and args.ref_seeds > args.seeds:
            mine = rung_rows(rows, setting, corpus, arm, width, found[arm].n_layers, args.tokens_per_param)
            cells += [Cell(setting, arm, width, n_layers, lr, seed, found[arm], args.tokens_per_param, size)
                      for lr in extra_seed_lrs(mine, grid, args.seeds) for seed in range(args.seeds, args.ref_seeds)]
    return cells


# --------------------------------------------------------------------------- rows


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:  # a torn last line from a killed writer: that run has no row
                continue
    return out


_append_lock = threading.Lock()


def append_row(path: Path, row: dict) -> None:
    """One JSON line, flushed and fsync'd before the next; the file is only ever appended to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _append_lock, open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def final_eval(metrics: Path) -> dict:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    evals = [r for r in rows if "val_loss" in r]
    train = [r["loss"] for r in rows if "loss" in r]
    return {**(evals[-1] if evals else {}), "train_loss": train[-1] if train else None}


def make_row(cell: Cell, ctx: dict, final: dict, probes: dict, wall: float, run_dir: Path) -> dict:
    b = cell.budget
    return {"setting": cell.setting, "corpus": ctx["corpus"], "arm": cell.arm, "width": cell.width,
            # size: the rung, shared by its arms (what comparisons pair and fits use as N);
            # params: this arm's own count (norm gains, λs and routers differ by a few hundred).
            "n_layers": b.n_layers, "size": cell.size or b.params, "params": b.params, "flops": b.flops, "tokens": b.tokens, "steps": b.steps,
            "tokens_per_param": float(cell.tokens_per_param), "lr": float(cell.lr), "seed": cell.seed,
            "commit": ctx["commit"], "device": ctx["device"],
            "val_loss": final.get("val/val_loss"), "ood_loss": final.get("val/ood_loss"),
            "induction": probes.get("induction"), "loss_by_position": probes.get("loss_by_position"),
            "train_loss": final.get("train_loss"), "diverged": bool(final.get("diverged", False)),
            "wall_s": round(wall, 1), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": repo_relative(run_dir)}


# --------------------------------------------------------------------------- running


class CellFailed(Exception):
    pass


class CodeChanged(SystemExit):
    """The code the runs import changed mid-sweep: every later row would be mislabelled, so
    the sweep stops (a SystemExit: the one-line message, no traceback)."""


def require_code_at(commit: str, root: Path = ROOT) -> None:
    """CodeChanged unless the tree's CODE_PATHS equal `commit`'s (module docstring: Exactness)."""
    if commit.endswith("-dirty"):
        return
    changed = subprocess.run(["git", "diff", "--name-only", commit, "--", *CODE_PATHS], cwd=root,
                             capture_output=True, text=True).stdout.split()
    if changed:
        raise CodeChanged(f"error: {changed[0]} changed since the sweep started at {commit[:12]}; "
                          f"commit, then rerun to continue")


def train_cell(cell: Cell, ctx: dict) -> dict:
    """Train, probe and record one cell; returns its row. Raises CellFailed (no row)."""
    require_code_at(ctx["commit"])
    out: Path = ctx["out"]
    run_dir = out / cell.name
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run restarts from scratch
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{cell.name}.log"
    cmd = [sys.executable, "-m", "trainer.train", repo_relative(BASE), *ctx["common"], *cell.overrides()]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(["python", *cmd[1:]]) + "\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=ctx["env"], stdout=log, stderr=subprocess.STDOUT).returncode
    if rc == DIVERGED_EXIT:
        final, probes = {"diverged": True}, {}
    elif rc != 0:
        raise CellFailed(f"trainer exit {rc}; see {repo_relative(log_path)}")
    else:
        final = final_eval(run_dir / "metrics.jsonl")
        probe_json = run_dir / "probes.json"
        with open(log_path, "a") as log:
            rc = subprocess.run([sys.executable, "-m", "benchmarks.ladder.probes", str(run_dir), "--out",
                                 str(probe_json)], cwd=ROOT, env=ctx["env"], stdout=log,
                                stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise CellFailed(f"probes exit {rc}; see {repo_relative(log_path)}")
        probes = json.loads(probe_json.read_text())
    row = make_row(cell, ctx, final, probes, time.perf_counter() - t0, run_dir)
    require_code_at(ctx["commit"])
    append_row(ctx["rows_path"], row)
    if not ctx.get("keep_runs"):
        shutil.rmtree(run_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)
    return row


def run_cells(cells: list[Cell], jobs: int, ctx: dict, run_fn=train_cell) -> tuple[list[dict], list[Cell]]:
    """Run `cells`, `jobs` at a time: (their rows, the cells that failed)."""
    failed: list[Cell] = []
    lock = threading.Lock()

    def say(line: str) -> None:  # whole lines: print's text and newline are two writes, which threads interleave
        with lock:
            print(line, flush=True)

    def one(cell: Cell) -> dict | None:
        say(f"{cell.name}: {cell.budget.steps} steps, {cell.budget.tokens:,} tokens: started")
        try:
            row = run_fn(cell, ctx)
        except CellFailed as e:
            say(f"{cell.name}: FAILED: {e}")
            failed.append(cell)
            return None
        loss = row["val_loss"]
        say(f"{cell.name}: val loss {'diverged' if loss is None else f'{loss:.4f}'} in {row['wall_s']:.0f}s")
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = [r for r in pool.map(one, cells) if r is not None]
    return rows, failed


def sweep(base_cfg, args, ctx: dict, run_fn=train_cell) -> int:
    """Each setting's rungs smallest first; each rung until every planned cell has a row (LR
    extensions re-plan after each round), a cell failed, or --max-runs runs were started."""
    started = 0
    for setting in args.settings:
        arms = [a for a in args.arms if a in SETTINGS[setting].arms]
        for width, n_layers in rungs(setting, args.sizes, args.depths):
            failed: set[str] = set()
            while True:
                rows = read_rows(ctx["rows_path"])
                done = {row_key(r) for r in rows}
                cells = plan_rung(base_cfg, setting, width, n_layers, arms, args, rows, ctx["corpus"])
                pending = [c for c in cells if c.key(ctx["corpus"]) not in done and c.name not in failed]
                if args.max_runs is not None:
                    pending = pending[:max(0, args.max_runs - started)]
                if not pending:
                    break
                started += len(pending)
                _, bad = run_cells(pending, args.jobs, ctx, run_fn)
                failed |= {c.name for c in bad}
            if failed:
                ctx.setdefault("failed", []).extend(sorted(failed))
                print(f"{len(failed)} run(s) failed at {setting} w{width} l{n_layers}; rerun to retry them", flush=True)
            if args.max_runs is not None and started >= args.max_runs:
                print(f"--max-runs {args.max_runs}: stopping; rerun to continue", flush=True)
                return started
    return started


# --------------------------------------------------------------------------- checks


def dirty_paths(root: Path, ignore: list[Path], paths=CODE_PATHS) -> list[str]:
    """Paths under `paths` (what the runs import: a tests or docs edit does not change a row)
    that `git status` reports changed or untracked, less `ignore` (and git-ignored files)."""
    proc = subprocess.run(["git", "status", "--porcelain=v1", "--untracked-files=all", "--", *paths], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {root} is not a git work tree ({proc.stderr.strip()[:120]}); "
                         f"the ladder records commits")
    skip = [os.path.relpath(os.path.abspath(p), root) for p in ignore]
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in proc.stdout.splitlines() if line.strip()]
    return [p for p in paths if not any(p == s or p.startswith(s.rstrip("/") + "/") for s in skip)]


def require_clean(root: Path, ignore: list[Path]) -> None:
    dirty = dirty_paths(root, ignore)
    if dirty:
        raise SystemExit(f"error: the git tree has {len(dirty)} uncommitted change(s) (e.g. {dirty[0]}); "
                         f"commit first, so every row's commit is the code that trained it")


def git_head(root: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def ensure_corpus(corpus_dir: Path, env: dict) -> str:
    """The corpus hash: build the default corpus when it is missing, then verify it against
    its corpus.json (benchmarks.ladder.corpus.check)."""
    from benchmarks.ladder import corpus as corpus_mod

    stamp = corpus_dir / "corpus.json"
    default = corpus_dir.resolve() == CORPUS.resolve()
    if default and stamp.is_file() and corpus_mod.RECORD.is_file() and \
            json.loads(stamp.read_text())["hash"] != json.loads(corpus_mod.RECORD.read_text())["hash"]:
        # A build from before the record changed (a pull that brought a new record): the rows are
        # keyed by the record's hash, and training on another corpus would silently start a new ladder.
        stamp.unlink()
    if not stamp.is_file():
        if not default:
            raise SystemExit(f"error: {corpus_dir} has no corpus.json; build it with "
                             f"python -m benchmarks.ladder.corpus --out {corpus_dir}")
        print(f"building the ladder corpus into {repo_relative(corpus_dir)} (python -m benchmarks.ladder.corpus)",
              flush=True)
        if subprocess.run([sys.executable, "-m", "benchmarks.ladder.corpus"], cwd=ROOT, env=env).returncode != 0:
            raise SystemExit("error: building the ladder corpus failed (its error is above)")
    try:
        return corpus_mod.check(corpus_dir)["hash"]
    except Exception as e:  # noqa: BLE001 - UserError and friends: one line, not a traceback
        raise SystemExit(f"error: {e}") from None


def data_overrides(corpus_dir: Path, out: Path) -> list[str]:
    return [f"data.source={repo_relative(corpus_dir / 'train.jsonl')}",
            f"data.eval.val={repo_relative(corpus_dir / 'val.jsonl')}",
            f"data.eval.ood={repo_relative(corpus_dir / 'ood.jsonl')}", f"run.out_dir={repo_relative(out)}"]


def prepare(common: list[str], env: dict, workers: int = 1) -> None:
    """Tokenizer and shards once, before parallel runs start (two runs finding the cache empty
    would both build it)."""
    cmd = [sys.executable, "-m", "trainer.prepare", repo_relative(BASE), *common, "--workers", str(workers)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: preparing the ladder corpus failed: {(proc.stderr.strip().splitlines() or [''])[-1]}")


def device_name(env: dict) -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    threads = env.get("OMP_NUM_THREADS", "1")
    return f"cpu: {cpu_model()} x{threads} thread{'s' if threads != '1' else ''}"


# --------------------------------------------------------------------------- the plan


def cpu_seconds_per_token(base_cfg, arm: str, width: int, n_layers: int, steps: int = 3) -> float:
    """CPU seconds per trained token of `arm`'s model at a rung, one thread, the base's batch: `steps`
    plain AdamW steps after one warm-up (benchmarks.common.plain_train_step)."""
    import dataclasses

    import torch

    from benchmarks.common import plain_train_step
    from model import Transformer

    m = base_cfg.model
    for k, v in model_overrides(arm, width, n_layers).items():
        m = (dataclasses.replace(m, mod=dataclasses.replace(m.mod, **{k[4:]: v})) if k.startswith("mod.")
             else dataclasses.replace(m, **{k: v}))
    torch.manual_seed(0)
    model = Transformer(m)
    b, t = base_cfg.parallel.micro_batch, base_cfg.data.seq_len
    ids = torch.randint(0, m.vocab_size, (b, t + 1))
    step = plain_train_step(model, lambda mod: torch.nn.functional.cross_entropy(
        mod(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()), base_cfg)
    step()
    c0 = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - c0) / (steps * b * t)


def estimate_cpu_s(cell: Cell, rate: float, base_cfg) -> float:
    """CPU seconds of one cell: its tokens at the measured rate (grow: each stage at its depth,
    scaled by FLOPs), its final evaluation of three held-out sets, and the fixed overhead."""
    evals = 3 * base_cfg.run.eval_batches * base_cfg.parallel.micro_batch * base_cfg.data.seq_len
    return cell.budget.tokens * rate + evals * rate * EVAL_TOKEN_COST + RUN_OVERHEAD_CPU_S


def dry_run(base_cfg, args, rows: list[dict], corpus: str, measure: bool = True) -> dict:
    """Print and return the plan: per (setting, rung, arm) its budget, LRs, runs and CPU time."""
    torch_threads = None
    if measure:
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    total = {"runs": 0, "pending": 0, "tokens": 0, "flops": 0.0, "cpu_s": 0.0, "by_setting": {}}
    done = {row_key(r) for r in rows}
    print(f"{'setting':8} {'rung':>9} {'arm':18} {'N':>9} {'steps':>6} {'tokens':>10} {'tok/N':>6} {'FLOPs':>9} "
          f"{'LRs':24} {'runs':>4} {'cpu-s/run':>9}")
    for setting in args.settings:
        arms = [a for a in args.arms if a in SETTINGS[setting].arms]
        for width, n_layers in rungs(setting, args.sizes, args.depths):
            cells = plan_rung(base_cfg, setting, width, n_layers, arms, args, rows, corpus)
            for arm in arms:
                mine = [c for c in cells if c.arm == arm]
                b = mine[0].budget
                if measure:
                    # grow is timed at its final depth and scaled by FLOPs: its half-depth stage is cheaper
                    rate = cpu_seconds_per_token(base_cfg, arm if arm != "grow" else "pre_ln", width, n_layers)
                    rate *= b.flops / (b.tokens * b.flops_per_token)
                else:
                    rate = b.flops_per_token / 25e9  # ~25 GFLOP per CPU second, measured at widths 32-80
                per_run = estimate_cpu_s(mine[0], rate, base_cfg)
                pending = [c for c in mine if c.key(corpus) not in done]
                lrs = ",".join(f"{c.lr:g}" for c in mine if c.seed == 0)
                print(f"{setting:8} {f'w{width}/l{n_layers}':>9} {arm:18} {b.params:>9,} {b.steps:>6} {b.tokens:>10,} "
                      f"{b.tokens_per_param:>6.2f} {b.flops:>9.3g} {lrs:24} {len(mine):>4} {per_run:>9.0f}", flush=True)
                s = total["by_setting"].setdefault(setting, {"runs": 0, "cpu_s": 0.0})
                s["runs"] += len(mine)
                s["cpu_s"] += per_run * len(mine)
                total["runs"] += len(mine)
                total["pending"] += len(pending)
                total["tokens"] += b.tokens * len(mine)
                total["flops"] += b.flops * len(mine)
                total["cpu_s"] += per_run * len(pending)
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    for setting, s in total["by_setting"].items():
        print(f"{setting}: {s['runs']} runs, {s['cpu_s'] / 3600:.1f} core-hours")
    print(f"total: {total['runs']} runs ({total['pending']} without a row), {total['tokens'] / 1e9:.2f}B tokens, "
          f"{total['flops']:.3g} FLOPs; pending {total['cpu_s'] / 3600:.1f} core-hours "
          f"(~{total['cpu_s'] / 3600 / args.jobs:.1f} h wall at --jobs {args.jobs}), before any LR extension")
    return total


# --------------------------------------------------------------------------- CLI


def _ints(v: str) -> list[int]:
    return [int(x) for x in v.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ladder.run", description=__doc__.splitlines()[0])
    ap.add_argument("--settings", type=lambda v: v.split(","), default=["width"],
                    help=f"comma-separated, from {list(SETTINGS)} (default: width)")
    ap.add_argument("--sizes", type=_ints, default=[32, 48, 80],
                    help=f"widths of the width setting (default 32,48,80; the ladder has {SETTINGS['width'].widths})")
    ap.add_argument("--depths", type=_ints, default=list(SETTINGS["depth"].depths),
                    help="depths of the depth setting (default 6,12,24)")
    ap.add_argument("--arms", type=lambda v: v.split(","), default=list(ARMS),
                    help="comma-separated arms, run in this order (default: all)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per (arm, rung, LR) (default 2)")
    ap.add_argument("--ref-seeds", type=int, default=3,
                    help=f"seeds for the reference ({REFERENCE}) at every LR of its settled grid "
                         f"(default 3; --seeds or less: none extra)")
    ap.add_argument("--lrs-per-cell", type=int, default=3, help="LRs per (arm, rung), ×2 apart (default 3)")
    ap.add_argument("--control-lrs", type=int, default=None, help="LRs for the control arms (default: --lrs-per-cell)")
    ap.add_argument("--max-extend", type=int, default=3,
                    help="at most this many LRs added beyond an arm's grid to bracket its best (default 3)")
    ap.add_argument("--tokens-per-param", type=float, default=8.0,
                    help="training tokens per non-embedding parameter of the reference (default 8)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each (default 1)")
    ap.add_argument("--max-runs", type=int, default=None, help="start at most K runs, then stop (rerun to continue)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its core-hours; train nothing")
    ap.add_argument("--no-measure", action="store_true", help="--dry-run: estimate CPU time from FLOPs, not timing")
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="folder of train/val/ood.jsonl + corpus.json")
    ap.add_argument("--rows", type=Path, default=ROWS, help="the append-only results file")
    ap.add_argument("--out", type=Path, default=OUT, help="run dirs (deleted once their row is written)")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run dir and log after its row")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run on uncommitted changes (rows get commit '<sha>-dirty'; for tests only)")
    args = ap.parse_args(argv)
    unknown = [a for a in args.arms if a not in ARMS]
    bad = [s for s in args.settings if s not in SETTINGS]
    if unknown or bad:
        raise SystemExit(f"error: unknown {'arm(s) ' + str(unknown) if unknown else 'setting(s) ' + str(bad)}; "
                         f"have arms {list(ARMS)}, settings {list(SETTINGS)}")
    if args.seeds < 1 or args.lrs_per_cell < 1 or args.jobs < 1:
        raise SystemExit("error: --seeds, --lrs-per-cell and --jobs must be >= 1")
    if args.control_lrs is None:
        args.control_lrs = args.lrs_per_cell
    if args.tokens_per_param < 8 and not args.allow_dirty:
        print(f"note: --tokens-per-param {args.tokens_per_param:g} is under the ladder's 8", flush=True)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainer.config import load_config

    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    env.setdefault("OMP_NUM_THREADS", "1")
    out = args.out.resolve()
    common = data_overrides(args.corpus.resolve(), out)
    have_corpus = (args.corpus / "corpus.json").is_file()
    if args.dry_run:
        # The plan needs the model, not the data: without the corpus, any source validates.
        stand_in = common if have_corpus else ["data.source=embedded", "data.eval.val=embedded",
                                               "data.eval.ood=embedded"]
        corpus = json.loads((args.corpus / "corpus.json").read_text())["hash"] if have_corpus else "(not built)"
        dry_run(load_config(BASE, stand_in), args, read_rows(args.rows), corpus, measure=not args.no_measure)
        return 0
    ignore = [args.rows, args.corpus]
    if args.allow_dirty:
        commit = git_head(ROOT) + ("-dirty" if dirty_paths(ROOT, ignore) else "")
    else:
        require_clean(ROOT, ignore)
        commit = git_head(ROOT)
    corpus = ensure_corpus(args.corpus, env)
    base_cfg = load_config(BASE, common)
    prepare(common, env, args.jobs)  # one worker per job slot: nothing else runs yet
    ctx = {"corpus": corpus, "commit": commit, "device": device_name(env), "env": env, "out": out,
           "rows_path": args.rows, "common": common, "keep_runs": args.keep_runs}
    started = sweep(base_cfg, args, ctx)
    failed = ctx.get("failed", [])
    print(f"{started} run(s) started, {len(failed)} failed; rows in {repo_relative(args.rows)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
