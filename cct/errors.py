"""User-facing errors: the CLI prints their message as one line and exits non-zero, no traceback."""


class CCTError(Exception):
    """A problem with the user's input or environment (data, files, checkpoints): exit code 1."""


class UsageError(CCTError):
    """A wrong command-line argument, recipe key or value: exit code 2."""
