"""Progressive depth growth (DESIGN §6)."""
from __future__ import annotations


def maybe_grow(cfg, state, engine, dist, core, ckpt, metrics):
    """Return (engine, grew). Grows when a stage's at_step is reached."""
    due = [st for st in cfg.growth.stages if st.at_step == state.step and st.layers > state.n_layers]
    if not due:
        return engine, False
    raise NotImplementedError("growth.stages is not implemented yet")
