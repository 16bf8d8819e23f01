"""Which source each global sample index comes from, as a pure function of (seed, index).

Weights are quantised to integers a_k over 2**20. Sources are peeled off one at a time: among
the samples not yet given to sources 0..k-1 (re-indexed j = 0, 1, ...), sample j goes to
source k when floor(((j+1)·a_k + t_k) / R_k) > floor((j·a_k + t_k) / R_k), with
R_k = a_k + ... + a_{K-1} and a seed-derived phase t_k in [0, R_k). That is a Bresenham line:
in ANY run of consecutive samples source k gets its share to within one sample per level, so
realised proportions over 10k samples are within a few hundredths of a percent of the weights,
where an i.i.d. draw would wander by ~0.5 points. The count of samples each source got before
index g is closed-form, which gives each source its own sample counter (and so its own epoch
and window order) without replaying history: resume is exact from the sample index alone.
"""
from __future__ import annotations

import numpy as np

RESOLUTION = 1 << 20


class Mixture:
    def __init__(self, weights: list[float], seed: int):
        total = float(sum(weights))
        assert total > 0 and all(w > 0 for w in weights), weights  # config validation guarantees this
        self.a = [max(1, round(w / total * RESOLUTION)) for w in weights]
        self.rest = [sum(self.a[k:]) for k in range(len(self.a))]
        rng = np.random.default_rng([seed, 0x6D1C])
        self.phase = [int(rng.integers(0, r)) for r in self.rest]

    @property
    def n_sources(self) -> int:
        return len(self.a)

    def assign(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within that source) for global sample indices `g` (int64 array)."""
        g = np.asarray(g, np.int64)
        source = np.full(g.shape, self.n_sources - 1, np.int64)
        within = np.zeros(g.shape, np.int64)
        j = g.copy()  # index among the samples not taken by earlier sources
        open_ = np.ones(g.shape, bool)
        for k in range(self.n_sources - 1):
            a, r, t = self.a[k], self.rest[k], self.phase[k]
            before = (j * a + t) // r
            hit = open_ & (((j + 1) * a + t) // r > before)
            source[hit], within[hit] = k, before[hit]
            j = np.where(open_ & ~hit, j - before, j)
            open_ &= ~hit
        within[open_] = j[open_]
        return source, within

    def counts(self, n: int) -> list[int]:
        """How many of the first `n` samples each source got."""
        out = []
        for k in range(self.n_sources - 1):
            c = (n * self.a[k] + self.phase[k]) // self.rest[k]
            out.append(c)
            n -= c
        return out + [n]
