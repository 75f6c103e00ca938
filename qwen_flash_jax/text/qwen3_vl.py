"""Qwen-Image 2.x's real text encoder: a Hugging Face Qwen3-VL checkpoint -> JAX, text-only or with images.

    params = load_qwen3_vl("<dir with config.json and *.safetensors>")           # Qwen3VLParams
    hidden = encode_features(params, input_ids, attention_mask)                   # text only, (B, S, hidden_size)
    hidden = encode_features(params, ids, mask, image_patches(images, params.vision.config), grid_hw)  # with images

The language model (`model.language_model.*` of a `Qwen3VLForConditionalGeneration` checkpoint) goes into the toy
world's decoder (`qwen_flash_jax.text.encoder`, `condition_channels=0`: no toy condition projection), loaded by
`load_text_encoder`; the vision tower (`model.visual.*`) into `qwen_flash_jax.text.qwen3_vl_vision`; the LM head
is ignored. Both paths return the last decoder layer's output before the final norm, as the pipeline reads it.

Why the toy decoder is the real one, for text-only input (checked numerically by tests/test_qwen3_vl_text.py):
  * Layers: Qwen3VLTextDecoderLayer is the Qwen3 layer the toy implements: pre-norm RMSNorm, grouped-query
    attention with a per-head RMSNorm on q and k before the rotary embedding, scale head_dim**-0.5, no biases
    (`attention_bias` must be false), SwiGLU MLP (`hidden_act` must be silu).
  * Rotary embedding: Qwen3-VL's interleaved M-RoPE gives each frequency pair the position of one of three
    streams (temporal, height, width). Without images transformers feeds the same positions to all three streams,
    so every pair is rotated by (position x inv_freq) exactly as in 1-D RoPE with the same theta, in the same
    rotate-half layout. `mrope_section` (read for the image path) then does not matter.
  * Positions under left padding: for text-only input transformers does NOT count positions from the mask; the
    language model gets arange(S) for every row, so a row with p padding tokens starts at position p. The toy
    encoder counts from the first real token (mask cumsum). Both see the same hidden states: RoPE makes every
    attention score depend on q_pos - k_pos only, a shift common to a row cancels, and padded keys are masked
    out. The difference is float rounding of the angles (about position x 6e-8 rad), far below bf16's.
    (With images, transformers' `get_rope_index` does count from the mask, as the toy does.)
  * With images (`features_with_images`, checked against transformers in tests/test_qwen3_vl_vision.py): the
    embeddings at the `<|image_pad|>` positions (`image_token_id`) are replaced by the vision tower's, in order;
    M-RoPE positions follow `get_rope_index` over each row's valid tokens (so left and right padding give the same
    states): text counts on from the previous token, an image of (h, w) merged tokens starting at position p
    puts p on the temporal stream, p + row and p + col on the height and width streams, and the text after it
    resumes at p + max(h, w); the interleaved `mrope_section` split gives frequency j the height stream if
    j % 3 == 1 and j < 3 * section[1], the width stream if j % 3 == 2 and j < 3 * section[2], else temporal.
    The deepstack features are added at the image positions after decoder layer i, for each i < their count.
  * Output: the pipeline's `hidden_states[-1]` must be the last decoder layer's output before the final RMSNorm.
    transformers 5.x returns the *normed* state there (it ties the last entry to `last_hidden_state`), which is
    why diffusers' `QwenImage21Pipeline` hooks the norm away; `encode` returns the pre-norm state directly.

Precision: `dtype="bfloat16"` stores the weights in bfloat16 (half the memory: ~16 GiB for the 8B model instead
of ~32 GiB); the decoder still computes in float32, casting each weight as it is used.

Errors (a missing directory, an unreadable or unsupported config, missing, unexpected or misshapen tensors,
a corrupt safetensors file) are `ConfigError`s with a one-line message naming the file and tensor.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_flash_jax import sharding
from qwen_flash_jax.errors import MAX_LISTED, CheckpointError, some_of
from qwen_flash_jax.models.config import ConfigError, read_config_json
from qwen_flash_jax.safetensors_checkpoint import SafetensorsCheckpoint
from qwen_flash_jax.text import encoder as enc
from qwen_flash_jax.text import qwen3_vl_vision as vision_lib
from qwen_flash_jax.text.encoder import TextEncoder, TextEncoderConfig, TextEncoderParams

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"  # transformers' shard index (SafetensorsCheckpoint reads it)
DTYPES = ("float32", "bfloat16")
# Where the language model sits, by the class that saved the checkpoint: Qwen3VLForConditionalGeneration,
# Qwen3VLModel, Qwen3VLTextModel. The first whose embedding is present wins.
LM_PREFIXES = ("model.language_model.", "language_model.", "")

# Qwen3VLTextModel key (below the prefix) -> (our path below `layers/<i>/` or the root, is a torch Linear weight).
_TOP_LEVEL = {
    "embed_tokens.weight": (("embed",), False),
    "norm.weight": (("final_norm", "scale"), False),
}
_PER_LAYER = {
    "input_layernorm.weight": (("input_norm", "scale"), False),
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), True),
    "self_attn.q_norm.weight": (("attn", "q_norm", "scale"), False),
    "self_attn.k_norm.weight": (("attn", "k_norm", "scale"), False),
    "post_attention_layernorm.weight": (("post_attn_norm", "scale"), False),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
}

# Qwen3VLTextConfig's class defaults, for optional fields a config.json may leave out.
_DEFAULT_ROPE_THETA = 500000.0
_DEFAULT_HEAD_DIM = 128
_DEFAULT_MROPE_SECTION = (24, 20, 20)


# --- config ---------------------------------------------------------------------------------------------------------


def config_from_hf(hf_config: dict) -> TextEncoderConfig:
    """Maps a Qwen3-VL `config.json` (the full `qwen3_vl` config or its `qwen3_vl_text` part) to our config;
    `image_pad_id` is the full config's `image_token_id` (None for a bare text config).

    Raises `ConfigError` for another model type, a missing size field, or a feature the decoder does not have
    (attention biases, another activation, a non-default rotary type such as YaRN scaling).
    """
    if not isinstance(hf_config, dict):
        raise ConfigError("the Qwen3-VL config is not a JSON object")
    model_type = hf_config.get("model_type")
    if model_type == "qwen3_vl":
        text = hf_config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("qwen3_vl config has no text_config object")
    elif model_type == "qwen3_vl_text":
        text = hf_config
    else:
        raise ConfigError(
            f"model_type {model_type!r} is not a Qwen3-VL model (expected 'qwen3_vl' or "
            "'qwen3_vl_text'; MoE variants are not supported)"
        )

    def required(name):
        value = text.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"text config field {name!r} must be a positive integer, got {value!r}")
        return value

    if text.get("attention_bias", False):
        raise ConfigError(
            "text config has attention_bias=true; Qwen3-VL's language model has no attention "
            "biases and the decoder does not implement them"
        )
    if text.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"text config hidden_act must be 'silu' (SwiGLU), got {text.get('hidden_act')!r}")
    num_heads = required("num_attention_heads")
    kv_heads = text.get("num_key_value_heads")
    head_dim = text.get("head_dim")
    rope = _rope_params(text)
    image_pad_id = hf_config.get("image_token_id", 151655) if model_type == "qwen3_vl" else None
    try:
        return TextEncoderConfig(
            vocab_size=required("vocab_size"),
            hidden_size=required("hidden_size"),
            num_layers=required("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_heads if kv_heads is None else int(kv_heads),
            head_dim=_DEFAULT_HEAD_DIM if head_dim is None else int(head_dim),
            mlp_dim=required("intermediate_size"),
            rope_theta=_rope_theta(rope),
            eps=float(text.get("rms_norm_eps", 1e-6)),
            condition_channels=0,  # no toy condition projection: images go through the vision tower
            image_pad_id=image_pad_id,
            mrope_section=rope.get("mrope_section", _DEFAULT_MROPE_SECTION),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"text config does not make a valid encoder: {e}") from None


def _rope_params(text: dict) -> dict:
    # transformers 5 writes `rope_parameters`; 4.x checkpoints have `rope_theta` and `rope_scaling` beside it.
    params = text.get("rope_parameters")
    if params is None:
        params = dict(text.get("rope_scaling") or {})
        if "rope_theta" in text:
            params["rope_theta"] = text["rope_theta"]
    if not isinstance(params, dict):
        raise ConfigError(f"text config rope_parameters must be an object, got {params!r}")
    section = params.get("mrope_section", _DEFAULT_MROPE_SECTION)
    if (
        not isinstance(section, (list, tuple))
        or len(section) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in section)
    ):
        raise ConfigError(f"text config mrope_section must be 3 non-negative integers, got {section!r}")
    return params


def _rope_theta(params: dict) -> float:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope"):  # 'mrope' is what some 4.x configs call the default M-RoPE
        raise ConfigError(f"rotary type {rope_type!r} is not supported (only the default, unscaled M-RoPE)")
    theta = params.get("rope_theta", _DEFAULT_ROPE_THETA)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def read_config(path: str | os.PathLike) -> TextEncoderConfig:
    """The encoder config of the checkpoint directory `path` (its config.json)."""
    data, config_path = read_config_json(path, "Qwen3-VL checkpoint")
    try:
        return config_from_hf(data)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None


# --- key mapping ----------------------------------------------------------------------------------------------------


def key_map(config: TextEncoderConfig, prefix: str = LM_PREFIXES[0]) -> dict[str, tuple[tuple, bool, tuple]]:
    """Every checkpoint key the language model needs -> (path in our state, transpose, torch shape)."""
    d, hd, mlp = config.hidden_size, config.head_dim, config.mlp_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    torch_shapes = {
        "embed_tokens.weight": (config.vocab_size, d),
        "norm.weight": (d,),
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),  # torch Linear: (out, in)
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (mlp, d),
        "mlp.up_proj.weight": (mlp, d),
        "mlp.down_proj.weight": (d, mlp),
    }
    out = {}
    for name, (path, transpose) in _TOP_LEVEL.items():
        out[prefix + name] = (path, transpose, torch_shapes[name])
    for i in range(config.num_layers):
        for name, (path, transpose) in _PER_LAYER.items():
            out[f"{prefix}layers.{i}.{name}"] = (("layers", i) + path, transpose, torch_shapes[name])
    return out


# --- loading --------------------------------------------------------------------------------------------------------


def load_text_encoder(path: str | os.PathLike, dtype: str = "float32", mesh=None, rules=()) -> TextEncoderParams:
    """Reads the language model of the Qwen3-VL checkpoint directory `path` into `TextEncoderParams`.

    The whole checkpoint is validated from config.json and the safetensors headers (key set, shapes) before any
    tensor data is read; then tensors are read one at a time (transposed and cast in one copy) and put on the
    default device, or with a `mesh`, straight into their shardings from the logical axis names and `rules`.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = read_config(path)
    path = Path(path)
    target = np.dtype(jnp.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    try:
        checkpoint = SafetensorsCheckpoint(path)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    try:
        keys = _check_keys(path, checkpoint.tensors, config)
        _, abstract = nnx.split(nnx.eval_shape(lambda: TextEncoder(config, rngs=nnx.Rngs(0))))
        nested = checkpoint.read_nested(
            {key: (leaf_path, "transpose" if transpose else "copy") for key, (leaf_path, transpose, _) in keys.items()},
            target,
            _shardings(abstract, mesh, rules),
        )
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    finally:
        checkpoint.close()
    nnx.replace_by_pure_dict(abstract, nested)
    return TextEncoderParams(config, abstract)


def _check_keys(path: Path, tensors: dict, config: TextEncoderConfig) -> dict:
    """The key map for the checkpoint's layout; every language-model tensor in `tensors` (the checkpoint's
    {key: TensorInfo}) present, known and of its shape."""
    prefix = next((p for p in LM_PREFIXES if p + "embed_tokens.weight" in tensors), None)
    if prefix is None:
        raise ConfigError(
            f"{path}: no language-model embedding (looked for "
            f"{', '.join(p + 'embed_tokens.weight' for p in LM_PREFIXES)}); is this a Qwen3-VL "
            "checkpoint?"
        )
    keys = key_map(config, prefix)
    missing = [k for k in keys if k not in tensors]
    # Anything else under the language model's prefix would be silently dropped (biases, extra layers...).
    if prefix:
        lm_names = {k for k in tensors if k.startswith(prefix)}
    else:  # a bare Qwen3VLTextModel: its own keys only
        lm_names = {k for k in tensors if k.split(".", 1)[0] in ("embed_tokens", "layers", "norm")}
    unexpected = sorted(lm_names - set(keys))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} of {len(keys)} language-model tensors: {some_of(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected language-model tensors: {some_of(unexpected)}")
    if problems:
        raise ConfigError(
            f"{path}: checkpoint does not match its config (num_hidden_layers={config.num_layers}): "
            + "; ".join(problems)
        )
    bad = [
        f"{k} has shape {tensors[k].shape}, expected {shape}"
        for k, (_, _, shape) in keys.items()
        if tuple(tensors[k].shape) != tuple(shape)
    ]
    if bad:
        raise ConfigError(f"{path}: {len(bad)} tensors have the wrong shape: " + "; ".join(bad[:MAX_LISTED]))
    return keys


# --- image-conditioned forward --------------------------------------------------------------------------------------


def mrope_positions(input_ids, attention_mask, image_pad_id: int, merged_grid_hw):
    """(3, B, S) int32 (temporal, height, width) positions as transformers' `get_rope_index` makes them for rows
    whose images all have (h, w) = `merged_grid_hw` merged tokens (see the module doc); 0 at padding.
    `merged_grid_hw` may instead be one (h, w) per image, in order (every row holds the same images)."""
    if isinstance(merged_grid_hw[0], (tuple, list)):
        return _mrope_positions_per_image(input_ids, attention_mask, image_pad_id, merged_grid_hw)
    lh, lw = merged_grid_hw
    tokens, span = lh * lw, max(lh, lw)
    valid = jnp.asarray(attention_mask).astype(bool)
    is_image = (jnp.asarray(input_ids) == image_pad_id) & valid
    seen = jnp.cumsum(is_image, axis=1, dtype=jnp.int32)  # image tokens up to and including this one
    text = (valid & ~is_image).astype(jnp.int32)
    text_before = jnp.cumsum(text, axis=1, dtype=jnp.int32) - text
    start = text_before + ((seen - 1) // tokens) * span  # an image token's image starts here
    within = (seen - 1) % tokens
    text_pos = text_before + (seen // tokens) * span
    streams = [jnp.where(is_image, start + offset, text_pos) for offset in (0, within // lw, within % lw)]
    return jnp.where(valid, jnp.stack(streams), 0)


def _mrope_positions_per_image(input_ids, attention_mask, image_pad_id: int, grids):
    """`mrope_positions` for images of different merged grids: image k has grids[k] = (h, w) tokens."""
    grids = np.asarray(grids, np.int32).reshape(-1, 2)
    tokens, spans = grids[:, 0] * grids[:, 1], grids.max(axis=1)
    ends = np.cumsum(tokens)  # image tokens up to the end of image k
    span_before = np.concatenate([[0], np.cumsum(spans)]).astype(np.int32)  # positions taken by images < k
    valid = jnp.asarray(attention_mask).astype(bool)
    is_image = (jnp.asarray(input_ids) == image_pad_id) & valid
    seen = jnp.cumsum(is_image, axis=1, dtype=jnp.int32)
    text = (valid & ~is_image).astype(jnp.int32)
    text_before = jnp.cumsum(text, axis=1, dtype=jnp.int32) - text
    image = jnp.clip(jnp.searchsorted(ends, seen - 1, side="right"), 0, len(grids) - 1)  # this token's image
    within = seen - 1 - jnp.take(jnp.asarray(ends - tokens), image)
    width = jnp.take(jnp.asarray(grids[:, 1]), image)
    start = text_before + jnp.take(jnp.asarray(span_before), image)
    done = jnp.searchsorted(ends, seen, side="right")  # images complete before this text token
    text_pos = text_before + jnp.take(jnp.asarray(span_before), done)
    streams = [jnp.where(is_image, start + offset, text_pos) for offset in (0, within // width, within % width)]
    return jnp.where(valid, jnp.stack(streams), 0)


def _mrope_streams(section, half: int) -> np.ndarray:
    """The position stream (0 temporal, 1 height, 2 width) of each of the head_dim/2 frequencies."""
    stream = np.zeros(half, np.int32)
    for dim in (1, 2):
        stream[np.arange(dim, min(3 * section[dim], half), 3)] = dim
    return stream


def _features_with_images(text_params, input_ids, attention_mask, image_embeds, deepstack, merged_grid_hw):
    cfg = text_params.config
    model = enc._model(text_params)
    valid = attention_mask.astype(bool)
    is_image = ((input_ids == cfg.image_pad_id) & valid)[..., None]
    slot = jnp.clip(jnp.cumsum(is_image[..., 0], axis=1) - 1, 0, image_embeds.shape[1] - 1)[..., None]

    def at_slots(features):  # (B, slots, D) -> (B, S, D): the k-th image token of a row gets the k-th row
        return jnp.take_along_axis(features.astype(jnp.float32), slot, axis=1)

    x = jnp.take(model.embed[...], input_ids, axis=0).astype(jnp.float32)
    x = jnp.where(is_image, at_slots(image_embeds), x)

    positions = mrope_positions(input_ids, attention_mask, cfg.image_pad_id, merged_grid_hw)
    stream = _mrope_streams(cfg.mrope_section, cfg.head_dim // 2)
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    angles = jnp.moveaxis(positions[stream], 0, -1).astype(jnp.float32) * inv_freq  # (B, S, head_dim/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)

    s = input_ids.shape[1]
    mask = (np.tril(np.ones((s, s), bool)) & (valid[:, None, :] | np.eye(s, dtype=bool)))[:, None]
    states = [x]
    for i, layer in enumerate(model.layers):
        x = layer(x, cos, sin, mask)
        if i < len(deepstack):
            x = x + jnp.where(is_image, at_slots(deepstack[i]), 0.0)
        states.append(x)
    picked = [states[i] for i in cfg.feature_layers]
    if len(picked) == 1:
        return picked[0]
    return jnp.concatenate(
        [p * jax.lax.rsqrt(jnp.mean(jnp.square(p), axis=-1, keepdims=True) + 1e-6) for p in picked], axis=-1
    )


_features_with_images_jit = jax.jit(_features_with_images, static_argnames=("merged_grid_hw",))


def features_with_images(
    text_params: TextEncoderParams, input_ids, attention_mask, image_embeds, deepstack, merged_grid_hw
):
    """Image-conditioned features (B, S, output_size) float32 (jitted; jittable with `merged_grid_hw` static):
    the last decoder layer's output before the final norm for the default `feature_layers`.

    Every row's valid `<|image_pad|>` tokens are its images' slots: `image_embeds` (B, K*T, hidden) and each
    `deepstack` entry hold K images of T = h*w merged tokens (`merged_grid_hw` = (h, w)) per row, in order.
    Any padding side works: positions are counted over each row's valid tokens.
    """
    cfg = text_params.config
    if cfg.image_pad_id is None or cfg.mrope_section is None:
        raise ValueError("images need a Qwen3-VL text config (image_pad_id and mrope_section; see config_from_hf)")
    merged_grid_hw = tuple(int(g) for g in merged_grid_hw)
    input_ids, attention_mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
    image_embeds, deepstack = jnp.asarray(image_embeds), tuple(jnp.asarray(d) for d in deepstack)
    _check_slots(input_ids, attention_mask, cfg.image_pad_id, image_embeds.shape, merged_grid_hw)
    if any(d.shape != image_embeds.shape for d in deepstack):
        raise ValueError(
            f"deepstack features {[d.shape for d in deepstack]} must match image_embeds {image_embeds.shape}"
        )
    return _features_with_images_jit(text_params, input_ids, attention_mask, image_embeds, deepstack, merged_grid_hw)


def _check_slots(input_ids, attention_mask, image_pad_id, embeds_shape, merged_grid_hw):
    """Each row's image tokens must be runs of exactly T = h*w, as many as `image_embeds` has rows for
    (checked on concrete inputs only: under an outer jit the caller is trusted)."""
    tokens = merged_grid_hw[0] * merged_grid_hw[1]
    if len(embeds_shape) != 3 or embeds_shape[0] != input_ids.shape[0] or embeds_shape[1] % tokens:
        raise ValueError(
            f"image_embeds must be (B={input_ids.shape[0]}, K*{tokens}, hidden) for merged grid "
            f"{merged_grid_hw}, got {tuple(embeds_shape)}"
        )
    if isinstance(input_ids, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer):
        return
    is_image = (np.asarray(input_ids) == image_pad_id) & (np.asarray(attention_mask) > 0)
    for b, row in enumerate(is_image):
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
        if row.sum() != embeds_shape[1] or np.any(runs != tokens):
            raise ValueError(
                f"row {b} has image-token runs {runs.tolist()}; the images need "
                f"{embeds_shape[1] // tokens} runs of {tokens} (h*w for merged grid {merged_grid_hw})"
            )


# --- text + vision ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Qwen3VLParams:
    """The whole encoder: language model and vision tower (None for a checkpoint without `model.visual.*`)."""

    text: TextEncoderParams
    vision: vision_lib.VisionParams | None


jax.tree_util.register_dataclass(Qwen3VLParams, data_fields=["text", "vision"], meta_fields=[])


def _shardings(abstract_state, mesh, rules):
    if mesh is None:
        return None
    return sharding.param_shardings(abstract_state, mesh, sharding.normalise_rules(rules))


def load_qwen3_vl(path: str | os.PathLike, dtype: str = "float32", mesh=None, rules=()) -> Qwen3VLParams:
    """The language model and, if the checkpoint has one, the vision tower of the Qwen3-VL directory `path`
    (with a `mesh`: each tensor straight into its sharding, see `load_text_encoder`)."""
    text = load_text_encoder(path, dtype, mesh, rules)
    try:
        checkpoint = SafetensorsCheckpoint(Path(path))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    try:
        with_vision = vision_lib.visual_prefix(checkpoint.tensors) is not None
    finally:
        checkpoint.close()
    if not with_vision:
        return Qwen3VLParams(text, None)
    vision = vision_lib.load_vision_tower(path, dtype, mesh, rules)
    if vision.config.out_hidden_size != text.config.hidden_size:
        raise ConfigError(
            f"{path}: the vision tower's out_hidden_size {vision.config.out_hidden_size} != the "
            f"language model's hidden_size {text.config.hidden_size}"
        )
    return Qwen3VLParams(text, vision)


def _encode_with_images(params: Qwen3VLParams, input_ids, attention_mask, patches, grid_hw):
    embeds, deepstack = vision_lib._vision_embeddings(params.vision, patches, grid_hw)
    m = params.vision.config.spatial_merge_size
    return _features_with_images(
        params.text, input_ids, attention_mask, embeds, deepstack, (grid_hw[0] // m, grid_hw[1] // m)
    )


_encode_with_images_jit = jax.jit(_encode_with_images, static_argnames=("grid_hw",))


def _encode_with_images_multi(params: Qwen3VLParams, input_ids, attention_mask, patches, grids):
    m = params.vision.config.spatial_merge_size
    embeds, deepstack = [], []
    for p, g in zip(patches, grids):
        e, d = vision_lib._vision_embeddings(params.vision, p, g)
        embeds.append(e)
        deepstack.append(d)
    batch = input_ids.shape[0]
    rows = lambda parts: jnp.broadcast_to(  # noqa: E731 - the images are shared by every row
        jnp.concatenate(parts, axis=1), (batch, sum(x.shape[1] for x in parts), parts[0].shape[-1])
    )
    merged = tuple((g[0] // m, g[1] // m) for g in grids)
    return _features_with_images(
        params.text,
        input_ids,
        attention_mask,
        rows(embeds),
        tuple(rows([d[i] for d in deepstack]) for i in range(len(deepstack[0]))),
        merged,
    )


_encode_with_images_multi_jit = jax.jit(_encode_with_images_multi, static_argnames=("grids",))


def encode_features_per_row(params: Qwen3VLParams, input_ids, attention_mask, patches, grids):
    """`encode_features_multi` inside jit, each row with its own K images: `patches[k]` (B, h_k*w_k, patch_dim),
    `grids` static. The caller guarantees every row's valid `<|image_pad|>` runs match the grids."""
    return _encode_with_images_multi(params, input_ids, attention_mask, tuple(patches), grids)


def encode_features_multi(params: Qwen3VLParams, input_ids, attention_mask, patches, grids):
    """`encode_features` for K condition images of any sizes shared by every row (as the pipeline passes them):
    `patches[k]` (1, h_k*w_k, patch_dim) from `image_patches`, `grids[k]` = (h_k, w_k) in patches; every row's
    valid `<|image_pad|>` tokens are the K images' merged tokens in order. Jitted."""
    if params.vision is None:
        raise ValueError("this checkpoint has no vision tower (model.visual.*): it cannot encode images")
    grids = tuple(tuple(int(v) for v in g) for g in grids)
    if len(patches) != len(grids) or not grids:
        raise ValueError(f"{len(patches)} patch arrays for {len(grids)} grids")
    m = params.vision.config.spatial_merge_size
    tokens = [g[0] * g[1] // m**2 for g in grids]
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    is_image = (ids == params.text.config.image_pad_id) & (mask > 0)
    for b, row in enumerate(is_image):
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        runs = (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()
        if runs != tokens:
            raise ValueError(f"row {b} has image-token runs {runs}; the images need runs of {tokens}")
    return _encode_with_images_multi_jit(
        params,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        tuple(jnp.asarray(p, jnp.float32) for p in patches),
        grids,
    )


def encode_features(params: Qwen3VLParams, input_ids, attention_mask, patches=None, grid_hw=None):
    """(B, S, hidden) pre-norm last-layer states: text-only (exactly `encoder.encode`) when `patches` is None, else
    conditioned on one image per row: `patches` (B, h*w, patch_dim) from `image_patches`, `grid_hw` = (h, w) in
    patches (static), each row holding h*w/merge**2 valid `<|image_pad|>` tokens. Jitted; jittable."""
    if patches is None:
        return enc.encode(params.text, input_ids, attention_mask)
    if params.vision is None:
        raise ValueError("this checkpoint has no vision tower (model.visual.*): it cannot encode images")
    if grid_hw is None:
        raise ValueError("image patches need their grid_hw = (h, w) in patches")
    grid_hw = tuple(int(g) for g in grid_hw)
    cfg, m = params.vision.config, params.vision.config.spatial_merge_size
    if grid_hw[0] % m or grid_hw[1] % m:
        raise ValueError(f"grid_hw {grid_hw} is not a whole number of {m}x{m} merge windows")
    input_ids, attention_mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
    patches = jnp.asarray(patches)
    if patches.shape != (input_ids.shape[0], grid_hw[0] * grid_hw[1], cfg.patch_dim):
        raise ValueError(
            f"patches must be (B={input_ids.shape[0]}, {grid_hw[0] * grid_hw[1]}, {cfg.patch_dim}) "
            f"for grid {grid_hw}, got {patches.shape}"
        )
    tokens = grid_hw[0] * grid_hw[1] // m**2
    _check_slots(
        input_ids,
        attention_mask,
        params.text.config.image_pad_id,
        (input_ids.shape[0], tokens, cfg.out_hidden_size),
        (grid_hw[0] // m, grid_hw[1] // m),
    )
    return _encode_with_images_jit(params, input_ids, attention_mask, patches, grid_hw)
