"""Edit pairs for the six Editing-Bench categories, with ground-truth source/target specs.

Every pair is rendered from two specs that share ``layout_seed`` and differ exactly in the op's key:
an attribute (``op = {"attribute", "from", "to", "action"}``), ``"style"`` (``op = {"style": name}``, target =
style transform of the source) or ``"degradation"`` (``op = {"degradation": type}``, source = degraded clean
render, target = the clean render). ``spec["region"]`` is a relative [x0, y0, x1, y1] box outside which source
and target pixels are identical (local edits), or None for global edits.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from . import core, landscape, styles, text
from ._common import check_size, child_random

EDIT_CATEGORIES: tuple[str, ...] = ("scene", "enhance", "object", "text_edit", "identity", "style")

#: What each edit category can do: base T2I category and the edited attribute / style / degradation.
EDIT_OPS: dict[str, tuple[dict, ...]] = {
    "scene": (
        {"base": "landscape", "attribute": "time_of_day", "local": False},
        {"base": "landscape", "attribute": "season", "local": False},
        {"base": "portrait", "attribute": "background", "local": False},
    ),
    "enhance": tuple(
        {"base": c, "degradation": d, "local": False} for c in core.T2I_CATEGORIES for d in styles.DEGRADATIONS
    ),
    "object": (
        {"base": "landscape", "attribute": "celestial", "local": True},  # add / remove / replace sun or moon
        {"base": "landscape", "attribute": "water", "local": True},  # add / remove the lake
        {"base": "landscape", "attribute": "trees", "local": True},  # add / remove trees
        {"base": "text", "attribute": "sign_colour", "local": True},  # recolour the sign / poster
    ),
    "text_edit": ({"base": "text", "attribute": "word", "local": True},),
    "identity": (
        {"base": "portrait", "attribute": "hair_colour", "local": True},
        {"base": "portrait", "attribute": "hair_length", "local": True},
        {"base": "portrait", "attribute": "glasses", "local": True},
    ),
    "style": tuple({"base": c, "style": s, "local": False} for c in core.T2I_CATEGORIES for s in styles.STYLES),
}


@dataclasses.dataclass(frozen=True)
class EditSample:
    source: np.ndarray
    instruction: str
    target: np.ndarray
    category: str
    spec: dict  # {"category", "source", "target", "op", "preserve", "region"}


def _action(attribute: str, old: str, new: str) -> str:
    if attribute in ("celestial", "water", "glasses"):
        absent = {"celestial": "none", "water": "none", "glasses": "no"}[attribute]
        return "add" if old == absent else "remove" if new == absent else "replace"
    if attribute == "trees":
        return "add" if landscape.N_TREES[new] > landscape.N_TREES[old] else "remove"
    if attribute in ("sign_colour", "hair_colour", "background"):
        return "recolour"
    return "change"


def _target_values(attribute: str, src: dict) -> tuple[str, ...]:
    values = core.T2I_ATTRIBUTES[src["category"]][attribute]
    if attribute == "sign_colour":
        values = text.allowed_sign_colours(src["text_colour"])
    return tuple(v for v in values if v != src[attribute])


def _region(src: dict, tgt: dict, attribute: str) -> list[float] | None:
    if attribute == "trees":
        return landscape.trees_region(src, tgt)
    return core.category_module(src["category"]).region(src, attribute)


# ----------------------------------------------------------------------------------------------- instructions
_TOD = {"day": "daytime", "sunset": "sunset", "night": "night"}
_CEL = {"sun": "the sun", "moon": "the moon"}
_SUFFIXES = ("", "", " and keep everything else the same", ", leaving the rest unchanged")


def _instruction(r: random.Random, src: dict, op: dict) -> str:
    if "style" in op:
        return r.choice(_STYLE_TEXT[op["style"]])
    if "degradation" in op:
        return r.choice(_DEGRADATION_TEXT[op["degradation"]])
    a, old, new, act = op["attribute"], op["from"], op["to"], op["action"]
    if a == "time_of_day":
        opts = (
            f"Change the time of day to {_TOD[new]}",
            f"Make it {_TOD[new]}",
            f"Turn this {_TOD[old]} scene into a {_TOD[new]} scene",
            f"Show the same place at {_TOD[new]}",
        )
    elif a == "season":
        opts = (
            f"Change the season to {new}",
            f"Make it {new}",
            f"Turn this {old} landscape into a {new} landscape",
            f"Show the same place in {new}",
        )
    elif a == "background":
        opts = (
            f"Change the background to {new}",
            f"Make the background {new}",
            f"Replace the {old} background with a {new} one",
        )
    elif a == "celestial":
        if act == "add":
            opts = (f"Add {_CEL[new]} to the sky", f"Put {_CEL[new]} in the sky", f"Add {_CEL[new]}")
        elif act == "remove":
            opts = (f"Remove {_CEL[old]}", f"Take {_CEL[old]} out of the sky", f"Delete {_CEL[old]} from the sky")
        else:
            opts = (
                f"Replace {_CEL[old]} with {_CEL[new]}",
                f"Swap {_CEL[old]} for {_CEL[new]}",
                f"Turn {_CEL[old]} into {_CEL[new]}",
            )
    elif a == "water":
        opts = (
            ("Add a lake", "Put a small lake in the foreground", "Add a blue lake to the landscape")
            if act == "add"
            else ("Remove the lake", "Get rid of the lake", "Replace the lake with ground")
        )
    elif a == "trees":
        if new == "none":
            opts = ("Remove all the trees", "Cut down every tree", "Delete the trees")
        elif act == "add":
            opts = (
                ("Add a few trees", "Plant some trees", "Add three trees")
                if new == "few"
                else ("Add many more trees", "Fill the landscape with trees", "Plant lots of trees")
            )
        else:
            opts = ("Remove most of the trees", "Thin the trees out to just a few", "Keep only a few of the trees")
    elif a == "sign_colour":
        noun = src["surface"]
        opts = (
            f"Recolour the {noun} {new}",
            f"Make the {noun} {new}",
            f"Change the {noun} colour from {old} to {new}",
            f"Paint the {noun} {new}",
        )
    elif a == "word":
        noun = src["surface"]
        opts = (
            f'Change the text to "{new}"',
            f'Replace "{old}" with "{new}"',
            f'Make the {noun} say "{new}" instead',
            f'Edit the word "{old}" so it reads "{new}"',
        )
    elif a == "hair_colour":
        opts = (
            f"Dye the hair {new}",
            f"Change the hair colour to {new}",
            f"Make their hair {new}",
            f"Give the person {new} hair",
        )
    elif a == "hair_length":
        opts = (
            ("Make the hair long", "Give them long hair", "Let the hair grow long")
            if new == "long"
            else ("Cut the hair short", "Give them short hair", "Make the hair short")
        )
    elif a == "glasses":
        opts = (
            ("Add glasses", "Put glasses on the person", "Give them a pair of glasses")
            if new == "yes"
            else ("Remove the glasses", "Take off the glasses", "Remove their glasses")
        )
    else:  # pragma: no cover - EDIT_OPS and this table are kept in sync by the tests
        raise ValueError(f"no instruction template for attribute {a!r}")
    return r.choice(opts) + r.choice(_SUFFIXES)


_STYLE_TEXT = {
    "grayscale": ("Make it black and white", "Convert the image to grayscale", "Remove all the colour"),
    "sepia": ("Apply a sepia tone", "Make it look like an old sepia photo", "Give it a brownish vintage sepia look"),
    "invert": ("Invert the colours", "Turn it into a colour negative", "Make the image look like a photo negative"),
    "pastel": ("Make the colours soft pastel", "Give it a pale pastel palette", "Render it in washed-out pastel tones"),
    "cyanotype": ("Turn it into a blue cyanotype", "Make it monochrome blue", "Give it a cyanotype blueprint look"),
}
_DEGRADATION_TEXT = {
    "blur": ("Sharpen the photo", "Remove the blur", "Deblur this image", "Make the blurry image sharp"),
    "noise": ("Remove the noise", "Denoise the photo", "Clean up the grainy image", "Get rid of the grain"),
    "pixelate": ("Remove the pixelation", "Restore the detail in this pixelated image", "Fix the blocky pixels"),
    "dark": ("Brighten the underexposed photo", "Fix the exposure", "Make the dark image brighter"),
}


# ----------------------------------------------------------------------------------------------- sampling
def _sample_op(r: random.Random, category: str) -> dict:
    return r.choice(EDIT_OPS[category])


def make_edit(r: random.Random, category: str, template: dict, size: int) -> EditSample:
    """Build one pair for an ``EDIT_OPS`` entry, with all choices drawn from ``r``."""
    base = template["base"]
    mod = core.category_module(base)
    src = mod.sample_spec(r)
    attrs = list(core.T2I_ATTRIBUTES[base])
    if "style" in template:
        tgt = dict(src, style=template["style"])
        op, preserve, region = {"style": template["style"]}, attrs, None
    elif "degradation" in template:
        clean = src
        src = dict(clean, degradation=styles.sample_degradation(r, template["degradation"]))
        tgt = clean
        op, preserve, region = {"degradation": template["degradation"]}, attrs, None
    else:
        a = template["attribute"]
        new = r.choice(_target_values(a, src))
        tgt = dict(src, **{a: new})
        op = {"attribute": a, "from": src[a], "to": new, "action": _action(a, src[a], new)}
        preserve = [x for x in attrs if x != a]
        region = _region(src, tgt, a) if template["local"] else None
    source, target = core.render(src, size), core.render(tgt, size)
    spec = {"category": category, "source": src, "target": tgt, "op": op, "preserve": preserve, "region": region}
    return EditSample(source=source, instruction=_instruction(r, src, op), target=target, category=category, spec=spec)


def sample_edit(rng: np.random.Generator, category: str, size: int = 32) -> EditSample:
    if category not in EDIT_CATEGORIES:
        raise ValueError(f"unknown edit category {category!r}; valid: {', '.join(EDIT_CATEGORIES)}")
    size = check_size(size)
    r = child_random(rng)
    return make_edit(r, category, _sample_op(r, category), size)
