"""The toy judge's network: a small CNN (Flax NNX) with one classification head per T2I attribute, and its training.

One 3-way category head plus one head per (category, attribute) of ``T2I_ATTRIBUTES``; all heads read the same
penultimate feature vector (also the feature space of the judge's Frechet distance). The network sees uint8 RGB
images of one fixed size; two coordinate channels are appended to the input so that globally pooled features can
still tell *where* things are (``placement``, ``mountains``, ``hair_length``).

Training samples fresh clean renders of the world every step (no fixed data set, nothing to download), each
attribute head trained with a cross-entropy masked to images of its category. Everything is a function of
``JudgeConfig`` (its ``seed`` fixes initialisation, data and evaluation samples).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .. import training_loop
from ..data.world import T2I_ATTRIBUTES, T2I_CATEGORIES, attribute_labels, render, sample_spec

#: Bumped whenever the network, training recipe or scoring rules change, so cached judges are not reused.
JUDGE_VERSION = 1

#: (category, attribute) of every head; the first one, ("*", "category"), classifies the T2I category.
HEADS: tuple[tuple[str, str], ...] = (("*", "category"),) + tuple(
    (c, a) for c in T2I_CATEGORIES for a in T2I_ATTRIBUTES[c]
)
HEAD_SIZES: tuple[int, ...] = (len(T2I_CATEGORIES),) + tuple(len(T2I_ATTRIBUTES[c][a]) for c, a in HEADS[1:])
HEAD_OFFSETS: tuple[int, ...] = tuple(int(x) for x in np.concatenate([[0], np.cumsum(HEAD_SIZES)]))
HEAD_INDEX: dict[tuple[str, str], int] = {h: j for j, h in enumerate(HEADS)}
N_LOGITS = HEAD_OFFSETS[-1]
#: Loss weights: the slow-to-learn small-detail heads count more (the word is also the key text attribute).
_LOSS_WEIGHTS = {
    ("text", "word"): 3.0,
    ("portrait", "eye_colour"): 2.0,
    ("landscape", "mountains"): 2.0,
    ("landscape", "trees"): 2.0,
}


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    size: int = 32
    seed: int = 0
    widths: tuple[int, int, int, int] = (24, 48, 48, 96)  # conv1 (full res), conv2 (/2), conv3, conv4 (/4)
    features: int = 96  # penultimate width (classifier + Frechet feature space)
    steps: int = 700
    batch: int = 64
    lr: float = 4e-3
    weight_decay: float = 1e-4
    category_probs: tuple[float, float, float] = (0.3, 0.3, 0.4)  # landscape, portrait, text (text is hardest)
    n_reference: int = 1000  # real renders per category for the reference feature statistics
    n_eval: int = 500  # held-out renders per category for accuracies and the quality calibration
    version: int = JUDGE_VERSION

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 16:
            raise ValueError(f"judge size must be an int >= 16, got {self.size!r}")
        if len(self.widths) != 4 or min(self.widths) < 1 or self.features < 1:
            raise ValueError(f"bad judge widths {self.widths} / features {self.features}")
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1, got {self.steps}, {self.batch}")
        if len(self.category_probs) != len(T2I_CATEGORIES) or abs(sum(self.category_probs) - 1.0) > 1e-6:
            raise ValueError(f"category_probs must be {len(T2I_CATEGORIES)} probabilities, got {self.category_probs}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "JudgeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown judge config keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------------------------- network
class Conv(nnx.Module):
    """3x3 'SAME' convolution with bias, NHWC, kernel laid out (kh, kw, in, out) with logical axis names."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")  # He init for ReLU
        self.kernel = nnx.Param(
            init(rngs.params(), (3, 3, in_ch, out_ch), jnp.float32),
            out_sharding=(None, None, "judge_in", "judge_out"),
            eager_sharding=False,
        )
        self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32), out_sharding=("judge_out",), eager_sharding=False)
        self.stride = stride

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], (self.stride, self.stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + self.bias[...]


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, scale: float = 1.0):
        init = jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
        self.kernel = nnx.Param(
            init(rngs.params(), (in_features, out_features), jnp.float32),
            out_sharding=("judge_in", "judge_out"),
            eager_sharding=False,
        )
        self.bias = nnx.Param(
            jnp.zeros((out_features,), jnp.float32), out_sharding=("judge_out",), eager_sharding=False
        )

    def __call__(self, x):
        return x @ self.kernel[...] + self.bias[...]


class JudgeNet(nnx.Module):
    """uint8 (B, S, S, 3) -> (logits (B, N_LOGITS), penultimate features (B, F), low-level features)."""

    def __init__(self, config: JudgeConfig, *, rngs: nnx.Rngs):
        w1, w2, w3, w4 = config.widths
        self.conv1 = Conv(3 + 2, w1, 1, rngs=rngs)
        self.conv2 = Conv(w1, w2, 2, rngs=rngs)
        self.conv3 = Conv(w2, w3, 1, rngs=rngs)
        self.conv4 = Conv(w3, w4, 2, rngs=rngs)
        self.fc = Linear(2 * w4, config.features, rngs=rngs, scale=2.0)
        self.head = Linear(config.features, N_LOGITS, rngs=rngs)

    def features(self, images):
        """(penultimate (B, F), low-level (B, 2 * (w1 + w2)): spatial mean and std of conv1 / conv2 maps)."""
        x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
        b, h, w, _ = x.shape
        yy = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, h)[None, :, None, None], (b, h, w, 1))
        xx = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, w)[None, None, :, None], (b, h, w, 1))
        x = jnp.concatenate([x, yy, xx], axis=-1)
        low = []
        for i, conv in enumerate((self.conv1, self.conv2, self.conv3, self.conv4)):
            x = jax.nn.relu(conv(x))
            if i < 2:
                low += [x.mean(axis=(1, 2)), x.std(axis=(1, 2))]
        pooled = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        return jax.nn.relu(self.fc(pooled)), jnp.concatenate(low, axis=-1)

    def __call__(self, images):
        """(logits (B, N_LOGITS), penultimate features, low-level features)."""
        f, low = self.features(images)
        return self.head(f), f, low


def head_log_probs(logits):
    """Per-head log-softmax of the concatenated logits (same layout)."""
    return jnp.concatenate(
        [jax.nn.log_softmax(logits[:, HEAD_OFFSETS[j] : HEAD_OFFSETS[j + 1]], axis=-1) for j in range(len(HEADS))],
        axis=-1,
    )


def abstract_model(config: JudgeConfig):
    """(graphdef, abstract Param state) without allocating parameters."""
    model = nnx.eval_shape(lambda: JudgeNet(config, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def flatten_params(state) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k in sorted(node, key=str):
                walk(f"{prefix}/{k}" if prefix else str(k), node[k])
        else:
            out[prefix] = np.asarray(node, np.float32)

    walk("", state.to_pure_dict() if hasattr(state, "to_pure_dict") else state)
    return out


def unflatten_params(config: JudgeConfig, flat: dict[str, np.ndarray]):
    """(graphdef, Param state) from a flat {"conv1/kernel": array} dict; checks names and shapes."""
    graphdef, abstract = abstract_model(config)
    expected = {
        k: tuple(v.shape)
        for k, v in flatten_params(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract.to_pure_dict())).items()
    }
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        bad = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ValueError(
            f"judge parameters do not match the config: missing {missing}, unexpected {extra}, "
            f"wrong shape {[(k, got[k], expected[k]) for k in bad]}"
        )
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jnp.asarray(value, jnp.float32)
    abstract.replace_by_pure_dict(nested)
    return graphdef, abstract


def _arch_key(config: JudgeConfig) -> tuple:
    return (tuple(config.widths), config.features)


@functools.lru_cache(maxsize=8)
def _apply_for(arch: tuple) -> Callable:
    graphdef, _ = abstract_model(JudgeConfig(widths=arch[0], features=arch[1]))

    @jax.jit
    def apply(params, images):
        logits, feats, low = nnx.merge(graphdef, params)(images)
        return jnp.exp(head_log_probs(logits)), feats, low

    return apply


def make_apply(config: JudgeConfig) -> Callable:
    """jit(params, images uint8) -> (per-head probabilities (B, N_LOGITS), penultimate, low-level features).

    One compiled function per architecture, shared by every judge of that architecture (no recompiles on load).
    """
    return _apply_for(_arch_key(config))


# ----------------------------------------------------------------------------------------------- data
def head_labels(spec: dict) -> np.ndarray:
    """(len(HEADS),) int32 labels of one T2I spec; -1 for the heads of the other categories."""
    lab = np.full((len(HEADS),), -1, np.int32)
    cat = spec["category"]
    lab[0] = T2I_CATEGORIES.index(cat)
    for attr, idx in attribute_labels(spec).items():
        lab[HEAD_INDEX[(cat, attr)]] = idx
    return lab


def sample_batch(rng: np.random.Generator, n: int, size: int, categories) -> tuple[np.ndarray, np.ndarray, list]:
    """n clean renders with the given category index per sample: (images, labels, specs)."""
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, len(HEADS)), np.int32)
    specs = []
    for i in range(n):
        spec = sample_spec(rng, T2I_CATEGORIES[int(categories[i])])
        images[i] = render(spec, size)
        labels[i] = head_labels(spec)
        specs.append(spec)
    return images, labels, specs


def _loss(logits, labels):
    logp = head_log_probs(logits)
    total = 0.0
    for j, head in enumerate(HEADS):
        y = labels[:, j]
        mask = (y >= 0).astype(jnp.float32)
        seg = logp[:, HEAD_OFFSETS[j] : HEAD_OFFSETS[j + 1]]
        nll = -jnp.take_along_axis(seg, jnp.maximum(y, 0)[:, None], axis=1)[:, 0]
        total = total + _LOSS_WEIGHTS.get(head, 1.0) * jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return total


@functools.lru_cache(maxsize=8)
def _train_step_for(arch: tuple, steps: int, lr: float, weight_decay: float):
    """(optimizer, jitted step), cached so that repeated trainings of one recipe compile once."""
    graphdef, _ = abstract_model(JudgeConfig(widths=arch[0], features=arch[1]))
    warmup = max(1, steps // 20)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * 0.02)
    opt = optax.adamw(schedule, weight_decay=weight_decay)

    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(p):
            return _loss(nnx.merge(graphdef, p)(images)[0], labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt, step


def train_network(config: JudgeConfig, log=print):
    """Train the classifier on fresh renders; returns (params state, train seconds)."""
    _, params = nnx.split(JudgeNet(config, rngs=nnx.Rngs(config.seed)), nnx.Param)
    opt, step = _train_step_for(_arch_key(config), config.steps, config.lr, config.weight_decay)
    opt_state = opt.init(params)

    rng = np.random.default_rng([config.seed, 1])

    def batches():
        while True:
            cats = rng.choice(len(T2I_CATEGORIES), config.batch, p=np.asarray(config.category_probs))
            images, labels, _ = sample_batch(rng, config.batch, config.size, cats)  # overlaps the async step
            yield images, labels

    def train_step(state, batch):
        params, opt_state, loss = step(*state, *batch)
        return (params, opt_state), {"loss": loss}

    t0 = time.perf_counter()
    (params, opt_state), _ = training_loop.run(
        (params, opt_state),
        train_step,
        batches(),
        start=0,
        steps=config.steps,
        label="judge",
        log=log,
        log_every=max(1, config.steps // 5),
    )
    jax.block_until_ready(params)
    return params, time.perf_counter() - t0
