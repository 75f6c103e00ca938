"""The toy text encoder: a small Qwen3-style decoder in Flax NNX, standing in for Qwen3-VL's language model.

Architecture (Qwen3's, scaled down): token embedding, then `num_layers` pre-norm decoder layers of
  RMSNorm -> causal grouped-query self-attention (per-head RMSNorm on q and k, then rotary embeddings) -> residual,
  RMSNorm -> SwiGLU MLP -> residual,
and a final RMSNorm. Rotary positions are 1-D and come from the attention mask's cumulative sum, so a left-padded
prompt sees the same positions (and, since padding is masked out of the keys, the same hidden states) as unpadded.
`encode` returns the last decoder layer's output *before* the final norm: what Qwen-Image feeds its transformer.

Feature layers. `feature_layers` picks the residual-stream states that make up the encoder's output (0 = the input
embeddings, k = after decoder layer k, negative counts from the end); with more than one, each is RMS-normalised
(no parameters) and they are concatenated, so the output width is hidden_size * len(feature_layers). The default
(-1,) is Qwen-Image's choice. The toy world uses (0, -1): a 2-layer language model trained for seconds buries the
words under context in its last layer, and a teacher conditioned on that alone learned the category of a prompt
but none of its attributes in 5400 steps (swapping a landscape caption for another landscape's changed the loss
by < 1%); with the word embeddings beside it, the attributes are learned within a few hundred steps.

Condition images. In Qwen3-VL a vision tower turns the image pixels into the embeddings at the `<|image_pad|>`
positions. The toy has no vision tower; instead the input embedding at the k-th `<|image_pad|>` slot of a sample is

    embed[<|image_pad|>] + condition_proj(mean of the k-th 2x2 group of condition latent tokens)

where the slots run over the condition images in order and, inside an image, over its (h/2, w/2) grid of 2x2
groups in row-major order (the real model's 2x2 spatial merge), and `condition_proj` is a bias-free linear map from
the latent channels to the hidden size. The decoder layers then mix that into the text: hidden states at and after
the slots carry the image. `condition_proj` is not trained by the language-model pretraining (captions have no
images); as a fixed random projection it still passes the image information on, and the frozen encoder is only a
feature extractor for the distillation system.

The real model. For text-only input this decoder is Qwen3-VL's language model; `qwen_flash_jax.text.qwen3_vl`
loads a Hugging Face Qwen3-VL checkpoint into it (with `condition_channels=0`: no `condition_proj`) and
its module doc says why the two agree (M-RoPE with equal position streams, transformers' positions under padding).
With images, `qwen3_vl.features_with_images` runs these same layers with the vision tower's embeddings, 3-D M-RoPE
positions and deepstack features; this module's forward is the text-only (and toy) path.

Parameters live in `TextEncoderParams`, a pytree of the config (static) and the `nnx.State` of `nnx.Param`s, each
with logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`) for `qwen_flash_jax.sharding`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwen_flash_jax import atomic, training_loop
from qwen_flash_jax.models.layers import Dense, RMSNorm
from qwen_flash_jax.text import prompts as prompts_lib
from qwen_flash_jax.text.prompts import IMAGE_PAD, special_token_id

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.npz"
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 128
    rope_theta: float = 10000.0
    eps: float = 1e-6
    # Toy-world extras: the latent channels of condition images (0: no `condition_proj`, as in the real Qwen3-VL,
    # whose images come from a vision tower), and the id of `<|image_pad|>` (None: no images).
    condition_channels: int = 48
    image_pad_id: int | None = None
    feature_layers: tuple[int, ...] = (-1,)  # residual-stream states concatenated into the output (see above)
    # The real Qwen3-VL's interleaved M-RoPE split of the head_dim/2 frequencies into (temporal, height, width)
    # streams, used only by the image-conditioned forward (`qwen_flash_jax.text.qwen3_vl`); None for the toy.
    mrope_section: tuple[int, int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(i) for i in self.mrope_section))
            if len(self.mrope_section) != 3 or min(self.mrope_section) < 0:
                raise ValueError(f"mrope_section must be 3 non-negative integers, got {list(self.mrope_section)}")
        if not self.feature_layers or any(
            not -self.num_layers - 1 <= i <= self.num_layers for i in self.feature_layers
        ):
            raise ValueError(
                f"feature_layers must be a non-empty list of indices in "
                f"[{-self.num_layers - 1}, {self.num_layers}], got {list(self.feature_layers)}"
            )
        if self.condition_channels < 0:
            raise ValueError(f"condition_channels must be >= 0, got {self.condition_channels}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.image_pad_id is not None and not 0 <= self.image_pad_id < self.vocab_size:
            raise ValueError(f"image_pad_id={self.image_pad_id} is outside the vocabulary of {self.vocab_size}")

    @property
    def output_size(self) -> int:
        """Width of the features `encode` returns (the transformer's `context_in_dim`)."""
        return self.hidden_size * len(self.feature_layers)

    @classmethod
    def for_tokenizer(cls, tokenizer, **kwargs) -> "TextEncoderConfig":
        """A config sized to `tokenizer`'s vocabulary, with its `<|image_pad|>` id."""
        kwargs.setdefault("vocab_size", len(tokenizer))
        kwargs.setdefault("image_pad_id", special_token_id(tokenizer, IMAGE_PAD))
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextEncoderConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown TextEncoderConfig fields {unknown}")
        return cls(**d)


# --- modules ----------------------------------------------------------------------------------------------------------

_F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)


class Attention(nnx.Module):
    """Qwen3 attention: grouped-query heads, RMSNorm on each q/k head before RoPE, no biases."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Dense(d, h * hd, ("embed", "heads"), rngs=rngs, **_F32)
        self.k_proj = Dense(d, kv * hd, ("embed", "kv_heads"), rngs=rngs, **_F32)
        self.v_proj = Dense(d, kv * hd, ("embed", "kv_heads"), rngs=rngs, **_F32)
        self.o_proj = Dense(h * hd, d, ("heads", "embed"), rngs=rngs, **_F32)
        self.q_norm = RMSNorm(hd, cfg.eps, "head_dim", param_dtype=jnp.float32)
        self.k_norm = RMSNorm(hd, cfg.eps, "head_dim", param_dtype=jnp.float32)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd

    def __call__(self, x, cos, sin, mask):
        """x (B, S, D); cos/sin (B, S, 1, head_dim); mask (B, 1, S, S) bool, True = may attend."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim).astype(np.float32)
        scores = jnp.where(mask, scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.gate_proj = Dense(cfg.hidden_size, cfg.mlp_dim, ("embed", "mlp"), rngs=rngs, **_F32)
        self.up_proj = Dense(cfg.hidden_size, cfg.mlp_dim, ("embed", "mlp"), rngs=rngs, **_F32)
        self.down_proj = Dense(cfg.mlp_dim, cfg.hidden_size, ("mlp", "embed"), rngs=rngs, **_F32)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.eps, "embed", param_dtype=jnp.float32)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.eps, "embed", param_dtype=jnp.float32)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        return x + self.mlp(self.post_attn_norm(x))


class TextEncoder(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        std = d**-0.5
        self.embed = nnx.Param(
            std * jax.random.normal(rngs.params(), (cfg.vocab_size, d), jnp.float32),
            out_sharding=("vocab", "embed"),
            eager_sharding=False,
        )
        # Scaled so that projected latents (roughly unit variance) land at the scale of the token embeddings.
        # None for condition_channels=0 (the real model's layout). The toy keeps it, drawn at the same point of the
        # rng sequence as before, so its parameters are unchanged.
        self.condition_proj = (
            Dense(cfg.condition_channels, d, (None, "embed"), rngs=rngs, init_scale=1.0 / d, **_F32)
            if cfg.condition_channels
            else None
        )
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(d, cfg.eps, "embed", param_dtype=jnp.float32)
        self.cfg = cfg

    def __call__(self, input_ids, attention_mask, condition_latents=None, condition_shapes=None):
        """Hidden states (B, S, hidden_size) float32 of the last decoder layer, before the final norm."""
        return self.residual_stream(input_ids, attention_mask, condition_latents, condition_shapes)[-1]

    def features(self, input_ids, attention_mask, condition_latents=None, condition_shapes=None):
        """The encoder's output (B, S, output_size) float32: the `feature_layers` states (see the module doc)."""
        states = self.residual_stream(input_ids, attention_mask, condition_latents, condition_shapes)
        picked = [states[i] for i in self.cfg.feature_layers]
        if len(picked) == 1:
            return picked[0]
        rms_normalise = lambda x: x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)  # noqa
        return jnp.concatenate([rms_normalise(x) for x in picked], axis=-1)

    def residual_stream(self, input_ids, attention_mask, condition_latents=None, condition_shapes=None):
        """[input embeddings, after layer 1, ..., after layer num_layers], each (B, S, hidden_size) float32.

        `condition_latents`: optional sequence of packed latents (B or 1, h*w, C), one per condition image, with
        their `condition_shapes` (h, w); their slots must be the `<|image_pad|>` tokens of `input_ids`.
        Positions where `attention_mask` is 0 hold finite values that mean nothing.
        """
        cfg = self.cfg
        valid = attention_mask.astype(bool)
        x = jnp.take(self.embed[...], input_ids, axis=0)
        if condition_latents is not None and len(condition_latents):
            x = x + self._condition_embeddings(input_ids, valid, condition_latents, condition_shapes)

        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
        angles = positions[..., None].astype(jnp.float32) * inv_freq
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
        cos, sin = jnp.cos(angles), jnp.sin(angles)

        s = input_ids.shape[1]
        causal = np.tril(np.ones((s, s), bool))
        # Padded keys are masked out; every query still sees itself, so padded rows stay finite.
        mask = causal & (valid[:, None, :] | np.eye(s, dtype=bool))
        mask = mask[:, None]
        states = [x]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
            states.append(x)
        return states

    def logits(self, hidden):
        """Language-model head tied to the token embedding, on the final-normed hidden states."""
        return jnp.dot(self.final_norm(hidden), self.embed[...].T)

    def _condition_embeddings(self, input_ids, valid, condition_latents, condition_shapes):
        cfg = self.cfg
        if cfg.image_pad_id is None:
            raise ValueError("condition images need TextEncoderConfig.image_pad_id (see for_tokenizer)")
        if self.condition_proj is None:
            raise ValueError(
                "this text encoder has no condition projection (condition_channels=0): the real "
                "Qwen3-VL encodes condition images with its vision tower (qwen3_vl.encode_features)"
            )
        if condition_shapes is None or len(condition_shapes) != len(condition_latents):
            raise ValueError("pass one (h, w) in condition_shapes per condition latent")
        batch = input_ids.shape[0]
        pooled = []
        for latents, (h, w) in zip(condition_latents, condition_shapes):
            if latents.ndim != 3 or latents.shape[1] != h * w or latents.shape[2] != cfg.condition_channels:
                raise ValueError(
                    f"condition latents must be (B, h*w={h * w}, C={cfg.condition_channels}) for "
                    f"shape ({h}, {w}), got {latents.shape}"
                )
            if h % 2 or w % 2:
                raise ValueError(f"condition image of {h}x{w} latent tokens: height and width must be even")
            grid = latents.astype(jnp.float32).reshape(latents.shape[0], h // 2, 2, w // 2, 2, -1)
            pooled.append(
                jnp.broadcast_to(
                    grid.mean(axis=(2, 4)).reshape(latents.shape[0], h * w // 4, -1),
                    (batch, h * w // 4, cfg.condition_channels),
                )
            )
        features = jnp.concatenate(pooled, axis=1)  # (B, slots, C), slots in sequence order
        is_slot = (input_ids == cfg.image_pad_id) & valid
        slot_index = jnp.clip(jnp.cumsum(is_slot.astype(jnp.int32), axis=1) - 1, 0, features.shape[1] - 1)
        per_token = jnp.take_along_axis(features, slot_index[..., None], axis=1)
        return jnp.where(is_slot[..., None], self.condition_proj(per_token), 0.0)


def _rope(x, cos, sin):
    """Rotate-half rotary embedding (Qwen3 / Llama layout), in float32."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# --- functional API ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextEncoderParams:
    """The encoder's parameters: a pytree with `config` static and `state` (an `nnx.State` of Params) as leaves."""

    config: TextEncoderConfig
    state: nnx.State


jax.tree_util.register_dataclass(TextEncoderParams, data_fields=["state"], meta_fields=["config"])


@functools.lru_cache(maxsize=None)
def _graphdef(cfg: TextEncoderConfig):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: TextEncoder(cfg, rngs=nnx.Rngs(0))))
    return graphdef


def init_params(config: TextEncoderConfig, seed: int = 0) -> TextEncoderParams:
    _, state = nnx.split(TextEncoder(config, rngs=nnx.Rngs(seed)))
    return TextEncoderParams(config, state)


def _model(params: TextEncoderParams) -> TextEncoder:
    return nnx.merge(_graphdef(params.config), params.state)


@functools.partial(jax.jit, static_argnames=("condition_shapes",))
def _encode(params, input_ids, attention_mask, condition_latents, condition_shapes):
    return _model(params).features(input_ids, attention_mask, condition_latents, condition_shapes)


def encode(params: TextEncoderParams, input_ids, attention_mask, condition_latents=None, condition_shapes=None):
    """The encoder's features (B, S, output_size) float32 (jitted): with the default `feature_layers`, the last
    decoder layer's hidden states before the final norm.

    `condition_latents`: optional list of packed latents (B, h*w, C) per condition image, with `condition_shapes`
    [(h, w), ...]; each image must own h*w/4 `<|image_pad|>` tokens in `input_ids` (as `tokenize_prompts` makes).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if condition_latents is not None and len(condition_latents):
        if condition_shapes is None:
            raise ValueError("condition_latents need condition_shapes [(h, w), ...]")
        condition_shapes = tuple((int(h), int(w)) for h, w in condition_shapes)
        expected = sum(prompts_lib.condition_slots_for(condition_shapes))
        if params.config.image_pad_id is None:
            raise ValueError("condition images need TextEncoderConfig.image_pad_id (see for_tokenizer)")
        if not isinstance(input_ids, jax.core.Tracer):
            found = np.asarray((input_ids == params.config.image_pad_id) & (attention_mask > 0)).sum(axis=1)
            if (found != expected).any():
                raise ValueError(
                    f"condition images of shapes {list(condition_shapes)} need {expected} "
                    f"{IMAGE_PAD} slots per prompt, found {found.tolist()}"
                )
        condition_latents = tuple(jnp.asarray(c) for c in condition_latents)
    else:
        condition_latents, condition_shapes = None, None
    return _encode(params, input_ids, attention_mask, condition_latents, condition_shapes)


def encode_prompts(
    params: TextEncoderParams, tokenizer, prompts: str | Sequence[str], condition_latents=None, condition_shapes=None
):
    """Prompts -> (prompt_embeds (B, L, D), prompt_mask (B, L) bool, image_slot_mask (B, L) bool), as the
    Qwen-Image pipeline's `encode_prompt`; append the target's slots with `prompts.append_target_slots`."""
    slots = prompts_lib.condition_slots_for(condition_shapes) if condition_latents is not None else []
    batch = prompts_lib.tokenize_prompts(tokenizer, prompts, slots)
    hidden = encode(params, batch["input_ids"], batch["attention_mask"], condition_latents, condition_shapes)
    return prompts_lib.extract_prompt_embeds(
        hidden, batch["input_ids"], batch["attention_mask"], batch["drop_idx"], batch["image_pad_id"]
    )


# --- pretraining ------------------------------------------------------------------------------------------------------


def _lm_loss(params: TextEncoderParams, input_ids, attention_mask):
    model = _model(params)
    logits = model.logits(model(input_ids, attention_mask))[:, :-1]
    targets = input_ids[:, 1:]
    weights = (attention_mask[:, :-1] * attention_mask[:, 1:]).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


lm_loss = jax.jit(_lm_loss)
lm_loss.__doc__ = "Mean next-token cross-entropy over valid (unpadded) token pairs, tied output head."


def pretrain_text_encoder(
    tokenizer,
    captions: Sequence[str],
    config: TextEncoderConfig | None = None,
    steps: int = 300,
    seed: int = 0,
    *,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    log_every: int = 0,
) -> TextEncoderParams:
    """Trains the encoder as a small causal language model on the templated captions (T2I template).

    Next-token cross-entropy with the output head tied to the embedding, AdamW with warmup + cosine decay. After a
    few hundred steps the hidden states carry the words of the prompt. Deterministic for a given seed (on CPU).
    """
    config = config or TextEncoderConfig.for_tokenizer(tokenizer)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"config.vocab_size={config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    captions = list(captions)
    if not captions:
        raise ValueError("no captions to pretrain on")
    data = prompts_lib.tokenize_prompts(tokenizer, captions)
    input_ids, attention_mask = data["input_ids"], data["attention_mask"]

    params = init_params(config, seed)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 10), max(steps, 1), learning_rate * 0.1
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, ids, mask):
        loss, grads = jax.value_and_grad(_lm_loss)(params, ids, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, len(captions))

    def batches():
        while True:
            idx = rng.choice(len(captions), size=batch_size, replace=False)
            ids, mask = input_ids[idx], attention_mask[idx]
            # Trim the shared left padding so short batches cost less (a few shapes, a few compilations at most).
            first = int(np.argmax(mask.any(axis=0)))
            first -= first % 8  # bucket the trimmed length
            yield ids[:, first:], mask[:, first:]

    def step(state, batch):
        params, opt_state, loss = train_step(*state, *batch)
        return (params, opt_state), {"loss": loss}

    (params, _), _ = training_loop.run(
        (params, opt_state), step, batches(), start=0, steps=steps, label="text-encoder pretrain", log_every=log_every
    )
    return params


# --- save / load ------------------------------------------------------------------------------------------------------


def save(path: str | os.PathLike, params: TextEncoderParams, tokenizer) -> None:
    """Writes config.json, params.npz and tokenizer/ to `path` atomically (`atomic.publish`), replacing what is
    there."""
    with atomic.publish(os.path.abspath(os.fspath(path))) as tmp:
        tmp.mkdir()
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(params.config.to_dict(), f, indent=2)
        pure = nnx.to_pure_dict(params.state)
        flat = {"/".join(str(k) for k in key): np.asarray(v) for key, v in _flatten(pure)}
        with open(tmp / PARAMS_FILE, "wb") as f:
            np.savez(f, **flat)
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))


def load(path: str | os.PathLike):
    """Reads what `save` wrote: returns (params, tokenizer)."""
    import transformers

    path = os.fspath(path)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = TextEncoderConfig.from_dict(json.load(f))
    _, abstract = nnx.split(nnx.eval_shape(lambda: TextEncoder(config, rngs=nnx.Rngs(0))))
    with np.load(os.path.join(path, PARAMS_FILE)) as npz:
        stored = {k: npz[k] for k in npz.files}
    expected = {"/".join(str(k) for k in key): v for key, v in _flatten(nnx.to_pure_dict(abstract))}
    if set(stored) != set(expected):
        raise ValueError(
            f"{path}: parameters do not match the config: missing "
            f"{sorted(set(expected) - set(stored))}, unexpected {sorted(set(stored) - set(expected))}"
        )
    for key, value in stored.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: parameter {key} has shape {value.shape}, the config needs {expected[key].shape}")
    nested: dict = {}
    for key, value in stored.items():
        node = nested
        parts = [int(p) if p.isdigit() else p for p in key.split("/")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jnp.asarray(value)
    nnx.replace_by_pure_dict(abstract, nested)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(os.path.join(path, TOKENIZER_DIR))
    return TextEncoderParams(config, abstract), tokenizer


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k in sorted(tree, key=str):
            yield from _flatten(tree[k], prefix + (k,))
    else:
        yield prefix, tree
