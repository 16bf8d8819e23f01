"""Errors meant for the user: raised at a boundary (config, data, checkpoint), printed by
the entry point as one line with a non-zero exit, never as a traceback."""


class UserError(Exception):
    pass
