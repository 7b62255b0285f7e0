"""The one exception type the CLI turns into a clean one-line error."""


class DataPrepError(Exception):
    """A user-facing problem (bad input, bad argument, refused output); the message says
    where (file, line, key) and what to do about it."""
