"""Learning-rate schedule as a pure function of the step, so resume and growth need no
scheduler state: warmup, then cosine / linear / WSD decay to min_lr_ratio·lr, with an
optional short re-warmup after each growth step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from model.config import lookup


# Here, not in trainer.config: the config tree imports it (and SCHEDULES, to validate
# schedule.kind), and this module imports nothing from trainer, so there is no circle.
@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | linear | wsd | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying


def _cosine(s: ScheduleConfig, frac: float) -> float:
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def _linear(s: ScheduleConfig, frac: float) -> float:
    return 1 - (1 - s.min_lr_ratio) * frac


def _wsd(s: ScheduleConfig, frac: float) -> float:
    """Warmup-stable-decay: flat, then linear to the floor over the last decay_fraction."""
    decay_start = 1.0 - s.decay_fraction
    if frac < decay_start:
        return 1.0
    return 1 - (1 - s.min_lr_ratio) * (frac - decay_start) / max(s.decay_fraction, 1e-9)


def _constant(s: ScheduleConfig, frac: float) -> float:
    return 1.0


# schedule.kind -> the LR multiplier after warmup, given the decay progress frac in [0, 1].
SCHEDULES: dict[str, Callable[[ScheduleConfig, float], float]] = {
    "cosine": _cosine, "linear": _linear, "wsd": _wsd, "constant": _constant}


def lr_at(cfg, step: int) -> float:
    """The LR of `step` under a RunConfig `cfg` (its schedule, optim.lr, run.max_steps, growth)."""
    s, peak, total = cfg.schedule, cfg.optim.lr, cfg.run.max_steps
    if step < s.warmup_steps:
        lr = peak * (step + 1) / s.warmup_steps
    else:
        frac = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
        lr = peak * lookup(SCHEDULES, "schedule.kind", s.kind)(s, frac)
    return lr * _rewarm_factor(cfg, step)


def _rewarm_factor(cfg, step: int) -> float:
    """Linear ramp from 1/n to 1 over the `rewarm_steps` after the latest growth step."""
    n = cfg.growth.rewarm_steps
    grown = [st.at_step for st in cfg.growth.stages if st.at_step <= step]
    if not n or not grown or step - grown[-1] >= n:
        return 1.0
    return (step - grown[-1] + 1) / n
