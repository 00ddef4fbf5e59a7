"""Errors that reach the user as one line (``error: ...``, exit code 2), never a traceback."""


class UserError(Exception):
    """Bad input from the user: a file, a folder, a flag. The message names it and the problem."""
