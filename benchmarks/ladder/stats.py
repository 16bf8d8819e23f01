"""Statistics of the option ladder that hold at 5%: cells, pooled seed variance, a best-LR
comparison by parametric bootstrap, and Holm's correction.

Why not the old rule. The ablation called a difference real when it exceeded the larger seed
range of two cells (benchmarks/ablation_stats.py). With 2 seeds that flags about 22% of null
comparisons and misses a true 2σ gap 37% of the time, and comparing each arm at its own best
of 3–4 LRs adds a selection the rule never saw. Here every number is an estimate with an
interval whose false-positive rate is measured (tests/unit/test_ladder_stats.py).

Cells. A run row belongs to the cell (setting, corpus, arm, size, lr), size being the
non-embedding parameter count N; a cell's seeds are its replicates. Rows of different
(setting, corpus) are never pooled: a corpus is named by its content hash, and a loss on one
corpus says nothing about the noise on another.

Seed variance. One σ² per arm of a (setting, corpus), pooled over the cells that can be that
arm's best (below): s² = Σ SS / Σ (n − 1), with df = Σ (n − 1), over its sizes. With 2 seeds a
cell alone has 1 df, so its own variance is useless; pooled over an arm's sizes it has a few
(3 per size with a bracketed best). Why per arm and not one σ per (setting, corpus), as first
built: the seed noise is not one number. Measured on the width rung at 32 (2 seeds per cell),
the σ near each arm's best LR runs from 0.03 (Peri-LN) to 0.34 (Pre-LN) and 0.73 (MoD at
capacity 1): arms without an embedding scale spike at their best LRs and the others do not.
One shared σ then made every interval as wide as the noisiest arm's (σ 0.21: nothing could be
decided) and, for the noisiest arm, too narrow. Why near the best: well below an arm's best LR
its seeds mostly agree to a few hundredths; near and above it they can differ by 1 nat;
pooling every LR mixes both.
The assumption left is that one arm's noise near its optimum is the same at every size.

Seeds shared by the LRs. A seed fixes the init and the data order at every LR of an arm and
size, and in the width rungs one seed is often better at nearly every LR of an arm (Pre-LN at
width 48: seed 1 by 0.56, 0.41 and 0.20 at its three LRs). So an arm's cells at one size are
correlated, and their within-cell SS are worth fewer than their nominal df. The df are still
counted per cell: the comparison below draws the cells independently, and a correlated set's
min strays less than independent draws do, which more than makes up for it. Measured on
synthetic nulls with a shared seed offset 3× the rest of the noise, the rate stays at 1.7–3.6%
(tests/unit/test_ladder_stats.py); Satterthwaite's df for the seed × LR table, tried instead,
brought it to 0% and the power at 2σ from 0.18 to 0.04.

Pairing. The seeds share the data order across arms, so arm and reference at the same seed
are positively correlated and a per-seed difference would have variance 2σ²(1 − ρ). We do not
use it: ρ is not estimable from 2 seeds per cell, differs by cell, and a pairing that gives
no reduction (ρ ≈ 0) would then be wrongly narrow. Treating the arms as independent draws
(variance σ_a²/n_a + σ_r²/n_r for a difference of means) is conservative whenever ρ ≥ 0, which
a shared data order makes the expected case.

Contenders. At one size, the cells that can be an arm's best: its best LR, that LR's grid
neighbours, and any other cell whose mean lies within 3 standard errors of the best's (3σ·√(1/n
+ 1/n_best), σ from the neighbourhood). A cell further off cannot be the min of the true
curve except with probability < 0.2%, so it is left out of the comparison's bounds (below),
where it would only widen the interval by adding draws that can never win.

Comparison. Δ = min over LRs of arm's cell means − min over LRs of ref's (each arm at its own
best LR, as practice compares them). The min is a biased estimator of the true optimum (the
luckiest of k noisy means), and the bias depends on how flat each LR curve is, so it does not
cancel in general. Each replicate draws each arm's σ² from its posterior (scaled inverse χ²,
σ² = df·s²/χ²_df, so the interval carries the uncertainty of a small-df variance like a t).

The bootstrap the issue first asked for re-selects around the observed means (cell means
from Normal(observed mean, σ²/n), each arm's min re-taken); it is kept as compare(...,
interval="percentile"/"basic"). Measured on synthetic nulls (2 seeds, 3 LRs, 3 sizes: each
arm's σ on 9 df; see the test): with identical LR curves its percentile interval holds (1%),
but when the true curves differ in shape with the same optimum (ref flat, arm peaked: an
option that changes LR sensitivity, which is what these options do), the percentile interval
rejects ~12% and the basic (pivotal) one 6–7%: re-selecting around the observed means
mis-estimates a selection bias that depends on the unknown curve shape. Neither meets 5%.

So the verdicts use bounds that hold for every curve shape ("lf", least favourable). With
X_i = μ_i + e_i over an arm's contenders, e_i ~ Normal(0, σ_arm²/n_i), and gaps
g_i = μ_i − min μ ≥ 0, an arm's error is W = min X − min μ = min_i (g_i + e_i), which grows
with every g_i: it is stochastically at least min_i e_i (all gaps 0, a flat curve) and at most
e_j* (one LR far better than the rest, a peaked curve). Hence Δ̂ − Δ = W_arm − W_ref lies (stochastically) between
L = min_i e_arm,i − Z_ref and U = Z_arm − min_i e_ref,i (Z a single cell's error), laws that
do not depend on the μ's. The 95% interval is [Δ̂ − q97.5(U), Δ̂ − q2.5(L)] and the two-sided
p-value 2·min(P(U ≥ Δ̂), P(L ≤ Δ̂)) (with the +1 of a Monte-Carlo p-value); the interval
excludes 0 iff p < 5%. The false-positive rate is ≤ 5% by construction for any shapes (≤ 2.5%
+ a little in the worst case, since only one tail can be least favourable at a time); the
price is power (measured in the test), which more seeds per cell buy back.

Verdict. Holm's step-down correction over every comparison of one report (family-wise 5%);
"better" / "worse" only when the Holm-adjusted p < 5% and the 95% interval excludes 0, else
"undecided". A best LR at the edge of its grid (or a grid of one LR) is flagged: the optimum
may lie beyond it, so that arm's loss is an upper bound on its tuned loss. An edge can only
hide a better loss, so it withholds the verdict it could reverse: an arm at its edge can be
called better (tuned, it would be better still) but not worse, and a reference at its edge
makes no arm better. (The ablation once assumed the margin was a lower bound whatever sat at
the edge; with the reference there it is not.)
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

METRIC = "val_loss"
ALPHA = 0.05
N_BOOT = 4000


KEY = ("setting", "corpus")


def row_key(r: dict, fields=KEY) -> tuple:
    """The group a row belongs to: never pooled with rows of another key."""
    return tuple(float(r[f]) if f == "tokens_per_param" and r.get(f) is not None else r.get(f) for f in fields)


def size_of(r: dict, size_key: str = "size") -> int:
    """A row's N: its rung's shared size (the runner's `size`), else its own `params`."""
    return int(r[size_key] if r.get(size_key) is not None else r["params"])


def group(rows: list[dict], metric: str = METRIC, size_key: str = "size", fields=KEY) -> dict:
    """{key: {arm: {size: {lr: np.array(seed values)}}}}, key = row_key (by default (setting,
    corpus)), sorted by size and LR. A diverged run (the runner's `diverged`, or a non-finite
    loss) counts as +inf: its LR can never be the best, and it stays in the grid, so a best LR
    next to a diverged one is bracketed. Rows with no value otherwise are left out."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in rows:
        v = r.get(metric)
        if v is None or not math.isfinite(float(v)):
            if not (r.get("diverged") or v is not None):
                continue
            v = math.inf
        out[row_key(r, fields)][r["arm"]][size_of(r, size_key)][float(r["lr"])].append(float(v))
    return {key: {arm: {size: {lr: np.asarray(v) for lr, v in sorted(lrs.items())}
                        for size, lrs in sorted(sizes.items())}
                  for arm, sizes in arms.items()}
            for key, arms in out.items()}


def pooled_variance(cells: dict) -> tuple[float, int]:
    """(s², df) pooled over every cell with ≥ 2 seeds of {arm: {size: {lr: seeds}}}; (nan, 0) if
    none. A cell with a diverged seed has no finite spread and is left out."""
    ss, df = 0.0, 0
    for sizes in cells.values():
        for lrs in sizes.values():
            for v in lrs.values():
                if len(v) >= 2 and np.isfinite(v).all():
                    ss += float(((v - v.mean()) ** 2).sum())
                    df += len(v) - 1
    return (ss / df if df else math.nan), df


def sigma2_draws(s2: float, df: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws of σ² from its posterior given the pooled s² on df degrees of freedom."""
    return df * s2 / rng.chisquare(df, size=n)


def best(lrs: dict[float, np.ndarray]) -> tuple[float, float]:
    """(best LR, its seed mean): the LR whose mean is lowest."""
    lr = min(lrs, key=lambda k: lrs[k].mean())
    return lr, float(lrs[lr].mean())


def at_edge(lrs: dict, lr: float) -> bool:
    """The best LR is not bracketed: a grid of one LR, or the grid's smallest or largest."""
    return len(lrs) < 2 or lr in (min(lrs), max(lrs))


def neighbourhood(lrs: dict[float, np.ndarray]) -> dict[float, np.ndarray]:
    """The best LR's cell and its grid neighbours (lrs sorted by LR, as `group` gives them)."""
    grid = list(lrs)
    i = grid.index(best(lrs)[0])
    return {lr: lrs[lr] for lr in grid[max(0, i - 1):i + 2]}


def contenders(lrs: dict[float, np.ndarray], s2: float) -> dict[float, np.ndarray]:
    """The cells that can be the arm's best (module docstring, "Contenders"): the neighbourhood,
    and any cell within 3 standard errors of the best (with s² the arm's seed variance)."""
    near = neighbourhood(lrs)
    if not math.isfinite(s2):
        return dict(lrs)
    lr_b, m_b = best(lrs)
    n_b = len(lrs[lr_b])
    return {lr: v for lr, v in lrs.items()
            if lr in near or v.mean() - m_b <= 3 * math.sqrt(s2 * (1 / len(v) + 1 / n_b))}


def seed_noise(cells: dict) -> dict[str, tuple[float, int]]:
    """{arm: (s², df)}: each arm's seed variance pooled over its neighbourhood cells at every size
    of one (setting, corpus) (module docstring, "Seed variance"); (nan, 0) for an arm with no
    such cell with 2 seeds."""
    return {arm: pooled_variance({arm: {size: neighbourhood(lrs) for size, lrs in sizes.items()}})
            for arm, sizes in cells.items()}


def has_noise(noise: dict, arms) -> bool:
    """Every arm of `arms` has a seed-variance estimate in seed_noise's `noise` (a cell with 2
    seeds near its best): without one there is no test."""
    return all(noise[a][1] and math.isfinite(noise[a][0]) for a in arms)


def best_replicates(lrs: dict[float, np.ndarray], sigma2: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per replicate (one per σ² draw), each cell mean drawn from Normal(observed mean, σ²/n)
    and the min over the LRs: the best-LR loss re-selected inside the replicate."""
    means = np.array([v.mean() for v in lrs.values()])
    n = np.array([len(v) for v in lrs.values()], dtype=float)
    draws = means + np.sqrt(sigma2[:, None] / n) * rng.standard_normal((len(sigma2), len(means)))
    return draws.min(axis=1)


def basic_interval(obs: float, reps: np.ndarray, level: float = 1 - ALPHA) -> tuple[float, float]:
    """The basic (pivotal) bootstrap interval: [obs − q_hi(D), obs − q_lo(D)] with D = rep − obs."""
    lo, hi = np.quantile(reps - obs, [(1 - level) / 2, (1 + level) / 2])
    return float(obs - hi), float(obs - lo)


def pivot_p(obs: float, reps: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a true value 0, from D = rep − obs as the law of obs − truth."""
    d = reps - obs
    tail = min(np.count_nonzero(d >= obs), np.count_nonzero(d <= obs))
    return float(min(1.0, 2 * (tail + 1) / (len(d) + 1)))


def least_favourable_replicates(a: dict, r: dict, sigma2_a: np.ndarray, sigma2_r: np.ndarray,
                                rng: np.random.Generator):
    """Draws of the two bounding laws of Δ̂ − Δ (module docstring, "Comparison"): U = Z_a − min_i e_r,i
    bounds it above and L = min_i e_a,i − Z_r below, whatever the true LR curves. `a`, `r`: each
    arm's contender cells; e_i ~ Normal(0, σ²/n_i) per cell with that arm's σ²; Z ~ Normal(0, σ²/n)
    with the arm's fewest seeds (the largest variance its unknown best cell can have)."""
    def noise(lrs, sigma2):
        n = np.array([len(v) for v in lrs.values()], dtype=float)
        return np.sqrt(sigma2[:, None] / n) * rng.standard_normal((len(sigma2), len(n))), n.min()

    e_a, n_a = noise(a, sigma2_a)
    e_r, n_r = noise(r, sigma2_r)
    z_a = np.sqrt(sigma2_a / n_a) * rng.standard_normal(len(sigma2_a))
    z_r = np.sqrt(sigma2_r / n_r) * rng.standard_normal(len(sigma2_r))
    return z_a - e_r.min(axis=1), e_a.min(axis=1) - z_r


def compare(cells: dict, ref: str, arm: str, size: int, noise: dict[str, tuple[float, int]], n_boot: int = N_BOOT,
            rng: np.random.Generator | int | None = 0, interval: str = "lf") -> dict:
    """Arm vs ref at one size, each at its own best LR (see the module docstring); `noise` is
    seed_noise(cells): {arm: (s², df)}.

    `interval`: "lf" (the default, used for verdicts: bounds valid for every shape of the true
    LR curves), or the re-selecting bootstrap's "percentile" and "basic" intervals, kept so the
    tests can show that both over-reject when one arm's LR curve is flat and the other's peaked."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    a, r = cells[arm][size], cells[ref][size]
    (lr_a, m_a), (lr_r, m_r) = best(a), best(r)
    (s2_a, df_a), (s2_r, df_r) = noise[arm], noise[ref]
    delta = m_a - m_r
    out = {"ref": ref, "arm": arm, "size": size, "delta": delta, "arm_loss": m_a, "ref_loss": m_r,
           "arm_lr": lr_a, "ref_lr": lr_r, "arm_edge": at_edge(a, lr_a), "ref_edge": at_edge(r, lr_r),
           "arm_lrs": len(a), "ref_lrs": len(r), "arm_seeds": int(len(a[lr_a])), "ref_seeds": int(len(r[lr_r])),
           "arm_sigma": math.sqrt(s2_a) if df_a else None, "arm_df": df_a,
           "ref_sigma": math.sqrt(s2_r) if df_r else None, "ref_df": df_r}
    if not has_noise(noise, (arm, ref)):
        return {**out, "lo": math.nan, "hi": math.nan, "p": 1.0, "note": "an arm has no cell with 2 seeds"}
    if not math.isfinite(delta):  # every LR of an arm diverged: nothing to compare
        return {**out, "lo": math.nan, "hi": math.nan, "p": 1.0, "note": "every LR diverged"}
    # one σ² per replicate and arm: the two arms' variances are estimated from different cells
    sigma2_a, sigma2_r = sigma2_draws(s2_a, df_a, n_boot, rng), sigma2_draws(s2_r, df_r, n_boot, rng)
    if interval == "lf":
        upper, lower = least_favourable_replicates(contenders(a, s2_a), contenders(r, s2_r), sigma2_a, sigma2_r, rng)
        lo, hi = delta - float(np.quantile(upper, 1 - ALPHA / 2)), delta - float(np.quantile(lower, ALPHA / 2))
        # reject Δ = 0 when Δ̂ lies beyond what the bounding law allows under it, on either side
        tail = min(np.count_nonzero(upper >= delta), np.count_nonzero(lower <= delta))
        p = float(min(1.0, 2 * (tail + 1) / (n_boot + 1)))
        return {**out, "lo": lo, "hi": hi, "p": p}
    # The re-selecting bootstrap: cell means drawn around the observed ones, each arm's min re-taken.
    reps = best_replicates(a, sigma2_a, rng) - best_replicates(r, sigma2_r, rng)
    if interval == "percentile":
        lo, hi = (float(q) for q in np.quantile(reps, [ALPHA / 2, 1 - ALPHA / 2]))
        p = float(min(1.0, 2 * (min(np.count_nonzero(reps >= 0), np.count_nonzero(reps <= 0)) + 1) / (n_boot + 1)))
    elif interval == "basic":
        lo, hi = basic_interval(delta, reps)
        p = pivot_p(delta, reps)
    else:
        raise ValueError(f"interval {interval!r}: expected 'lf', 'percentile' or 'basic'")
    return {**out, "lo": lo, "hi": hi, "p": p}


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control for any dependence)."""
    p = np.asarray(pvalues, dtype=float)
    adj, running = np.empty_like(p), 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
    return adj


def verdict(c: dict, alpha: float = ALPHA) -> str:
    """"better" (lower loss) / "worse" only when the Holm-adjusted test rejects, the interval
    excludes 0 and no best LR at an edge could reverse it (module docstring: Verdict); else
    "undecided"."""
    if c.get("p_holm", 1.0) < alpha and math.isfinite(c["lo"]):
        if c["hi"] < 0 and not c.get("ref_edge"):
            return "better"
        if c["lo"] > 0 and not c.get("arm_edge"):
            return "worse"
    return "undecided"


def judge(comparisons: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Holm over all `comparisons` (one report's family); adds p_holm and verdict in place."""
    for c, adj in zip(comparisons, holm([c["p"] for c in comparisons])):
        c["p_holm"] = float(adj)
        c["verdict"] = verdict(c, alpha)
    return comparisons
