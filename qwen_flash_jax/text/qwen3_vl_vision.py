"""The vision side of Qwen-Image 2.x's text encoder: Qwen3-VL's image preprocessing and vision tower, in JAX.

    config = read_vision_config("<Qwen3-VL checkpoint dir>")              # config.json + preprocessor_config.json
    patches = image_patches(images_uint8_bhwc, config)                     # host numpy, (B, N, patch_dim)
    vision = load_vision_tower("<dir>")                                    # VisionParams (model.visual.*)
    embeds, deepstack = vision_embeddings(vision, patches, grid_hw)        # (B, T, text hidden), tuple of same

What transformers does, and how we match it (checked by tests/test_qwen3_vl_vision.py):
  * Preprocessing (Qwen2-VL's image processor): resize to a multiple of patch*merge within [min_pixels,
    max_pixels], rescale and normalise, cut into patches, repeat the single frame temporal_patch_size times (the
    Conv3d's input) and order the patches window by window (row-major over the (h/merge, w/merge) merge windows,
    row-major inside each), so each merged token's merge**2 patches are consecutive. `image_patches` takes only
    images that need no resize (a resampler is hard to match bit for bit; our data has fixed sizes).
  * Normalisation arithmetic: the torchvision backend (the default wherever torchvision is installed) computes
    (x - 255*mean) / (255*std) in float32; the PIL backend rounds x/255 from float64 to float32, then
    (v - mean) / std. They differ by a float32 ulp; `backend` picks which to reproduce exactly.
  * Tower: the Conv3d (stride = kernel) is one matmul on the flat patches; the learned (side x side) position
    table is resampled to the (h, w) patch grid bilinearly with align_corners=True (four gathered rows and
    weights per patch, computed on the host for the static grid); `depth` pre-norm blocks (LayerNorm eps 1e-6,
    bidirectional attention within the image with a 2-D rotary embedding: half of each head's frequencies turn
    with the patch row, half with the column, rotate-half layout; GELU MLP); the merger (LayerNorm, concatenate
    each window's merge**2 tokens, MLP with exact GELU) to the language model's width. After each block in
    `deepstack_visual_indexes` a deepstack merger (LayerNorm after concatenating) makes the features that the
    language model adds at its image positions after its decoder layers 0, 1, ...
  * Batching: transformers packs images on one axis with per-image attention (cu_seqlens); with one image per
    sample and equal sizes that is a batch axis, which is what `vision_embeddings` takes.

Parameters are stored as loaded (float32 or bfloat16) and used in float32. Their logical axis names
(`vision_embed`, `vision_mlp`, `vision_merge`, `vision_pos`, `embed`) have no sharding rules by default: the
tower (~0.4B parameters for the 8B model) is replicated unless rules name them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_flash_jax import sharding
from qwen_flash_jax.errors import CheckpointError, some_of
from qwen_flash_jax.models.config import ConfigError, read_config_json
from qwen_flash_jax.safetensors_checkpoint import SafetensorsCheckpoint

PREPROCESSOR_FILE = "preprocessor_config.json"
VISUAL_PREFIXES = ("model.visual.", "visual.")  # Qwen3VLForConditionalGeneration, Qwen3VLModel
DTYPES = ("float32", "bfloat16")
BACKENDS = ("torchvision", "pil")
_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}  # name -> tanh approximation
# Qwen3VLVisionConfig's class defaults, for fields a config.json leaves out (transformers fills them the same way).
_VISION_DEFAULTS = dict(
    depth=27,
    hidden_size=1152,
    hidden_act="gelu_pytorch_tanh",
    intermediate_size=4304,
    num_heads=16,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=3584,
    num_position_embeddings=2304,
    deepstack_visual_indexes=(8, 16, 24),
)
# Without a preprocessor_config.json: Qwen3-VL's published preprocessing (mean = std = 0.5, 256**2 to 4096**2
# pixels). transformers' class defaults are Qwen2-VL's (CLIP mean/std, 56**2 to 28**2*1280 pixels); a file that
# exists but leaves a key out gets those, as the processor would.
_QWEN3_VL_PREPROCESSING = dict(
    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), min_pixels=256 * 256, max_pixels=4096 * 4096
)
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    # Preprocessing (preprocessor_config.json).
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    do_resize: bool = True
    min_pixels: int = 256 * 256
    max_pixels: int = 4096 * 4096

    def __post_init__(self):
        for name in ("deepstack_visual_indexes", "image_mean", "image_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (one of {', '.join(_ACTIVATIONS)})")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into num_heads={self.num_heads} heads of a "
                "multiple of 4 (the 2-D rotary embedding)"
            )
        if math.isqrt(self.num_position_embeddings) ** 2 != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} is not a square grid")
        idx = self.deepstack_visual_indexes
        if list(idx) != sorted(set(idx)) or any(not 0 <= i < self.depth for i in idx):
            raise ValueError(
                f"deepstack_visual_indexes {list(idx)} must be increasing block indices < depth {self.depth}"
            )
        if len(self.image_mean) != self.in_channels or len(self.image_std) != self.in_channels:
            raise ValueError(
                f"image_mean/image_std need {self.in_channels} values, got {list(self.image_mean)}, "
                f"{list(self.image_std)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one row of `image_patches`: in_channels * temporal_patch_size * patch_size**2."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merged_size(self) -> int:
        return self.hidden_size * self.spatial_merge_size**2


def vision_config_from_hf(hf_config: dict, preprocessor: dict | None = None) -> VisionConfig:
    """A `qwen3_vl` config.json's `vision_config` (and a preprocessor_config.json, or None) -> VisionConfig."""
    vision = hf_config.get("vision_config") if isinstance(hf_config, dict) else None
    if not isinstance(vision, dict):
        raise ConfigError("the config has no vision_config object")
    values = {k: vision.get(k, default) for k, default in _VISION_DEFAULTS.items()}
    for k, v in values.items():
        if isinstance(_VISION_DEFAULTS[k], int) and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ConfigError(f"vision config field {k!r} must be a positive integer, got {v!r}")
    rope = vision.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"vision rotary type {rope.get('rope_type')!r} is not supported (only 'axial')")
    values["rope_theta"] = float(rope.get("rope_theta", 10000.0))
    values.update(_preprocessing(preprocessor, values))
    try:
        return VisionConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"vision config does not make a valid vision tower: {e}") from None


def _preprocessing(pre, vision: dict) -> dict:
    if pre is None:
        return dict(_QWEN3_VL_PREPROCESSING)
    if not isinstance(pre, dict):
        raise ConfigError(f"{PREPROCESSOR_FILE} is not a JSON object")
    for ours, theirs in (
        ("patch_size", "patch_size"),
        ("temporal_patch_size", "temporal_patch_size"),
        ("spatial_merge_size", "merge_size"),
    ):
        if theirs in pre and pre[theirs] != vision[ours]:
            raise ConfigError(
                f"{PREPROCESSOR_FILE} has {theirs}={pre[theirs]!r} but the vision tower's {ours} is {vision[ours]}"
            )
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    try:
        return dict(
            image_mean=tuple(float(v) for v in pre.get("image_mean", _CLIP_MEAN)),
            image_std=tuple(float(v) for v in pre.get("image_std", _CLIP_STD)),
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
            do_rescale=bool(pre.get("do_rescale", True)),
            do_normalize=bool(pre.get("do_normalize", True)),
            do_resize=bool(pre.get("do_resize", True)),
            min_pixels=int(size.get("shortest_edge", pre.get("min_pixels", 56 * 56))),
            max_pixels=int(size.get("longest_edge", pre.get("max_pixels", 28 * 28 * 1280))),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{PREPROCESSOR_FILE} has an invalid value: {e}") from None


def read_vision_config(path: str | os.PathLike) -> VisionConfig:
    """The vision config of the Qwen3-VL checkpoint directory `path`: its config.json, and the first
    preprocessor_config.json in `path` or in a diffusers pipeline's sibling `processor/` folder."""
    data, config_path = read_config_json(path, "Qwen3-VL checkpoint")
    path = Path(path)
    preprocessor, pre_path = None, None
    for candidate in (path / PREPROCESSOR_FILE, path.parent / "processor" / PREPROCESSOR_FILE):
        if candidate.is_file():
            pre_path = candidate
            try:
                preprocessor = json.loads(candidate.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{candidate}: cannot read: {' '.join(str(e).split())}") from None
            break
    try:
        return vision_config_from_hf(data, preprocessor)
    except ConfigError as e:
        raise ConfigError(f"{config_path}{f' / {pre_path}' if pre_path else ''}: {e}") from None


# --- preprocessing (host) -----------------------------------------------------------------------------------------


def image_grid(height: int, width: int, config: VisionConfig) -> tuple[tuple[int, int], int]:
    """((h, w) in patches, merged vision tokens h*w/merge**2) for an image of height x width pixels.

    Raises ValueError for a size the processor would resize (not a multiple of patch_size * spatial_merge_size,
    or outside [min_pixels, max_pixels]) or refuse (aspect ratio above 200).
    """
    factor = config.patch_size * config.spatial_merge_size
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(
            f"image of {height}x{width} pixels: height and width must be positive multiples of "
            f"patch_size * spatial_merge_size = {factor} (the processor would resize it)"
        )
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}x{width} pixels: aspect ratio above 200, which the processor refuses")
    if config.do_resize and not config.min_pixels <= height * width <= config.max_pixels:
        raise ValueError(
            f"image of {height}x{width} = {height * width} pixels is outside the processor's "
            f"[{config.min_pixels}, {config.max_pixels}] (it would be resized)"
        )
    h, w = height // config.patch_size, width // config.patch_size
    return (h, w), h * w // config.spatial_merge_size**2


def image_patches(images, config: VisionConfig, backend: str = "torchvision"):
    """uint8 RGB images (B, H, W, C) -> float32 (B, N, patch_dim): each image's `pixel_values` rows, as
    transformers' Qwen3-VL image processor (`backend`: its torchvision or PIL arithmetic) makes them.

    A jax array in gives a jax array out (torchvision arithmetic, jittable): the training step cuts the patches on
    device from the uint8 pixels, which are 1/(2 * 4) the bytes of the float32 patches (one frame, not two)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(images, jax.Array):
        images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] != config.in_channels:
        raise ValueError(f"images must be uint8 (B, H, W, {config.in_channels}), got {images.dtype} {images.shape}")
    (gh, gw), _ = image_grid(images.shape[1], images.shape[2], config)
    if isinstance(images, jax.Array):
        return _patch_rows(jnp, images, config, gh, gw, _normalise_torchvision(images, config))
    if backend == "torchvision":
        x = _normalise_torchvision(images, config)
    else:  # PIL: x / 255 rounded from float64 to float32, then (v - mean) / std
        x = (
            (images.astype(np.float64) * config.rescale_factor).astype(np.float32)
            if config.do_rescale
            else images.astype(np.float32)
        )
        if config.do_normalize:
            x = (x - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    return np.ascontiguousarray(_patch_rows(np, images, config, gh, gw, x), dtype=np.float32)


def _normalise_torchvision(images, config: VisionConfig):
    """The torchvision backend's float32 arithmetic (numpy or jax in, same out)."""
    mean, std = np.asarray(config.image_mean, np.float32), np.asarray(config.image_std, np.float32)
    x = images.astype(np.float32)
    if config.do_rescale and config.do_normalize:
        scale = np.float32(1.0 / config.rescale_factor)  # mean and std absorb the rescale
        return (x - mean * scale) / (std * scale)
    if config.do_rescale:
        x = x * np.float32(config.rescale_factor)
    return (x - mean) / std if config.do_normalize else x


def _patch_rows(xp, images, config: VisionConfig, gh: int, gw: int, x):
    """Normalised pixels (B, H, W, C) -> (B, gh*gw, patch_dim) in merge-window order, the frame repeated."""
    b, c = images.shape[0], images.shape[-1]
    m, p, t = config.spatial_merge_size, config.patch_size, config.temporal_patch_size
    x = x.reshape(b, gh // m, m, p, gw // m, m, p, c).transpose(0, 1, 4, 2, 5, 7, 3, 6)  # windows, window, C, p, p
    x = xp.broadcast_to(x[..., None, :, :], x.shape[:6] + (t, p, p))  # the single frame, temporal_patch_size times
    return x.reshape(b, gh * gw, config.patch_dim)


@functools.lru_cache(maxsize=64)
def _grid_tables(config: VisionConfig, grid_hw: tuple[int, int]):
    """Static per-grid tables, tokens in merge-window order: position-table rows (N, 4) and weights (N, 4) of the
    bilinear (align_corners) resampling, and the rotary cos/sin (N, head_dim), all float32 as torch computes them."""
    h, w = grid_hw
    m, side = config.spatial_merge_size, math.isqrt(config.num_position_embeddings)
    rows = np.arange(h).reshape(h // m, m)[:, None, :, None]
    cols = np.arange(w).reshape(w // m, m)[None, :, None, :]
    row, col = [np.broadcast_to(a, (h // m, w // m, m, m)).reshape(-1) for a in (rows, cols)]

    def taps(index, size):
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        offsets = np.arange(2, dtype=np.float32)
        tap = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        weight = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets), np.float32(0))
        return tap, weight

    (ht, hw_), (wt, ww) = taps(row, h), taps(col, w)
    index = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    weight = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    quarter = config.head_dim // 2
    inv_freq = np.float32(1.0) / (
        np.float32(config.rope_theta) ** (np.arange(0, quarter, 2, dtype=np.float32) / np.float32(quarter))
    )
    angles = np.concatenate(
        [row[:, None].astype(np.float32) * inv_freq, col[:, None].astype(np.float32) * inv_freq], axis=-1
    )
    angles = np.concatenate([angles, angles], axis=-1)
    return index, weight, np.cos(angles), np.sin(angles)


# --- modules ------------------------------------------------------------------------------------------------------


class Linear(nnx.Module):
    """Linear layer with bias, kernel (in, out), used in float32 whatever the stored dtype."""

    def __init__(self, din: int, dout: int, axes: tuple, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = nnx.Param(init(rngs.params(), (din, dout), jnp.float32), out_sharding=axes, eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32), out_sharding=(axes[1],), eager_sharding=False)

    def __call__(self, x):
        y = jnp.dot(x.reshape(-1, x.shape[-1]), self.kernel[...].astype(jnp.float32)) + self.bias[...].astype(
            jnp.float32
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, axis: str):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(axis,), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=(axis,), eager_sharding=False)

    def __call__(self, x):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + _LN_EPS) * self.scale[...].astype(jnp.float32) + self.bias[...].astype(
            jnp.float32
        )


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.norm1, self.norm2 = LayerNorm(d, "vision_embed"), LayerNorm(d, "vision_embed")
        self.qkv = Linear(d, 3 * d, ("vision_embed", "vision_mlp"), rngs=rngs)
        self.proj = Linear(d, d, ("vision_mlp", "vision_embed"), rngs=rngs)
        self.fc1 = Linear(d, cfg.intermediate_size, ("vision_embed", "vision_mlp"), rngs=rngs)
        self.fc2 = Linear(cfg.intermediate_size, d, ("vision_mlp", "vision_embed"), rngs=rngs)
        self.num_heads, self.tanh_gelu = cfg.num_heads, _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x, cos, sin):
        """x (B, N, D); cos/sin (N, 1, head_dim). Every patch of an image attends to every other."""
        b, n, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, -1), 2, 0)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(np.float32)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, n, d)
        x = x + self.proj(out)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=self.tanh_gelu))


class PatchMerger(nnx.Module):
    """merge**2 neighbouring tokens -> one of the language model's width; LayerNorm before (`merger`) or after
    (the deepstack mergers, `postshuffle`) concatenating them."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool, *, rngs: nnx.Rngs):
        wide = cfg.merged_size
        self.norm = LayerNorm(
            wide if postshuffle else cfg.hidden_size, "vision_merge" if postshuffle else "vision_embed"
        )
        self.fc1 = Linear(wide, wide, ("vision_merge", "vision_merge"), rngs=rngs)
        self.fc2 = Linear(wide, cfg.out_hidden_size, ("vision_merge", "embed"), rngs=rngs)
        self.postshuffle, self.wide = postshuffle, wide

    def __call__(self, x):
        b = x.shape[0]
        x = self.norm(x.reshape(b, -1, self.wide)) if self.postshuffle else self.norm(x).reshape(b, -1, self.wide)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, (None, "vision_embed"), rngs=rngs)
        self.pos_embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.num_position_embeddings, cfg.hidden_size), jnp.float32),
            out_sharding=("vision_pos", "vision_embed"),
            eager_sharding=False,
        )
        self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, False, rngs=rngs)
        self.deepstack_mergers = nnx.List([PatchMerger(cfg, True, rngs=rngs) for _ in cfg.deepstack_visual_indexes])
        self.cfg = cfg

    def __call__(self, patches, grid_hw: tuple[int, int]):
        """patches (B, h*w, patch_dim) -> (embeds (B, T, out_hidden), deepstack tuple of (B, T, out_hidden))."""
        cfg = self.cfg
        if patches.ndim != 3 or patches.shape[1:] != (grid_hw[0] * grid_hw[1], cfg.patch_dim):
            raise ValueError(
                f"patches must be (B, {grid_hw[0] * grid_hw[1]}, {cfg.patch_dim}) for grid "
                f"{tuple(grid_hw)}, got {patches.shape}"
            )
        index, weight, cos, sin = _grid_tables(cfg, tuple(grid_hw))
        x = self.patch_embed(patches.astype(jnp.float32))
        pos = jnp.take(self.pos_embed[...].astype(jnp.float32), index, axis=0)  # (N, 4, D)
        x = x + jnp.sum(pos * weight[..., None], axis=1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin)
            if i in cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_mergers[cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), tuple(deepstack)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


# --- functional API -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionParams:
    """The tower's parameters: a pytree with `config` static and `state` (an `nnx.State` of Params) as leaves."""

    config: VisionConfig
    state: nnx.State


jax.tree_util.register_dataclass(VisionParams, data_fields=["state"], meta_fields=["config"])


@functools.lru_cache(maxsize=None)
def _graphdef(cfg: VisionConfig):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0))))
    return graphdef


def _vision_embeddings(params: VisionParams, patches, grid_hw):
    return nnx.merge(_graphdef(params.config), params.state)(patches, grid_hw)


_vision_embeddings_jit = jax.jit(_vision_embeddings, static_argnames=("grid_hw",))


def vision_embeddings(params: VisionParams, patches, grid_hw):
    """(image_embeds (B, T, out_hidden), deepstack tuple of (B, T, out_hidden)) float32 for `image_patches` rows of
    B images on the same (h, w) patch grid (static); T = h*w / spatial_merge_size**2. Jitted; jittable."""
    return _vision_embeddings_jit(params, patches, tuple(int(g) for g in grid_hw))


# --- loading ------------------------------------------------------------------------------------------------------


def key_map(config: VisionConfig, prefix: str = VISUAL_PREFIXES[0]) -> dict[str, tuple[tuple, str, tuple]]:
    """Every checkpoint key of the tower -> (path in our state, how to convert it, torch shape)."""
    d, i, w, o, p = (
        config.hidden_size,
        config.intermediate_size,
        config.merged_size,
        config.out_hidden_size,
        config.patch_size,
    )
    out = {}

    def linear(key, path, din, dout):
        out[f"{prefix}{key}.weight"] = (path + ("kernel",), "linear", (dout, din))
        out[f"{prefix}{key}.bias"] = (path + ("bias",), "copy", (dout,))

    def norm(key, path, dim):
        out[f"{prefix}{key}.weight"] = (path + ("scale",), "copy", (dim,))
        out[f"{prefix}{key}.bias"] = (path + ("bias",), "copy", (dim,))

    out[f"{prefix}patch_embed.proj.weight"] = (
        ("patch_embed", "kernel"),
        "conv",
        (d, config.in_channels, config.temporal_patch_size, p, p),
    )
    out[f"{prefix}patch_embed.proj.bias"] = (("patch_embed", "bias"), "copy", (d,))
    out[f"{prefix}pos_embed.weight"] = (("pos_embed",), "copy", (config.num_position_embeddings, d))
    for b in range(config.depth):
        norm(f"blocks.{b}.norm1", ("blocks", b, "norm1"), d)
        norm(f"blocks.{b}.norm2", ("blocks", b, "norm2"), d)
        linear(f"blocks.{b}.attn.qkv", ("blocks", b, "qkv"), d, 3 * d)
        linear(f"blocks.{b}.attn.proj", ("blocks", b, "proj"), d, d)
        linear(f"blocks.{b}.mlp.linear_fc1", ("blocks", b, "fc1"), d, i)
        linear(f"blocks.{b}.mlp.linear_fc2", ("blocks", b, "fc2"), i, d)
    mergers = [("merger", ("merger",), d)] + [
        (f"deepstack_merger_list.{j}", ("deepstack_mergers", j), w) for j in range(len(config.deepstack_visual_indexes))
    ]
    for key, path, norm_dim in mergers:
        norm(f"{key}.norm", path + ("norm",), norm_dim)
        linear(f"{key}.linear_fc1", path + ("fc1",), w, w)
        linear(f"{key}.linear_fc2", path + ("fc2",), w, o)
    return out


_LAYOUTS = {  # torch layout -> ours, by the kind of tensor `key_map` names (`SafetensorsCheckpoint.read_nested`)
    "copy": "copy",
    "linear": "transpose",  # (out, in) -> (in, out)
    "conv": lambda t: t.reshape(t.shape[0], -1).T,  # (out, C, T, p, p) -> (C*T*p*p, out): the flat patch rows
}


def visual_prefix(tensors) -> str | None:
    """The prefix under which `tensors` (checkpoint keys) hold a vision tower, or None if they hold none."""
    return next((p for p in VISUAL_PREFIXES if any(k.startswith(p) for k in tensors)), None)


def load_vision_tower(path: str | os.PathLike, dtype: str = "float32", mesh=None, rules=()) -> VisionParams:
    """Reads `model.visual.*` of the Qwen3-VL checkpoint directory `path` into VisionParams (with a `mesh`, each
    tensor straight into its sharding from the logical axis names and `rules`).

    Validates the key set and every shape from config.json and the safetensors headers before reading any data;
    errors are one-line ConfigErrors naming the file and tensor.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = read_vision_config(path)
    target = np.dtype(jnp.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    try:
        checkpoint = SafetensorsCheckpoint(Path(path))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    try:
        keys = _check_keys(Path(path), checkpoint.tensors, config)
        _, abstract = nnx.split(nnx.eval_shape(lambda: VisionTower(config, rngs=nnx.Rngs(0))))
        shardings = None
        if mesh is not None:
            shardings = sharding.param_shardings(abstract, mesh, sharding.normalise_rules(rules))
        nested = checkpoint.read_nested(
            {key: (leaf_path, _LAYOUTS[how]) for key, (leaf_path, how, _) in keys.items()}, target, shardings
        )
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    finally:
        checkpoint.close()
    nnx.replace_by_pure_dict(abstract, nested)
    return VisionParams(config, abstract)


def _check_keys(path: Path, tensors: dict, config: VisionConfig) -> dict:
    prefix = visual_prefix(tensors)
    if prefix is None:
        raise ConfigError(f"{path}: no vision tower (no {' or '.join(p + '*' for p in VISUAL_PREFIXES)} tensors)")
    keys = key_map(config, prefix)
    missing = [k for k in keys if k not in tensors]
    unexpected = sorted(k for k in tensors if k.startswith(prefix) and k not in keys)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} of {len(keys)} vision tensors: {some_of(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected vision tensors: {some_of(unexpected)}")
    if problems:
        raise ConfigError(
            f"{path}: checkpoint does not match its vision_config (depth={config.depth}, "
            f"{len(config.deepstack_visual_indexes)} deepstack mergers): " + "; ".join(problems)
        )
    bad = [
        f"{k} has shape {tuple(tensors[k].shape)}, expected {shape}"
        for k, (_, _, shape) in keys.items()
        if tuple(tensors[k].shape) != tuple(shape)
    ]
    if bad:
        raise ConfigError(f"{path}: {len(bad)} vision tensors have the wrong shape: " + "; ".join(bad[:5]))
    return keys
