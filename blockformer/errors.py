"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""


class BlockformerError(Exception):
    """A problem with the user's input or environment, explained in one line."""
