"""A toy judge that replaces the paper's VLM judges (Appendix A) on the procedural world, with 1-5 scores.

T2I (per category, ``score_t2i``): the rubric's two equally critical dimensions, multiplied —

    score = 1 + 4 * compliance * quality        (two decimals; 5 = everything correct and clean, 1 = unusable)

* compliance: a small CNN (``judge_net``) trained on real renders reads every attribute; compliance is
  P(asked category) times the weighted mean of P(asked value) over the category's attributes (the word counts
  ``_WORD_WEIGHT`` times for text, the key attribute there).
* quality = exp(-sum of penalties), each penalty the excess of a defect probe over the same probe on real renders
  of the category (their 1st / 99th percentile, so real images pay ~nothing), divided by a fixed "one unit of
  badness": noise level, edge softness (blur), grid-aligned edges (pixelation), and the Mahalanobis distance of
  low-level network statistics (colour casts, exposure, anything off the real distribution).
* fidelity: Frechet distance between the penultimate features of the scored images and of real renders of the same
  category, over the set (``fidelity_fd``; lower is better; ``fidelity_fd_low`` in the low-level feature space).

Edits (per Editing-Bench category, ``score_edit``): the world gives the exact target, so each output gets
instruction following, preservation and pixel fidelity sub-scores in [0, 1]; the score is
``1 + 4 * min(0.35 instr + 0.25 preserve + 0.4 fidelity, instr)`` — a failed instruction caps it (Table B).

* pixel progress = 1 - MAE(output, target) / MAE(source, target) inside the edit region (whole image for global
  edits): 1 = target reached, 0 = source returned unchanged, < 0 = moved away (noise);
* attribute edits (scene, object, text_edit, identity): instr = P(target value of the edited attribute) times
  min(1, pixel progress / 0.5) (a classifier fooled by an unrelated image still fails); preserve = P(kept value)
  averaged over the other attributes, times the pixel fidelity to the source outside the edit region;
* enhance: instr = min(probe progress / 0.8, pixel progress / 0.5), probe progress being how far the degradation's
  own probe (sharpness, noise level, blockiness or luminance) moved from the source's value to the target's;
  preserve = the attributes of the clean target still read by the classifier;
* style (invisible to the classifier, trained on unstyled renders): instr = pixel progress / 0.7; preserve =
  pixel fidelity;
* fidelity = PSNR to the target mapped linearly from [12, 36] dB to [0, 1], clipped.

    judge = load_or_train_judge("/tmp/judge_cache")       # ~1 min on 2 CPU cores the first time
    judge.score_t2i(images, [s.spec for s in samples])["per_category"]
    judge.score_edit(sources, outputs, [e.spec for e in edits])["mean"]
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from ..data.world import EDIT_CATEGORIES, T2I_ATTRIBUTES, T2I_CATEGORIES, attribute_labels, render
from . import judge_metrics as jm
from .judge_net import (
    HEAD_INDEX,
    HEAD_OFFSETS,
    HEADS,
    JUDGE_VERSION,
    JudgeConfig,
    flatten_params,
    make_apply,
    sample_batch,
    train_network,
    unflatten_params,
)

_WORD_WEIGHT = 3.0
# One unit of penalty (quality *= e^-1) per: 20 levels of noise, 0.4 of lost edge steepness, 0.5 of grid-aligned
# edge share, 0.6 of feature-space distance (RMS Mahalanobis per dimension) above the real renders' percentile.
_NOISE_UNIT, _BLUR_UNIT, _BLOCK_UNIT, _FEATURE_UNIT = 20.0, 0.4, 0.5, 0.6
_PSNR_RANGE = (12.0, 36.0)  # dB mapped to pixel fidelity 0 .. 1
_EDIT_WEIGHTS = (0.35, 0.25, 0.4)  # instruction, preservation, fidelity
_MAX_BATCH = 256


@dataclasses.dataclass(eq=False)  # holds arrays: compare judges by their fields explicitly
class ToyJudge:
    """A trained judge: config, network parameters, real-render reference statistics and calibrated thresholds."""

    config: JudgeConfig
    params: dict[str, np.ndarray]  # flat "conv1/kernel" -> array
    reference: dict[str, np.ndarray]  # "<category>/<stat>" -> array (feature means / covariances / precisions)
    thresholds: dict[str, float]  # "<category>/<probe>" -> percentile of the probe on real renders
    accuracy: dict[str, float] = dataclasses.field(default_factory=dict)  # "<category>/<attribute>" held-out
    train_seconds: float = 0.0
    _apply: Callable | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _state: object = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def size(self) -> int:
        return self.config.size

    # ------------------------------------------------------------------------------------------- inference
    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batched jitted inference: (head probabilities, penultimate features, low-level features)."""
        if self._apply is None:
            _, self._state = unflatten_params(self.config, self.params)
            self._apply = make_apply(self.config)
        outs: list[list[np.ndarray]] = [[], [], []]
        for i in range(0, len(images), _MAX_BATCH):
            chunk = images[i : i + _MAX_BATCH]
            n = len(chunk)
            bucket = max(8, 1 << (n - 1).bit_length())  # few distinct shapes -> few compilations
            if bucket > n:
                chunk = np.concatenate([chunk, np.zeros((bucket - n,) + chunk.shape[1:], chunk.dtype)])
            for out, value in zip(outs, self._apply(self._state, chunk)):
                out.append(np.asarray(value)[:n])
        probs, feats, low = (np.concatenate(o) for o in outs)
        return probs, feats, low

    def _check_images(self, images, name: str) -> np.ndarray:
        arr = np.asarray(images)
        s = self.size
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (s, s, 3) or len(arr) == 0:
            raise ValueError(
                f"{name} must be a non-empty uint8 array of shape (N, {s}, {s}, 3) for this size-{s} "
                f"judge; got dtype {arr.dtype}, shape {arr.shape}"
            )
        return arr

    @staticmethod
    def _check_specs(specs, n: int, name: str) -> list[dict]:
        if isinstance(specs, (dict, str, bytes)) or not hasattr(specs, "__iter__"):
            raise ValueError(f"need one spec dict per image: {name} is a {type(specs).__name__}, not a list")
        specs = list(specs)
        if len(specs) != n:
            raise ValueError(f"need one spec dict per image: got {len(specs)} {name} for {n} images")
        return specs

    def _prob(self, probs: np.ndarray, category: str, attribute: str, value: str) -> np.ndarray:
        j = HEAD_INDEX[(category, attribute)]
        return probs[:, HEAD_OFFSETS[j] + T2I_ATTRIBUTES[category][attribute].index(value)]

    # ------------------------------------------------------------------------------------------- T2I
    def compliance(self, probs: np.ndarray, specs: list[dict]) -> np.ndarray:
        out = np.zeros(len(specs), np.float32)
        for i, spec in enumerate(specs):
            cat = spec["category"]
            p_cat = probs[i, T2I_CATEGORIES.index(cat)]
            num = den = 0.0
            for attr, idx in attribute_labels(spec).items():
                w = _WORD_WEIGHT if (cat, attr) == ("text", "word") else 1.0
                num += w * probs[i, HEAD_OFFSETS[HEAD_INDEX[(cat, attr)]] + idx]
                den += w
            out[i] = p_cat * num / den
        return out

    def quality(self, images: np.ndarray, low: np.ndarray, categories: list[str]) -> dict[str, np.ndarray]:
        """Per-sample quality in (0, 1] and its penalties (0 = as clean as real renders of the category)."""
        cats = np.asarray(categories)
        noise, sharp, block = jm.noise_sigma(images), jm.sharpness(images), jm.blockiness(images)
        z = np.zeros(len(images), np.float32)
        ref = {k: np.zeros(len(images), np.float32) for k in ("noise", "sharp", "block", "z")}
        for cat in set(categories):
            m = cats == cat
            z[m] = self._low_stats(cat).z(low[m])
            for k in ref:
                ref[k][m] = self.thresholds[f"{cat}/{k}"]
        pen = {
            "noise": np.maximum(noise - ref["noise"], 0.0) / _NOISE_UNIT,
            "blur": np.maximum(ref["sharp"] - sharp, 0.0) / _BLUR_UNIT,
            "block": np.maximum(block - ref["block"], 0.0) / _BLOCK_UNIT,
            "feature": np.maximum(z - ref["z"], 0.0) / _FEATURE_UNIT,
        }
        q = np.exp(-sum(pen.values())).astype(np.float32)
        return {"quality": q, **{f"penalty_{k}": v.astype(np.float32) for k, v in pen.items()}}

    def _low_stats(self, cat: str) -> jm.GaussianStats:
        r = self.reference
        return jm.GaussianStats(r[f"{cat}/low_mean"], r[f"{cat}/low_cov"], r[f"{cat}/low_precision"])

    def score_t2i(self, images: np.ndarray, specs: list[dict]) -> dict:
        """Scores of generated images against the T2I specs they were prompted with (see the module docstring)."""
        images = self._check_images(images, "images")
        specs = self._check_specs(specs, len(images), "specs")
        for spec in specs:
            if not isinstance(spec, dict) or spec.get("category") not in T2I_CATEGORIES:
                raise ValueError(f"T2I spec must be a dict with category in {T2I_CATEGORIES}; got {spec!r:.120}")
            attribute_labels(spec)  # ValueError on unknown attribute values
        cats = [s["category"] for s in specs]
        probs, feats, low = self._forward(images)
        comp = self.compliance(probs, specs)
        qual = self.quality(images, low, cats)
        scores = np.round(1.0 + 4.0 * comp * qual["quality"], 2).astype(np.float32)
        per_cat, fd, fd_low = {}, {}, {}
        for cat in T2I_CATEGORIES:
            m = np.asarray(cats) == cat
            if not m.any():
                continue
            per_cat[cat] = float(scores[m].mean())
            fd[cat] = self.frechet(feats[m], cat, "feat")
            fd_low[cat] = self.frechet(low[m], cat, "low")
        return {
            "per_sample": scores,
            "per_category": per_cat,
            "fidelity_fd": fd,
            "fidelity_fd_low": fd_low,
            "mean": float(scores.mean()),
            "compliance": comp,
            **qual,
        }

    def frechet(self, feats: np.ndarray, category: str, space: str = "feat") -> float:
        """Frechet distance of a feature set to the real renders of ``category`` (nan for fewer than 2 samples)."""
        if len(feats) < 2:
            return float("nan")
        mean, cov = jm.mean_cov(feats)
        r = self.reference
        return jm.frechet_distance(mean, cov, r[f"{category}/{space}_mean"], r[f"{category}/{space}_cov"])

    # ------------------------------------------------------------------------------------------- edits
    def score_edit(self, sources: np.ndarray, outputs: np.ndarray, specs: list[dict]) -> dict:
        """Scores of edit outputs against the world's ground-truth edit specs (see the module docstring)."""
        sources = self._check_images(sources, "sources")
        outputs = self._check_images(outputs, "outputs")
        if sources.shape != outputs.shape:
            raise ValueError(f"sources and outputs must have the same shape; got {sources.shape} and {outputs.shape}")
        specs = self._check_specs(specs, len(outputs), "specs")
        for spec in specs:
            if (
                not isinstance(spec, dict)
                or spec.get("category") not in EDIT_CATEGORIES
                or not all(k in spec for k in ("source", "target", "op", "preserve", "region"))
            ):
                raise ValueError(
                    f"edit spec must be an EditSample.spec dict (category in {EDIT_CATEGORIES}, "
                    f"source, target, op, preserve, region); got {spec!r:.120}"
                )
        n, s = len(outputs), self.size
        targets = np.stack([render(spec["target"], s) for spec in specs])
        probs, _, _ = self._forward(outputs)
        fid = jm.ramp(jm.psnr(outputs, targets), *_PSNR_RANGE)
        instr, pres = np.zeros(n, np.float32), np.zeros(n, np.float32)
        for i, spec in enumerate(specs):
            instr[i], pres[i] = self._edit_terms(
                sources[i : i + 1], outputs[i : i + 1], targets[i : i + 1], probs[i : i + 1], spec, float(fid[i])
            )
        w_i, w_p, w_f = _EDIT_WEIGHTS
        base = w_i * instr + w_p * pres + w_f * fid
        scores = np.round(1.0 + 4.0 * np.minimum(base, instr), 2).astype(np.float32)
        cats = np.asarray([spec["category"] for spec in specs])
        per_cat = {c: float(scores[cats == c].mean()) for c in EDIT_CATEGORIES if (cats == c).any()}
        return {
            "per_sample": scores,
            "per_category": per_cat,
            "mean": float(scores.mean()),
            "instruction": instr,
            "preservation": pres,
            "fidelity": fid.astype(np.float32),
        }

    def _edit_terms(self, src, out, tgt, probs, spec: dict, fid: float) -> tuple[float, float]:
        """(instruction following, preservation) of one edit, both in [0, 1]."""
        op, base, s = spec["op"], spec["target"]["category"], self.size
        region = jm.region_mask(spec["region"], s)[None]
        d_src = float(jm.masked_mae(src, tgt, region)[0])
        d_out = float(jm.masked_mae(out, tgt, region)[0])
        pixel_progress = 1.0 - d_out / max(d_src, 0.5)  # 1 = target reached, 0 = source returned, < 0 = worse
        p_cat = float(probs[0, T2I_CATEGORIES.index(base)])
        kept = [float(self._prob(probs, base, a, spec["target"][a])[0]) for a in spec["preserve"]]
        p_kept = p_cat * (float(np.mean(kept)) if kept else 1.0)
        if "attribute" in op:
            p_new = p_cat * float(self._prob(probs, base, op["attribute"], op["to"])[0])
            instr = p_new * float(jm.ramp(pixel_progress, 0.0, 0.5))
            outside = ~region
            if spec["region"] is not None and outside.any():
                p_kept *= float(jm.ramp(jm.psnr(out, src, outside), *_PSNR_RANGE)[0])
            return instr, p_kept
        if "degradation" in op:
            probe_progress = _probe_progress(op["degradation"], src, out, tgt)
            if probe_progress is None:  # degradation too mild for its probe to tell: pixels only
                probe_progress = pixel_progress
            instr = min(float(jm.ramp(probe_progress, 0.0, 0.8)), float(jm.ramp(pixel_progress, 0.0, 0.5)))
            return instr, p_kept
        # style: the classifier never saw styled images; pixels against the exact target decide
        return float(jm.ramp(pixel_progress, 0.0, 0.7)), fid


_PROBES = {  # degradation -> (probe where larger = cleaner, smallest source-target gap it can resolve)
    "blur": (jm.sharpness, 0.05),
    "noise": (lambda x: -jm.noise_sigma(x), 2.0),
    "pixelate": (lambda x: -jm.blockiness(x), 0.1),
    "dark": (jm.luminance, 5.0),
}


def _probe_progress(kind: str, src, out, tgt) -> float | None:
    probe, min_gap = _PROBES[kind]
    v_src, v_out, v_tgt = (float(probe(x)[0]) for x in (src, out, tgt))
    if abs(v_tgt - v_src) < min_gap:
        return None
    return (v_out - v_src) / (v_tgt - v_src)


# ----------------------------------------------------------------------------------------------- training
def train_judge(size: int = 32, seed: int = 0, steps: int = 700, log=print, **config_overrides) -> ToyJudge:
    """Train the classifier on fresh clean renders, then fit its reference statistics on more real renders.

    Deterministic for (size, seed, steps, overrides). ``config_overrides`` go to ``JudgeConfig`` (e.g. ``widths``,
    ``batch``, ``n_reference``) — smaller settings give a faster, weaker judge for tests.
    """
    config = JudgeConfig(size=size, seed=seed, steps=steps, **config_overrides)
    state, seconds = train_network(config, log=log)
    judge = ToyJudge(config, flatten_params(state), {}, {}, train_seconds=seconds)
    t0 = time.perf_counter()
    _fit_reference(judge)
    if log is not None:
        worst = min(judge.accuracy, key=judge.accuracy.get)
        log(
            f"judge trained in {seconds:.1f}s, calibrated in {time.perf_counter() - t0:.1f}s; held-out accuracy "
            f"min {judge.accuracy[worst]:.3f} ({worst}), mean {np.mean(list(judge.accuracy.values())):.3f}"
        )
    return judge


def _fit_reference(judge: ToyJudge) -> None:
    """Reference feature statistics (fit split) and probe percentiles + accuracies (held-out split), per category."""
    cfg = judge.config
    fit_rng, eval_rng = np.random.default_rng([cfg.seed, 2]), np.random.default_rng([cfg.seed, 3])
    for ci, cat in enumerate(T2I_CATEGORIES):
        images, _, _ = sample_batch(fit_rng, cfg.n_reference, cfg.size, [ci] * cfg.n_reference)
        _, feats, low = judge._forward(images)
        for space, x in (("feat", feats), ("low", low)):
            mean, cov = jm.mean_cov(x)
            judge.reference[f"{cat}/{space}_mean"] = mean.astype(np.float32)
            judge.reference[f"{cat}/{space}_cov"] = cov.astype(np.float32)
        judge.reference[f"{cat}/low_precision"] = jm.GaussianStats.fit(low).precision

        images, labels, _ = sample_batch(eval_rng, cfg.n_eval, cfg.size, [ci] * cfg.n_eval)
        probs, _, low = judge._forward(images)
        for j, head in enumerate(HEADS):
            mask = labels[:, j] >= 0
            if mask.any():
                pred = probs[mask, HEAD_OFFSETS[j] : HEAD_OFFSETS[j + 1]].argmax(axis=1)
                key = f"{cat}/category" if j == 0 else "/".join(head)
                judge.accuracy[key] = float((pred == labels[mask, j]).mean())
        th = judge.thresholds
        th[f"{cat}/noise"] = float(np.percentile(jm.noise_sigma(images), 99))
        th[f"{cat}/sharp"] = float(np.percentile(jm.sharpness(images), 1))
        th[f"{cat}/block"] = float(np.percentile(jm.blockiness(images), 99))
        th[f"{cat}/z"] = float(np.percentile(judge._low_stats(cat).z(low), 99))


__all__ = ["JUDGE_VERSION", "JudgeConfig", "ToyJudge", "train_judge"]
