"""The DeepSpeed trainer: config, data, distributed setup, loop, checkpoints, logging."""


def load_model(path, step=None):
    """Trained model from a run dir or checkpoint dir, in eval mode (see trainer.export.load)."""
    # why here: every `python -m trainer.x` imports this package first, and loading needs torch
    from trainer.export.load import load_model as _load

    return _load(path, step)
