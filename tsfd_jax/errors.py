"""Errors that reach the user as one line (``error: ...``, exit code 2), never a traceback."""


class UserError(Exception):
    """Bad input from the user: a file, a folder, a flag. The message names it and the problem."""


class ConfigError(UserError, ValueError):
    """A config field holding a value the code cannot use; the message names the field. A
    ValueError as well, for code that calls the library directly."""
