"""Errors whose message is meant for the user as is (the CLI prints it as one `error: ...` line)."""

import contextlib
import signal
import sys
import threading
from typing import NoReturn


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, malformed, or does not match the model it should hold."""


MAX_LISTED = 5  # how many offending names an error message lists


def some_of(names, limit: int = MAX_LISTED) -> str:
    """The first `limit` names, comma-separated, and how many more there are: for one-line error messages."""
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def fail(status: int, error) -> NoReturn:
    """Exit with `status` after printing `error` as exactly one `error: ...` line on stderr."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so that every temporary is removed on the way out


@contextlib.contextmanager
def command_line_errors(user_errors, io_errors=(OSError,), interrupted: str = "interrupted; nothing was written"):
    """The command lines' error contract around their work: a user's mistake (`user_errors`) is one `error: ...`
    line and exit status 2, another I/O error status 1, Ctrl-C or SIGTERM status 130 with `interrupted`."""
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread only
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        yield
    except user_errors as e:
        fail(2, e)
    except io_errors as e:
        fail(1, e)
    except KeyboardInterrupt:
        fail(130, interrupted)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
