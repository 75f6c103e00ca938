"""Contact sheets: tile small images into one upscaled grid for eyeballing (and reuse by other tools)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .core import T2I_CATEGORIES, sample_t2i
from .edits import EDIT_CATEGORIES, sample_edit


def _rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.dtype != np.uint8:
        gain = 255.0 if img.dtype.kind == "f" and img.max() <= 1.0 else 1.0  # [0, 1] floats -> [0, 255]
        img = np.clip(np.asarray(img, np.float32) * gain, 0, 255).astype(np.uint8)
    return img


def side_by_side(*images: np.ndarray, gap: int = 1, fill: int = 255) -> np.ndarray:
    """Concatenate images of equal height horizontally with ``gap`` columns of ``fill`` between them."""
    parts: list[np.ndarray] = []
    for i, img in enumerate(images):
        img = _rgb(img)
        if i and gap:
            parts.append(np.full((img.shape[0], gap, 3), fill, np.uint8))
        parts.append(img)
    return np.concatenate(parts, axis=1)


def contact_sheet(images: Sequence[np.ndarray], cols: int, scale: int = 4, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Grid of images (H, W, 3) uint8 — sizes may differ; each sits top-left in a cell of the largest size —
    upscaled ``scale``x with nearest neighbour, ``pad`` (pre-scale) pixels of ``fill`` around every cell."""
    if cols < 1 or scale < 1 or not len(images):
        raise ValueError("need cols >= 1, scale >= 1 and at least one image")
    imgs = [_rgb(im) for im in images]
    ch, cw = max(im.shape[0] for im in imgs), max(im.shape[1] for im in imgs)
    rows = -(-len(imgs) // cols)
    sheet = np.full((pad + rows * (ch + pad), pad + cols * (cw + pad), 3), fill, np.uint8)
    for k, im in enumerate(imgs):
        y, x = pad + (k // cols) * (ch + pad), pad + (k % cols) * (cw + pad)
        sheet[y : y + im.shape[0], x : x + im.shape[1]] = im
    return np.repeat(np.repeat(sheet, scale, axis=0), scale, axis=1)


def demo_sheet(
    seed: int = 0, size: int = 32, t2i_per_category: int = 6, edits_per_category: int = 4, scale: int = 4
) -> np.ndarray:
    """One row per T2I category (samples), then one row per edit category (source|target pairs)."""
    rng = np.random.default_rng(seed)
    strips = []
    for cat in T2I_CATEGORIES:
        strips.append(side_by_side(*(sample_t2i(rng, cat, size).image for _ in range(t2i_per_category)), gap=2))
    for cat in EDIT_CATEGORIES:
        pairs = []
        for _ in range(edits_per_category):
            e = sample_edit(rng, cat, size)
            pairs.append(side_by_side(e.source, e.target, gap=1, fill=0))
        strips.append(side_by_side(*pairs, gap=4))
    return contact_sheet(strips, cols=1, scale=scale, pad=3)


def save_png(img: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(_rgb(img)).save(path)
