"""Exceptions shared by all modules."""


class UserError(Exception):
    """An error caused by the user's input; the CLI prints it as one line without a traceback."""


class InputFileNotFoundError(UserError, FileNotFoundError):
    """An input file the user named does not exist.

    Both a UserError (one-line CLI message) and a FileNotFoundError, so code that catches either
    (``except FileNotFoundError``, ``except OSError``, ``except UserError``) handles it.
    """


class DataFormatError(UserError, ValueError):
    """Bad input data; the message names the file, the record and the problem."""
