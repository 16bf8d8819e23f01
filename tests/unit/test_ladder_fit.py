"""The ladder's scaling fits recover known laws within their bootstrap intervals
(benchmarks/ladder/fit.py).

A synthetic ladder: per arm L(N) = E + A·N^−α at 5 sizes (factor 2 apart), 3 LRs per size
around a size-dependent optimum with a quadratic penalty in log LR, 2 seeds, Gaussian seed
noise; E shared. Seeds are fixed, so the checks are deterministic.
"""
from __future__ import annotations

import math

import numpy as np

from benchmarks.ladder import fit, stats

E, SIZES, SIGMA = 2.0, (1e5, 2e5, 4e5, 8e5, 1.6e6), 0.01
A_REF, ALPHA_REF = 40.0, 0.3


def lr_star(n):
    return 1e-3 * (n / 1e5) ** -0.3


def ladder(rng, arms, seeds=2):
    cells = {}
    for arm, (a, alpha) in arms.items():
        cells[arm] = {}
        for n in SIZES:
            cells[arm][int(n)] = {}
            for k in (-1, 0, 1):
                lr = float(lr_star(n) * 2.0 ** (k + rng.uniform(-0.4, 0.4)))
                loss = E + a * n ** -alpha + 0.05 * math.log(lr / lr_star(n)) ** 2
                cells[arm][int(n)][lr] = loss + SIGMA * rng.standard_normal(seeds)
    return cells


def true_log_m(a_o, alpha_o, n):
    return -math.log(a_o / A_REF) / ALPHA_REF + (alpha_o / ALPHA_REF - 1) * math.log(n)


def run(arms, seed):
    cells = ladder(np.random.default_rng(seed), arms)
    out = fit.ladder_fit(cells, stats.seed_noise(cells), [("opt", "ref")], n_boot=100, rng=seed)
    fit.judge_slopes(out["pairs"])
    return out


def test_growing_gain_is_recovered_within_its_intervals():
    alpha_o = 0.36
    a_o = A_REF * 1e6 ** (alpha_o - ALPHA_REF) * 0.9
    out = run({"ref": (A_REF, ALPHA_REF), "opt": (a_o, alpha_o)}, seed=0)
    for arm, alpha in (("ref", ALPHA_REF), ("opt", alpha_o)):
        a = out["alpha"][arm]
        assert a["lo"] <= alpha <= a["hi"], (arm, a)
    pair = out["pairs"][0]
    assert pair["slope_lo"] <= alpha_o / ALPHA_REF - 1 <= pair["slope_hi"], pair
    assert pair["verdict"] == "grows"
    for m in pair["m"]:
        assert m["lo"] <= math.exp(true_log_m(a_o, alpha_o, m["N"])) <= m["hi"], m
    assert pair["m"][-1]["extrapolation"] and pair["m"][-1]["N"] == fit.EXTRAPOLATE_N
    assert not any(m["extrapolation"] for m in pair["m"][:-1])


def test_constant_gain_comes_out_undecided_or_covered():
    a_o = A_REF * 0.8  # the same exponent: m(N) constant, slope 0
    out = run({"ref": (A_REF, ALPHA_REF), "opt": (a_o, ALPHA_REF)}, seed=1)
    pair = out["pairs"][0]
    assert pair["verdict"] == "undecided" or pair["slope_lo"] <= 0 <= pair["slope_hi"], pair
    for m in pair["m"][:-1]:
        assert m["lo"] <= math.exp(true_log_m(a_o, ALPHA_REF, m["N"])) <= m["hi"], m


def test_fit_is_exact_on_noiseless_data():
    n = np.array(SIZES)
    curves = {"r": (n, E + A_REF * n ** -ALPHA_REF), "o": (n, E + 25.0 * n ** -0.35)}
    f = fit.fit(curves)
    assert abs(f["E"] - E) < 0.02
    assert abs(f["arms"]["r"]["alpha"] - ALPHA_REF) < 0.01 and abs(f["arms"]["o"]["alpha"] - 0.35) < 0.01
    assert abs(fit.slope(f, "o", "r") - (0.35 / ALPHA_REF - 1)) < 0.05


def test_too_few_sizes_means_no_fit_and_no_verdict():
    cells = ladder(np.random.default_rng(2), {"ref": (A_REF, ALPHA_REF), "opt": (30.0, 0.3)})
    cells = {a: dict(list(sizes.items())[:2]) for a, sizes in cells.items()}
    out = fit.ladder_fit(cells, stats.seed_noise(cells), [("opt", "ref")], n_boot=10)
    assert out["fit"] is None and out["pairs"] == [] and "no arm" in out["note"]


def test_mod_compute_multiplier_against_the_dense_frontier():
    """MoD reaching the dense arm's loss at each size with half its FLOPs: the dense reference
    needs twice MoD's compute to match it (multiplier 2), covered."""
    rng = np.random.default_rng(3)
    cells = ladder(rng, {"dense": (A_REF, ALPHA_REF), "mod": (A_REF, ALPHA_REF)})
    flops = {"dense": {int(n): 6 * n * 1e7 for n in SIZES}, "mod": {int(n): 3 * n * 1e7 for n in SIZES}}
    out = fit.compute_multiplier(cells, flops, "dense", "mod", stats.seed_noise(cells), n_boot=60, rng=3)
    assert abs(out["frontier"]["beta"] - ALPHA_REF) < 0.08
    inside = [r["lo"] <= 2.0 <= r["hi"] for r in out["at"]]
    assert sum(inside) >= 4, out["at"]


def test_predict_lr_follows_the_best_lr_law():
    rng = np.random.default_rng(4)
    cells = ladder(rng, {"pre_ln": (A_REF, ALPHA_REF)})
    rows = [{"setting": "width", "corpus": "h", "arm": "pre_ln", "params": n, "lr": lr, "seed": s, "val_loss": float(v)}
            for n, lrs in cells["pre_ln"].items() for lr, vals in lrs.items() for s, v in enumerate(vals)]
    lr = fit.predict_lr(rows, "pre_ln", 1e7)
    assert abs(math.log(lr / lr_star(1e7))) < math.log(1.6), (lr, lr_star(1e7))
    assert fit.predict_lr(rows, "value_residual", 1e7) == lr  # no rows yet: the fallback's law
    try:
        fit.predict_lr(rows + [{**rows[0], "corpus": "other"}], "pre_ln", 1e7)
    except ValueError as e:
        assert "never pooled" in str(e)
    else:
        raise AssertionError("rows of two corpora were pooled")


def test_report_with_first_rungs_and_missing_arms_says_undecided(tmp_path):
    """One size, one option, a second corpus: the report is written, the corpora are kept
    apart, and nothing that cannot be judged yet gets a verdict."""
    import json

    from benchmarks.ladder import report

    rng = np.random.default_rng(5)
    rows = [{"setting": "width", "corpus": corpus, "arm": arm, "params": 100_000, "flops": 6e12, "lr": lr, "seed": s,
             "tokens_per_param": 8.0, "val_loss": 3.0 + rng.normal(0, 0.01), "ood_loss": 3.5,
             # the probes' shape: position buckets in order; a quarter of 8 buckets is 2
             "loss_by_position": {"1": 6.0, "2-3": 5.0, "4-7": 4.5, "8-15": 4.0, "16-31": 3.5, "32-63": 3.2,
                                  "64-127": 3.1, "128-256": 3.0 + (arm == "peri_ln")}}
            for corpus in ("aaaa", "bbbb") for arm in ("pre_ln", "peri_ln") for lr in (1e-3, 2e-3) for s in (0, 1)]
    for i, r in enumerate(rows):
        r |= {"commit": "c1" if i % 3 else "c2-dirty", "device": "cpu: B x1 thread" if i < 4 else "cpu: A x1 thread"}
    rows.append({**rows[0], "lr": 4e-3, "val_loss": None, "diverged": True})
    runs = tmp_path / "runs.jsonl"
    runs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert report.main(["--runs", str(runs), "--out", str(tmp_path), "--boot", "500",
                        "--fit-boot", "10"]) == 0
    md = (tmp_path / "ladder.md").read_text()
    rep = json.loads((tmp_path / "ladder.json").read_text())
    assert "2 corpora" in md and "1 size(s) so far" in md and "no fit" in md
    assert len(rep["sections"]) == 2
    assert all(c["verdict"] == "undecided" for s in rep["sections"] for c in s["comparisons"])
    assert "1 of them diverged" in md
    assert "2 commit(s), 7 row(s) from a dirty tree; devices: cpu: A x1 thread (12), cpu: B x1 thread (5)." in md
    assert "Rows of different CPUs are pooled" in md
    assert "| - (an edge) |" in md  # a two-LR grid brackets nothing: no best-LR extrapolation to 1e9
    extras = {(e["arm"], e["lr"]): e for e in rep["sections"][0]["extras"]}
    assert {round(e["loss_first_quarter"], 6) for e in extras.values()} == {5.5}
    assert sorted(round(e["loss_last_quarter"], 6) for e in extras.values()) == [3.05, 3.55]
    assert (tmp_path / "ladder_width_aaaa_tpp8_loss.png").is_file() and (tmp_path / "ladder_width_bbbb_tpp8_lr.png").is_file()


def test_each_option_is_compared_with_its_own_control_as_well_as_the_references():
    """The controls isolate part of an option (arms.py control_for), so the report compares the
    option with its control, not only both with Pre-LN; the depth ladder's only option, LNS, is
    judged against Pre-LN with LNS's init."""
    from benchmarks.ladder import report

    width = report.reference_pairs(["pre_ln", "pre_ln_embed_norm", "peri_ln", "lns", "pre_ln_lns_init", "mod",
                                    "mod_c1", "grow", "shallow"])
    assert {("pre_ln_lns_init", "lns"), ("shallow", "grow"), ("mod_c1", "mod")} <= set(width)
    assert ("pre_ln", "pre_ln_embed_norm") in width and ("pre_ln_embed_norm", "pre_ln") not in width
    assert width.count(("pre_ln_embed_norm", "peri_ln")) == 1  # embed_norm's control pair is already a reference pair
    assert len(width) == len(set(width))
    depth = report.reference_pairs(["pre_ln", "lns", "pre_ln_lns_init"])
    assert depth == [("pre_ln", "lns"), ("pre_ln", "pre_ln_lns_init"), ("pre_ln_lns_init", "lns")]
    assert report.reference_pairs(["pre_ln", "lns"]) == [("pre_ln", "lns")]  # no control yet: nothing invented


def test_a_slope_through_an_unbracketed_best_lr_gets_no_verdict():
    """The growing gain above, with the option's largest LR at one size dropped so that its
    best LR sits at the grid's edge there: the slope is still fitted and reported, but its
    verdict waits for the bracket (the edge point only bounds the tuned loss)."""
    alpha_o = 0.36
    a_o = A_REF * 1e6 ** (alpha_o - ALPHA_REF) * 0.9
    cells = ladder(np.random.default_rng(0), {"ref": (A_REF, ALPHA_REF), "opt": (a_o, alpha_o)})
    n = int(SIZES[2])
    lrs = cells["opt"][n]
    best = stats.best(lrs)[0]
    cells["opt"][n] = {lr: v for lr, v in lrs.items() if lr <= best}  # best is now the largest LR
    out = fit.ladder_fit(cells, stats.seed_noise(cells), [("opt", "ref")], n_boot=100, rng=0)
    pair = fit.judge_slopes(out["pairs"])[0]
    assert pair["edges"] == [n] and pair["verdict"] == "undecided"
    assert pair["slope_lo"] > 0 and pair["p_holm"] < 0.05  # it would have been "grows"


def test_lr_at_1b_says_when_the_best_lr_fit_cannot_place_it():
    """The report's lr* at 1e9: none from an edge or too few sizes; flagged when the per-size
    best LRs go up and down (the line is then mostly their scatter), plain when monotone."""
    from benchmarks.ladder.report import lr_at_1b

    def lf(lrs, bracketed=True):
        ns = [1e5 * 2 ** i for i in range(len(lrs))]
        b, a = np.polyfit(np.log(ns), np.log(lrs), 1)
        return {"a": a, "b": b, "points": [{"N": n, "lr": lr, "bracketed": bracketed} for n, lr in zip(ns, lrs)]}

    assert lr_at_1b(lf([0.004, 0.008, 0.016], bracketed=False)) == "- (an edge)"
    assert lr_at_1b(lf([0.004, 0.008])) == "- (2 sizes)"
    falling = lr_at_1b(lf([0.016, 0.008, 0.004]))
    assert "monotone" not in falling and math.isclose(float(falling), 0.016 * (1e9 / 1e5) ** -1, rel_tol=1e-2)
    assert lr_at_1b(lf([0.005, 0.026, 0.016])).endswith(" (lr* not monotone in N)")
