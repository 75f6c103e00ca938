"""Deterministic global image transforms: styles (style-transfer edits) and degradations (enhancement edits).

A spec may carry ``"style": name`` and/or ``"degradation": {"type": ..., params}``; ``render`` applies the style
first, then the degradation. Degradation parameters are relative to a 32-px image (blur radius and pixel block
scale with ``size``); the noise pattern is fixed by the stored ``seed``.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageFilter

from ._common import check_choice

STYLES: tuple[str, ...] = ("grayscale", "sepia", "invert", "pastel", "cyanotype")
DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "pixelate", "dark")

_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)
_SEPIA = np.asarray([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
_CYAN_DARK = np.asarray([15, 35, 95], np.float32)
_CYAN_LIGHT = np.asarray([210, 230, 250], np.float32)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def apply_style(img: np.ndarray, style: str) -> np.ndarray:
    """A global palette / tone transform of a uint8 RGB image (pure, deterministic)."""
    check_choice("style", style, STYLES)
    if style == "invert":
        return 255 - img
    f = img.astype(np.float32)
    if style == "grayscale":
        y = f @ _LUMA
        return np.repeat(_to_u8(y)[..., None], 3, axis=-1)
    if style == "sepia":
        return _to_u8(f @ _SEPIA.T)
    if style == "pastel":
        y = (f @ _LUMA)[..., None]
        desat = y + (f - y) * 0.6
        return _to_u8(desat * 0.55 + 255 * 0.45)
    # cyanotype: blue monochrome
    t = ((f @ _LUMA) / 255.0)[..., None]
    return _to_u8(_CYAN_DARK + (_CYAN_LIGHT - _CYAN_DARK) * t)


def sample_degradation(r: random.Random, kind: str | None = None) -> dict:
    kind = kind if kind is not None else r.choice(DEGRADATIONS)
    check_choice("degradation", kind, DEGRADATIONS)
    if kind == "blur":
        return {"type": "blur", "radius": r.choice((1.0, 1.3, 1.6))}
    if kind == "noise":
        return {"type": "noise", "sigma": r.choice((20.0, 28.0, 36.0)), "seed": r.getrandbits(31)}
    if kind == "pixelate":
        return {"type": "pixelate", "factor": r.choice((2, 4))}
    return {"type": "dark", "gain": r.choice((0.25, 0.35, 0.45))}


def apply_degradation(img: np.ndarray, deg: dict) -> np.ndarray:
    kind = check_choice("degradation", deg["type"], DEGRADATIONS)
    size = img.shape[0]
    if kind == "blur":
        return np.array(Image.fromarray(img).filter(ImageFilter.GaussianBlur(deg["radius"] * size / 32)))
    if kind == "noise":
        noise = np.random.default_rng(int(deg["seed"])).normal(0.0, deg["sigma"], img.shape).astype(np.float32)
        return _to_u8(img.astype(np.float32) + noise)
    if kind == "pixelate":
        f = int(deg["factor"])
        h, w = img.shape[:2]
        small = Image.fromarray(img).resize((max(1, w // f), max(1, h // f)), Image.Resampling.BOX)
        return np.array(small.resize((w, h), Image.Resampling.NEAREST))
    return _to_u8(img.astype(np.float32) * float(deg["gain"]))
