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
