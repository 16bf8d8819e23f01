"""The ablation protocol (benchmarks/ablate.py, benchmarks/ablation_stats.py): verdicts on
synthetic summaries by the ladder's statistics, the run rows, and the runner's resume
(finished runs are skipped, nothing retrained)."""
from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import ablate, ablation_stats
from benchmarks.ladder import stats


def _s(variant, lr, seed, loss, setting="default", source="c"):
    return {"setting": setting, "source": source, "variant": variant, "lr": lr, "seed": seed,
            "final_val_loss": loss, "shared_lr": 3e-3}


def test_cell_is_mean_and_range_over_seeds():
    c = ablation_stats.cell([3.0, 3.2, 3.1])
    assert c["mean"] == pytest.approx(3.1) and c["spread"] == pytest.approx(0.2) and c["n"] == 3


def test_the_old_range_rule_is_kept_only_for_the_ladder_reports_comparison_column():
    ref = ablation_stats.cell([4.0, 4.1])  # mean 4.05, spread 0.1
    assert ablation_stats.verdict(ablation_stats.cell([3.8, 3.85]), ref) == "better"  # 0.225 better > 0.1
    assert ablation_stats.verdict(ablation_stats.cell([4.1, 4.12]), ref) == "noise"  # 0.06 worse < 0.1
    assert ablation_stats.verdict(ablation_stats.cell([3.0]), ablation_stats.cell([4.0])) == "noise"  # one seed


NOISE = (-0.01, 0.012)  # seed 0, seed 1: a seed σ of ~0.016 in every cell


def _grid(variant, losses, setting="default", source="c"):
    """Summaries of one variant: {lr: mean loss}, two seeds each around it."""
    return [_s(variant, lr, seed, loss + NOISE[seed], setting, source) for lr, loss in losses.items()
            for seed in (0, 1)]


def _args(**kw):
    return argparse.Namespace(**{"seeds": 2, "lrs": [1.5e-3, 3e-3, 6e-3], "sources": ["c"], "settings": ["default"],
                                 "steps_scale": 1.0, "boot": 2000, **kw})


def test_a_clearly_better_arm_is_better_a_null_pair_undecided_and_the_table_says_so():
    ref = {1.5e-3: 4.05, 3e-3: 4.0, 6e-3: 4.2}
    runs = (_grid("pre_ln", ref) + _grid("good", {lr: v - 0.3 for lr, v in ref.items()})
            + _grid("bad", {lr: v + 0.3 for lr, v in ref.items()})
            + [{**s, "final_val_loss": s["final_val_loss"] + (0.004 if s["seed"] else -0.004)}  # same means: a null
               for s in _grid("same", ref)])
    rep = ablate.report(runs, _args())
    rows = {r["variant"]: r for r in rep["tables"][0]["rows"]}
    good, bad, same = (rows[v]["vs"]["pre_ln"] for v in ("good", "bad", "same"))
    assert good["verdict"] == "better" and good["hi"] < 0 and good["delta"] == pytest.approx(-0.3)
    assert bad["verdict"] == "worse" and bad["lo"] > 0
    assert same["verdict"] == "undecided" and same["lo"] < 0 < same["hi"]
    assert rep["comparisons"] == 3 and good["p_holm"] >= good["p"]  # Holm over the report's 3 comparisons
    assert rows["good"]["best"]["lr"] == 3e-3 and rows["good"]["best"]["at_edge"] is False
    md = ablate.markdown(rep)
    line = next(x for x in md.splitlines() if x.startswith("| good |"))
    assert "| 3.7010 ± 0.0110 (n=2) | -0.3000 [" in line and "| **better** (" in line and "old rule: better)" in line
    assert "| undecided (" in next(x for x in md.splitlines() if x.startswith("| same |"))
    assert "Holm's adjusted p (over all 3 comparisons" in md


def test_holm_runs_over_every_comparison_of_the_report_and_an_undecided_needs_no_rejection():
    ref = {1.5e-3: 4.05, 3e-3: 4.0, 6e-3: 4.2}
    one = _grid("pre_ln", ref) + _grid("good", {lr: v - 0.3 for lr, v in ref.items()})
    two = [{**s, "source": "d"} for s in one]
    rep = ablate.report(one + two, _args(sources=["c", "d"]))
    comps = [r["vs"]["pre_ln"] for t in rep["tables"] for r in t["rows"] if "pre_ln" in r["vs"]]
    assert rep["comparisons"] == len(comps) == 2
    adjusted = stats.holm([c["p"] for c in comps])  # one family across both corpora
    assert [c["p_holm"] for c in comps] == pytest.approx(list(adjusted))
    # An arm 0.08 better: alone it is "better"; with two null comparisons on another corpus in the
    # same report, Holm's adjustment (×3 for the smallest p) leaves it undecided though its own
    # interval excludes 0 (its σ, LR grid and random stream are the same in both reports).
    weak = _grid("pre_ln", ref) + _grid("a", {lr: v - 0.08 for lr, v in ref.items()})
    alone = ablate.report(weak, _args())["tables"][0]["rows"][1]["vs"]["pre_ln"]
    assert alone["verdict"] == "better" and alone["p"] < 0.05
    nulls = [{**s, "source": "d"} for s in _grid("pre_ln", ref) + _grid("n1", ref) + _grid("n2", ref)]
    crowd = ablate.report(weak + nulls, _args(sources=["c", "d"]))
    c = next(r for r in crowd["tables"][0]["rows"] if r["variant"] == "a")["vs"]["pre_ln"]
    assert c["p"] == pytest.approx(alone["p"]) and c["hi"] < 0 and c["p_holm"] == pytest.approx(3 * c["p"])
    assert c["verdict"] == "undecided"
    assert c["old_verdict"] == "better"  # the old rule (beyond the seed ranges) called it; the table shows both


def test_both_references_are_judged_and_the_second_against_the_first():
    ref = {1.5e-3: 4.05, 3e-3: 4.0, 6e-3: 4.2}
    runs = (_grid("pre_ln", ref) + _grid("pre_ln_embed_norm", {lr: v - 0.3 for lr, v in ref.items()})
            + _grid("peri", {lr: v - 0.3 for lr, v in ref.items()}))
    rows = {r["variant"]: r for r in ablate.report(runs, _args())["tables"][0]["rows"]}
    assert rows["peri"]["vs"]["pre_ln"]["verdict"] == "better"
    assert rows["peri"]["vs"]["pre_ln_embed_norm"]["verdict"] == "undecided"
    assert set(rows["pre_ln_embed_norm"]["vs"]) == {"pre_ln"} and rows["pre_ln"]["vs"] == {}


def test_a_best_lr_at_either_end_of_the_grid_is_flagged():
    lrs = {lr: ablation_stats.cell([v, v + 0.01]) for lr, v in ((1e-3, 4.0), (2e-3, 3.9), (4e-3, 3.95))}
    assert not ablation_stats.at_edge(lrs, ablation_stats.best_lr(lrs))  # bracketed: 2e-3 beats both sides
    lrs[8e-3] = ablation_stats.cell([3.5, 3.51])
    assert ablation_stats.best_lr(lrs) == 8e-3 and ablation_stats.at_edge(lrs, 8e-3)
    assert ablation_stats.at_edge(lrs, 1e-3) and not ablation_stats.at_edge({1e-3: lrs[1e-3]}, 1e-3)  # one LR: no grid
    runs = _grid("pre_ln", {1.5e-3: 4.2, 3e-3: 4.1, 6e-3: 4.0})
    rep = ablate.report(runs, _args())
    assert rep["tables"][0]["rows"][0]["best"]["at_edge"] is True
    assert "| 0.006 (of 3, **edge**) |" in ablate.markdown(rep)


def test_depth_table_describes_each_variant_at_the_lrs_of_its_loss_row():
    def s(variant, lr, seed, loss, gap, angle):
        return {**_s(variant, lr, seed, loss, setting="deep"), "skip_last_quarter_gap": gap, "last_quarter_angle": angle}

    runs = [s("pre_ln", 3e-3, 0, 4.0, 0.10, 0.05), s("pre_ln", 3e-3, 1, 4.01, 0.12, 0.05),
            s("pre_ln", 6e-3, 0, 4.3, 0.30, 0.09), s("pre_ln", 6e-3, 1, 4.31, 0.31, 0.09),
            s("lns", 3e-3, 0, 3.9, 0.11, 0.06), s("lns", 3e-3, 1, 3.91, 0.13, 0.06),
            s("lns", 6e-3, 0, 3.8, 0.50, 0.04), s("lns", 6e-3, 1, 3.81, 0.52, 0.04)]
    rep = ablate.report(runs, _args(lrs=[3e-3, 6e-3], settings=["deep"]))
    rows = {r["variant"]: r for r in rep["tables"][0]["depth"]}
    # LNS's best LR is 6e-3, Pre-LN's 3e-3: the best-LR column compares 0.51 with 0.11.
    best = rows["lns"]["best"]
    assert best["lr"] == 6e-3 and best["skip_last_quarter_gap"]["delta"] == pytest.approx(0.40)
    assert rows["lns"]["shared"]["skip_last_quarter_gap"]["delta"] == pytest.approx(0.01)
    assert "delta" not in rows["pre_ln"]["best"]["skip_last_quarter_gap"] and "verdict" not in best["last_quarter_angle"]
    lns_depth = [line for line in ablate.markdown(rep).splitlines() if line.startswith("| lns |")][-1]
    assert "| 0.5100 ± 0.0100 | +0.4000 |" in lns_depth


def test_iso_flop_rows_name_their_budget_and_keep_the_top_k_loss_as_a_note():
    mod = [{**_s("mod", 3e-3, seed, 3.7 + seed / 100), "budget": "iso-FLOP", "steps": 512,
            "final_val_loss_topk": 3.6} for seed in (0, 1)]
    dense = [{**_s("pre_ln", 3e-3, seed, 4.0), "budget": "iso-token", "steps": 300} for seed in (0, 1)]
    table = ablate.report(dense + mod, _args(lrs=[3e-3]))["tables"][0]
    md = ablate.markdown({"protocol": "p", "reference": "pre_ln", "tables": [table]})
    assert any(line.startswith("| mod (iso-FLOP, 512 steps) | 3.7050") for line in md.splitlines())
    assert any(line.startswith("| pre_ln | ") for line in md.splitlines())
    assert any(n.startswith("mod: val loss with top-k routing") and "3.6000" in n for n in table["notes"])


def test_a_row_is_keyed_by_setting_corpus_arm_lr_seed_and_recorded_once(tmp_path):
    runs = _grid("pre_ln", {3e-3: 4.0}, source="embedded")
    runs = [{**s, "git_commit": "abc", "device": "cpu", "config": "configs/ablations/pre_ln.yaml",
             "flops_per_token": ablate.config_size("configs/ablations/pre_ln.yaml")[0]} for s in runs]
    row = ablate.row_of(runs[0], tmp_path)
    assert {k: row[k] for k in (*ablate.ROW_KEY, "commit", "device", "val_loss")} == {
        "setting": "default", "corpus": "embedded", "arm": "pre_ln", "lr": 3e-3, "seed": 0, "commit": "abc",
        "device": "cpu", "val_loss": pytest.approx(3.99)}
    assert row["params"] == row["size"] > 1e6  # Pre-LN's non-embedding count, derived from its config
    assert ablate.row_of({**runs[0], "flops_per_token": 1.0}, tmp_path)["params"] is None  # config changed since
    rows = tmp_path / "rows.jsonl"
    assert ablate.record(runs, rows, tmp_path) == 2 and ablate.record(runs[::-1], rows, tmp_path) == 0
    assert [json.loads(x)["seed"] for x in rows.read_text().splitlines()] == [0, 1]


def test_report_only_backfills_the_rows_and_rebuilds_the_tables_without_training(tmp_path):
    lrs = {1e-3: 4.0, 2e-3: 3.9}
    for s in _grid("pre_ln", lrs, source="embedded") + _grid("lns", lrs, source="embedded"):
        path = ablate.summary_path(tmp_path / "s", s["setting"], s["source"], s["variant"], s["lr"], s["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(s))
    argv = ["--report-only", "--seeds", "2", "--lrs", "1e-3,2e-3", "--sources", "embedded", "--only", "pre_ln,lns",
            "--summaries", str(tmp_path / "s"), "--results", str(tmp_path / "r"), "--rows", str(tmp_path / "rows.jsonl"),
            "--out", str(tmp_path / "runs"), "--boot", "500"]
    assert ablate.main(argv) == 0 and ablate.main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows == sorted(rows, key=lambda r: (r["arm"], r["lr"], r["seed"]))  # no duplicates
    assert "| lns |" in (tmp_path / "r" / "ablation.md").read_text() and not (tmp_path / "runs").exists()


def test_sweep_resumes_by_skipping_runs_whose_summary_exists(tmp_path):
    calls = []

    def fake_train(run, out, env):  # what a finished run leaves: its metrics.jsonl
        calls.append(run["run_name"])
        lr = next(float(o.split("=")[1]) for o in run["overrides"] if o.startswith("optim.lr="))
        run_dir = out / run["run_name"]
        run_dir.mkdir(parents=True)
        rows = [{"step": 1, "loss": 5.0, "tokens_per_s": 1.0}, {"step": 2, "val_loss": 4.0 + lr}]
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return 1.0

    args = argparse.Namespace(settings=["default"], only=["pre_ln", "lns"], sources=["embedded"],
                              steps_scale=0.01, lrs=[1e-3, 2e-3], seeds=2, report_only=False, jobs=2)
    prepared = []
    rows = tmp_path / "rows.jsonl"
    first = ablate.sweep(args, tmp_path / "runs", tmp_path / "summaries", {}, run_fn=fake_train,
                         prepare_fn=lambda config, common, env: prepared.append(config.name), rows=rows)
    assert prepared == ["base.yaml"]  # once per corpus, before its runs
    assert len(calls) == 2 * 2 * 2 and len(first) == 8
    stored = sorted(p.relative_to(tmp_path / "summaries").as_posix() for p in (tmp_path / "summaries").rglob("*.json"))
    assert "default/embedded/lns/lr0.002-seed1.json" in stored and len(stored) == 8
    got = [json.loads(x) for x in rows.read_text().splitlines()]  # one row per finished run, as it finished
    assert len(got) == 8 and {(r["arm"], r["lr"], r["seed"]) for r in got} == {
        (v, lr, s) for v in ("pre_ln", "lns") for lr in (1e-3, 2e-3) for s in (0, 1)}
    assert all(r["params"] > 1e6 and r["val_loss"] == pytest.approx(4.0 + r["lr"]) for r in got)

    (tmp_path / "summaries/default/embedded/lns/lr0.002-seed1.json").unlink()  # as if interrupted there
    calls.clear()
    again = ablate.sweep(args, tmp_path / "runs2", tmp_path / "summaries", {}, run_fn=fake_train,
                         prepare_fn=lambda *a: None, rows=rows)
    assert calls == ["default-embedded-lns-lr0.002-s1"] and len(again) == 8
    assert len(rows.read_text().splitlines()) == 8  # its key had a row: the first row of a key is the record
    # The table's order (the --only order, then LR, seed) whatever order the runs finished in.
    assert [(s["variant"], s["lr"], s["seed"]) for s in again][:5] == [
        ("pre_ln", 1e-3, 0), ("pre_ln", 1e-3, 1), ("pre_ln", 2e-3, 0), ("pre_ln", 2e-3, 1), ("lns", 1e-3, 0)]
    rep = ablate.report(again, args)
    assert rep["tables"][0]["shared_lr"] == 3e-3 and {r["variant"] for r in rep["tables"][0]["rows"]} == {"pre_ln", "lns"}


def test_a_failed_run_leaves_no_summary_and_the_others_finish(tmp_path, capsys):
    def train_or_fail(run, out, env):
        if "lr0.002" in run["run_name"]:
            raise SystemExit(f"{run['run_name']} failed (exit 1)")
        (out / run["run_name"]).mkdir(parents=True)
        (out / run["run_name"] / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 4.0, "val_loss": 4.0}))
        return 1.0

    args = argparse.Namespace(settings=["default"], only=["pre_ln"], sources=["embedded"], steps_scale=0.01,
                              lrs=[1e-3, 2e-3], seeds=1, report_only=False, jobs=2)
    done = ablate.sweep(args, tmp_path / "runs", tmp_path / "summaries", {}, run_fn=train_or_fail,
                        prepare_fn=lambda *a: None)
    assert [s["lr"] for s in done] == [1e-3]
    assert [p.name for p in (tmp_path / "summaries").rglob("*.json")] == ["lr0.001-seed0.json"]
    assert "1 run(s) failed and will be retried by the next sweep: default-embedded-pre_ln-lr0.002-s0" \
        in capsys.readouterr().out


def test_edge_extension_adds_one_grid_step_beyond_a_best_lr_at_the_edge():
    grid = [1.5e-3, 3e-3, 6e-3]

    def lrs(losses, n=2):
        return {lr: ablation_stats.cell([v] * n) for lr, v in losses.items()}

    assert ablation_stats.edge_extension(lrs({1.5e-3: 4.0, 3e-3: 3.9, 6e-3: 3.8}), grid, 2, 1) == 1.2e-2
    assert ablation_stats.edge_extension(lrs({1.5e-3: 3.7, 3e-3: 3.9, 6e-3: 3.8}), grid, 2, 1) == 7.5e-4
    assert ablation_stats.edge_extension(lrs({1.5e-3: 4.0, 3e-3: 3.7, 6e-3: 3.8}), grid, 2, 1) is None  # bracketed
    assert ablation_stats.edge_extension(lrs({1.5e-3: 4.0, 3e-3: 3.9}), grid, 2, 1) is None  # grid not finished
    assert ablation_stats.edge_extension(lrs({1.5e-3: 4.0, 3e-3: 3.9, 6e-3: 3.8}, n=1), grid, 2, 1) is None  # 1 seed
    extended = lrs({1.5e-3: 4.0, 3e-3: 3.9, 6e-3: 3.8, 1.2e-2: 3.7})
    assert ablation_stats.edge_extension(extended, grid, 2, 1) is None  # its one extension is spent
    assert ablation_stats.edge_extension(extended, grid, 2, 2) == 2.4e-2
    assert ablation_stats.edge_extension(lrs({3e-3: 3.9}), [3e-3], 2, 1) is None  # one LR: no edge to extend


def _loss_with_optimum(opt):
    """A fake run whose final val loss is lowest at lr=opt (a parabola in log2 lr)."""
    import math

    def train(run, out, env):
        lr = next(float(o.split("=")[1]) for o in run["overrides"] if o.startswith("optim.lr="))
        if opt == "fail-small" and lr < 1e-3:
            raise SystemExit(f"{run['run_name']} failed (exit 1)")
        loss = 3.0 + math.log2(lr / (opt if isinstance(opt, float) else 5e-4)) ** 2 / 10
        (out / run["run_name"]).mkdir(parents=True)
        (out / run["run_name"] / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": loss, "val_loss": loss}))
        return 1.0

    return train


def test_sweep_extends_the_grid_until_the_best_lr_is_bracketed_then_resumes_with_nothing_to_do(tmp_path, capsys):
    args = argparse.Namespace(settings=["default"], only=["pre_ln"], sources=["embedded"], steps_scale=0.01,
                              lrs=[1e-3, 2e-3], seeds=1, report_only=False, jobs=1, extend_edges=3)
    first = ablate.sweep(args, tmp_path / "runs", tmp_path / "s", {}, run_fn=_loss_with_optimum(4e-3),
                         prepare_fn=lambda *a: None)
    # 2e-3 is the grid's best and its edge -> 4e-3 (best, edge again) -> 8e-3: 4e-3 is bracketed.
    assert [s["lr"] for s in first] == [1e-3, 2e-3, 4e-3, 8e-3]
    assert "default/embedded/pre_ln: best LR at the grid's edge; adding lr 0.004" in capsys.readouterr().out
    lrs = ablation_stats.aggregate(first)[("default", "embedded")]["pre_ln"]
    best = ablation_stats.best_lr(lrs)
    assert best == 4e-3 and len(lrs) == 4 and not ablation_stats.at_edge(lrs, best)

    calls = []

    def record(run, out, env):
        calls.append(run["run_name"])
        return 1.0

    again = ablate.sweep(args, tmp_path / "runs2", tmp_path / "s", {}, run_fn=record, prepare_fn=lambda *a: None)
    assert calls == [] and [s["lr"] for s in again] == [1e-3, 2e-3, 4e-3, 8e-3]  # the extensions are found too
    report_only = argparse.Namespace(**{**vars(args), "report_only": True})
    assert len(ablate.sweep(report_only, tmp_path / "runs3", tmp_path / "s", {}, run_fn=record)) == 4 and calls == []

    # The extensions are capped, and without --extend-edges the grid is as given.
    capped = argparse.Namespace(**{**vars(args), "extend_edges": 1})
    got = ablate.sweep(capped, tmp_path / "runs4", tmp_path / "s2", {}, run_fn=_loss_with_optimum(1e-1),
                       prepare_fn=lambda *a: None)
    assert [s["lr"] for s in got] == [1e-3, 2e-3, 4e-3]
    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "extend_edges"})
    assert len(ablate.sweep(plain, tmp_path / "runs5", tmp_path / "s3", {}, run_fn=_loss_with_optimum(1e-1),
                            prepare_fn=lambda *a: None)) == 2


def test_a_run_that_fails_is_not_retried_by_the_same_sweeps_extension_rounds(tmp_path, capsys):
    args = argparse.Namespace(settings=["default"], only=["pre_ln"], sources=["embedded"], steps_scale=0.01,
                              lrs=[1e-3, 2e-3], seeds=1, report_only=False, jobs=1, extend_edges=2)
    tried = []
    fake = _loss_with_optimum("fail-small")  # best at 1e-3, the lower edge; the extension 5e-4 fails

    def train(run, out, env):
        tried.append(run["run_name"])
        return fake(run, out, env)

    done = ablate.sweep(args, tmp_path / "runs", tmp_path / "s", {}, run_fn=train, prepare_fn=lambda *a: None)
    assert [s["lr"] for s in done] == [1e-3, 2e-3] and tried.count("default-embedded-pre_ln-lr0.0005-s0") == 1
    assert "1 run(s) failed and will be retried by the next sweep: default-embedded-pre_ln-lr0.0005-s0" \
        in capsys.readouterr().out
