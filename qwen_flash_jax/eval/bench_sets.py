"""Held-out toy benchmark sets: T2I-Bench and Editing-Bench stand-ins drawn from the world with an eval seed.

The eval seed is disjoint from the data seed's stream (different generator keys), and every item keeps its spec,
so a judge can score generations against the ground truth.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen_flash_jax.data import world


@dataclasses.dataclass
class T2IBench:
    category: str
    captions: list[str]
    specs: list[dict]
    real: np.ndarray  # (N, H, W, 3) uint8 renders of the specs


@dataclasses.dataclass
class EditBench:
    category: str
    instructions: list[str]
    specs: list[dict]
    sources: np.ndarray
    targets: np.ndarray


def t2i_bench(size: int, per_category: int, seed: int) -> dict[str, T2IBench]:
    out = {}
    for i, category in enumerate(world.T2I_CATEGORIES):
        rng = np.random.default_rng([seed, 1, i])
        samples = [world.sample_t2i(rng, category, size) for _ in range(per_category)]
        out[category] = T2IBench(
            category, [s.caption for s in samples], [s.spec for s in samples], np.stack([s.image for s in samples])
        )
    return out


def edit_bench(size: int, per_category: int, seed: int) -> dict[str, EditBench]:
    out = {}
    for i, category in enumerate(world.EDIT_CATEGORIES):
        rng = np.random.default_rng([seed, 2, i])
        samples = [world.sample_edit(rng, category, size) for _ in range(per_category)]
        out[category] = EditBench(
            category,
            [s.instruction for s in samples],
            [s.spec for s in samples],
            np.stack([s.source for s in samples]),
            np.stack([s.target for s in samples]),
        )
    return out
