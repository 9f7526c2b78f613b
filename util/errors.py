"""The errors a run reports as one line (`error: ...`, exit 1); the message names the file, flag or key."""


class DataError(RuntimeError):
    """A dataset folder or image file cannot be used; the message names it."""
