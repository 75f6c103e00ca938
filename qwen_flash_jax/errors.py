"""Errors whose message is meant for the user as is (the CLI prints it as one `error: ...` line)."""


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, malformed, or does not match the model it should hold."""


MAX_LISTED = 5  # how many offending names an error message lists


def some_of(names, limit: int = MAX_LISTED) -> str:
    """The first `limit` names, comma-separated, and how many more there are: for one-line error messages."""
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
