"""T2I side of the world: category registry, schema, spec sampling, rendering, captions and labels."""

from __future__ import annotations

import dataclasses
from types import ModuleType

import numpy as np

from . import landscape, portrait, styles, text
from ._common import check_size, child_random

T2I_CATEGORIES: tuple[str, ...] = ("landscape", "portrait", "text")
_MODULES: dict[str, ModuleType] = {"landscape": landscape, "portrait": portrait, "text": text}

#: category -> attribute -> allowed values; the position of a value is its class index.
T2I_ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {c: dict(_MODULES[c].ATTRIBUTES) for c in T2I_CATEGORIES}
_INDEX = {
    c: {a: {v: i for i, v in enumerate(vals)} for a, vals in attrs.items()} for c, attrs in T2I_ATTRIBUTES.items()
}


@dataclasses.dataclass(frozen=True)
class T2ISample:
    image: np.ndarray  # (size, size, 3) uint8
    caption: str
    category: str
    spec: dict  # ground truth: {"category", <attributes>..., "layout_seed"}


def category_module(category: str) -> ModuleType:
    try:
        return _MODULES[category]
    except (KeyError, TypeError):
        raise ValueError(f"unknown T2I category {category!r}; valid: {', '.join(T2I_CATEGORIES)}") from None


def _spec_module(spec: dict) -> ModuleType:
    if not isinstance(spec, dict) or "category" not in spec:
        raise ValueError("spec must be a dict with a 'category' key")
    mod = category_module(spec["category"])
    index = _INDEX[spec["category"]]
    for attr, values in index.items():
        if spec.get(attr) not in values:
            raise ValueError(f"{spec['category']} spec: {attr}={spec.get(attr)!r} not in {tuple(values)}")
    if "layout_seed" not in spec:
        raise ValueError("spec has no 'layout_seed'")
    return mod


def sample_spec(rng: np.random.Generator, category: str) -> dict:
    """Only the ground-truth spec of a T2I sample (no rendering)."""
    mod = category_module(category)
    return mod.sample_spec(child_random(rng))


def render(spec: dict, size: int = 32) -> np.ndarray:
    """Pure function of (spec, size): (size, size, 3) uint8 RGB. Applies spec["style"] / spec["degradation"]."""
    mod = _spec_module(spec)
    img = mod.render(spec, check_size(size))
    if "style" in spec:
        img = styles.apply_style(img, spec["style"])
    if "degradation" in spec:
        img = styles.apply_degradation(img, spec["degradation"])
    return img


def caption(spec: dict, rng: np.random.Generator) -> str:
    """A caption naming every attribute of the spec; template, synonyms and clause order are picked by ``rng``."""
    return _spec_module(spec).caption(spec, child_random(rng))


def attribute_labels(spec: dict) -> dict[str, int]:
    """Class index of each attribute of the spec's category, in ``T2I_ATTRIBUTES`` order."""
    _spec_module(spec)
    index = _INDEX[spec["category"]]
    return {attr: values[spec[attr]] for attr, values in index.items()}


def labels_to_values(category: str, labels: dict[str, int]) -> dict[str, str]:
    """Inverse of :func:`attribute_labels` (attribute values only, no layout)."""
    category_module(category)
    return {a: T2I_ATTRIBUTES[category][a][i] for a, i in labels.items()}


def sample_t2i(rng: np.random.Generator, category: str, size: int = 32) -> T2ISample:
    mod = category_module(category)
    size = check_size(size)
    r = child_random(rng)
    spec = mod.sample_spec(r)
    return T2ISample(image=mod.render(spec, size), caption=mod.caption(spec, r), category=category, spec=spec)
