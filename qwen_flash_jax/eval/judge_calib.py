"""Calibration sets for the toy judge: real renders and controlled corruptions, as stand-ins for generators.

T2I conditions (per category): ``real`` renders; ``mild`` (one of: Gaussian blur radius 0.5-0.8 px at 32 px,
Gaussian noise sigma 5-10, colour jitter of +-10 % gain and +-10 levels) as imperfect teacher samples; ``heavy``
(one of: blur radius 1.6-2.4, noise sigma 35-50, 4x pixelation, colour jitter of +-40 %); ``noise`` (uniform
random pixels); ``wrong_spec`` (real images scored against the spec of another image of the same category).

Edit conditions (per edit category): the ground-truth ``target``; a ``mild``-ly / ``heavy``-ly degraded target;
the unedited ``source`` returned as output; ``noise``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from ..data.world import EDIT_CATEGORIES, T2I_CATEGORIES, sample_edit, sample_t2i

T2I_CONDITIONS = ("real", "mild", "heavy", "noise", "wrong_spec")
EDIT_CONDITIONS = ("target", "mild", "heavy", "source", "noise")


def _blur(img, radius):
    return np.array(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius * img.shape[0] / 32)))


def _noise(img, sigma, rng):
    return np.clip(img.astype(np.float32) + rng.normal(0.0, sigma, img.shape) + 0.5, 0, 255).astype(np.uint8)


def _jitter(img, amount, rng):
    gain = 1.0 + rng.uniform(-amount, amount, 3)
    offset = rng.uniform(-amount, amount, 3) * 100.0
    return np.clip(img.astype(np.float32) * gain + offset + 0.5, 0, 255).astype(np.uint8)


def _pixelate(img, factor):
    s = img.shape[0]
    small = Image.fromarray(img).resize((max(1, s // factor),) * 2, Image.Resampling.BOX)
    return np.array(small.resize((s, s), Image.Resampling.NEAREST))


def degrade(img: np.ndarray, level: str, rng: np.random.Generator) -> np.ndarray:
    """One randomly chosen corruption of the given level ("mild" or "heavy")."""
    kind = int(rng.integers(3 if level == "mild" else 4))
    if level == "mild":
        if kind == 0:
            return _blur(img, rng.uniform(0.5, 0.8))
        if kind == 1:
            return _noise(img, rng.uniform(5.0, 10.0), rng)
        return _jitter(img, 0.1, rng)
    if level != "heavy":
        raise ValueError(f"level must be 'mild' or 'heavy', got {level!r}")
    if kind == 0:
        return _blur(img, rng.uniform(1.6, 2.4))
    if kind == 1:
        return _noise(img, rng.uniform(35.0, 50.0), rng)
    if kind == 2:
        return _pixelate(img, 4)
    return _jitter(img, 0.4, rng)


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    if n < 2:
        raise ValueError("wrong_spec needs at least 2 samples per category")
    perm = rng.permutation(n)
    return np.roll(perm, 1)[np.argsort(perm)]  # i -> the sample after i in a random cycle: never itself


def t2i_sets(n_per_category: int, size: int = 32, seed: int = 0) -> dict[str, tuple[np.ndarray, list[dict]]]:
    """condition -> (images (N, size, size, 3) uint8, specs), N = 3 * n_per_category, categories in blocks."""
    rng = np.random.default_rng([seed, 7])
    samples = [sample_t2i(rng, c, size) for c in T2I_CATEGORIES for _ in range(n_per_category)]
    real = np.stack([s.image for s in samples])
    specs = [s.spec for s in samples]
    wrong = []
    for k in range(len(T2I_CATEGORIES)):
        block = specs[k * n_per_category : (k + 1) * n_per_category]
        wrong += [block[j] for j in _derangement(n_per_category, rng)]
    return {
        "real": (real, specs),
        "mild": (np.stack([degrade(x, "mild", rng) for x in real]), specs),
        "heavy": (np.stack([degrade(x, "heavy", rng) for x in real]), specs),
        "noise": (rng.integers(0, 256, real.shape, dtype=np.uint8), specs),
        "wrong_spec": (real, wrong),
    }


def edit_sets(n_per_category: int, size: int = 32, seed: int = 0):
    """(sources, specs, condition -> outputs), categories in blocks of n_per_category."""
    rng = np.random.default_rng([seed, 8])
    edits = [sample_edit(rng, c, size) for c in EDIT_CATEGORIES for _ in range(n_per_category)]
    sources = np.stack([e.source for e in edits])
    targets = np.stack([e.target for e in edits])
    outputs = {
        "target": targets,
        "mild": np.stack([degrade(x, "mild", rng) for x in targets]),
        "heavy": np.stack([degrade(x, "heavy", rng) for x in targets]),
        "source": sources,
        "noise": rng.integers(0, 256, targets.shape, dtype=np.uint8),
    }
    return sources, [e.spec for e in edits], outputs


def calibration_tables(judge, n_per_category: int = 60, seed: int = 0) -> dict:
    """{"t2i": {condition: {category: mean score, ..., "fd/<cat>": fd}}, "edit": {condition: {category: mean}}}."""
    out: dict = {"t2i": {}, "edit": {}}
    for cond, (images, specs) in t2i_sets(n_per_category, judge.size, seed).items():
        r = judge.score_t2i(images, specs)
        row = dict(r["per_category"])
        row["mean"] = r["mean"]
        row.update({f"fd/{c}": v for c, v in r["fidelity_fd"].items()})
        row.update({f"fd_low/{c}": v for c, v in r["fidelity_fd_low"].items()})
        out["t2i"][cond] = row
    sources, specs, outputs = edit_sets(n_per_category, judge.size, seed)
    for cond, outs in outputs.items():
        r = judge.score_edit(sources, outs, specs)
        out["edit"][cond] = dict(r["per_category"], mean=r["mean"])
    return out


def format_tables(tables: dict) -> str:
    lines = []
    t2i_cols = list(T2I_CATEGORIES) + ["mean"] + [f"fd/{c}" for c in T2I_CATEGORIES]
    lines.append("T2I (score 1-5, higher is better; fd = Frechet distance in penultimate features, lower is better)")
    lines.append(f"{'condition':<11}" + "".join(f"{c:>13}" for c in t2i_cols))
    for cond, row in tables["t2i"].items():
        lines.append(f"{cond:<11}" + "".join(f"{row.get(c, float('nan')):>13.2f}" for c in t2i_cols))
    lines.append("")
    lines.append("Edits (score 1-5)")
    edit_cols = list(EDIT_CATEGORIES) + ["mean"]
    lines.append(f"{'condition':<11}" + "".join(f"{c:>11}" for c in edit_cols))
    for cond, row in tables["edit"].items():
        lines.append(f"{cond:<11}" + "".join(f"{row.get(c, float('nan')):>11.2f}" for c in edit_cols))
    return "\n".join(lines)
