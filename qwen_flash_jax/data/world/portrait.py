"""Portrait category: a simple head-and-shoulders figure on a plain background.

Visual encoding (readable at 32x32):
  skin         face/neck colour (light / medium / dark);
  hair_colour  colour of the fringe + sideburns (and of the long curtains) — black / brown / blonde / red;
  hair_length  short = fringe + sideburns only; long = curtains falling on both sides of the neck to the shoulders;
  eye_colour   a 2-px iris next to a white sclera pixel column in each eye (blue / brown / green);
  glasses      dark rings around both eyes joined by a bridge;
  background   flat colour with a slight vertical shade (blue / green / grey / pink).
Layout (head position/size, shirt colour, eye spacing) comes from ``layout_seed``.
"""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ._common import (
    capitalise,
    fill_rect,
    gradient_rows,
    join_clauses,
    mix,
    pad_box,
    rows_to_image,
    sample_uniform_spec,
)

NAME = "portrait"

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "skin": ("light", "medium", "dark"),
    "hair_colour": ("black", "brown", "blonde", "red"),
    "hair_length": ("short", "long"),
    "eye_colour": ("blue", "brown", "green"),
    "glasses": ("no", "yes"),
    "background": ("blue", "green", "grey", "pink"),
}

SKIN = {"light": (250, 214, 182), "medium": (205, 148, 100), "dark": (110, 70, 48)}
HAIR = {"black": (22, 20, 24), "brown": (125, 68, 22), "blonde": (245, 212, 105), "red": (210, 55, 25)}
EYE = {"blue": (35, 110, 255), "brown": (95, 50, 15), "green": (25, 175, 60)}
SCLERA = (250, 250, 250)
BACKGROUND = {"blue": (85, 145, 235), "green": (95, 185, 105), "grey": (150, 150, 155), "pink": (245, 160, 205)}
SHIRTS = ((55, 55, 65), (235, 235, 235), (130, 30, 45), (30, 40, 95), (200, 160, 40), (120, 80, 160))
GLASSES = (20, 20, 25)
MOUTH = (165, 35, 50)


class Layout(NamedTuple):
    head: tuple[float, float, float, float]  # cx, cy, rx, ry
    shirt: int
    eye_dx: float  # half distance between eye centres
    eye_dy: float  # eye centre offset below head centre
    fringe: float  # fringe line, as fraction of ry above the head centre
    mouth_w: float


@functools.lru_cache(maxsize=512)
def layout(seed: int) -> Layout:
    r = random.Random(seed)
    u = r.uniform
    head = (u(0.46, 0.54), u(0.44, 0.48), u(0.22, 0.245), u(0.28, 0.3))
    return Layout(head, r.randrange(len(SHIRTS)), u(0.105, 0.12), u(0.0, 0.03), u(0.32, 0.42), u(0.05, 0.075))


def sample_spec(r: random.Random) -> dict:
    return sample_uniform_spec(r, NAME, ATTRIBUTES)


def _geometry(lay: Layout):
    cx, cy, rx, ry = lay.head
    fringe_y = cy - lay.fringe * ry
    top = cy - ry - 0.035
    fringe_box = (cx - rx - 0.025, top, cx + rx + 0.025, 2 * fringe_y - top)  # upper half of this = fringe
    side_w = 0.05
    sideburns = (
        (cx - rx - 0.01, fringe_y - 0.02, cx - rx + side_w, cy + 0.05),
        (cx + rx - side_w, fringe_y - 0.02, cx + rx + 0.01, cy + 0.05),
    )
    curtains = (cx - rx - 0.05, cy - 0.5 * ry, cx + rx + 0.05, cy + ry + 0.16)
    ey = cy + lay.eye_dy
    eyes = ((cx - lay.eye_dx, ey), (cx + lay.eye_dx, ey))
    return fringe_box, sideburns, curtains, eyes


def render(spec: dict, size: int) -> np.ndarray:
    lay = layout(int(spec["layout_seed"]))
    s = size
    cx, cy, rx, ry = lay.head
    bg = BACKGROUND[spec["background"]]
    img = rows_to_image(gradient_rows(s, mix(bg, (255, 255, 255), 0.15), mix(bg, (0, 0, 0), 0.12)), s)
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    skin, hair = SKIN[spec["skin"]], HAIR[spec["hair_colour"]]
    fringe_box, sideburns, curtains, eyes = _geometry(lay)

    d.ellipse((s * (cx - 0.42), s * (cy + ry + 0.07), s * (cx + 0.42), s * 1.35), fill=SHIRTS[lay.shirt])
    if spec["hair_length"] == "long":
        x0, y0, x1, y1 = curtains
        d.rounded_rectangle((s * x0, s * y0, s * x1, s * y1), radius=max(1.0, 0.08 * s), fill=hair)
    nw = 0.09
    fill_rect(d, s * (cx - nw), s * cy, s * (cx + nw), s * (cy + ry + 0.1), fill=skin)
    d.ellipse((s * (cx - rx), s * (cy - ry), s * (cx + rx), s * (cy + ry)), fill=skin)
    d.chord(tuple(s * v for v in fringe_box), 180, 360, fill=hair)
    for box in sideburns:
        fill_rect(d, *(s * v for v in box), fill=hair)

    lw = max(1, round(s / 32))
    if spec["glasses"] == "yes":
        rg = 0.085
        for ex, ey in eyes:
            d.ellipse((s * (ex - rg), s * (ey - rg), s * (ex + rg), s * (ey + rg)), outline=GLASSES, width=lw)
        (lx, ly), (rx_, _) = eyes
        d.line((s * (lx + rg), s * ly, s * (rx_ - rg), s * ly), fill=GLASSES, width=lw)

    # Eyes after the glasses (at 16 px the rings would cover them); snap to the pixel grid so the iris is solid.
    ew, eh = max(2, round(0.1 * s)), max(1, round(0.06 * s))
    iw = max(1, round(0.065 * s))
    for k, (ex, ey) in enumerate(eyes):
        x0, y0 = int(round(s * ex - ew / 2)), int(round(s * ey - eh / 2))
        d.rectangle((x0, y0, x0 + ew - 1, y0 + eh - 1), fill=SCLERA)
        ix0 = x0 + ew - iw if k == 0 else x0  # iris on the inner side (looking at the viewer)
        d.rectangle((ix0, y0, ix0 + iw - 1, y0 + eh - 1), fill=EYE[spec["eye_colour"]])

    my = cy + 0.6 * ry
    d.line((s * (cx - lay.mouth_w), s * my, s * (cx + lay.mouth_w), s * my), fill=MOUTH, width=lw)
    return np.array(im)


def region(spec: dict, attribute: str) -> list[float] | None:
    """Relative [x0, y0, x1, y1] box containing every pixel that ``attribute`` can affect (None = global)."""
    lay = layout(int(spec["layout_seed"]))
    fringe_box, sideburns, curtains, eyes = _geometry(lay)
    if attribute == "glasses":
        (lx, ly), (rx_, _) = eyes
        return pad_box((lx - 0.085, ly - 0.085, rx_ + 0.085, ly + 0.085))
    if attribute == "hair_length":
        return pad_box(curtains)
    if attribute == "hair_colour":
        top = fringe_box[1]
        return pad_box((min(curtains[0], fringe_box[0]), top, max(curtains[2], fringe_box[2]), curtains[3]))
    return None


# ----------------------------------------------------------------------------------------------- captions
PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "skin": {
        "light": ("with light skin", "with fair skin", "with a pale complexion"),
        "medium": ("with medium skin", "with tan skin", "with an olive complexion"),
        "dark": ("with dark skin", "with a dark complexion", "with deep dark skin"),
    },
    "eye_colour": {
        c: (f"with {c} eyes", f"with bright {c} eyes", f"whose eyes are {c}") for c in ("blue", "brown", "green")
    },
    "glasses": {
        "yes": ("who wears glasses", "wearing dark-rimmed glasses", "with a pair of glasses"),
        "no": ("without glasses", "not wearing glasses", "with no glasses"),
    },
    "background": {
        c: (f"against a {c} background", f"in front of a plain {c} backdrop", f"on a {c} background")
        for c in ("blue", "green", "grey", "pink")
    },
}
HAIR_WORDS = {
    "black": ("black", "jet black"),
    "brown": ("brown", "chestnut brown"),
    "blonde": ("blonde", "golden blonde"),
    "red": ("red", "copper red"),
}
LENGTH_WORDS = {"short": ("short", "short cropped"), "long": ("long", "long flowing")}
HAIR_TEMPLATES = ("with {l} {c} hair", "with {c} hair that is {l}", "whose {c} hair is {l}")
OPENERS = (
    "A portrait of a person",
    "A headshot of someone",
    "A close-up portrait of a person",
    "A photo of a person's face",
    "A simple portrait of a person",
    "A person",
)


def caption(spec: dict, r: random.Random) -> str:
    tpl = r.choice(HAIR_TEMPLATES)
    lw = r.choice(LENGTH_WORDS[spec["hair_length"]]) if tpl.startswith("with {l}") else spec["hair_length"]
    clauses = [tpl.format(l=lw, c=r.choice(HAIR_WORDS[spec["hair_colour"]]))]
    clauses += [r.choice(PHRASES[a][spec[a]]) for a in ("skin", "eye_colour", "glasses", "background")]
    r.shuffle(clauses)
    return capitalise(f"{r.choice(OPENERS)} {join_clauses(r, clauses)}.")
