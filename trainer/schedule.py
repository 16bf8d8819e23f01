"""Learning-rate schedule as a pure function of the step, so resume and growth need no
scheduler state: warmup, then cosine / linear / WSD decay to min_lr_ratio·lr, with an
optional short re-warmup after each growth step."""
from __future__ import annotations

import math

from trainer.config import RunConfig


def lr_at(cfg: RunConfig, step: int) -> float:
    s, peak, total = cfg.schedule, cfg.optim.lr, cfg.run.max_steps
    floor = peak * s.min_lr_ratio
    if step < s.warmup_steps:
        lr = peak * (step + 1) / s.warmup_steps
    else:
        frac = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
        if s.kind == "cosine":
            lr = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))
        elif s.kind == "linear":
            lr = peak - (peak - floor) * frac
        elif s.kind == "wsd":
            decay_start = 1.0 - s.decay_fraction
            lr = peak if frac < decay_start else peak - (peak - floor) * (frac - decay_start) / max(s.decay_fraction, 1e-9)
        else:
            lr = peak
    return lr * _rewarm_factor(cfg, step)


def _rewarm_factor(cfg: RunConfig, step: int) -> float:
    """Linear ramp from 1/n to 1 over the `rewarm_steps` after the latest growth step."""
    n = cfg.growth.rewarm_steps
    grown = [st.at_step for st in cfg.growth.stages if st.at_step <= step]
    if not n or not grown or step - grown[-1] >= n:
        return 1.0
    return (step - grown[-1] + 1) / n
