"""Edit layouts: the condition-image sizes an edit batch is laid out at, and which layout each record takes.

A batch has one static layout (jit shapes are static), yet real edit data mixes records of one, two or more
condition images of many aspect ratios. `data.edit_layouts` lists the layouts a run trains on, each a tuple of
(height, width) condition sizes in pixels, e.g. one square image, one landscape image, and a pair:

    data.edit_layouts = (((1024, 1024),), ((832, 1248),), ((1024, 1024), (832, 1248)))

Every record goes to the layout with its number of condition images whose aspect ratios are nearest its images'
(the sum over its images of |log(aspect / layout aspect)|; ties to the first listed), and is fitted to it
(`edit_images.fit`: centre crop to the aspect ratio, then the pipeline's resize). The sizes are read from the image
files' headers only where two layouts share an image count. Each layout has its own batch stream and its own
`TaskSpec` (`task_key`): the input pipeline mixes the streams batch by batch in proportion to the records each layout
holds, per category, so the categories keep their configured weights (`data.pipeline.task_stream`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from qwen_flash_jax.models.config import ConfigError

Layout = tuple[tuple[int, int], ...]


def from_config(data_config) -> tuple[Layout, ...]:
    """`data.edit_layouts` as layouts of ((height, width), ...) pixels; () when unset (one square source of
    `data.image_size`, the toy world's edits)."""
    value = data_config.get("edit_layouts", ()) or ()
    try:
        layouts = tuple(tuple((int(h), int(w)) for h, w in layout) for layout in value)
    except (TypeError, ValueError):
        raise ConfigError(
            "data.edit_layouts must be a list of layouts, each a list of (height, width) condition sizes, e.g. "
            f"(((1024, 1024),), ((1024, 1024), (832, 1248))); got {value!r}"
        ) from None
    if any(not layout for layout in layouts):
        raise ConfigError(f"data.edit_layouts has an empty layout: {value!r}")
    if any(h <= 0 or w <= 0 for layout in layouts for h, w in layout):
        raise ConfigError(f"data.edit_layouts must hold positive sizes, got {value!r}")
    if len(set(layouts)) != len(layouts):
        raise ConfigError(f"data.edit_layouts lists a layout twice: {value!r}")
    return layouts


def task_key(index: int) -> str:
    """The key of layout `index`'s batches and `TaskSpec`: the first layout is "edit" (as an edit without layouts)."""
    return "edit" if index == 0 else f"edit:{index}"


def _distance(sizes, layout: Layout) -> float:
    return sum(abs(math.log((w / h) / (lw / lh))) for (h, w), (lh, lw) in zip(sizes, layout))


def assign(sizes, layouts: tuple[Layout, ...]) -> int | None:
    """The layout a record of condition images of `sizes` ((height, width) each, in order) takes; None if no
    layout has that many images."""
    candidates = [i for i, layout in enumerate(layouts) if len(layout) == len(sizes)]
    if not candidates:
        return None
    return min(candidates, key=lambda i: (_distance(sizes, layouts[i]), i))


def needs_sizes(layouts: tuple[Layout, ...]) -> bool:
    """Whether a record's image sizes matter (two layouts of one image count), or its image count alone decides."""
    counts = [len(layout) for layout in layouts]
    return len(set(counts)) < len(counts)


def record_images(source, index: int, with_sizes: bool) -> list[tuple[int, int]]:
    """Record `index`'s condition images as (height, width), or as (0, 0) each when only their number matters.
    Reads the source's line and, for sizes, the image headers; no image is decoded."""
    paths = getattr(source, "condition_paths", None)
    if paths is None:
        raise ConfigError(
            f"data.edit_layouts needs edits from data.source='jsonl'; {type(source).__name__} cannot say which "
            "condition images its records hold"
        )
    return [image_size(p) if with_sizes else (0, 0) for p in paths(index)]


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file as it is read (EXIF orientation applied), from its header."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that turn the image by 90 degrees
            width, height = height, width
    return height, width


@dataclasses.dataclass(frozen=True)
class Split:
    """One category's record indices per layout, and the records no layout takes (their image counts)."""

    indices: tuple[np.ndarray, ...]
    unmatched: dict[int, int]  # image count -> records

    def counts(self) -> tuple[int, ...]:
        return tuple(len(i) for i in self.indices)


def split(source, layouts: tuple[Layout, ...]) -> Split:
    """The layout of each of `source`'s records, as index arrays per layout (ascending)."""
    with_sizes = needs_sizes(layouts)
    chosen = [[] for _ in layouts]
    unmatched: dict[int, int] = {}
    for i in range(len(source)):
        sizes = record_images(source, i, with_sizes)
        layout = assign(sizes, layouts) if with_sizes else _by_count(len(sizes), layouts)
        if layout is None:
            unmatched[len(sizes)] = unmatched.get(len(sizes), 0) + 1
        else:
            chosen[layout].append(i)
    return Split(tuple(np.asarray(c, np.int64) for c in chosen), unmatched)


def _by_count(count: int, layouts: tuple[Layout, ...]) -> int | None:
    return next((i for i, layout in enumerate(layouts) if len(layout) == count), None)


@dataclasses.dataclass(frozen=True)
class Subset:
    """The records of `source` at `indices`, as a source of its own (a layout's share of a category)."""

    source: Any
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(self.indices[int(index) % len(self.indices)])]
