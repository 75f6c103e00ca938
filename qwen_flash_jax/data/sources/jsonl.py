"""Real data as JSONL files: T2I prompts (optionally with images) and edit pairs pointing to image files.

T2I line:  {"prompt": str, "category": one of T2I_CATEGORIES, "image": optional path, "id": optional}
Edit line: {"instruction": str, "category": one of EDIT_CATEGORIES, "source": path or [path, ...],
            "target": optional path, "id": optional}
A list of sources is an edit's condition images in order (the last one sets the output's aspect ratio); its
record's "source" is then a list of arrays.

Relative paths resolve against ``image_root`` or else the JSONL file's folder. Opening parses and validates every
line (JSON, fields, category, image files exist) but keeps only each good line's byte offset, so a source of a
million lines is a few MB and pickles cheaply; ``__getitem__`` re-reads its line and decodes the images (PIL, RGB,
EXIF orientation applied, resized to (size, size) with Lanczos; non-square images are stretched; ``size=None``
keeps every image's own size, for edits laid out by `data.edit_images`). A record's id is
its "id" field, else ``<file name>:<line number>``.

Bad records: ``on_bad_record="error"`` raises ``DataError("<file>:<line>: <problem>")`` for the first one;
``"skip"`` drops them at open time, counts them in ``source.skipped`` (reason -> count, shared by all categories of
one file) and logs one summary line. An image that exists but cannot be decoded is only found on access: "error"
raises a DataError naming the record; "skip" counts it (once per process) and returns the next good record,
wrapping around, so the substitution is deterministic.
"""

from __future__ import annotations

import array
import collections
import json
import logging
import os
import threading
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from qwen_flash_jax.data.world import EDIT_CATEGORIES, T2I_CATEGORIES

from ._common import DataError, TaskSources, check_index, check_int, check_on_bad_record, one_line

log = logging.getLogger(__name__)

RESAMPLE = Image.Resampling.LANCZOS


class _Bad(Exception):
    """A record problem found while opening: reason (the key in ``skipped``) and a message for the user."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_image(path: str, size: int | None) -> np.ndarray:
    """(size, size, 3) uint8 RGB from an image file (its own size if `size` is None); raises whatever PIL raises
    for an unreadable one."""
    with Image.open(path) as im:
        if size is None:
            return np.array(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)
        if im.format == "JPEG":
            im.draft("RGB", (2 * size, 2 * size))  # DCT-domain downscale first: much faster for big JPEGs
        im = ImageOps.exif_transpose(im).convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), RESAMPLE)
        return np.array(im, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ line schema
class _Schema:
    """Which fields a task's lines have; `parse` validates a decoded line into (category, text, id, image paths)."""

    def __init__(
        self,
        task: str,
        text: str,
        record_text: str,
        images: tuple[tuple[str, bool], ...],
        categories: tuple[str, ...],
        lists: tuple[str, ...] = (),
    ):
        self.task, self.text, self.record_text = task, text, record_text  # JSONL field, record key
        self.images, self.categories = images, categories  # images: (field, required)
        self.lists = lists  # image fields that may hold a non-empty list of paths

    def _path(self, field: str, value: Any, base: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Bad("invalid_field", f"field {field!r} must be a non-empty path string, got {value!r}")
        return os.path.normpath(os.path.join(base, os.path.expanduser(value.strip())))

    def parse(self, obj: Any, base: str, default_id: str) -> tuple[str, str, str, dict[str, Any]]:
        if not isinstance(obj, dict):
            raise _Bad("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
        required = [self.text, "category"] + [f for f, req in self.images if req]
        missing = [f for f in required if f not in obj or obj[f] is None]
        if missing:
            raise _Bad(
                "missing_field", f"missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}"
            )
        for field in (self.text, "category"):
            if not isinstance(obj[field], str):
                raise _Bad("invalid_field", f"field {field!r} must be a string, got {type(obj[field]).__name__}")
        text = obj[self.text].strip()
        if not text:
            raise _Bad(f"empty_{self.text}", f"empty {self.text}")
        category = obj["category"]
        if category not in self.categories:
            raise _Bad(
                "unknown_category",
                f"unknown category {category!r}; valid {self.task} categories: {', '.join(self.categories)}",
            )
        rid = obj.get("id", default_id)
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            raise _Bad("invalid_field", f"field 'id' must be a non-empty string or an integer, got {rid!r}")
        paths: dict[str, Any] = {}
        for field, _ in self.images:
            value = obj.get(field)
            if value is None:
                paths[field] = None
            elif field in self.lists and isinstance(value, list):
                if not value:
                    raise _Bad("invalid_field", f"field {field!r} must be a path or a non-empty list of paths")
                paths[field] = [self._path(field, v, base) for v in value]
            else:
                paths[field] = self._path(field, value, base)
        return category, text, str(rid), paths


T2I = _Schema("t2i", "prompt", "caption", (("image", False),), T2I_CATEGORIES)
EDIT = _Schema(
    "edit", "instruction", "instruction", (("source", True), ("target", False)), EDIT_CATEGORIES, lists=("source",)
)


# ------------------------------------------------------------------------------------------------- the source
class JsonlSource:
    """The good lines of one category of a JSONL file; records are built (images decoded) on access."""

    def __init__(
        self,
        schema: _Schema,
        path: str,
        base: str,
        category: str,
        offsets: np.ndarray,
        lengths: np.ndarray,
        line_numbers: np.ndarray,
        size: int,
        on_bad_record: str,
        stamp: tuple[int, int],
        skipped: dict[str, int],
    ):
        self.schema, self.path, self.base, self.category = schema, path, base, category
        self._offsets, self._lengths, self._line_numbers = offsets, lengths, line_numbers
        self.size, self.on_bad_record, self._stamp = size, on_bad_record, stamp
        self.skipped = skipped  # reason -> count; open-time counts are per file, so all categories share this dict
        self._setup()

    def _setup(self) -> None:
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._unreadable: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_lock", "_unreadable")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self._offsets)

    def __repr__(self) -> str:
        return f"JsonlSource({self.schema.task}/{self.category}, {len(self)} records from {self.path})"

    def _file(self) -> int:
        with self._lock:
            if self._fd is None:
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except OSError as e:
                    raise DataError(f"{self.path}: cannot open: {one_line(e.strerror or e)}") from None
                st = os.fstat(fd)
                if (st.st_size, st.st_mtime_ns) != self._stamp:
                    os.close(fd)
                    raise DataError(f"{self.path}: file changed since the sources were opened; open them again")
                self._fd = fd
            return self._fd

    def _build(self, i: int) -> dict[str, Any]:
        line = os.pread(self._file(), int(self._lengths[i]), int(self._offsets[i]))
        lineno = int(self._line_numbers[i])
        default_id = f"{os.path.basename(self.path)}:{lineno}"
        category, text, rid, paths = self.schema.parse(json.loads(line), self.base, default_id)
        images = {}
        for field, value in paths.items():
            images[field] = None
            for path in [value] if isinstance(value, str) else value or []:
                try:
                    image = load_image(path, self.size)
                except Exception as e:  # noqa: BLE001 - any decoding failure makes the record unusable
                    raise _Bad(
                        "unreadable_image",
                        f"{self.path}:{lineno}: record {rid!r}: cannot read {field} image "
                        f"{path!r}: {one_line(e) or type(e).__name__}",
                    ) from None
                images[field] = image if isinstance(value, str) else [*(images[field] or []), image]
        return {"id": rid, "category": category, self.schema.record_text: text, **images, "spec": ""}

    def condition_paths(self, index: int) -> list[str]:
        """An edit record's condition image paths, in order, from its line alone (no image is read): what
        `data.edit_layouts` assigns a layout by."""
        i = check_index(index, len(self))
        line = os.pread(self._file(), int(self._lengths[i]), int(self._offsets[i]))
        _, _, _, paths = self.schema.parse(json.loads(line), self.base, f"line {int(self._line_numbers[i])}")
        value = paths.get("source")
        return [value] if isinstance(value, str) else list(value or [])

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        i = check_index(index, n)
        for k in range(n):
            j = (i + k) % n
            if j in self._unreadable:
                continue
            try:
                record = self._build(j)
            except _Bad as bad:
                if self.on_bad_record == "error":
                    raise DataError(str(bad)) from None
                self._unreadable.add(j)
                self.skipped[bad.reason] = self.skipped.get(bad.reason, 0) + 1
                log.warning("skipping: %s", bad)
                continue
            return record
        raise DataError(f"{self.path}: no {self.schema.task} record of category {self.category!r} has readable images")


# ---------------------------------------------------------------------------------------------------- opening
def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise _Bad("invalid_json", f"invalid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise _Bad("invalid_json", f"invalid JSON (not UTF-8: {e.reason} at byte {e.start})") from None


def _open(
    schema: _Schema, path: str | os.PathLike, size: int, on_bad_record: str, image_root: str | os.PathLike | None
) -> TaskSources:
    size = None if size is None else check_int("size", size, 1)
    on_bad_record = check_on_bad_record(on_bad_record)
    path = os.path.abspath(os.fspath(path))
    base = os.path.dirname(path) if image_root is None else os.path.abspath(os.fspath(image_root))
    if image_root is not None and not os.path.isdir(base):
        raise DataError(f"{path}: image_root {base!r} is not a folder")
    skipped: dict[str, int] = {}
    first_skip = ""
    # Compact growing int arrays (not lists of Python ints): a million lines cost ~16 MB, also while opening.
    per_category: dict[str, tuple[array.array, ...]] = collections.defaultdict(
        lambda: (array.array("q"), array.array("i"), array.array("i"))
    )
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {one_line(e.strerror or e)}") from None
    with f:
        stat = os.fstat(f.fileno())
        offset, name = 0, os.path.basename(path)
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                obj = _decode(raw)
                category, _, rid, paths = schema.parse(obj, base, f"{name}:{lineno}")
                for field, value in paths.items():
                    for p in [value] if isinstance(value, str) else value or []:
                        if not os.path.isfile(p):
                            raise _Bad("missing_file", f"record {rid!r}: {field} image file not found: {p!r}")
            except _Bad as bad:
                if on_bad_record == "error":
                    raise DataError(f"{path}:{lineno}: {bad}") from None
                skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
                first_skip = first_skip or f"line {lineno}: {bad}"
                continue
            offsets, lengths, lines = per_category[category]
            offsets.append(start)
            lengths.append(len(raw))
            lines.append(lineno)
    if skipped:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
        log.warning("%s: skipped %d bad records (%s); first at %s", path, sum(skipped.values()), counts, first_skip)
    if not per_category:
        extra = f" (skipped {sum(skipped.values())} bad ones; first at {first_skip})" if skipped else ""
        raise DataError(f"{path}: no usable {schema.task} records{extra}")
    stamp = (stat.st_size, stat.st_mtime_ns)
    return {
        schema.task: {
            c: JsonlSource(
                schema,
                path,
                base,
                c,
                *(np.frombuffer(a, a.typecode).copy() for a in per_category[c]),
                size,
                on_bad_record,
                stamp,
                skipped,
            )
            for c in schema.categories
            if c in per_category
        }
    }


def jsonl_t2i_sources(
    path: str | os.PathLike,
    *,
    size: int | None = 32,
    on_bad_record: str = "error",
    image_root: str | os.PathLike | None = None,
) -> TaskSources:
    """{"t2i": {category: source}} from a JSONL of prompts; records without an image have ``image=None``."""
    return _open(T2I, path, size, on_bad_record, image_root)


def jsonl_edit_sources(
    path: str | os.PathLike,
    *,
    size: int | None = 32,
    on_bad_record: str = "error",
    image_root: str | os.PathLike | None = None,
) -> TaskSources:
    """{"edit": {category: source}} from a JSONL of edit pairs; records without a target have ``target=None``;
    ``size=None`` keeps the images' own sizes."""
    return _open(EDIT, path, size, on_bad_record, image_root)
