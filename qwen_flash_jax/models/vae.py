"""Qwen-Image 2.x VAE (diffusers `AutoencoderKLQwenImage21`) for single images, as Flax NNX modules.

diffusers keeps Wan's video-VAE interface (5-D `(B, C, T, H, W)` tensors, a per-frame feature cache, "causal 3-D"
convolutions), but in this diffusers version every convolution is a 2-D one that refuses temporal context: the model
is image-only, one frame in, one latent frame out. This port drops the frame axis altogether:

  * Layout is NHWC (channels last) throughout: XLA's convolutions and the transformer's latent tokens (`B, h*w, C`)
    are channels-last, so no transposes are needed between the VAE and the rest of the system.
  * Latents are `(B, h, w, z_dim)`; images `(B, H, W, image_channels)` with values in [-1, 1] (diffusers'
    preprocessing), decoded images are clamped to [-1, 1] as in diffusers. The published model reads RGBA
    (`in_channels=4`): the pipeline converts every condition image to RGBA, so an opaque image has alpha = 1.
  * What a single frame makes of Wan's temporal machinery, derived from the reference with the frame count fixed
    at one (the first, cache-less chunk):
      - the `time_conv` of every temporal Resample is never applied (diffusers only runs it from the second chunk
        on); its weights are in the checkpoint, so the loader checks and skips them;
      - the encoder's average-pool shortcut (`AvgDown3D`) with a temporal factor pads the missing frames with
        zeros *before* averaging, so those zeros take part in the mean (`_avg_down`);
      - the decoder's duplicating shortcut (`DupUp3D`) with a temporal factor keeps only the last of its frames
        (`first_chunk=True`), which selects a fixed subset of the repeated channels (`_dup_up`).
  * Numerics: convolutions and attention run in `config.dtype` with float32 accumulation, the RMS norms, softmax
    and the shortcut means in float32. (diffusers in bfloat16 normalises in float32 but applies the norm's gain in
    bfloat16; we keep the gain in float32 as well.)
  * Dropout is identity: this port is inference-only (the VAE stays frozen).

Parameters mirror the diffusers state dict one to one (see `torch_key`): conv kernels are HWIO
(`(kh, kw, in, out)`, torch stores `(out, in, kh, kw)`), norm gains are `(C,)` (torch stores `(C, 1, 1[, 1])`).
Every parameter carries logical axis names (`vae_in`, `vae_out`, `vae_channels`) for `qwen_flash_jax.sharding`;
no rule names them today, so they are replicated unless a config adds rules.

Entry point: `qwen_flash_jax.models.vae_io.load_vae(dir)` (a diffusers VAE directory) gives a `VAEModel` with
jitted `encode` / `decode`, and `vae_io.VAECodec` puts it behind the toy codec's interface; `normalize_latents` /
`denormalize_latents` / `pack_latents` / `unpack_latents` here are the pipeline's latent transforms. (Constructing
`QwenImageVAE` directly gives random weights, but eager NNX init compiles one initialiser per parameter shape:
~20 s on a CPU even for a tiny config. Real weights come from `load_vae`, which never initialises.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_flash_jax.models.config import ConfigError

DIFFUSERS_CLASS_NAME = "AutoencoderKLQwenImage21"
NORM_EPS = 1e-12  # F.normalize's floor on the vector norm
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this

# Fields of diffusers' config that describe the model (everything else in config.json is `_`-prefixed bookkeeping).
ARCH_FIELDS = (
    "base_dim",
    "decoder_base_dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "attn_scales",
    "temperal_downsample",  # sic, diffusers' spelling
    "dropout",
    "latents_mean",
    "latents_std",
    "is_residual",
    "in_channels",
    "out_channels",
    "patch_size",
    "scale_factor_temporal",
    "scale_factor_spatial",
)
_TUPLE_FIELDS = ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    # Architecture: diffusers' names and defaults (the published Qwen-Image 2.x VAE), except the latent statistics,
    # which have no default here: a real checkpoint's config.json always carries them, and silently normalising
    # with numbers that are not the checkpoint's would be worse than failing.
    base_dim: int = 96
    decoder_base_dim: int | None = 144  # None -> base_dim
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # ignored by the residual architecture; see __post_init__ for the other
    temperal_downsample: tuple[bool, ...] = (False, True, True, True)
    dropout: float = 0.0  # training only; inference ignores it
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    is_residual: bool = True
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int | None = None
    scale_factor_temporal: int | None = 8  # diffusers bookkeeping (tiling); unused for images
    scale_factor_spatial: int | None = 16  # diffusers bookkeeping (tiling); `spatial_compression` is derived
    # Runtime (ours, never from a checkpoint).
    param_dtype: str = "float32"
    dtype: str = "float32"  # conv / attention dtype; norms, softmax and means run in float32 regardless

    def __post_init__(self):
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "temperal_downsample", tuple(bool(t) for t in self.temperal_downsample))
        if not self.dim_mult or min(self.dim_mult) < 1:
            raise ConfigError(f"dim_mult must be a non-empty list of positive ints, got {list(self.dim_mult)}")
        for name in ("base_dim", "z_dim", "in_channels", "out_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise ConfigError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if len(self.temperal_downsample) < len(self.dim_mult) - 1:
            raise ConfigError(
                f"temperal_downsample needs at least {len(self.dim_mult) - 1} entries (one per "
                f"downsampling stage), got {len(self.temperal_downsample)}"
            )
        if self.attn_scales and not self.is_residual:
            # diffusers builds attention blocks into the plain encoder's stages but its encoder calls them with a
            # feature cache they do not accept (a TypeError on every encode): there is no reference to port.
            # (The residual encoder and both decoders ignore attn_scales.)
            raise ConfigError(
                f"attn_scales={list(self.attn_scales)} with is_residual=False is not supported: "
                "diffusers' encoder cannot run that configuration either"
            )
        p = self.patch
        if p < 1 or self.in_channels % (p * p) or self.out_channels % (p * p):
            raise ConfigError(
                f"in_channels={self.in_channels} and out_channels={self.out_channels} must be "
                f"multiples of patch_size**2 = {p * p}"
            )
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.z_dim:
                raise ConfigError(f"{name} needs z_dim={self.z_dim} entries, got {len(value)}")
        if self.latents_std is not None and min(self.latents_std) <= 0:
            raise ConfigError("latents_std entries must be positive")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")

    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def resolved_decoder_base_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent position along each side: one 2x downsampling per stage but the last, times the patch."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def image_channels(self) -> int:
        return self.in_channels // (self.patch * self.patch)

    @property
    def output_image_channels(self) -> int:
        return self.out_channels // (self.patch * self.patch)

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]  # the decoder reads the encoder's list reversed, as diffusers does

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kwargs) -> "VAEConfig":
        return dataclasses.replace(self, **kwargs)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **runtime) -> "VAEConfig":
        """Builds a config from a diffusers VAE `config.json` dict; rejects configs of other models."""
        class_name = config.get("_class_name")
        if class_name is not None and class_name != DIFFUSERS_CLASS_NAME:
            raise ConfigError(
                f"config.json describes a {class_name}, not a {DIFFUSERS_CLASS_NAME} (Qwen-Image 2.x VAE)"
            )
        unknown = sorted(k for k in config if not k.startswith("_") and k not in ARCH_FIELDS)
        if unknown:
            raise ConfigError(
                f"config.json has fields {unknown} that {DIFFUSERS_CLASS_NAME} does not know; "
                "is this the config of another model?"
            )
        for name in ("latents_mean", "latents_std"):
            if config.get(name) is None:
                raise ConfigError(
                    f"config.json has no {name} (diffusers would fall back to its built-in defaults; "
                    "this port needs them written out)"
                )
        return cls(**{k: config[k] for k in ARCH_FIELDS if k in config}, **runtime)


# --- building blocks -----------------------------------------------------------------------------------------------


def _param(value, axes):
    # Logical names only: `qwen_flash_jax.sharding` places parameters, so Flax must not shard eagerly.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Conv(nnx.Module):
    """2-D convolution with bias, NHWC / HWIO. `padding` is explicit ((top, bottom), (left, right))."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding=None, dtype, param_dtype, rngs: nnx.Rngs
    ):
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = _param(
            init(rngs.params(), (kernel, kernel, in_ch, out_ch), param_dtype), (None, None, "vae_in", "vae_out")
        )
        self.bias = _param(jnp.zeros((out_ch,), param_dtype), ("vae_out",))
        pad = kernel // 2
        self.padding = padding if padding is not None else ((pad, pad), (pad, pad))
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            (self.stride, self.stride),
            self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class ChannelRMSNorm(nnx.Module):
    """diffusers' `RMS_norm`: x / max(||x||_2, eps) * sqrt(C) * gain over the channel axis (no bias here: the
    VAE never enables it). An L2 normalisation scaled by sqrt(C), i.e. RMSNorm with eps on the norm, not the mean."""

    def __init__(self, dim: int, *, dtype, param_dtype):
        self.scale = _param(jnp.ones((dim,), param_dtype), ("vae_channels",))
        self.dim = dim
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, NORM_EPS) * math.sqrt(self.dim) * self.scale[...].astype(jnp.float32)
        return y.astype(self.dtype)


class ResidualBlock(nnx.Module):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> conv3x3, plus a 1x1-projected (if the width changes) skip."""

    def __init__(self, in_dim: int, out_dim: int, *, kw):
        norm_kw = dict(dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.norm1 = ChannelRMSNorm(in_dim, **norm_kw)
        self.conv1 = Conv(in_dim, out_dim, 3, **kw)
        self.norm2 = ChannelRMSNorm(out_dim, **norm_kw)
        self.conv2 = Conv(out_dim, out_dim, 3, **kw)
        self.conv_shortcut = Conv(in_dim, out_dim, 1, **kw) if in_dim != out_dim else None

    def __call__(self, x):
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)))
        x = self.conv2(jax.nn.silu(self.norm2(x)))
        return x + skip


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all H*W positions, residual; q, k, v from one 1x1 conv, in that order."""

    def __init__(self, dim: int, *, kw):
        self.norm = ChannelRMSNorm(dim, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.to_qkv = Conv(dim, 3 * dim, 1, **kw)
        self.proj = Conv(dim, dim, 1, **kw)
        self.dtype = kw["dtype"]

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v, preferred_element_type=jnp.float32).astype(self.dtype)
        return x + self.proj(out.reshape(b, h, w, c))


class Resample(nnx.Module):
    """2x spatial down- or upsampling.

    down: zero-pad one row at the bottom and one column at the right, then a stride-2 3x3 conv (VALID).
    up:   nearest 2x (diffusers' `nearest-exact` at an integer factor is plain pixel repetition), then a 3x3 conv
          to `out_dim`.
    `temporal` records that diffusers' module also holds a `time_conv` (never applied to a single frame: see the
    module docstring); the loader uses it to expect, check and skip those weights.
    """

    def __init__(self, dim: int, mode: str, *, out_dim: int | None = None, temporal: bool = False, kw):
        if mode == "down":
            self.conv = Conv(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
        elif mode == "up":
            self.conv = Conv(dim, out_dim, 3, **kw)
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        self.dim = dim
        self.temporal = temporal

    def time_conv_shapes(self) -> dict[str, tuple[int, ...]]:
        """diffusers `time_conv` parameter shapes (a 1x1 conv; upsampling doubles the channels for two frames)."""
        if not self.temporal:
            return {}
        out = self.dim if self.mode == "down" else 2 * self.dim
        return {"weight": (out, self.dim, 1, 1), "bias": (out,)}

    def __call__(self, x):
        if self.mode == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


def _check_group(in_ch: int, out_ch: int, factor: int, what: str):
    # Down: in*factor channels are averaged in groups onto out; up: out*factor channels are repeats of the in ones.
    remainder = (in_ch * factor) % out_ch if what == "down" else (out_ch * factor) % in_ch
    if remainder:
        raise ConfigError(
            f"channel widths {in_ch} -> {out_ch} do not fit the {what}sampling shortcut (factor "
            f"{factor}): diffusers cannot build this config either"
        )


def _avg_down(x, out_ch: int, factor_t: int, factor_s: int):
    """diffusers' `AvgDown3D` on one frame: space-to-depth by `factor_s`, the `factor_t - 1` zero frames diffusers
    pads in front of a lone frame, then the mean over consecutive groups of the resulting channels."""
    b, h, w, c = x.shape
    fs = factor_s
    x = x.astype(jnp.float32).reshape(b, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 2, 4)
    if factor_t > 1:  # channel order is (c, frame, row offset, column offset); the real frame is the last
        x = jnp.stack([jnp.zeros_like(x)] * (factor_t - 1) + [x], axis=4)
    groups = x.reshape(b, h // fs, w // fs, out_ch, -1)
    return groups.mean(axis=-1)


def _dup_up(x, out_ch: int, factor_t: int, factor_s: int):
    """diffusers' `DupUp3D` on a first chunk: repeat every channel, read the result as (out, frame, row offset,
    column offset), keep the last frame (`first_chunk` drops the others) and depth-to-space."""
    b, h, w, c = x.shape
    fs = factor_s
    repeats = out_ch * factor_t * fs * fs // c
    x = jnp.repeat(x, repeats, axis=-1).reshape(b, h, w, out_ch, factor_t, fs, fs)[:, :, :, :, factor_t - 1]
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * fs, w * fs, out_ch)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, kw):
        self.resnets = nnx.List([ResidualBlock(dim, dim, kw=kw), ResidualBlock(dim, dim, kw=kw)])
        self.attentions = nnx.List([AttentionBlock(dim, kw=kw)])

    def __call__(self, x):
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class ResidualDownBlock(nnx.Module):
    """`is_residual` encoder stage: residual blocks, an optional downsample, plus the average-pool shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, *, temporal: bool, down: bool, kw):
        self.factor_t, self.factor_s = (2 if temporal else 1), (2 if down else 1)
        _check_group(in_dim, out_dim, self.factor_t * self.factor_s**2, "down")
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nnx.List([ResidualBlock(i, o, kw=kw) for i, o in zip(dims[:-1], dims[1:])])
        self.downsampler = Resample(out_dim, "down", temporal=temporal, kw=kw) if down else None
        self.out_dim = out_dim

    def __call__(self, x):
        shortcut = _avg_down(x, self.out_dim, self.factor_t, self.factor_s)
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
        return x + shortcut.astype(x.dtype)


class ResidualUpBlock(nnx.Module):
    """`is_residual` decoder stage: residual blocks, an optional upsample, plus the duplicating shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, *, temporal: bool, up: bool, kw):
        self.factor_t = 2 if temporal else 1
        if up:
            _check_group(in_dim, out_dim, self.factor_t * 4, "up")
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(i, o, kw=kw) for i, o in zip(dims[:-1], dims[1:])])
        self.upsampler = Resample(out_dim, "up", out_dim=out_dim, temporal=temporal, kw=kw) if up else None
        self.out_dim = out_dim

    def __call__(self, x):
        x_in = x
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsampler is None:  # diffusers has no shortcut on a stage that does not upsample
            return x
        return self.upsampler(x) + _dup_up(x_in, self.out_dim, self.factor_t, 2)


class UpBlock(nnx.Module):
    """Plain (not `is_residual`) decoder stage: residual blocks, then an upsample that halves the width."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, *, up: bool, temporal: bool, kw):
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(i, o, kw=kw) for i, o in zip(dims[:-1], dims[1:])])
        self.upsamplers = (
            nnx.List([Resample(out_dim, "up", out_dim=out_dim // 2, temporal=temporal, kw=kw)]) if up else None
        )

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, kw):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv_in = Conv(cfg.in_channels, dims[0], 3, **kw)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = cfg.temperal_downsample[i] if i != last else False
            if cfg.is_residual:
                blocks.append(
                    ResidualDownBlock(in_dim, out_dim, cfg.num_res_blocks, temporal=temporal, down=i != last, kw=kw)
                )
                continue
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, kw=kw))
                in_dim = out_dim
            if i != last:
                blocks.append(Resample(out_dim, "down", temporal=temporal, kw=kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], kw=kw)
        self.norm_out = ChannelRMSNorm(dims[-1], dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = Conv(dims[-1], 2 * cfg.z_dim, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, kw):
        base = cfg.resolved_decoder_base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        last = len(cfg.dim_mult) - 1
        self.conv_in = Conv(cfg.z_dim, dims[0], 3, **kw)
        self.mid_block = MidBlock(dims[0], kw=kw)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != last
            temporal = cfg.temperal_upsample[i] if up else False
            if cfg.is_residual:
                blocks.append(ResidualUpBlock(in_dim, out_dim, cfg.num_res_blocks, temporal=temporal, up=up, kw=kw))
            else:
                # The plain decoder's upsample halves the width, so every stage after the first starts at half.
                blocks.append(
                    UpBlock(
                        in_dim // 2 if i > 0 else in_dim, out_dim, cfg.num_res_blocks, up=up, temporal=temporal, kw=kw
                    )
                )
        self.up_blocks = nnx.List(blocks)
        self.norm_out = ChannelRMSNorm(dims[-1], dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = Conv(dims[-1], cfg.out_channels, 3, **kw)

    def __call__(self, x):
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


def _patchify(x, p: int):
    """(B, H, W, C) -> (B, H/p, W/p, C*p*p), channel index c*p*p + column_offset*p + row_offset (diffusers' order:
    the column offset is the slower one)."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 4, 2).reshape(b, h // p, w // p, c * p * p)


def _unpatchify(x, p: int):
    if p == 1:
        return x
    b, h, w, cpp = x.shape
    c = cpp // (p * p)
    return x.reshape(b, h, w, c, p, p).transpose(0, 1, 5, 2, 4, 3).reshape(b, h * p, w * p, c)


class QwenImageVAE(nnx.Module):
    """The VAE. `encode(images)` -> (mean, logvar) of the latent Gaussian; `decode(latents)` -> images."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.cfg = cfg
        self.encoder = Encoder(cfg, kw=kw)
        self.quant_conv = Conv(2 * cfg.z_dim, 2 * cfg.z_dim, 1, **kw)
        self.post_quant_conv = Conv(cfg.z_dim, cfg.z_dim, 1, **kw)
        self.decoder = Decoder(cfg, kw=kw)

    def encode(self, images):
        """(B, H, W, image_channels) in [-1, 1] -> (mean, logvar), each (B, H/s, W/s, z_dim), s = spatial_compression.

        The pipeline uses the mean (`sample_mode="argmax"`); logvar is clamped as diffusers' distribution does.
        """
        cfg = self.cfg
        s = cfg.spatial_compression
        if images.ndim != 4 or images.shape[-1] != cfg.image_channels:
            raise ValueError(f"images must be (B, H, W, {cfg.image_channels}), got shape {images.shape}")
        if images.shape[1] % s or images.shape[2] % s:
            # Odd sizes would make the strided convs and the average-pool shortcut disagree (diffusers fails too).
            raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} must be a multiple of {s}")
        x = _patchify(images.astype(cfg.jnp_dtype), cfg.patch)
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents):
        """(B, h, w, z_dim) -> images (B, h*s, w*s, output_image_channels), clamped to [-1, 1]."""
        cfg = self.cfg
        if latents.ndim != 4 or latents.shape[-1] != cfg.z_dim:
            raise ValueError(f"latents must be (B, h, w, {cfg.z_dim}), got shape {latents.shape}")
        x = self.decoder(self.post_quant_conv(latents.astype(cfg.jnp_dtype)))
        return jnp.clip(_unpatchify(x, cfg.patch), -1.0, 1.0)


# --- pipeline-side latent transforms -------------------------------------------------------------------------------


def _stats(config: VAEConfig):
    if config.latents_mean is None or config.latents_std is None:
        raise ConfigError("this VAE config has no latents_mean / latents_std")
    return np.asarray(config.latents_mean, np.float32), np.asarray(config.latents_std, np.float32)


def normalize_latents(latents, config: VAEConfig):
    """Encoder mean -> the transformer's latents: (x - latents_mean) / latents_std per channel (last axis).

    Computed in float32, returned in the input's dtype (diffusers rounds the statistics to a bf16 input's dtype
    first; the difference is bf16 rounding)."""
    mean, std = _stats(config)
    return ((latents.astype(jnp.float32) - mean) / std).astype(latents.dtype)


def denormalize_latents(latents, config: VAEConfig):
    """The transformer's latents -> the decoder's input: x * latents_std + latents_mean (inverse of the above)."""
    mean, std = _stats(config)
    return (latents.astype(jnp.float32) * std + mean).astype(latents.dtype)


def pack_latents(latents):
    """(B, h, w, C) -> tokens (B, h*w, C), row-major: diffusers' Qwen-Image 2.x `_pack_latents` (no 2x2 patching)."""
    b, h, w, c = latents.shape
    return latents.reshape(b, h * w, c)


def unpack_latents(tokens, h: int, w: int):
    """Tokens (B, h*w, C) -> latents (B, h, w, C)."""
    if tokens.ndim != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"tokens must be (B, h*w={h * w}, C) for a {h}x{w} latent grid, got shape {tokens.shape}")
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2])
