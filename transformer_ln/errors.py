"""Errors that are the user's to fix: the command line prints their message, not a traceback."""


class UserError(Exception):
    """Bad input (a path, a value, a run directory); the message says what is wrong and what to do."""
