"""Errors meant for the user: raised at a boundary (config, data, checkpoint), printed by
the entry point as one line with a non-zero exit, never as a traceback. They live here, at
the bottom of the import graph, so any module can raise them without importing the module
that owns the boundary."""


class UserError(Exception):
    pass


class ConfigError(UserError, ValueError):
    """A user-facing, one-line configuration error."""


class CheckpointError(UserError):
    """A user-facing, one-line checkpoint problem."""
