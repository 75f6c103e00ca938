"""The toy latent codec: space-to-depth, behind the interface the real VAE will have.

An image (B, H, W, 3), uint8 or float in [-1, 1], becomes latents (B, H/patch, W/patch, patch*patch*3): each
patch x patch pixel tile is one latent token whose channels are the tile's pixels in (row, column, colour) order,
optionally normalised per latent channel by a mean and std. A 32x32 image with patch 4 gives 8x8 tokens of 48
channels. Without normalisation the codec is a pure permutation, so `decode(encode(x)) == x` exactly; with it,
`to_uint8(decode(encode(u))) == u` exactly for uint8 images.

The pipeline then packs latents into tokens (B, h*w, C) in row-major order, as diffusers' `_pack_latents` does for
Qwen-Image 2.x (which consumes latents unpatched). The transformer groups image tokens into 2x2 slots, so the
latent height and width must both be even.

Works on numpy arrays (host-side data pipelines) and on jax arrays (inside jit) alike: the result has the input's
array type.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    patch: int = 4
    image_channels: int = 3
    # Per latent channel (patch*patch*image_channels values each), or None for no normalisation.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.patch < 1 or self.image_channels < 1:
            raise ValueError(f"patch and image_channels must be positive, got {self.patch}, {self.image_channels}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        channels = self.patch * self.patch * self.image_channels
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                object.__setattr__(self, name, value)
                if len(value) != channels:
                    raise ValueError(f"{name} needs {channels} entries (one per latent channel), got {len(value)}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std entries must be positive")


class SpaceToDepthCodec:
    """Lossless space-to-depth codec with the VAE's interface (encode / decode / pack / unpack / latent_shape)."""

    def __init__(self, config: CodecConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError("pass either a CodecConfig or keyword fields, not both")
        self.config = config or CodecConfig(**kwargs)

    # --- sizes ------------------------------------------------------------------------------------------------------
    @property
    def patch(self) -> int:
        return self.config.patch

    @property
    def scale_factor(self) -> int:
        """Pixels per latent token along each side (the VAE's `vae_scale_factor`)."""
        return self.config.patch

    @property
    def channels(self) -> int:
        return self.config.patch * self.config.patch * self.config.image_channels

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, C) of the latents of an image of height x width pixels; raises ValueError if it does not fit."""
        p = self.patch
        if height <= 0 or width <= 0 or height % p or width % p:
            raise ValueError(f"image size {height}x{width} must be a positive multiple of the patch size {p}")
        h, w = height // p, width // p
        if h % 2 or w % 2:
            raise ValueError(
                f"image size {height}x{width} gives {h}x{w} latent tokens; both must be even so the image fills "
                f"whole 2x2 slots (use a multiple of {2 * p} pixels)"
            )
        return h, w, self.channels

    # --- codec -------------------------------------------------------------------------------------------------------
    def encode(self, images):
        """(B, H, W, image_channels) uint8, or float in [-1, 1] -> latents (B, h, w, C) float32."""
        xp = _xp(images)
        if images.ndim != 4 or images.shape[-1] != self.config.image_channels:
            raise ValueError(f"images must be (B, H, W, {self.config.image_channels}), got shape {images.shape}")
        b, height, width, c = images.shape
        h, w, _ = self.latent_shape(height, width)
        if images.dtype == np.uint8:
            x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        elif xp.issubdtype(images.dtype, xp.floating):
            x = images.astype(np.float32)
        else:
            raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}")
        p = self.patch
        x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, self.channels)
        if self.config.mean is not None:
            x = (x - np.asarray(self.config.mean, np.float32)) / np.asarray(self.config.std, np.float32)
        return x

    def decode(self, latents):
        """Latents (B, h, w, C) -> images (B, H, W, image_channels) float32 in [-1, 1] (as encoded)."""
        if latents.ndim != 4 or latents.shape[-1] != self.channels:
            raise ValueError(f"latents must be (B, h, w, {self.channels}), got shape {latents.shape}")
        b, h, w, _ = latents.shape
        x = latents.astype(np.float32)
        if self.config.mean is not None:
            x = x * np.asarray(self.config.std, np.float32) + np.asarray(self.config.mean, np.float32)
        p, c = self.patch, self.config.image_channels
        return x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, c)

    # --- token packing ---------------------------------------------------------------------------------------------
    @staticmethod
    def pack(latents):
        """(B, h, w, C) -> tokens (B, h*w, C), row-major (diffusers' `_pack_latents`)."""
        if latents.ndim != 4:
            raise ValueError(f"latents must be (B, h, w, C), got shape {latents.shape}")
        b, h, w, c = latents.shape
        return latents.reshape(b, h * w, c)

    @staticmethod
    def unpack(tokens, h: int, w: int):
        """Tokens (B, h*w, C) -> latents (B, h, w, C)."""
        if tokens.ndim != 3 or tokens.shape[1] != h * w:
            raise ValueError(f"tokens must be (B, h*w={h * w}, C) for a {h}x{w} latent grid, got shape {tokens.shape}")
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2])

    @staticmethod
    def to_uint8(images):
        """Float images in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
        xp = _xp(images)
        x = xp.clip(xp.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255)
        return x.astype(np.uint8)

    # --- normalisation ----------------------------------------------------------------------------------------------
    def with_stats(self, images, eps: float = 1e-3) -> "SpaceToDepthCodec":
        """A codec normalised by the per-latent-channel mean/std of `images` (host-side; std floored at eps)."""
        raw = SpaceToDepthCodec(dataclasses.replace(self.config, mean=None, std=None))
        latents = np.asarray(raw.encode(np.asarray(images)), np.float64).reshape(-1, self.channels)
        mean = latents.mean(axis=0)
        std = np.maximum(latents.std(axis=0), eps)
        return SpaceToDepthCodec(dataclasses.replace(self.config, mean=_floats(mean), std=_floats(std)))

    def __repr__(self) -> str:
        return f"SpaceToDepthCodec({self.config})"


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np
