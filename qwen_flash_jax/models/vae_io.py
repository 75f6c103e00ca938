"""Loading Qwen-Image 2.x's VAE from a diffusers directory, and running it as jitted pure functions.

    model = load_vae("/path/to/pipeline/vae", dtype="bfloat16")   # VAEModel
    mean, logvar = model.encode(images)                          # (B, H, W, 4) in [-1, 1], NHWC
    images = model.decode(latents)

The modules, the config and the pipeline's latent transforms are in `qwen_flash_jax.models.vae`; this file maps
diffusers' state dict onto them (`torch_key`), checks a checkpoint's keys and shapes from the safetensors headers
before reading any data, and wraps the result (`VAEModel`, and `VAECodec` behind the toy codec's interface).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_flash_jax.errors import MAX_LISTED, CheckpointError, some_of
from qwen_flash_jax.models.config import ConfigError, read_config_json
from qwen_flash_jax.models.hf_keys import unflatten
from qwen_flash_jax.models.vae import (
    QwenImageVAE,
    Resample,
    VAEConfig,
    denormalize_latents,
    normalize_latents,
    pack_latents,
    unpack_latents,
)
from qwen_flash_jax.safetensors_checkpoint import SafetensorsCheckpoint

CONFIG_FILE = "config.json"


# --- the model as pure functions over a parameter tree --------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class VAEModel:
    """A VAE as jitted functions of `params` (a nested dict laid out as `QwenImageVAE`'s state).

    `encode(images)` -> (mean, logvar) and `decode(latents)` -> images use `self.params`; compiled once per shape.
    """

    config: VAEConfig
    graphdef: Any = dataclasses.field(repr=False)
    params: Any = dataclasses.field(repr=False)

    def encode(self, images):
        return self._encode(self.params, jnp.asarray(images))

    def decode(self, latents):
        return self._decode(self.params, jnp.asarray(latents))

    # Per instance (a cache keyed on the instance would keep every model's params alive).
    @functools.cached_property
    def _encode(self):
        return jax.jit(lambda params, x: nnx.merge(self.graphdef, params).encode(x))

    @functools.cached_property
    def _decode(self):
        return jax.jit(lambda params, x: nnx.merge(self.graphdef, params).decode(x))


def _abstract_module(config: VAEConfig) -> QwenImageVAE:
    return nnx.eval_shape(lambda: QwenImageVAE(config, rngs=nnx.Rngs(0)))


# --- loading a diffusers VAE directory -------------------------------------------------------------------------------


def torch_key(path: tuple) -> str:
    """Our parameter path -> its diffusers state-dict key.

    Names match diffusers' module names except: a Resample's conv is `resample.1` there (index 0 of that
    `nn.Sequential` is the parameter-free pad or upsample), kernels are `weight` and norm gains `gamma`."""
    *modules, leaf = [str(p) for p in path]
    modules = ["resample.1" if m == "conv" else m for m in modules]
    return ".".join(modules + [{"kernel": "weight", "scale": "gamma"}.get(leaf, leaf)])


def _torch_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    leaf = path[-1]
    if leaf == "kernel":  # HWIO -> (out, in, kh, kw)
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "scale":  # the attention norm is built for 4-D (image) input, the others for 5-D
        return (shape[0], 1, 1) if path[-2] == "norm" else (shape[0], 1, 1, 1)
    return tuple(shape)


def _from_torch(path: tuple, array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return array.transpose(2, 3, 1, 0)
    if path[-1] == "scale":
        return array.reshape(-1)
    return array


def read_vae_config(path, **runtime) -> VAEConfig:
    """A diffusers VAE directory's config.json as a `VAEConfig` (runtime fields from `runtime`)."""
    data, config_path = read_config_json(path, "VAE directory")
    try:
        return VAEConfig.from_diffusers_config(data, **runtime)
    except (TypeError, ValueError) as e:  # ConfigError included; TypeError: a field of the wrong type
        raise ConfigError(f"{config_path}: {_one_line(e)}") from None


def expected_tensors(config: VAEConfig) -> tuple[dict[str, tuple], dict[str, tuple[int, ...]]]:
    """(diffusers key -> our path for every tensor we load, diffusers key -> shape for every key of the state dict,
    including the `time_conv` weights we skip)."""
    module = _abstract_module(config)
    state = nnx.to_flat_state(nnx.state(module, nnx.Param))
    paths, shapes = {}, {}
    for path, variable in state:
        key = torch_key(path)
        paths[key] = tuple(path)
        shapes[key] = _torch_shape(tuple(path), tuple(variable.shape))
    for mpath, sub in nnx.iter_modules(module):
        if isinstance(sub, Resample):
            prefix = ".".join(str(p) for p in mpath)
            for name, shape in sub.time_conv_shapes().items():
                shapes[f"{prefix}.time_conv.{name}"] = shape
    return paths, shapes


def load_vae(path, *, dtype: str = "float32", param_dtype: str = "float32") -> VAEModel:
    """Loads a diffusers `AutoencoderKLQwenImage21` directory (config.json + safetensors, one file or sharded).

    Every key and shape is checked from the safetensors headers before any data is read; then tensors are read,
    converted and placed on the device one at a time, so host memory holds one tensor at a time. Any defect
    (missing directory or config, another model's config, missing / unexpected tensors, a wrong shape, a corrupt
    file) raises `ConfigError` with one line naming the file and tensor.
    """
    path = Path(path)
    config = read_vae_config(path, dtype=dtype, param_dtype=param_dtype)
    paths, shapes = expected_tensors(config)
    try:
        ckpt = SafetensorsCheckpoint(path)
    except CheckpointError as e:
        raise ConfigError(_one_line(e)) from None
    with ckpt:
        present = ckpt.tensors
        where = some_of(sorted({info.file.name for info in present.values()}))
        missing = [k for k in shapes if k not in present]
        unexpected = sorted(k for k in present if k not in shapes)
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} of {len(shapes)} tensors: {some_of(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors: {some_of(unexpected)}")
        if problems:
            raise ConfigError(f"{path} ({where}) does not match its {CONFIG_FILE}: " + "; ".join(problems))
        bad = [
            f"{present[k].file.name}: tensor {k} has shape {present[k].shape}, expected {shape}"
            for k, shape in shapes.items()
            if present[k].shape != shape
        ]
        if bad:
            raise ConfigError(f"{path}: {len(bad)} tensors have the wrong shape: " + "; ".join(bad[:MAX_LISTED]))
        np_dtype = np.dtype(config.jnp_param_dtype)
        leaves = {}
        try:
            for key, our_path in paths.items():
                leaves[our_path] = jnp.asarray(_from_torch(our_path, ckpt.read(key)).astype(np_dtype))
        except CheckpointError as e:
            raise ConfigError(_one_line(e)) from None
    graphdef = nnx.split(_abstract_module(config))[0]
    return VAEModel(config, graphdef, unflatten(leaves))


def _one_line(error) -> str:
    return " ".join(str(error).split())


# --- the codec interface ---------------------------------------------------------------------------------------------


class VAECodec:
    """The VAE behind the toy codec's interface (`models.codec.SpaceToDepthCodec`): encode / decode / pack / unpack /
    latent_shape / scale_factor / channels / to_uint8.

    `encode` takes (B, H, W, 3 or image_channels) uint8 or float in [-1, 1] images and returns *normalised*
    latents (the encoder mean, as the pipeline uses); RGB input to an RGBA VAE gets an opaque alpha channel, as the
    pipeline's RGBA conversion gives it. `decode` denormalises and decodes, and drops alpha when `rgb` is set.
    """

    def __init__(self, model: VAEModel, *, rgb: bool = True):
        self.model = model
        self.config = model.config
        self.rgb = rgb

    @property
    def scale_factor(self) -> int:
        return self.config.spatial_compression

    patch = scale_factor  # the toy codec's name for the same number (pixels per latent token side)

    @property
    def channels(self) -> int:
        return self.config.z_dim

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        s = self.scale_factor
        if height <= 0 or width <= 0 or height % s or width % s:
            raise ValueError(f"image size {height}x{width} must be a positive multiple of {s}")
        h, w = height // s, width // s
        if h % 2 or w % 2:
            raise ValueError(
                f"image size {height}x{width} gives {h}x{w} latents; both must be even so the image "
                f"fills whole 2x2 slots (use a multiple of {2 * s} pixels)"
            )
        return h, w, self.channels

    def encode(self, images):
        if images.ndim != 4:
            raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
        self.latent_shape(images.shape[1], images.shape[2])
        if images.dtype == np.uint8:
            x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        else:
            x = jnp.asarray(images, jnp.float32)
        want = self.config.image_channels
        if x.shape[-1] == want - 1 and want == 4:
            x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)
        mean, _ = self.model.encode(x)
        return normalize_latents(mean.astype(jnp.float32), self.config)

    def decode(self, latents):
        images = self.model.decode(denormalize_latents(jnp.asarray(latents, jnp.float32), self.config))
        images = images.astype(jnp.float32)
        return images[..., :3] if self.rgb and images.shape[-1] == 4 else images

    pack = staticmethod(pack_latents)
    unpack = staticmethod(unpack_latents)

    @staticmethod
    def to_uint8(images):
        x = jnp.clip(jnp.round((jnp.asarray(images, jnp.float32) + 1.0) * 127.5), 0, 255)
        return np.asarray(x).astype(np.uint8)
