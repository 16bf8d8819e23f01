"""The ladder's comparison holds at 5% on synthetic runs, including best-LR re-selection and
seed noise that differs between arms and LRs, and Holm and the edge flag do what they say
(benchmarks/ladder/stats.py).

Each simulated experiment: two arms × 3 LRs × 2 seeds at one size, Gaussian seed noise (σ = 1
unless a case says otherwise), each arm's σ² pooled over its own cells near its best LR (df 3
here), each arm judged at its own best LR. Monte-Carlo slack: with n experiments the rate's
standard error at 5% is √(0.05·0.95/n), so a procedure whose true rate is 5% passes
`rate ≤ 0.05 + 2·SE` about 98% of the time (the seeds are fixed, so the test is
deterministic; the bound says how much of a measured rate is simulation noise).
"""
from __future__ import annotations

import math

import numpy as np

from benchmarks.ladder import stats

LRS = (1e-3, 2e-3, 4e-3)
FLAT, PEAKED = (0.0, 0.0, 0.0), (3.0, 0.0, 3.0)  # true loss per LR, in units of σ
STEADY = (1.0, 1.0, 1.0)  # seed σ per LR
SPIKY = (0.3, 1.0, 4.0)  # what the width rung shows: seeds agree below the best LR, split above it


def _experiment(rng, ref_curve, arm_curve, effect=0.0, seeds=2, ref_sd=STEADY, arm_sd=STEADY, sizes=1, shared=0.0):
    """{arm: {size: {lr: seed losses}}}; sizes > 1 repeat the same curves at more sizes, which
    only adds degrees of freedom to each arm's σ (the comparison is at size 1). `shared`: the σ of
    an offset per seed that every LR of an arm and size shares (a seed's init and data order)."""
    def cell(curve, shift, sd):
        offset = shared * rng.standard_normal(seeds)
        return {lr: curve[i] + shift + offset + sd[i] * rng.standard_normal(seeds) for i, lr in enumerate(LRS)}

    return {arm: {size: cell(curve, shift, sd) for size in range(1, sizes + 1)}
            for arm, curve, shift, sd in (("ref", ref_curve, 0.0, ref_sd), ("arm", arm_curve, effect, arm_sd))}


def rejection_rate(n, ref_curve, arm_curve, effect=0.0, interval="lf", seed=0, n_boot=1000, **sd):
    """The share of experiments with a verdict, judged as if each best LR were bracketed, as
    the runner leaves every grid (it extends an edge best until it is not). The 3 fixed LRs
    here put a flat curve's best at an edge 2 times in 3, and an edge withholds a verdict
    (test_an_edge_withholds_only_the_verdict_it_could_reverse): left in, that guard would
    hide the rates of the comparison itself, which are what these tests measure."""
    rng, hits = np.random.default_rng(seed), 0
    for e in range(n):
        cells = _experiment(rng, ref_curve, arm_curve, effect, **sd)
        c = stats.compare(cells, "ref", "arm", 1, stats.seed_noise(cells), n_boot=n_boot, rng=seed * 100_000 + e,
                          interval=interval)
        c.update(arm_edge=False, ref_edge=False)
        hits += stats.judge([c])[0]["verdict"] != "undecided"
    return hits / n


def bound(n, rate=0.05):
    return rate + 2 * math.sqrt(rate * (1 - rate) / n)


def test_false_positive_rate_with_best_lr_reselection_is_at_most_5_percent():
    n = 300
    rates = {shapes: rejection_rate(n, *shapes, seed=i)
             for i, shapes in enumerate([(FLAT, FLAT), (PEAKED, PEAKED), (FLAT, PEAKED), (PEAKED, FLAT)])}
    print("false-positive rates (ref, arm curve shapes):", rates)
    assert all(r <= bound(n) for r in rates.values()), rates


def test_false_positive_rate_holds_when_the_seed_noise_differs_between_arms_and_lrs():
    """The noise the width rung shows: one arm 5× noisier than the other, the noise growing with
    LR (seeds split above the best), and one seed better than the other at every LR of an arm
    (its cells then count more df than they hold, and their min strays less than the bound's
    independent draws; measured over 1,500 experiments: 1.7–3.6% for flat, peaked and mixed
    curves at 1 and 3 sizes). A shared σ would be too narrow for the noisy arm."""
    n = 300
    noisy = tuple(5 * x for x in STEADY)
    quiet = tuple(0.3 * x for x in STEADY)
    cases = {"noisy ref": dict(ref_sd=noisy), "noisy arm": dict(arm_sd=noisy),
             "spiky, peaked": dict(ref_sd=SPIKY, arm_sd=SPIKY, shapes=(PEAKED, PEAKED)),
             "spiky ref, flat vs peaked": dict(ref_sd=SPIKY, shapes=(FLAT, PEAKED)),
             "seed offset shared by the LRs": dict(ref_sd=quiet, arm_sd=quiet, shared=1.0, sizes=3,
                                                   shapes=(PEAKED, PEAKED))}
    rates = {}
    for i, (name, case) in enumerate(cases.items()):
        shapes = case.pop("shapes", (FLAT, FLAT))
        rates[name] = rejection_rate(n, *shapes, seed=20 + i, **case)
    print("false-positive rates, unequal noise:", rates)
    assert all(r <= bound(n) for r in rates.values()), rates


def test_the_reselecting_percentile_bootstrap_over_rejects_when_curve_shapes_differ():
    """Why the verdicts do not use it: same optimum, ref flat and arm peaked, so the ref's
    best-LR loss is the luckier min of three and the arm looks worse than it is. Measured 0.12
    (600 experiments, 3 sizes: each arm's σ on 9 df; at one size, df 3, the heavy posterior
    of σ hides it: 0.05)."""
    n = 300
    rate = rejection_rate(n, FLAT, PEAKED, interval="percentile", seed=7, sizes=3)
    print("percentile bootstrap, flat vs peaked null:", rate)
    assert rate > 0.05


def test_power_at_a_2_sigma_effect():
    """An arm 2σ better at every LR, on a ladder of 3 sizes (each arm's σ on 9 df, as on the
    issue's three rungs). Measured 0.18 (identical flat curves, 600 experiments); the floor sits
    3 SE below that. With 2 seeds a 2σ gap is a z of 2 before any selection; bounds that hold
    for every curve shape cost power, which more seeds buy back (3σ: 0.60; 3 seeds at 2σ: 0.46).
    At one size (df 3 per arm) the power at 2σ is 0.05: a single rung decides little."""
    n = 200
    power2 = rejection_rate(n, FLAT, FLAT, effect=-2.0, seed=11, sizes=3)
    power3 = rejection_rate(n, FLAT, FLAT, effect=-3.0, seed=12, sizes=3)
    print(f"power at 2σ: {power2:.3f}, at 3σ: {power3:.3f}")
    assert power2 >= 0.10
    assert power3 >= 0.49


def test_verdict_direction_and_interval():
    rng = np.random.default_rng(3)
    cells = _experiment(rng, PEAKED, PEAKED, effect=-10.0)
    noise = stats.seed_noise(cells)
    c = stats.judge([stats.compare(cells, "ref", "arm", 1, noise)])[0]
    assert c["verdict"] == "better" and c["hi"] < 0 and c["lo"] < c["delta"] < c["hi"]
    c = stats.judge([stats.compare(cells, "arm", "ref", 1, noise)])[0]
    assert c["verdict"] == "worse" and c["lo"] > 0


def test_holm_on_a_known_example():
    # sorted p: 0.01·4 = 0.04, 0.02·3 = 0.06, 0.03·2 = 0.06 (monotone), 0.5·1 = 0.5
    adj = stats.holm([0.03, 0.5, 0.01, 0.02])
    np.testing.assert_allclose(adj, [0.06, 0.5, 0.04, 0.06])
    comps = [{"p": p, "lo": -2.0, "hi": -1.0} for p in (0.03, 0.5, 0.01, 0.02)]
    assert [c["verdict"] for c in stats.judge(comps)] == ["undecided", "undecided", "better", "undecided"]


def test_pooled_variance_uses_only_cells_with_two_seeds():
    cells = {"a": {1: {1e-3: np.array([1.0, 3.0]), 2e-3: np.array([5.0])}}, "b": {1: {1e-3: np.array([0.0, 1.0, 2.0])}}}
    s2, df = stats.pooled_variance(cells)
    assert df == 3 and math.isclose(s2, (2.0 + 2.0) / 3)


def test_edge_of_grid_is_flagged():
    cells = {"ref": {1: {1e-3: np.array([3.0, 3.1]), 2e-3: np.array([2.0, 2.1]), 4e-3: np.array([3.0, 3.2])}},
             "arm": {1: {1e-3: np.array([3.0, 3.1]), 2e-3: np.array([2.5, 2.6]), 4e-3: np.array([2.0, 2.2])}}}
    c = stats.compare(cells, "ref", "arm", 1, stats.seed_noise(cells), n_boot=200)
    assert c["arm_edge"] and not c["ref_edge"] and c["arm_lr"] == 4e-3
    assert stats.at_edge({1e-3: None}, 1e-3)  # a grid of one LR brackets nothing


def test_an_edge_withholds_only_the_verdict_it_could_reverse():
    """An edge best LR bounds the tuned loss from above: an arm at its edge may still be called
    better but not worse, and nothing is better than a reference at its edge."""
    clear = {"p": 0.001, "p_holm": 0.001}
    better, worse = {**clear, "lo": -2.0, "hi": -1.0}, {**clear, "lo": 1.0, "hi": 2.0}
    assert stats.verdict({**better, "arm_edge": True, "ref_edge": False}) == "better"
    assert stats.verdict({**better, "arm_edge": False, "ref_edge": True}) == "undecided"
    assert stats.verdict({**worse, "arm_edge": True, "ref_edge": False}) == "undecided"
    assert stats.verdict({**worse, "arm_edge": False, "ref_edge": True}) == "worse"
    assert stats.verdict({**worse, "arm_edge": False, "ref_edge": False}) == "worse"


def test_no_two_seed_cell_means_undecided():
    cells = {"ref": {1: {1e-3: np.array([3.0])}}, "arm": {1: {1e-3: np.array([1.0])}}}
    noise = stats.seed_noise(cells)
    c = stats.judge([stats.compare(cells, "ref", "arm", 1, noise)])[0]
    assert noise["arm"][1] == 0 and c["verdict"] == "undecided"


def test_rows_group_per_setting_and_corpus_and_diverged_runs_count_as_inf():
    rows = [{"setting": "width", "corpus": h, "arm": "pre_ln", "params": 10, "lr": 1e-3, "seed": s, "val_loss": 3.0 + s}
            for h in ("aaa", "bbb") for s in (0, 1)]
    g = stats.group(rows)
    assert set(g) == {("width", "aaa"), ("width", "bbb")}
    diverged = {"setting": "width", "corpus": "aaa", "arm": "pre_ln", "params": 10, "lr": 4e-3, "val_loss": None}
    failed = {**diverged, "lr": 8e-3}
    cells = stats.group([*rows, {**diverged, "seed": 0, "diverged": True}, {**diverged, "seed": 1, "diverged": True},
                         {**failed, "seed": 0}])[("width", "aaa")]
    lrs = cells["pre_ln"][10]
    assert set(lrs) == {1e-3, 4e-3} and np.isinf(lrs[4e-3]).all()  # the row without a loss is left out
    assert stats.pooled_variance(cells) == (0.5, 1)  # the diverged cell has no spread to pool
    assert stats.best(lrs) == (1e-3, 3.5)


def test_arms_of_one_rung_pair_by_its_size_not_their_own_param_counts():
    # Peri-LN's extra norm gains make its count differ from Pre-LN's at the same rung: paired by
    # the rung's `size`, the two meet at one size; rows without `size` fall back to `params`.
    rows = [{"setting": "width", "corpus": "h", "arm": arm, "size": 107040, "params": params, "lr": 1e-3,
             "seed": s, "val_loss": 3.0 + s / 10} for arm, params in (("pre_ln", 107040), ("peri_ln", 107584))
            for s in (0, 1)]
    cells = stats.group(rows)[("width", "h")]
    assert set(cells["pre_ln"]) == set(cells["peri_ln"]) == {107040}
    old = [{k: v for k, v in r.items() if k != "size"} for r in rows]
    assert set(stats.group(old)[("width", "h")]["peri_ln"]) == {107584}


def test_seed_noise_is_per_arm_and_pooled_near_the_best_lr():
    # arm a: best at 2e-3; its neighbours 1e-3 and 4e-3 pool (SS 2 + 0.005 + 0.5, df 3); 8e-3, a
    # factor 4 off, split by 4 nats, is no contender and does not inflate σ. Arm b is its own.
    a = {1: {1e-3: np.array([3.0, 3.1]), 2e-3: np.array([1.0, 3.0]), 4e-3: np.array([3.0, 4.0]),
             8e-3: np.array([5.0, 9.0])}}
    b = {1: {1e-3: np.array([2.0, 2.2])}, 2: {1e-3: np.array([1.0, 1.2, 1.4])}}
    noise = stats.seed_noise({"a": a, "b": b})
    assert noise["a"][1] == 3 and math.isclose(noise["a"][0], (2.0 + 0.005 + 0.5) / 3)
    assert noise["b"][1] == 3 and math.isclose(noise["b"][0], (0.02 + 0.08) / 3)
    s2 = noise["a"][0]
    assert set(stats.contenders(a[1], s2)) == {1e-3, 2e-3, 4e-3}
    # a cell two grid steps away but within 3 standard errors of the best is still a contender
    assert 8e-3 in stats.contenders({**a[1], 8e-3: np.array([2.0, 2.4])}, s2)
