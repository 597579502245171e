"""User errors: printed as one line by `python -m training`, exit code 2, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, incompatible checkpoint); the message says what."""
