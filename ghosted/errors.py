"""The one exception type users see: raised at the boundary with a fix in the message."""


class GhostedError(Exception):
    """A user-facing error: the message names the bad value and how to fix it."""
