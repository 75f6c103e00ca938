"""Landscape category: sky gradient, sun/moon, mountains, ground, lake and trees.

Visual encoding (designed to be readable at 32x32):
  time_of_day  sky gradient (blue / purple-to-orange / near-black with stars) and a global tint on the ground;
  celestial    yellow (orange at sunset) disc = sun, pale crescent = moon, always above the mountain tops;
  mountains    one large grey-blue peak vs. a range of 4 overlapping peaks spanning the width;
  water        a blue ellipse in the foreground (icy light blue in winter);
  trees        0 / 3 / 8 trees; the 3 "few" trees are a subset of the 8 "many" ones (same layout);
  season       ground + canopy colours: green / ochre with orange canopies / white ground with dark conifers and
               snow caps on the mountains.
"""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ._common import (
    bbox_union,
    capitalise,
    fill_rect,
    gradient_rows,
    join_clauses,
    pad_box,
    rows_to_image,
    sample_uniform_spec,
    scale_colour,
    with_article,
)

NAME = "landscape"

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "time_of_day": ("day", "sunset", "night"),
    "celestial": ("sun", "moon", "none"),
    "mountains": ("none", "one", "range"),
    "water": ("none", "lake"),
    "trees": ("none", "few", "many"),
    "season": ("summer", "autumn", "winter"),
}

N_TREES = {"none": 0, "few": 3, "many": 8}

SKY = {  # (top, horizon)
    "day": ((55, 115, 225), (165, 210, 250)),
    "sunset": ((75, 40, 125), (255, 150, 60)),
    "night": ((4, 6, 28), (30, 40, 90)),
}
TINT = {"day": (1.0, 1.0, 1.0), "sunset": (1.0, 0.8, 0.7), "night": (0.55, 0.6, 0.75)}
GROUND = {  # (near horizon, foreground)
    "summer": ((85, 160, 60), (55, 130, 40)),
    "autumn": ((175, 140, 70), (145, 110, 50)),
    "winter": ((225, 230, 240), (250, 252, 255)),
}
CANOPY = {"summer": (20, 90, 30), "autumn": (215, 75, 20), "winter": (18, 70, 45)}
TRUNK = (85, 55, 30)
LAKE = {"summer": (35, 85, 195), "autumn": (35, 85, 195), "winter": (110, 165, 225)}
MOUNTAIN = ((105, 110, 140), (130, 135, 165))  # two shades so overlapping peaks stay separable
SNOW = (245, 248, 255)
SUN = {"day": (255, 225, 50), "sunset": (255, 100, 30), "night": (255, 225, 50)}
MOON = (235, 235, 210)
STAR = (235, 235, 200)
MIN_DISC_PX = 2.5  # sun/moon radius floor, so the crescent survives at 16 px


class Layout(NamedTuple):
    horizon: float
    celestial: tuple[float, float, float, float]  # cx, cy, r, crescent shadow offset (signed, relative)
    stars: tuple[tuple[float, float], ...]
    one_mountain: tuple[float, float, float]  # peak x, peak y, half base width
    mountain_range: tuple[tuple[float, float, float], ...]
    lake: tuple[float, float, float, float]  # cx, cy, rx, ry
    trees: tuple[tuple[float, float, float, float], ...]  # x, base y, height, width; first N_TREES["few"] = few


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _tree_box(x, base, h, w):
    return (x - w / 2, base - h, x + w / 2, base)


@functools.lru_cache(maxsize=512)
def layout(seed: int) -> Layout:
    """Positions and shapes, in relative [0, 1] coordinates, fixed by ``layout_seed``."""
    r = random.Random(seed)
    u = r.uniform
    horizon = u(0.56, 0.64)
    cel = (u(0.18, 0.82), u(0.11, 0.19), 0.1, 0.5 * 0.1 * r.choice((-1.0, 1.0)))
    stars = tuple((u(0.02, 0.98), u(0.02, horizon - 0.12)) for _ in range(7))
    one = (u(0.35, 0.65), u(0.31, 0.37), u(0.32, 0.42))
    n_peaks = 4
    rng_peaks = []
    for i in range(n_peaks):
        x = -0.05 + (i + 0.5) * 1.1 / n_peaks + u(-0.05, 0.05)
        rng_peaks.append((x, u(0.32, 0.44), u(0.17, 0.23)))
    lake = (u(0.4, 0.6), horizon + (1 - horizon) * u(0.5, 0.62), u(0.2, 0.26), u(0.065, 0.085))
    lake_box = pad_box((lake[0] - lake[2], lake[1] - lake[3], lake[0] + lake[2], lake[1] + lake[3]), 0.02)
    trees: list[tuple[float, float, float, float]] = []
    boxes: list[tuple[float, float, float, float]] = []
    for attempt in range(400):
        if len(trees) == N_TREES["many"]:
            break
        base = u(horizon + 0.06, 0.97)
        depth = (base - horizon) / (1 - horizon)  # 0 far .. 1 near
        h = (0.15 + 0.07 * depth) * u(0.92, 1.08)
        w = h * u(0.68, 0.78)
        x = u(0.05, 0.95)
        box = _tree_box(x, base, h, w)
        spacing = 0.6 if attempt < 300 else 0.2  # relax if the layout is crowded
        if _overlaps(box, lake_box):
            continue
        shrunk = (x - w * spacing / 2, base - h * spacing, x + w * spacing / 2, base)
        if any(_overlaps(shrunk, b) for b in boxes):
            continue
        trees.append((x, base, h, w))
        boxes.append(shrunk)
    while len(trees) < N_TREES["many"]:  # pathological fallback: far left/right columns (never hit lake)
        k = len(trees)
        trees.append((0.06 if k % 2 else 0.94, horizon + 0.1 + 0.03 * k, 0.16, 0.12))
    return Layout(horizon, cel, stars, one, tuple(rng_peaks), lake, tuple(trees))


def sample_spec(r: random.Random) -> dict:
    return sample_uniform_spec(r, NAME, ATTRIBUTES)


def _px(v: float, size: int) -> float:
    return v * size


def render(spec: dict, size: int) -> np.ndarray:
    lay = layout(int(spec["layout_seed"]))
    tod, season = spec["time_of_day"], spec["season"]
    tint = TINT[tod]
    hp = int(round(lay.horizon * size))
    sky = gradient_rows(size, *SKY[tod], 0.0, lay.horizon)
    g_near, g_far = (scale_colour(c, tint) for c in GROUND[season])
    ground = gradient_rows(size, g_near, g_far, lay.horizon, 1.0)
    rows = sky.copy()
    rows[hp:] = ground[hp:]
    img = rows_to_image(rows, size)

    if tod == "night":
        for sx, sy in lay.stars:
            yy, xx = int(sy * size), int(sx * size)
            if yy < hp:
                img[yy, xx] = STAR

    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    s = size

    cx, cy, cr, coff = lay.celestial
    # Snap the disc centre to the pixel grid so sun/moon have the same pixel footprint wherever they are.
    cxp, cyp, rp = round(cx * s), round(cy * s), max(cr * s, MIN_DISC_PX)
    off = rp * coff / cr
    disc = (cxp - rp, cyp - rp, cxp + rp - 1, cyp + rp - 1)
    if spec["celestial"] == "sun":
        d.ellipse(disc, fill=SUN[tod])
    elif spec["celestial"] == "moon":
        mask = Image.new("L", (s, s), 0)
        md = ImageDraw.Draw(mask)
        md.ellipse(disc, fill=255)
        lift = 0.3 * abs(off)
        md.ellipse((disc[0] + off, disc[1] - lift, disc[2] + off, disc[3] - lift), fill=0)
        im.paste(MOON, (0, 0, s, s), mask)

    if spec["mountains"] != "none":
        peaks = (lay.one_mountain,) if spec["mountains"] == "one" else lay.mountain_range
        base_y = hp
        for i, (px_, py_, hw) in enumerate(peaks):
            colour = scale_colour(MOUNTAIN[i % 2], tint)
            pts = [(s * (px_ - hw), base_y), (s * px_, s * py_), (s * (px_ + hw), base_y)]
            d.polygon(pts, fill=colour)
            if season == "winter":
                f = 0.38
                depth = base_y - s * py_
                d.polygon(
                    [
                        (s * (px_ - hw * f), s * py_ + depth * f),
                        (s * px_, s * py_),
                        (s * (px_ + hw * f), s * py_ + depth * f),
                    ],
                    fill=scale_colour(SNOW, tint),
                )

    if spec["water"] == "lake":
        lx, ly, lrx, lry = lay.lake
        lake_rgb = scale_colour(LAKE[season], tint)
        d.ellipse((s * (lx - lrx), s * (ly - lry), s * (lx + lrx), s * (ly + lry)), fill=lake_rgb)

    n = N_TREES[spec["trees"]]
    if n:
        canopy = scale_colour(CANOPY[season], tint)
        trunk = scale_colour(TRUNK, tint)
        tw = max(1.0, 0.04 * s)
        for x, base, h, w in sorted(lay.trees[:n], key=lambda t: t[1]):
            trunk_h = 0.3 * h
            fill_rect(d, s * x - tw / 2, s * (base - trunk_h), s * x + tw / 2, s * base, fill=trunk)
            if season == "winter":
                d.polygon(
                    [
                        (s * (x - w / 2), s * (base - trunk_h)),
                        (s * x, s * (base - h)),
                        (s * (x + w / 2), s * (base - trunk_h)),
                    ],
                    fill=canopy,
                )
            else:
                d.ellipse((s * (x - w / 2), s * (base - h), s * (x + w / 2), s * (base - trunk_h * 0.7)), fill=canopy)
    return np.array(im)


def region(spec: dict, attribute: str) -> list[float] | None:
    """Relative [x0, y0, x1, y1] box containing every pixel that ``attribute`` can affect (None = global)."""
    lay = layout(int(spec["layout_seed"]))
    if attribute == "celestial":
        cx, cy, cr, _ = lay.celestial
        cr = max(cr, MIN_DISC_PX / 16)
        return pad_box((cx - cr, cy - cr, cx + cr, cy + cr))
    if attribute == "water":
        lx, ly, lrx, lry = lay.lake
        return pad_box((lx - lrx, ly - lry, lx + lrx, ly + lry))
    if attribute == "trees":
        return pad_box(bbox_union(*(_tree_box(*t) for t in lay.trees)))
    return None


def trees_region(spec_a: dict, spec_b: dict) -> list[float] | None:
    """Tight region for a tree-count edit: only trees present in exactly one of the two specs change."""
    lay = layout(int(spec_a["layout_seed"]))
    lo, hi = sorted((N_TREES[spec_a["trees"]], N_TREES[spec_b["trees"]]))
    return pad_box(bbox_union(*(_tree_box(*t) for t in lay.trees[lo:hi])))


# ----------------------------------------------------------------------------------------------- captions
PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "time_of_day": {
        "day": ("during the day", "in daylight", "under a clear daytime sky", "in the daytime"),
        "sunset": ("at sunset", "at dusk", "under an orange sunset sky", "in the glow of sunset"),
        "night": ("at night", "at nighttime", "under a dark starry night sky", "in the middle of the night"),
    },
    "celestial": {
        "sun": ("with the sun in the sky", "with a bright sun", "with the sun shining", "with a round sun"),
        "moon": ("with a crescent moon", "with the moon in the sky", "with a pale moon", "with the moon showing"),
        "none": ("with no sun or moon", "with neither sun nor moon visible", "with no sun or moon in sight"),
    },
    "mountains": {
        "none": ("with no mountains", "with a flat horizon and no mountains", "without any mountains"),
        "one": ("with a single mountain", "with one mountain peak", "with a lone mountain"),
        "range": ("with a mountain range", "with a row of mountains", "with several mountain peaks"),
    },
    "water": {
        "none": ("with no lake", "without any water", "with no water"),
        "lake": ("with a lake", "with a small lake", "beside a calm lake", "with a blue lake"),
    },
    "trees": {
        "none": ("with no trees", "without any trees", "with not a single tree"),
        "few": ("with a few trees", "with some scattered trees", "with three trees"),
        "many": ("with many trees", "with lots of trees", "with a crowd of trees", "with plenty of trees"),
    },
    "season": {
        "summer": ("in summer", "in summertime", "on a green summer day"),
        "autumn": ("in autumn", "in the fall", "in autumn with orange leaves"),
        "winter": ("in winter", "in wintertime", "in snowy winter"),
    },
}
SUBJECTS = ("landscape", "natural landscape", "countryside scene", "outdoor scene", "nature scene", "rural view")
OPENERS = ("{a}", "A photo of {a}", "A painting of {a}", "An image of {a}", "A simple picture of {a}", "{a} shown")


def caption(spec: dict, r: random.Random) -> str:
    clauses = [r.choice(PHRASES[a][spec[a]]) for a in ATTRIBUTES]
    r.shuffle(clauses)
    opener = r.choice(OPENERS).format(a=with_article(r.choice(SUBJECTS)))
    return capitalise(f"{opener} {join_clauses(r, clauses)}.")
