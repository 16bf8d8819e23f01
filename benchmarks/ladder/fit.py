"""Scaling fits of the option ladder: L(N) per arm with a shared irreducible loss, the
effective-size multiplier m(N) of an option against a reference, MoD against the dense
loss-versus-FLOPs frontier, and the best LR against size.

Fit. L(N) = E + A_arm · N^(−α_arm), E shared by the arms of one (setting, corpus) (the
irreducible loss belongs to the data, not the architecture), fitted on each arm's best-LR
loss per size (mean over seeds) by minimising a Huber loss (δ = 1e-3) on log residuals
log L_pred − log L_obs with L-BFGS-B from a grid of starts, as Hoffmann et al. 2022 (approach
3). A is fitted as B = A · N0^(−α) at N0 = the geometric mean of the sizes, which decorrelates
the amplitude from the exponent and keeps the problem well conditioned. An arm needs ≥ 3
sizes to be fitted (2 parameters of its own, plus E).

Multiplier. m(N) is the factor by which the reference's size must grow to match the option
at N: E + A_r (mN)^−α_r = E + A_o N^−α_o gives
    log m = −log(A_o/A_r)/α_r + (α_o/α_r − 1) · log N,
so d log m / d log N = α_o/α_r − 1: above 0 the option's gain grows with scale, below 0 it
shrinks. m > 1 means the option is worth more parameters.

Intervals. Parametric bootstrap as in stats.py: each replicate draws each arm's σ² from its
posterior (stats.seed_noise), every cell mean from Normal(observed mean, σ²/n), re-selects
each arm's best LR per size and refits (warm-started at the point fit, plus one grid start). Intervals are the
replicates' 2.5–97.5 percentiles (transformation-respecting, so log m and m agree). The
selection bias of the best-LR min shifts an arm's whole curve by about the same amount; the
slope, a ratio of exponents, is first-order insensitive to it. A slope verdict ("grows" /
"shrinks") needs its interval to exclude 0 and its bootstrap p-value to pass Holm over the
report's slopes, and every size's best LR bracketed for both arms (an edge point bounds the
tuned loss, it does not give it); else "undecided". The value at N = 1e9 is an extrapolation
and marked so.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from benchmarks.ladder import stats

DELTA = 1e-3
N_BOOT = 200
EXTRAPOLATE_N = 1e9
MIN_SIZES = 3
ALPHA_GRID = (0.1, 0.3, 0.6, 1.0)
E_FRACTIONS = (0.0, 0.5, 0.9)  # E starts, as fractions of the lowest loss


def best_curve(sizes: dict[int, dict[float, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(N, best-LR mean loss) per size of one arm; a size where every LR diverged is left out."""
    ns = np.array(sorted(sizes), dtype=float)
    ls = np.array([stats.best(sizes[int(n)])[1] for n in ns])
    return ns[np.isfinite(ls)], ls[np.isfinite(ls)]


def _objective(theta, x, y, idx, k):
    """Σ Huber(log P − log L)/δ and its gradient; θ = [E, logB_1..k, α_1..k], x = log(N/N0)."""
    e, log_b, alpha = theta[0], theta[1:1 + k], theta[1 + k:]
    t = np.exp(log_b[idx] - alpha[idx] * x)
    p = e + t
    r = np.log(p) - y
    absr = np.abs(r)
    f = np.where(absr <= DELTA, 0.5 * r * r, DELTA * (absr - 0.5 * DELTA)).sum() / DELTA
    g = np.clip(r, -DELTA, DELTA) / DELTA / p  # dHuber/dr · dr/dP
    grad = np.concatenate([[g.sum()], np.bincount(idx, g * t, k), np.bincount(idx, -x * g * t, k)])
    return f, grad


def fit(curves: dict[str, tuple[np.ndarray, np.ndarray]], warm: dict | None = None, n0: float | None = None) -> dict:
    """Fit E (shared) and (A, α) per arm to {arm: (N, L)}; each arm needs ≥ MIN_SIZES sizes.

    Returns {"E", "n0", "arms": {arm: {"A", "alpha", "B"}}, "loss"}. With `warm` (a previous fit
    of the same arms) it starts there and from one grid point only: the bootstrap's refits."""
    arms = [a for a, (n, _) in curves.items() if len(n) >= MIN_SIZES]
    if not arms:
        raise ValueError(f"no arm has {MIN_SIZES} sizes")
    k = len(arms)
    idx = np.concatenate([np.full(len(curves[a][0]), i) for i, a in enumerate(arms)])
    ns = np.concatenate([curves[a][0] for a in arms])
    ls = np.concatenate([curves[a][1] for a in arms])
    n0 = n0 or float(np.exp(np.log(ns).mean()))
    x, y, lmin = np.log(ns / n0), np.log(ls), float(ls.min())
    bounds = [(0.0, 0.999 * lmin)] + [(-20.0, math.log(ls.max()) + 3)] * k + [(0.01, 3.0)] * k

    def start(e, alpha):
        log_b = [math.log(max(np.exp(y[idx == i]).mean() - e, 1e-6)) for i in range(k)]
        return np.array([e, *log_b, *[alpha] * k])

    if warm is None:
        starts = [start(f * lmin, a) for a in ALPHA_GRID for f in E_FRACTIONS]
    else:
        starts = [np.array([min(warm["E"], bounds[0][1]), *[warm["arms"][a]["logB"] for a in arms],
                            *[warm["arms"][a]["alpha"] for a in arms]]), start(0.5 * lmin, 0.3)]
    best = None
    # One BLAS thread: L-BFGS-B's BLAS calls on a dozen parameters gain nothing from threads,
    # and with every core busy (the ladder's own runs) OpenBLAS's thread hand-offs made each
    # iteration ~100x slower: the report took 7.6 min with default threads, 9 s with one.
    with threadpool_limits(limits=1, user_api="blas"):
        for s in starts:
            res = minimize(_objective, s, args=(x, y, idx, k), jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 500, "ftol": 1e-14, "gtol": 1e-10})
            if best is None or res.fun < best.fun:
                best = res
    th = best.x
    return {"E": float(th[0]), "n0": n0, "loss": float(best.fun),
            "arms": {a: {"logB": float(th[1 + i]), "alpha": float(th[1 + k + i]),
                         "A": float(math.exp(th[1 + i] + th[1 + k + i] * math.log(n0)))}
                     for i, a in enumerate(arms)}}


def predict(f: dict, arm: str, n) -> np.ndarray:
    p = f["arms"][arm]
    return f["E"] + np.exp(p["logB"] - p["alpha"] * np.log(np.asarray(n, dtype=float) / f["n0"]))


def log_multiplier(f: dict, option: str, ref: str, n) -> np.ndarray:
    """log m(N): the reference's size factor that matches the option at N (module docstring).
    Written with B at N0 (log A = log B + α log N0) to stay exact at any magnitude."""
    o, r = f["arms"][option], f["arms"][ref]
    x = np.log(np.asarray(n, dtype=float) / f["n0"])
    return (o["logB"] - r["logB"]) / -r["alpha"] + (o["alpha"] / r["alpha"] - 1) * x


def slope(f: dict, option: str, ref: str) -> float:
    """d log m / d log N = α_o/α_r − 1."""
    return f["arms"][option]["alpha"] / f["arms"][ref]["alpha"] - 1


def _replicate_cells(cells: dict, arms, noise: dict, n_boot: int, rng) -> list[dict]:
    """n_boot parametric replicates of {arm: {size: {lr: [mean]}}}: each arm's σ² from its
    posterior (noise = stats.seed_noise), each cell mean from Normal(mean, σ²/n) (one value
    standing for the cell's seed mean)."""
    reps = [{a: {} for a in arms} for _ in range(n_boot)]
    for a in arms:
        sigma2 = stats.sigma2_draws(*noise[a], n_boot, rng)
        for size, lrs in cells[a].items():
            means = np.array([v.mean() for v in lrs.values()])
            n = np.array([len(v) for v in lrs.values()], dtype=float)
            draws = means + np.sqrt(sigma2[:, None] / n) * rng.standard_normal((n_boot, len(means)))
            for b in range(n_boot):
                reps[b][a][size] = {lr: draws[b, j:j + 1] for j, lr in enumerate(lrs)}
    return reps


def percentile(reps, level: float = 0.95) -> tuple[float, float]:
    reps = np.asarray(reps, dtype=float)
    reps = reps[~np.isnan(reps)]
    if not len(reps):
        return math.nan, math.nan
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def boot_p(reps) -> float:
    """Two-sided p-value of 0 from a normal fitted to the replicates, 2·Φ(−|mean|/sd): a few
    hundred refits cannot resolve the small p-values Holm needs by counting (2/(B+1) is its
    floor), and a slope's replicates are near normal. The verdict also needs the percentile
    interval to exclude 0, which counts."""
    reps = np.asarray(reps, dtype=float)
    reps = reps[np.isfinite(reps)]
    if len(reps) < 2 or reps.std() == 0:
        return 1.0
    return float(math.erfc(abs(reps.mean()) / reps.std() / math.sqrt(2)))


def ladder_fit(cells: dict, noise: dict, pairs: list[tuple[str, str]], n_boot: int = N_BOOT,
               rng: np.random.Generator | int | None = 0, extrapolate: float = EXTRAPOLATE_N) -> dict:
    """Point fit, bootstrap refits and, per (option, ref) pair both fitted, m(N) at each ladder
    size and at `extrapolate`, and the slope, with percentile intervals.

    Returns {"fit", "sizes", "arms_fitted", "alpha": {arm: {value, lo, hi}}, "pairs": [...], "note"}."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    curves = {a: best_curve(sizes) for a, sizes in cells.items()}
    fitted = [a for a, (n, _) in curves.items() if len(n) >= MIN_SIZES]
    out = {"arms_fitted": fitted, "sizes": sorted({int(n) for a in curves for n in curves[a][0]}),
           "pairs": [], "alpha": {}}
    if not fitted:
        return {**out, "fit": None, "note": f"no arm has {MIN_SIZES} sizes yet: no fit, every slope undecided"}
    point = fit({a: curves[a] for a in fitted})
    reps = []
    if stats.has_noise(noise, fitted):
        for rc in _replicate_cells(cells, fitted, noise, n_boot, rng):
            reps.append(fit({a: best_curve(rc[a]) for a in fitted}, warm=point, n0=point["n0"]))
    out["fit"] = point
    out["E_interval"] = percentile([r["E"] for r in reps])
    for a in fitted:
        lo, hi = percentile([r["arms"][a]["alpha"] for r in reps])
        out["alpha"][a] = {"value": point["arms"][a]["alpha"], "lo": lo, "hi": hi, "A": point["arms"][a]["A"]}
    for option, ref in pairs:
        if option not in fitted or ref not in fitted:
            continue
        sizes = np.array(sorted(set(curves[option][0]) | set(curves[ref][0])))
        grid = np.append(sizes, extrapolate)
        lm = log_multiplier(point, option, ref, grid)
        lm_reps = np.array([log_multiplier(r, option, ref, grid) for r in reps]).reshape(len(reps), len(grid))
        sl_reps = [slope(r, option, ref) for r in reps]
        at = [{"N": float(n), "m": float(np.exp(v)), "lo": float(np.exp(percentile(lm_reps[:, j])[0])),
               "hi": float(np.exp(percentile(lm_reps[:, j])[1])), "extrapolation": bool(n > sizes.max())}
              for j, (n, v) in enumerate(zip(grid, lm))]
        lo, hi = percentile(sl_reps)
        # sizes where either arm's best LR is at its grid's edge: a point that is only a bound
        edges = sorted(int(n) for n in sizes for a in (option, ref)
                       if int(n) in cells[a] and stats.at_edge(cells[a][int(n)], stats.best(cells[a][int(n)])[0]))
        out["pairs"].append({"option": option, "ref": ref, "m": at, "slope": slope(point, option, ref),
                             "slope_lo": lo, "slope_hi": hi, "p": boot_p(sl_reps) if reps else 1.0,
                             "n_boot": len(reps), "edges": sorted(set(edges))})
    return out


def judge_slopes(pairs: list[dict], alpha: float = stats.ALPHA) -> list[dict]:
    """Holm over the report's slopes; "grows" / "shrinks" only when the adjusted p < alpha, the
    interval excludes 0 and every size's best LR is bracketed for both arms (an edge point is
    a bound on the tuned loss, not the loss, and can tilt the slope either way); else
    "undecided". Edge pairs stay in the Holm family: dropping them would relax the others."""
    for p, adj in zip(pairs, stats.holm([p["p"] for p in pairs])):
        p["p_holm"] = float(adj)
        ok = adj < alpha and math.isfinite(p["slope_lo"]) and not p.get("edges")
        p["verdict"] = "grows" if ok and p["slope_lo"] > 0 else "shrinks" if ok and p["slope_hi"] < 0 else "undecided"
    return pairs


def compute_multiplier(cells: dict, flops: dict, dense: str, option: str, noise: dict,
                       n_boot: int = N_BOOT, rng: np.random.Generator | int | None = 0) -> dict | None:
    """MoD against the dense frontier: fit the dense reference's L(C) = E + A·C^−β over training
    FLOPs C (its best-LR loss per size), and at each of the option's sizes the factor by which
    the dense reference's compute must grow to match the option's loss at the option's own C:
    C' = C-solution of E + A C'^−β = L_option, multiplier C'/C. Infinite when L_option ≤ E (the
    frontier never reaches it); flagged as extrapolation when C' lies beyond the dense runs.

    `flops`: {arm: {size: training FLOPs}}. None when the dense arm has < MIN_SIZES sizes."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if dense not in cells or option not in cells or len(cells[dense]) < MIN_SIZES:
        return None
    ns, ls = best_curve(cells[dense])
    cs = np.array([flops[dense][int(n)] for n in ns], dtype=float)
    point = fit({dense: (cs, ls)})
    o_sizes = sorted(cells[option])
    c_opt = np.array([flops[option][s] for s in o_sizes], dtype=float)

    def log_mult(f, l_opt):
        p = f["arms"][dense]
        gap = np.asarray(l_opt) - f["E"]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_c = math.log(f["n0"]) + (np.log(np.where(gap > 0, gap, np.nan)) - p["logB"]) / -p["alpha"]
        return np.where(gap > 0, log_c - np.log(c_opt), np.inf)

    l_obs = np.array([stats.best(cells[option][s])[1] for s in o_sizes])
    lm = log_mult(point, l_obs)
    reps = []
    if stats.has_noise(noise, (dense, option)):
        rcs = _replicate_cells(cells, [dense, option], noise, n_boot, rng)
        for rc in rcs:
            n_r, l_r = best_curve(rc[dense])
            f = fit({dense: (cs, l_r)}, warm=point, n0=point["n0"])
            reps.append(log_mult(f, [stats.best(rc[option][s])[1] for s in o_sizes]))
    reps = np.array(reps).reshape(len(reps), len(o_sizes))
    rows = []
    for j, s in enumerate(o_sizes):
        col = np.where(np.isinf(reps[:, j]), 50.0, reps[:, j]) if len(reps) else reps[:, j]  # inf → "≥ e^50"
        lo, hi = percentile(col)
        rows.append({"N": s, "C": float(c_opt[j]), "loss": float(l_obs[j]), "multiplier": float(np.exp(lm[j])),
                     "lo": float(np.exp(lo)), "hi": float(np.exp(hi)),
                     "extrapolation": bool(not np.isfinite(lm[j]) or np.exp(lm[j]) * c_opt[j] > cs.max()
                                           or np.exp(lm[j]) * c_opt[j] < cs.min())})
    return {"dense": dense, "option": option, "frontier": {"E": point["E"], "A": point["arms"][dense]["A"],
                                                           "beta": point["arms"][dense]["alpha"]}, "at": rows}


def best_lr_per_size(sizes: dict[int, dict[float, np.ndarray]]) -> list[tuple[int, float, bool]]:
    """(N, lr*, bracketed) per size: the vertex of a parabola in log LR through the best grid
    LR and its two neighbours when the best is bracketed (finer than the grid's factor-2
    steps), else the edge LR itself."""
    out = []
    for n, lrs in sorted(sizes.items()):
        grid = sorted(lrs)
        lr, _ = stats.best(lrs)
        i = grid.index(lr)
        y = np.array([lrs[g].mean() for g in grid[max(0, i - 1):i + 2]])
        if 0 < i < len(grid) - 1 and np.isfinite(y).all():  # a diverged neighbour: keep the grid LR
            x = np.log(grid[i - 1:i + 2])
            c2, c1, _ = np.polyfit(x, y, 2)
            v = -c1 / (2 * c2) if c2 > 0 else x[1]
            out.append((n, float(np.exp(np.clip(v, x[0], x[2]))), True))
        else:
            out.append((n, float(lr), 0 < i < len(grid) - 1))
    return out


def lr_fit(sizes: dict[int, dict[float, np.ndarray]]) -> dict:
    """log lr* = a + b log N by least squares on best_lr_per_size; with one size b = 0."""
    pts = best_lr_per_size(sizes)
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    if len(pts) >= 2:
        b, a = np.polyfit(x, y, 1)
    else:
        b, a = 0.0, float(y[0])
    return {"a": float(a), "b": float(b), "points": [{"N": n, "lr": lr, "bracketed": br} for n, lr, br in pts]}


def predict_lr(rows: list[dict], arm: str, params: float, setting: str | None = None, corpus: str | None = None,
               fallback: str = "pre_ln", metric: str = stats.METRIC) -> float:
    """The best LR for `arm` at `params` from the rows so far, for the runner to place a larger
    rung's LR grid: exp(a + b log N) of lr_fit. Rows of one (setting, corpus) only: name them
    when `rows` hold several. An arm with no rows yet borrows `fallback`'s fit."""
    groups = stats.group(rows, metric)
    keys = [k for k in groups if (setting is None or k[0] == setting) and (corpus is None or k[1] == corpus)]
    if len(keys) != 1:
        raise ValueError(f"predict_lr: rows hold {len(keys)} matching (setting, corpus) groups {keys}; "
                         "name setting and corpus (rows of different corpora are never pooled)")
    cells = groups[keys[0]]
    name = arm if arm in cells else fallback
    if name not in cells:
        raise ValueError(f"predict_lr: no rows for {arm!r} or the fallback {fallback!r} in {keys[0]}")
    f = lr_fit(cells[name])
    return float(math.exp(f["a"] + f["b"] * math.log(params)))
