"""The ablation protocol (benchmarks/ablate.py, benchmarks/ablation_stats.py): statistics on
synthetic summaries, and the runner's resume (finished runs are skipped, nothing retrained)."""
from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import ablate, ablation_stats


def _s(variant, lr, seed, loss, setting="default", source="c"):
    return {"setting": setting, "source": source, "variant": variant, "lr": lr, "seed": seed,
            "final_val_loss": loss, "shared_lr": 3e-3}


def test_cell_is_mean_and_range_over_seeds():
    c = ablation_stats.cell([3.0, 3.2, 3.1])
    assert c["mean"] == pytest.approx(3.1) and c["spread"] == pytest.approx(0.2) and c["n"] == 3


def test_reproduced_needs_a_difference_beyond_both_seed_spreads_and_two_seeds():
    ref = ablation_stats.cell([4.0, 4.1])  # mean 4.05, spread 0.1
    assert ablation_stats.reproduced(ablation_stats.cell([3.8, 3.85]), ref)  # 0.225 better > 0.1
    assert not ablation_stats.reproduced(ablation_stats.cell([3.98, 4.0]), ref)  # 0.06 better < 0.1
    assert not ablation_stats.reproduced(ablation_stats.cell([3.5, 4.3]), ref)  # within its own spread
    assert not ablation_stats.reproduced(ablation_stats.cell([4.2, 4.3]), ref)  # worse
    assert not ablation_stats.reproduced(ablation_stats.cell([3.0]), ablation_stats.cell([4.0]))  # one seed
    assert ablation_stats.verdict(ablation_stats.cell([4.3, 4.35]), ref) == "worse"  # 0.25 worse > 0.1
    assert ablation_stats.verdict(ablation_stats.cell([4.1, 4.12]), ref) == "noise"  # 0.06 worse < 0.1
    assert ablation_stats.verdict(ablation_stats.cell([3.8, 3.85]), ref) == "better"


def test_each_variant_is_compared_at_the_shared_lr_and_at_its_own_best_lr():
    runs = [_s("pre_ln", 3e-3, 0, 4.0), _s("pre_ln", 3e-3, 1, 4.02), _s("pre_ln", 6e-3, 0, 4.2),
            _s("pre_ln", 6e-3, 1, 4.22), _s("peri", 3e-3, 0, 3.99), _s("peri", 3e-3, 1, 4.03),
            _s("peri", 6e-3, 0, 3.7), _s("peri", 6e-3, 1, 3.72)]
    table = ablation_stats.aggregate(runs)[("default", "c")]
    assert ablation_stats.best_lr(table["peri"]) == 6e-3 and ablation_stats.best_lr(table["pre_ln"]) == 3e-3
    rows = {r["variant"]: r for r in ablation_stats.compare(table, "pre_ln", 3e-3)}
    shared, best = rows["peri"]["shared"], rows["peri"]["best"]
    assert shared["delta"] == pytest.approx(0.0) and shared["reproduced"] is False
    assert best["lr"] == 6e-3 and best["delta"] == pytest.approx(3.71 - 4.01) and best["reproduced"] is True
    assert rows["pre_ln"]["best"]["reproduced"] is False  # the reference is never a claim
    md = ablation_stats.markdown({"protocol": "p", "reference": "pre_ln",
                                  "tables": [{"setting": "default", "source": "c", "rows": list(rows.values())}]})
    peri_line = next(line for line in md.splitlines() if line.startswith("| peri |"))
    assert peri_line.endswith("| **better** |") and "3.7100 ± 0.0100 (n=2)" in peri_line and "| 0.006 (of 2, **edge**) |" in peri_line


def test_a_best_lr_at_either_end_of_the_grid_is_flagged_as_a_lower_bound():
    lrs = {lr: ablation_stats.cell([v, v + 0.01]) for lr, v in ((1e-3, 4.0), (2e-3, 3.9), (4e-3, 3.95))}
    assert not ablation_stats.at_edge(lrs, ablation_stats.best_lr(lrs))  # bracketed: 2e-3 beats both sides
    lrs[8e-3] = ablation_stats.cell([3.5, 3.51])
    assert ablation_stats.best_lr(lrs) == 8e-3 and ablation_stats.at_edge(lrs, 8e-3)
    assert ablation_stats.at_edge(lrs, 1e-3) and not ablation_stats.at_edge({1e-3: lrs[1e-3]}, 1e-3)  # one LR: no grid
    row = ablation_stats.compare({"pre_ln": lrs}, "pre_ln", 2e-3)[0]
    assert row["best"]["at_edge"] is True and row["shared"]["at_edge"] is False


def test_depth_table_compares_each_variant_at_the_lrs_of_its_loss_row():
    def s(variant, lr, seed, loss, gap, angle):
        return {**_s(variant, lr, seed, loss, setting="deep"), "skip_last_quarter_gap": gap, "last_quarter_angle": angle}

    runs = [s("pre_ln", 3e-3, 0, 4.0, 0.10, 0.05), s("pre_ln", 3e-3, 1, 4.01, 0.12, 0.05),
            s("pre_ln", 6e-3, 0, 4.3, 0.30, 0.09), s("pre_ln", 6e-3, 1, 4.31, 0.31, 0.09),
            s("lns", 3e-3, 0, 3.9, 0.11, 0.06), s("lns", 3e-3, 1, 3.91, 0.13, 0.06),
            s("lns", 6e-3, 0, 3.8, 0.50, 0.04), s("lns", 6e-3, 1, 3.81, 0.52, 0.04)]
    args = argparse.Namespace(seeds=2, lrs=[3e-3, 6e-3], sources=["c"], settings=["deep"], steps_scale=1.0)
    table = ablate.report(runs, args)["tables"][0]
    rows = {r["variant"]: r for r in table["depth"]}
    # LNS's best LR is 6e-3, Pre-LN's 3e-3: the best-LR column compares 0.51 with 0.11.
    best = rows["lns"]["best"]
    assert best["lr"] == 6e-3 and best["skip_last_quarter_gap"]["delta"] == pytest.approx(0.40)
    assert best["skip_last_quarter_gap"]["verdict"] == "larger" and best["last_quarter_angle"]["verdict"] == "smaller"
    shared = rows["lns"]["shared"]["skip_last_quarter_gap"]  # 0.12 vs 0.11 inside the 0.02 spreads
    assert shared["delta"] == pytest.approx(0.01) and shared["verdict"] == "noise"
    assert "delta" not in rows["pre_ln"]["best"]["skip_last_quarter_gap"]
    md = ablation_stats.markdown({"protocol": "p", "reference": "pre_ln", "tables": [table]})
    lns_depth = [line for line in md.splitlines() if line.startswith("| lns |")][-1]
    assert "| 0.5100 ± 0.0100 | +0.4000 **larger** |" in lns_depth


def test_iso_flop_rows_name_their_budget_and_keep_the_top_k_loss_as_a_note():
    mod = [{**_s("mod", 3e-3, seed, 3.7 + seed / 100), "budget": "iso-FLOP", "steps": 512,
            "final_val_loss_topk": 3.6} for seed in (0, 1)]
    dense = [{**_s("pre_ln", 3e-3, seed, 4.0), "budget": "iso-token", "steps": 300} for seed in (0, 1)]
    args = argparse.Namespace(seeds=2, lrs=[3e-3], sources=["c"], settings=["default"], steps_scale=1.0)
    table = ablate.report(dense + mod, args)["tables"][0]
    md = ablation_stats.markdown({"protocol": "p", "reference": "pre_ln", "tables": [table]})
    assert any(line.startswith("| mod (iso-FLOP, 512 steps) | 3.7050") for line in md.splitlines())
    assert any(line.startswith("| pre_ln | ") for line in md.splitlines())
    assert any(n.startswith("mod: val loss with top-k routing") and "3.6000" in n for n in table["notes"])


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
    first = ablate.sweep(args, tmp_path / "runs", tmp_path / "summaries", {}, run_fn=fake_train,
                         prepare_fn=lambda config, common, env: prepared.append(config.name))
    assert prepared == ["base.yaml"]  # once per corpus, before its runs
    assert len(calls) == 2 * 2 * 2 and len(first) == 8
    stored = sorted(p.relative_to(tmp_path / "summaries").as_posix() for p in (tmp_path / "summaries").rglob("*.json"))
    assert "default/embedded/lns/lr0.002-seed1.json" in stored and len(stored) == 8

    (tmp_path / "summaries/default/embedded/lns/lr0.002-seed1.json").unlink()  # as if interrupted there
    calls.clear()
    again = ablate.sweep(args, tmp_path / "runs2", tmp_path / "summaries", {}, run_fn=fake_train,
                         prepare_fn=lambda *a: None)
    assert calls == ["default-embedded-lns-lr0.002-s1"] and len(again) == 8
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
    row = ablation_stats.compare(ablation_stats.aggregate(first)[("default", "embedded")], "pre_ln", 3e-3)[0]
    assert row["best"]["lr"] == 4e-3 and row["best"]["lrs_run"] == 4 and row["best"]["at_edge"] is False

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
