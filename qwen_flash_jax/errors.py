"""Errors whose message is meant for the user as is (the CLI prints it as one `error: ...` line)."""


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, malformed, or does not match the model it should hold."""
