"""Publishing a file or directory whole or not at all: write it under a temporary name beside its destination,
then rename it into place, so that a reader (or a concurrent run) never sees a half-written one.

Imports nothing from the package, so every layer can use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

IF_EXISTS = ("replace", "keep", "error")


def check_publishable(path: str | os.PathLike) -> None:
    """Raises OSError if `publish(path)` could not stage its entry (the parent cannot be made, or nothing can be
    written in it): a command checks its output location this way before its slow work. Creates the parent."""
    path = pathlib.Path(path)
    if path.parent.exists() and not path.parent.is_dir():  # mkdir would say only "File exists"
        raise NotADirectoryError(errno.ENOTDIR, f"{path.parent} is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


@contextlib.contextmanager
def publish(path: str | os.PathLike, if_exists: str = "replace") -> Iterator[pathlib.Path]:
    """Yields a path that does not exist yet, beside `path`; write the file or directory there. On a clean exit it
    is renamed to `path`; on an exception it is removed and `path` is left as it was.

    If `path` exists at the rename, `if_exists` decides:
      "replace": the new one takes its place (a file atomically; where a directory is involved, the old one is
                 first moved aside, then deleted);
      "keep":    the existing one is kept and the new one discarded (also when a concurrent writer's appears
                 between the check and the rename);
      "error":   FileExistsError.

    The temporary name is the hidden directory `.<name>.tmp-*` beside `path`, holding the new entry (and, while
    it is replaced, the old one); it is always removed.
    """
    if if_exists not in IF_EXISTS:
        raise ValueError(f"if_exists must be one of {IF_EXISTS}, got {if_exists!r}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        new = stage / path.name
        yield new
        if not os.path.lexists(new):
            raise FileNotFoundError(f"nothing was written to {new} to publish as {path}")
        aside = None
        if path.exists():
            if if_exists == "keep":
                return
            if if_exists == "error":
                raise FileExistsError(f"{path} already exists")
            # A directory cannot be renamed over a non-empty one, nor over a file: move the old one aside first.
            if path.is_dir() or new.is_dir():
                aside = stage / f"{path.name}.old"
                os.replace(path, aside)
        try:
            os.replace(new, path)
        except OSError:
            if aside is not None:
                os.replace(aside, path)  # put the old one back
            elif if_exists == "keep" and path.exists():  # a concurrent writer published it first
                return
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
