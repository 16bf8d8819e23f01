"""The ladder runner in process (benchmarks/ladder/run.py, arms.py, probes.py): the plan's
cells and budgets, the LR bracketing, resume, the dirty-tree refusal and the row schema. No
training: budgets come from meta-device models and runs from a fake run function."""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from benchmarks.ladder import arms, probes, run
from trainer.config import load_config

STAND_IN = ["data.source=embedded", "data.eval.val=embedded", "data.eval.ood=embedded"]


@pytest.fixture(scope="module")
def base_cfg():
    return load_config(run.BASE, STAND_IN)


def args_for(argv: list[str]):
    return run.parse_args(argv)


# --------------------------------------------------------------------------- plan and budgets


@pytest.mark.parametrize("width", [32, 48, 80])
def test_budgets_tokens_per_param_iso_flop_and_growth(base_cfg, width):
    b = arms.budgets(base_cfg, width, 8, 8.0)
    assert set(b) == set(arms.ARMS)
    tps = base_cfg.parallel.micro_batch * base_cfg.data.seq_len
    ref = b["pre_ln"]
    for arm, x in b.items():
        assert x.tokens_per_param >= 8.0, arm  # every run, on its own non-embedding N
        assert x.tokens == x.steps * tps
        if arms.ARMS[arm].budget == "iso-token":
            assert x.steps == ref.steps, arm
    # MoD is iso-FLOP with pre_ln (within one step's FLOPs), and capacity 0.125 buys more tokens
    for arm in ("mod", "mod_c1"):
        assert abs(b[arm].flops - ref.flops) <= b[arm].flops_per_token * tps, arm
    assert b["mod"].steps > ref.steps
    # grow's FLOPs are summed stage by stage (half depth for the first 25%), below pre_ln's;
    # shallow trains those FLOPs at half depth
    half = arms.budgets(base_cfg, width, 4, 8.0)["pre_ln"].flops_per_token
    at = arms.grow_step(ref.steps)
    assert b["grow"].flops == pytest.approx(tps * (at * half + (ref.steps - at) * ref.flops_per_token))
    assert b["grow"].flops < ref.flops
    assert b["shallow"].n_layers == 4
    assert abs(b["shallow"].flops - b["grow"].flops) <= b["shallow"].flops_per_token * tps


def test_shapes_head_dim_16_and_ffn():
    for width in arms.SETTINGS["width"].widths:
        s = arms.shape(width, 8)
        assert s["d_model"] // s["n_heads"] == 16
        assert s["ffn_hidden"] % 16 == 0 and 8 / 3 <= s["ffn_hidden"] / width < 8 / 3 + 16 / width


def test_plan_cells_lrs_and_controls(base_cfg):
    a = args_for(["--sizes", "32", "--seeds", "2"])
    cells = run.plan_rung(base_cfg, "width", 32, 8, a.arms, a, [], "h")
    assert len(cells) == len(arms.ARMS) * 3 * 2
    assert sorted({c.lr for c in cells}) == [0.002, 0.004, 0.008]  # centred on CENTRE_LR, ×2 apart
    assert len({c.key("h") for c in cells}) == len(cells)
    cut = args_for(["--sizes", "32", "--control-lrs", "1"])
    cells = run.plan_rung(base_cfg, "width", 32, 8, cut.arms, cut, [], "h")
    per_arm = {arm: len({c.lr for c in cells if c.arm == arm}) for arm in arms.ARMS}
    assert per_arm["pre_ln_lns_init"] == per_arm["mod_c1"] == per_arm["shallow"] == 1
    assert per_arm["lns"] == per_arm["pre_ln"] == 3


def test_every_arms_overrides_validate(base_cfg):
    """Each arm's cell command line loads through the real config validation, as trained."""
    a = args_for(["--sizes", "32", "--seeds", "1", "--lrs-per-cell", "1"])
    for cell in run.plan_rung(base_cfg, "width", 32, 8, a.arms, a, [], "h"):
        cfg = load_config(run.BASE, [*STAND_IN, *cell.overrides()])
        assert cfg.run.max_steps == cell.budget.steps and cfg.optim.lr == cell.lr and cfg.run.seed == cell.seed
        assert cfg.final_layers == cell.budget.n_layers
        assert cfg.schedule.warmup_steps == max(1, round(0.05 * cell.budget.steps))
        if cell.arm == "lns":
            assert cfg.model.ln_scaling and not cfg.model.depth_scaled_init
        if cell.arm == "grow":
            assert cfg.model.n_layers == 4 and cfg.growth.stages[0].layers == 8
    depth = args_for(["--settings", "depth", "--depths", "24", "--seeds", "1"])
    cells = run.plan_rung(base_cfg, "depth", 48, 24, depth.arms, depth, [], "h")
    assert {c.arm for c in cells} == {"pre_ln", "lns", "pre_ln_lns_init"}
    assert all(c.budget.params > 600_000 and c.budget.tokens_per_param >= 8 for c in cells)


# --------------------------------------------------------------------------- LRs and bracketing


def rows_for(losses: dict[float, float], seeds: int = 2, arm: str = "pre_ln", **kw) -> list[dict]:
    return [{"setting": "width", "corpus": "h", "arm": arm, "width": 32, "n_layers": 8, "tokens_per_param": 8.0,
             "lr": lr, "seed": s, "params": 107040, "val_loss": v, **kw}
            for lr, v in losses.items() for s in range(seeds)]


def test_lr_lattice():
    assert run.snap(0.0041) == 0.004 and run.snap(0.0027) == 0.002 and run.snap(0.0029) == 0.004  # log-space nearest
    assert run.lr_grid(0.004, 3) == [0.002, 0.004, 0.008]
    assert run.lr_grid(0.004, 1) == [0.004]


def test_extension_at_each_edge_and_not_inside():
    grid = [0.002, 0.004, 0.008]
    assert run.extension(rows_for({0.002: 3.0, 0.004: 3.1, 0.008: 3.2}), grid, 2) == 0.001
    assert run.extension(rows_for({0.002: 3.2, 0.004: 3.1, 0.008: 3.0}), grid, 2) == 0.016
    assert run.extension(rows_for({0.002: 3.2, 0.004: 3.0, 0.008: 3.1}), grid, 2) is None
    # unfinished: a seed missing at one LR -> wait
    partial = [r for r in rows_for({0.002: 3.2, 0.004: 3.1, 0.008: 3.0}) if not (r["lr"] == 0.004 and r["seed"] == 1)]
    assert run.extension(partial, grid, 2) is None
    # a diverged top LR counts as +inf: best is inside, bracketed
    assert run.extension(rows_for({0.002: 3.2, 0.004: 3.0, 0.008: None}), grid, 2) is None
    assert run.extension(rows_for({0.002: None, 0.004: None, 0.008: None}), grid, 2) is None


def test_arm_lrs_extends_and_caps(base_cfg):
    b = arms.budgets(base_cfg, 32, 8, 8.0)["pre_ln"]
    rows = rows_for({0.002: 3.2, 0.004: 3.1, 0.008: 3.0})
    assert run.arm_lrs(rows, "width", "h", "pre_ln", 32, b, 8.0, 2, 3, 3, b.params) == [0.002, 0.004, 0.008, 0.016]
    assert run.arm_lrs(rows, "width", "h", "pre_ln", 32, b, 8.0, 2, 3, 0, b.params) == [0.002, 0.004, 0.008]
    # rows of another corpus or budget are not this cell's
    assert run.arm_lrs(rows, "width", "other", "pre_ln", 32, b, 8.0, 2, 3, 3, b.params) == [0.002, 0.004, 0.008]


def test_the_reference_gets_a_third_seed_near_its_best_once_its_grid_is_settled(base_cfg):
    """--ref-seeds: seed 2 for Pre-LN at every LR of its grid that did not diverge, once the grid
    is finished and bracketed; no other arm."""
    a = args_for(["--sizes", "32", "--arms", "pre_ln,lns"])

    def third(rows):
        cells = run.plan_rung(base_cfg, "width", 32, 8, a.arms, a, rows, "h")
        return sorted((c.arm, c.lr) for c in cells if c.seed >= a.seeds)

    curve = {0.002: 3.3, 0.004: 3.2, 0.008: 3.0, 0.016: 3.1, 0.032: None}  # best 0.008, inside; 0.032 diverged
    rows = rows_for(curve) + rows_for(curve, arm="lns")
    assert third(rows) == [("pre_ln", 0.002), ("pre_ln", 0.004), ("pre_ln", 0.008), ("pre_ln", 0.016)]
    assert third(rows[1:]) == []  # one (LR, seed) missing: the best is not known yet
    assert third(rows_for({0.002: 3.2, 0.004: 3.1, 0.008: 3.0})) == []  # best at the edge: 0.016 comes first
    # Third seeds that move the best (on every seed's mean, as the report takes it) to the
    # grid's edge re-open the bracket: 0.001 is planned, and its extra seed waits for its first two.
    edge = rows + [{**rows[0], "lr": lr, "seed": 2, "val_loss": v} for lr, v in ((0.002, 0.0), (0.008, 9.0))]
    cells = run.plan_rung(base_cfg, "width", 32, 8, a.arms, a, edge, "h")
    assert sorted(c.seed for c in cells if c.arm == "pre_ln" and c.lr == 0.001) == [0, 1]
    assert third(edge) == []
    none = args_for(["--sizes", "32", "--arms", "pre_ln", "--ref-seeds", "2"])
    assert all(c.seed < 2 for c in run.plan_rung(base_cfg, "width", 32, 8, none.arms, none, rows, "h"))


def test_a_started_grid_stays_where_it_is_when_a_smaller_rung_moves(base_cfg, monkeypatch):
    """The smaller rungs' fit places an arm's grid from the rows written before its first row
    at the rung: a smaller rung gaining rows later (Pre-LN's third seeds moved width 48's best
    and the fit's centre for width 80 from 0.008 to 0.0005) must not add a second grid beside
    one that is running or done."""
    import benchmarks.ladder.fit as fit

    early = rows_for({0.004: 3.0}, params=10, size=10, width=16)
    late = rows_for({0.002: 2.0}, seeds=1, params=10, size=10, width=16)
    monkeypatch.setattr(fit, "predict_lr", lambda rows, *a, **k: 0.008 if len(rows) == len(early) else 0.0005)
    b = arms.budgets(base_cfg, 32, 8, 8.0)["pre_ln"]

    def grid(rows):
        return run.arm_lrs(rows, "width", "h", "pre_ln", 32, b, 8.0, 2, 3, 3, b.params)

    assert grid(early) == [0.004, 0.008, 0.016]
    assert grid(early + rows_for({0.008: 3.0}) + late) == [0.004, 0.008, 0.016]  # started: stays
    done = rows_for({0.004: 3.2, 0.008: 3.0, 0.016: 3.1})
    assert grid(early + done + late) == [0.004, 0.008, 0.016]  # finished: nothing new
    assert grid(early + late) == [0.00025, 0.0005, 0.001]  # not started: the fit as it is now


def test_centre_from_smaller_rungs(monkeypatch):
    seen = {}

    def fake_predict(rows, arm, params, setting=None, corpus=None):
        seen.update(n=len(rows), arm=arm, params=params)
        return 0.0123

    import benchmarks.ladder.fit as fit

    monkeypatch.setattr(fit, "predict_lr", fake_predict)
    rows = rows_for({0.004: 3.0}) + rows_for({0.004: 2.9}, params=10**9)
    assert run.centre_lr(rows, "width", "h", "lns", 222000) == 0.0123
    assert seen == {"n": 2, "arm": "lns", "params": 222000}  # only the smaller rung's rows
    assert run.centre_lr([], "width", "h", "lns", 222000) == run.CENTRE_LR
    # A lighter arm's rows of this same rung (its own params a few hundred below the rung's
    # size) are not a smaller rung: they must not move the grid mid-rung.
    same_rung = rows_for({0.032: 3.0}, params=221_800, size=222_000)
    assert run.centre_lr(same_rung, "width", "h", "mod", 222_000) == run.CENTRE_LR
    monkeypatch.setattr(fit, "predict_lr", lambda *a, **k: (_ for _ in ()).throw(ValueError("too few")))
    assert run.centre_lr(rows, "width", "h", "lns", 222000) == run.CENTRE_LR


# --------------------------------------------------------------------------- sweep, resume, rows


def fake_run(losses):
    """A run function that writes a row whose val loss is losses(lr), as train_cell would."""
    def one(cell, ctx):
        row = run.make_row(cell, ctx, {"val/val_loss": losses(cell.lr), "val/ood_loss": 4.0, "train_loss": 3.0},
                           {"induction": 0.5, "loss_by_position": {"1": 5.0}}, 1.0, ctx["out"] / cell.name)
        run.append_row(ctx["rows_path"], row)
        return row
    return one


def ctx_for(tmp_path) -> dict:
    return {"corpus": "h", "commit": "abc", "device": "cpu: test x1 thread", "rows_path": tmp_path / "rows.jsonl",
            "out": tmp_path / "runs"}


def test_sweep_brackets_then_resumes(base_cfg, tmp_path):
    a = args_for(["--sizes", "32", "--arms", "pre_ln", "--seeds", "1", "--ref-seeds", "1"])
    ctx = ctx_for(tmp_path)
    losses = fake_run(lambda lr: 3.0 + math.log2(lr / 0.016) ** 2)  # best at 0.016: two extensions up
    assert run.sweep(base_cfg, a, ctx, losses) == 5
    rows = run.read_rows(ctx["rows_path"])
    assert sorted(r["lr"] for r in rows) == [0.002, 0.004, 0.008, 0.016, 0.032]
    assert run.sweep(base_cfg, a, ctx, losses) == 0  # every cell has its row: nothing reruns
    before = ctx["rows_path"].read_text()
    more = args_for(["--sizes", "32", "--arms", "pre_ln", "--seeds", "2", "--ref-seeds", "2", "--max-runs", "2"])
    assert run.sweep(base_cfg, more, ctx, losses) == 2
    assert ctx["rows_path"].read_text().startswith(before)  # appended, never rewritten


def test_failed_cell_gets_no_row_and_is_not_retried_in_the_same_sweep(base_cfg, tmp_path):
    a = args_for(["--sizes", "32", "--arms", "pre_ln", "--seeds", "1", "--max-extend", "0"])
    calls = []

    def failing(cell, ctx):
        calls.append(cell.name)
        raise run.CellFailed("boom")

    assert run.sweep(base_cfg, a, ctx_for(tmp_path), failing) == 3
    assert len(calls) == 3 and run.read_rows(tmp_path / "rows.jsonl") == []


ROW_KEYS = {"setting", "corpus", "arm", "width", "n_layers", "size", "params", "flops", "tokens", "steps", "tokens_per_param",
            "lr", "seed", "commit", "device", "val_loss", "ood_loss", "induction", "loss_by_position", "train_loss",
            "diverged", "wall_s", "finished", "run_dir"}


def test_row_schema_and_append(base_cfg, tmp_path):
    a = args_for(["--sizes", "32", "--arms", "mod", "--seeds", "1", "--lrs-per-cell", "1"])
    cell = run.plan_rung(base_cfg, "width", 32, 8, a.arms, a, [], "h")[0]
    ctx = ctx_for(tmp_path)
    path = ctx["rows_path"]
    path.write_text('{"already": "here"}\n')
    row = fake_run(lambda lr: 3.5)(cell, ctx)
    assert set(row) == ROW_KEYS
    assert row["params"] == cell.budget.params and row["flops"] == cell.budget.flops and row["n_layers"] == 8
    # The rung's size is pre_ln's, shared by every arm there (mod's own count has its routers).
    pre_ln = run.plan_rung(base_cfg, "width", 32, 8, ["pre_ln"], a, [], "h")[0]
    assert row["size"] == pre_ln.budget.params != row["params"]
    assert row["finished"].endswith("+00:00")
    lines = path.read_text().splitlines()
    assert lines[0] == '{"already": "here"}' and json.loads(lines[1]) == row
    assert run.row_key(row) == cell.key("h")
    diverged = run.make_row(cell, ctx, {"diverged": True}, {}, 1.0, tmp_path)
    assert diverged["val_loss"] is None and diverged["diverged"] is True


# --------------------------------------------------------------------------- the dirty-tree refusal


def git(repo, *cmd) -> str:
    return subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True, text=True).stdout


def new_repo(tmp_path):
    """An empty git repository with a trainer/ folder (a path the runs import)."""
    repo = tmp_path / "repo"
    (repo / "trainer").mkdir(parents=True)
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@t")
    git(repo, "config", "user.name", "t")
    return repo


def test_dirty_tree_refused(tmp_path):
    repo = new_repo(tmp_path)
    (repo / ".gitignore").write_text("trainer/ignored/\n")
    (repo / "trainer" / "code.py").write_text("x = 1\n")
    (repo / "notes.md").write_text("")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "init")
    rows, corpus = repo / "results" / "rows.jsonl", repo / "data" / "ladder"
    run.require_clean(repo, [rows, corpus])
    rows.parent.mkdir()
    rows.write_text("{}\n")
    corpus.mkdir(parents=True)
    (corpus / "train.jsonl").write_text("{}\n")
    (repo / "trainer" / "ignored").mkdir()
    (repo / "trainer" / "ignored" / "x").write_text("")
    (repo / "notes.md").write_text("an edit outside what runs import\n")
    run.require_clean(repo, [rows, corpus])  # results, corpus, git-ignored files and non-code do not count
    (repo / "trainer" / "code.py").write_text("x = 2\n")
    with pytest.raises(SystemExit, match="commit first"):
        run.require_clean(repo, [rows, corpus])
    git(repo, "commit", "-qam", "edit")
    (repo / "trainer" / "new.py").write_text("")
    with pytest.raises(SystemExit, match="1 uncommitted change"):
        run.require_clean(repo, [rows, corpus])


def test_a_default_build_of_another_corpus_is_rebuilt_to_the_record(tmp_path, monkeypatch):
    """A corpus left in benchmarks/data/ladder from before the record changed would key every
    row to a new corpus (a whole new ladder, silently): the runner rebuilds it from the record."""
    from benchmarks.ladder import corpus as corpus_mod

    folder, record = tmp_path / "ladder", tmp_path / "ladder_corpus.json"
    monkeypatch.setattr(run, "CORPUS", folder)
    monkeypatch.setattr(corpus_mod, "RECORD", record)

    def write_build(digest):
        folder.mkdir(exist_ok=True)
        triples = []
        for name in corpus_mod.SPLITS:
            (folder / f"{name}.jsonl").write_text(json.dumps({"text": digest + name, "source": name}) + "\n")
            triples.append((name, name, corpus_mod.hashlib.sha256((digest + name).encode()).hexdigest()))
        info = {"hash": corpus_mod.corpus_hash(triples), "files": dict.fromkeys(corpus_mod.SPLITS, 1),
                "bytes": {n: len(digest + n) for n in corpus_mod.SPLITS}}
        (folder / "corpus.json").write_text(json.dumps(info))
        return info["hash"]

    wanted = write_build("record")
    record.write_text(json.dumps({"hash": wanted}))
    stale = write_build("stale")
    builds = []
    monkeypatch.setattr(run.subprocess, "run",
                        lambda *a, **k: builds.append(write_build("record")) or subprocess.CompletedProcess(a, 0))
    assert run.ensure_corpus(folder, {}) == wanted != stale and len(builds) == 1
    assert run.ensure_corpus(folder, {}) == wanted and len(builds) == 1  # the record's build is kept


def test_a_run_refuses_code_changed_since_the_sweep_started(tmp_path):
    repo = new_repo(tmp_path)
    (repo / "trainer" / "loop.py").write_text("x = 1\n")
    (repo / "tests.py").write_text("")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "init")
    start = git(repo, "rev-parse", "HEAD").strip()
    (repo / "tests.py").write_text("y = 1\n")  # outside CODE_PATHS: the sweep goes on
    git(repo, "commit", "-qam", "tests")
    run.require_code_at(start, repo)
    (repo / "trainer" / "loop.py").write_text("x = 2\n")  # uncommitted, then committed: both stop it
    with pytest.raises(run.CodeChanged, match="trainer/loop.py changed since the sweep started"):
        run.require_code_at(start, repo)
    git(repo, "commit", "-qam", "loop")
    with pytest.raises(run.CodeChanged, match="trainer/loop.py changed"):
        run.require_code_at(start, repo)


# --------------------------------------------------------------------------- probes


def test_position_buckets():
    b = probes.buckets(256)
    assert len(b) == 8 and b[0] == (1, 1) and b[-1] == (128, 256)
    assert all(hi + 1 == lo for (_, hi), (lo, _) in zip(b, b[1:]))


def test_probes_on_a_tiny_model():
    from model import Transformer
    from model.config import ModelConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, vocab_size=128, max_seq_len=256)).eval()
    score = probes.induction_score(model, 128)
    assert math.isfinite(score) and abs(score) < 0.5  # an untrained model cannot copy
    tokens = torch.randint(0, 128, (4 * 64 + 1,)).numpy().astype("uint16")
    by_pos = probes.loss_by_position(model, tokens, 64)
    assert list(by_pos) == ["1", "2-3", "4-7", "8-15", "16-31", "32-64"]
    assert all(math.isfinite(v) for v in by_pos.values())
