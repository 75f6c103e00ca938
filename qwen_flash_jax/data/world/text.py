"""Text category: one vocabulary word on a sign (plate on a post, outdoors) or a poster (paper on a wall).

Glyphs come from Pillow's default font (``ImageFont.load_default(size=9 * size / 32)``), drawn without
anti-aliasing at 32..63 px: at 32 px capitals are 6 px tall and the widest word ("OPEN") is 25 px wide.
At 16 px the text is a 3-px tall downsampled blob in the text colour: present, not legible.
Low-contrast text/sign colour pairs (``FORBIDDEN_PAIRS``, WCAG contrast < 2.3) are never sampled.
"""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ._common import capitalise, fill_rect, gradient_rows, mix, new_seed, pad_box, rows_to_image, with_article

NAME = "text"

VOCABULARY: tuple[str, ...] = (
    "CAT",
    "DOG",
    "SUN",
    "BOX",
    "BUS",
    "ZOO",
    "INN",
    "SKI",
    "STOP",
    "OPEN",
    "SALE",
    "EXIT",
    "CAFE",
    "SHOP",
    "TAXI",
    "FISH",
)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "word": VOCABULARY,
    "text_colour": ("black", "white", "red", "blue"),
    "sign_colour": ("yellow", "green", "white", "orange"),
    "surface": ("sign", "poster"),
    "placement": ("top", "middle", "bottom"),
}

TEXT_RGB = {"black": (15, 15, 15), "white": (250, 250, 250), "red": (210, 25, 25), "blue": (25, 55, 210)}
SIGN_RGB = {"yellow": (250, 210, 40), "green": (45, 145, 70), "white": (240, 240, 235), "orange": (245, 135, 30)}
FORBIDDEN_PAIRS: frozenset[tuple[str, str]] = frozenset(  # (text_colour, sign_colour) with too little contrast
    {("white", "white"), ("white", "yellow"), ("red", "green"), ("red", "orange"), ("blue", "green")}
)
PLACEMENT_Y = {"top": 0.25, "middle": 0.5, "bottom": 0.74}
SKIES = (((95, 150, 225), (185, 215, 245)), ((140, 165, 200), (205, 215, 230)), ((60, 110, 200), (150, 195, 240)))
GROUNDS = ((70, 120, 55), (105, 105, 110), (125, 100, 70))
WALLS = ((150, 75, 60), (165, 165, 160), (95, 70, 50), (70, 85, 110))
POST = (85, 85, 90)
BORDER = (35, 35, 35)
PLATE_W, PLATE_H = 0.9, 0.36  # relative plate size (fits a 4-letter word with margins)
TEXT_HALF_W, TEXT_HALF_H = 0.45, 0.18  # conservative relative half-extent of any word around its centre


def allowed_sign_colours(text_colour: str) -> tuple[str, ...]:
    return tuple(c for c in ATTRIBUTES["sign_colour"] if (text_colour, c) not in FORBIDDEN_PAIRS)


def allowed_text_colours(sign_colour: str) -> tuple[str, ...]:
    return tuple(c for c in ATTRIBUTES["text_colour"] if (c, sign_colour) not in FORBIDDEN_PAIRS)


class Layout(NamedTuple):
    cx: float  # horizontal centre of plate / poster
    sky: int
    ground: int
    horizon: float
    wall: int
    poster: tuple[float, float, float, float]  # x0, y0, x1, y1


@functools.lru_cache(maxsize=512)
def layout(seed: int) -> Layout:
    r = random.Random(seed)
    u = r.uniform
    poster = (u(0.03, 0.05), u(0.03, 0.06), u(0.95, 0.97), u(0.94, 0.97))
    return Layout(
        u(0.48, 0.52), r.randrange(len(SKIES)), r.randrange(len(GROUNDS)), u(0.8, 0.86), r.randrange(len(WALLS)), poster
    )


def sample_spec(r: random.Random) -> dict:
    word = r.choice(VOCABULARY)
    text_colour = r.choice(ATTRIBUTES["text_colour"])
    spec = {
        "category": NAME,
        "word": word,
        "text_colour": text_colour,
        "sign_colour": r.choice(allowed_sign_colours(text_colour)),
        "surface": r.choice(ATTRIBUTES["surface"]),
        "placement": r.choice(ATTRIBUTES["placement"]),
        "layout_seed": new_seed(r),
    }
    return spec


MAX_TEXT_W = 0.8  # the widest vocabulary word spans at most this fraction of the image width


def _raw_masks(font_size: float, size: int, aliased: bool) -> dict[str, np.ndarray]:
    font = ImageFont.load_default(size=font_size)
    out = {}
    for w in VOCABULARY:
        im = Image.new("L", (2 * size + 8, size + 8), 0)
        d = ImageDraw.Draw(im)
        d.fontmode = "1" if aliased else "L"
        d.text((2, 2), w, fill=255, font=font)
        out[w] = np.asarray(im, np.float32) / 255.0
    return out


@functools.lru_cache(maxsize=16)
def word_masks(size: int) -> dict[str, np.ndarray]:
    """Float32 coverage masks (h, w) in [0, 1] of every vocabulary word for an image of ``size`` pixels.

    Pillow's default FreeType font at ``9 * size / 32`` px (shrunk until the widest word fits ``MAX_TEXT_W``),
    drawn without anti-aliasing from 32 to 63 px (crisp 6-px capitals at 32) and anti-aliased above; below 32 px
    the 32-px masks are box-downsampled (contrast-boosted blobs, not legible letters at 16 px).
    Masks share the same rows (common baseline) and are cropped to their own ink columns.
    """
    if size < 32:  # box-downsample the crisp 32-px masks, then boost the faint coverage
        out = {}
        for w, m in word_masks(32).items():
            h, wd = m.shape
            im = Image.fromarray((m * 255).astype(np.uint8)).resize(
                (max(1, wd * size // 32), max(1, h * size // 32)), Image.Resampling.BOX
            )
            small = np.clip(np.asarray(im, np.float32) * (2.0 / 255.0), 0.0, 1.0)
            small.setflags(write=False)
            out[w] = small
        return out
    aliased = size < 64
    font_size = 9.0 * size / 32
    while True:
        raw = _raw_masks(font_size, size, aliased)
        widths = [int(np.ptp(np.flatnonzero(m.any(axis=0)))) + 1 for m in raw.values()]
        if max(widths) <= MAX_TEXT_W * size or font_size <= 3:
            break
        font_size -= 0.5
    rows = np.flatnonzero(np.any(np.stack([m.any(axis=1) for m in raw.values()]), axis=0))
    out = {}
    for w, m in raw.items():
        cols = np.flatnonzero(m.any(axis=0))
        crop = np.ascontiguousarray(m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
        crop.setflags(write=False)
        out[w] = crop
    return out


def word_mask(word: str, size: int) -> np.ndarray:
    return word_masks(size)[word]


def _boxes(spec: dict, lay: Layout):
    ty = PLACEMENT_Y[spec["placement"]]
    if spec["surface"] == "sign":
        surface = (lay.cx - PLATE_W / 2, ty - PLATE_H / 2, lay.cx + PLATE_W / 2, ty + PLATE_H / 2)
    else:
        surface = lay.poster
    return surface, (lay.cx, ty)


def render(spec: dict, size: int) -> np.ndarray:
    lay = layout(int(spec["layout_seed"]))
    s = size
    sign_rgb = SIGN_RGB[spec["sign_colour"]]
    (x0, y0, x1, y1), (tx, ty) = _boxes(spec, lay)
    lw = max(1, round(s / 32))
    if spec["surface"] == "sign":
        rows = gradient_rows(s, *SKIES[lay.sky], 0.0, lay.horizon)
        hp = int(round(lay.horizon * s))
        ground = GROUNDS[lay.ground]
        rows[hp:] = gradient_rows(s, ground, mix(ground, (0, 0, 0), 0.25), lay.horizon, 1.0)[hp:]
        im = Image.fromarray(rows_to_image(rows, s))
        d = ImageDraw.Draw(im)
        pw = max(2.0, 0.07 * s)
        fill_rect(d, s * lay.cx - pw / 2, s * y1, s * lay.cx + pw / 2, s, fill=POST)
        fill_rect(d, s * x0, s * y0, s * x1, s * y1, fill=sign_rgb, outline=BORDER, width=lw)
    else:
        wall = WALLS[lay.wall]
        im = Image.fromarray(rows_to_image(gradient_rows(s, wall, mix(wall, (0, 0, 0), 0.3)), s))
        d = ImageDraw.Draw(im)
        fill_rect(d, s * x0, s * y0, s * x1, s * y1, fill=sign_rgb, outline=mix(sign_rgb, (0, 0, 0), 0.45), width=lw)
    img = np.array(im)

    m = word_mask(spec["word"], s)
    h, w = m.shape
    px, py = int(round(tx * s - w / 2)), int(round(ty * s - h / 2))
    patch = img[py : py + h, px : px + w].astype(np.float32)
    colour = np.asarray(TEXT_RGB[spec["text_colour"]], np.float32)
    mm = m[..., None]
    img[py : py + h, px : px + w] = (patch + (colour - patch) * mm + 0.5).astype(np.uint8)
    return img


def region(spec: dict, attribute: str) -> list[float] | None:
    """Relative [x0, y0, x1, y1] box containing every pixel that ``attribute`` can affect (None = global)."""
    lay = layout(int(spec["layout_seed"]))
    surface, (tx, ty) = _boxes(spec, lay)
    if attribute in ("word", "text_colour"):
        return pad_box((tx - TEXT_HALF_W, ty - TEXT_HALF_H, tx + TEXT_HALF_W, ty + TEXT_HALF_H), 0.0)
    if attribute == "sign_colour":
        return [max(0.0, v - 0.02) if i < 2 else min(1.0, v + 0.02) for i, v in enumerate(surface)]
    return None


# ----------------------------------------------------------------------------------------------- captions
NOUNS = {
    "sign": ("sign", "signboard", "street sign", "road sign"),
    "poster": ("poster", "paper poster", "printed poster", "wall poster"),
}
WORD_CLAUSES = ('that reads "{w}"', 'with the word "{w}"', 'saying "{w}"', 'bearing the text "{w}"', 'that says "{w}"')
COLOUR_CLAUSES = ("in {c} letters", "written in {c}", "in {c} capital letters", "with {c} lettering")
PLACEMENT_PHRASES = {
    "top": ("at the top of the image", "near the top of the frame", "placed high in the picture"),
    "middle": ("in the middle of the image", "centred in the frame", "in the centre of the picture"),
    "bottom": ("at the bottom of the image", "near the bottom of the frame", "placed low in the picture"),
}
OPENERS = ("{np}", "A photo of {np}", "A picture of {np}", "A close-up of {np}")
PHRASES: dict[str, dict[str, tuple[str, ...]]] = {"placement": PLACEMENT_PHRASES}


def caption(spec: dict, r: random.Random) -> str:
    noun_phrase = with_article(f"{spec['sign_colour']} {r.choice(NOUNS[spec['surface']])}")
    word_clause = r.choice(WORD_CLAUSES).format(w=spec["word"])
    colour_clause = r.choice(COLOUR_CLAUSES).format(c=spec["text_colour"])
    place = r.choice(PLACEMENT_PHRASES[spec["placement"]])
    tail = [colour_clause, place]
    r.shuffle(tail)
    body = f"{noun_phrase} {word_clause} {tail[0]}, {tail[1]}"
    return capitalise(r.choice(OPENERS).format(np=body)) + "."
