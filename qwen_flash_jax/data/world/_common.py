"""Shared helpers of the procedural world: rng plumbing, size checks, colour maths, background rows.

Randomness: every public sampler takes a ``numpy.random.Generator`` and draws ONE integer from it to seed a
stdlib ``random.Random`` (Mersenne Twister, stable across Python versions for integer seeds). All further
choices use that ``Random``: scalar draws from it are ~30x cheaper than from a numpy Generator, which is what
keeps sampling at thousands of samples per second. Layout randomness is a ``layout_seed`` stored in the spec,
so ``render`` is a pure function of (spec, size).
"""

from __future__ import annotations

import functools
import random
from typing import Sequence

import numpy as np

Colour = tuple[int, int, int]

MIN_SIZE = 16


def child_random(rng: np.random.Generator) -> random.Random:
    """A fast stdlib ``Random`` seeded from one draw of ``rng`` (so results are a function of ``rng``)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"expected a numpy.random.Generator, got {type(rng).__name__}")
    return random.Random(int(rng.integers(0, 2**63 - 1)))


def new_seed(r: random.Random) -> int:
    """A JSON-friendly non-negative seed (fits in int32)."""
    return r.getrandbits(31)


def check_size(size: int) -> int:
    """Images are square, ``size`` x ``size``; tested for 16..128 (multiples of 16), any int >= 16 works."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    size = int(size)
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    return size


def check_choice(kind: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


def scale_colour(colour: Sequence[float], factor: Sequence[float]) -> Colour:
    """Per-channel multiply (a tint / darkening), clipped to uint8 range."""
    return tuple(int(min(255, max(0, round(c * f)))) for c, f in zip(colour, factor))  # type: ignore[return-value]


def mix(a: Sequence[float], b: Sequence[float], t: float) -> Colour:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def _row_t(size: int) -> np.ndarray:
    """Row centres in [0, 1], shape (size, 1)."""
    return ((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None]


def gradient_rows(size: int, top: Colour, bottom: Colour, y0: float = 0.0, y1: float = 1.0) -> np.ndarray:
    """(size, 3) float32 row colours: ``top`` at relative height y0 ramping to ``bottom`` at y1."""
    t = np.clip((_row_t(size) - y0) / max(y1 - y0, 1e-6), 0.0, 1.0)
    top_a = np.asarray(top, np.float32)
    return top_a + (np.asarray(bottom, np.float32) - top_a) * t


def rows_to_image(rows: np.ndarray, size: int) -> np.ndarray:
    """Broadcast (size, 3) row colours to a contiguous (size, size, 3) uint8 image."""
    img = np.empty((size, size, 3), np.uint8)
    img[...] = np.clip(rows + 0.5, 0, 255).astype(np.uint8)[:, None, :]
    return img


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def join_clauses(r: random.Random, clauses: list[str]) -> str:
    """Join clauses with commas; the last one is attached with ', and' / ' and' / ',' (a rng picks)."""
    if len(clauses) == 1:
        return clauses[0]
    last_joiner = r.choice((", and ", " and ", ", "))
    return ", ".join(clauses[:-1]) + last_joiner + clauses[-1]


def bbox_union(*boxes: Sequence[float] | None) -> list[float] | None:
    boxes_ = [b for b in boxes if b is not None]
    if not boxes_:
        return None
    return [min(b[0] for b in boxes_), min(b[1] for b in boxes_), max(b[2] for b in boxes_), max(b[3] for b in boxes_)]


def pad_box(box: Sequence[float], margin: float = 0.03) -> list[float]:
    """Grow a relative [x0, y0, x1, y1] box by ``margin`` and clip it to the unit square."""
    return [max(0.0, box[0] - margin), max(0.0, box[1] - margin), min(1.0, box[2] + margin), min(1.0, box[3] + margin)]


def fill_rect(draw, x0: float, y0: float, x1: float, y1: float, **kwargs) -> None:
    """Draw the half-open pixel box [x0, x1) x [y0, y1) (rounded; at least one pixel) with PIL's inclusive API."""
    ix0, iy0 = int(round(x0)), int(round(y0))
    ix1, iy1 = max(ix0, int(round(x1)) - 1), max(iy0, int(round(y1)) - 1)
    draw.rectangle((ix0, iy0, ix1, iy1), **kwargs)


def sample_uniform_spec(r: random.Random, name: str, attributes: dict) -> dict:
    """A spec with every attribute drawn uniformly (in schema order) and a fresh layout seed."""
    spec: dict = {"category": name}
    for attr, values in attributes.items():
        spec[attr] = r.choice(values)
    spec["layout_seed"] = new_seed(r)
    return spec
