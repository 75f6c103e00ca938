"""Qwen-Image 2.x single-stream transformer (diffusers `QwenImage21Transformer2DModel`) as Flax NNX modules.

Numerics follow diffusers; the differences are structural:
  * the 32 blocks are one module with stacked parameters (leading `layers` axis) run under `jax.lax.scan` (or, with
    `scan_layers=False`, a loop over layer slices), with a config-selected remat policy, so compile time does not
    grow with depth;
  * everything derived from the token layout (gathers, RoPE tables, the block-causal mask) is a host constant from a
    hashable `TokenLayout`, so the forward traces once per layout;
  * the block-causal attention is one masked attention over the whole sequence (diffusers runs one SDPA call per
    prompt segment); the prefix KV cache is a value returned and passed back, not state mutated in place.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_flash_jax.models.attention import AttentionMask, attention
from qwen_flash_jax.models.config import TransformerConfig
from qwen_flash_jax.models.layers import Dense, RMSNorm, layer_norm
from qwen_flash_jax.models.layout import TokenLayout

TIMESTEP_DIM = 256  # sinusoidal timestep features fed to the timestep MLP
ROPE_THETA = 10000

KV_CACHE_MODES = (None, "extract", "cached")


# Identity activation sharding; `qwen_flash_jax.sharding.ActivationSharding` replaces it on a mesh.
def _no_constraint(x, names):
    del names
    return x


class TextProjection(nnx.Module):
    """`txt_in`: zero-centred RMSNorm, then a tanh-GELU MLP from the text-encoder width to the model width."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.text_norm = RMSNorm(
            cfg.context_in_dim, cfg.eps, "context", zero_centred=True, param_dtype=cfg.jnp_param_dtype
        )
        self.in_layer = Dense(cfg.context_in_dim, cfg.inner_dim, ("context", "embed"), **kw)
        self.out_layer = Dense(cfg.inner_dim, cfg.inner_dim, ("embed", "embed_out"), **kw)

    def __call__(self, x):
        x = self.text_norm(x)
        return self.out_layer(jax.nn.gelu(self.in_layer(x), approximate=True))


class TimestepEmbedding(nnx.Module):
    """Cos-first sinusoidal features of 1000*t, then a SiLU MLP (both linears bias-free)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.linear_1 = Dense(TIMESTEP_DIM, cfg.inner_dim, (None, "embed"), **kw)
        self.linear_2 = Dense(cfg.inner_dim, cfg.inner_dim, ("embed", "embed_out"), **kw)
        self.dtype = cfg.jnp_dtype

    def __call__(self, t):
        half = TIMESTEP_DIM // 2
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
        # diffusers first casts t to the activation dtype, then scales in float32.
        args = 1000.0 * t.astype(self.dtype).astype(jnp.float32)[:, None] * freqs[None]
        features = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1).astype(self.dtype)
        return self.linear_2(jax.nn.silu(self.linear_1(features)))


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        d = cfg.inner_dim
        self.to_q = Dense(d, d, ("embed", "heads"), **kw)
        self.to_k = Dense(d, d, ("embed", "heads"), **kw)
        self.to_v = Dense(d, d, ("embed", "heads"), **kw)
        self.to_out = Dense(d, d, ("heads", "embed"), **kw)
        self.norm_q = RMSNorm(cfg.attention_head_dim, cfg.eps, "head_dim", param_dtype=cfg.jnp_param_dtype)
        self.norm_k = RMSNorm(cfg.attention_head_dim, cfg.eps, "head_dim", param_dtype=cfg.jnp_param_dtype)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.implementation = cfg.attention

    def project_kv(self, x, rope):
        k = self._heads(self.to_k(x))
        v = self._heads(self.to_v(x))
        return apply_rope(self.norm_k(k), rope), v

    def __call__(self, x, rope, mask, constrain, prefix_kv=None):
        """x: (B, S_q, D). `prefix_kv`: cached (k, v) of earlier tokens, prepended to this chunk's keys."""
        q = apply_rope(self.norm_q(self._heads(self.to_q(x))), rope)
        k, v = self.project_kv(x, rope)
        new_kv = (k, v)
        if prefix_kv is not None:
            k = jnp.concatenate([prefix_kv[0], k], axis=1)
            v = jnp.concatenate([prefix_kv[1], v], axis=1)
        q = constrain(q, ("batch", "seq", "act_heads", None))
        k = constrain(k, ("batch", "seq", "act_heads", None))
        v = constrain(v, ("batch", "seq", "act_heads", None))
        out = attention(q, k, v, mask, constrain, self.implementation)
        out = out.reshape(*out.shape[:2], self.num_heads * self.head_dim)
        return self.to_out(out), new_kv

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)


class FeedForward(nnx.Module):
    """SwiGLU: out(silu(gate_layer(x)) * proj(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.proj = Dense(cfg.inner_dim, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.gate_layer = Dense(cfg.inner_dim, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.out = Dense(cfg.mlp_dim, cfg.inner_dim, ("mlp", "embed"), **kw)

    def __call__(self, x, constrain):
        hidden = jax.nn.silu(self.gate_layer(x)) * self.proj(x)
        return self.out(constrain(hidden, ("batch", "seq", "act_mlp")))


class Block(nnx.Module):
    """Single-stream block: tanh-gated residual attention and SwiGLU, scale-only modulation (no shift)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)
        self.eps = cfg.eps

    def __call__(self, x, modulation, rope, mask, constrain, prefix_kv=None):
        scale1, gate1, scale2, gate2 = modulation
        attn_out, new_kv = self.attn(layer_norm(x, self.eps) * (1 + scale1), rope, mask, constrain, prefix_kv)
        x = x + jnp.tanh(gate1) * attn_out
        x = x + jnp.tanh(gate2) * self.mlp(layer_norm(x, self.eps) * (1 + scale2), constrain)
        if x.dtype == jnp.float16:
            x = jnp.clip(x, -65504, 65504)
        return constrain(x, ("batch", "seq", "act_embed")), new_kv


class FinalNorm(nnx.Module):
    """`norm_out`: affine-free LayerNorm scaled (no shift) by a projection of the timestep embedding."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.linear = Dense(
            cfg.inner_dim,
            cfg.inner_dim,
            ("embed", "embed_out"),
            dtype=cfg.jnp_dtype,
            param_dtype=cfg.jnp_param_dtype,
            rngs=rngs,
            zero_init=True,
        )
        self.eps = cfg.eps

    def __call__(self, x, temb, temb_prefix, target_mask):
        prefix_scale = None if temb_prefix is None else self.linear(jax.nn.silu(temb_prefix))
        scale = _rows_per_token(self.linear(jax.nn.silu(temb)), prefix_scale, target_mask)
        return layer_norm(x, self.eps) * (1 + scale)


class QwenImageTransformer(nnx.Module):
    """The full model. Call with diffusers' inputs plus a `TokenLayout` (see `layout.make_layout`).

    kv_cache_mode:
      None      -> output (B, seq_len, C) over the whole joint sequence, like diffusers.
      "extract" -> (output, kv_cache): also returns the text/condition prefix keys and values of every layer,
                   `{"k", "v"}` of shape (layers, B, prefix_len, heads, head_dim). Requires causal_condition.
      "cached"  -> output (B, target_tokens, C) for the target image only, reusing `kv_cache`; text and
                   condition latents are not recomputed.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, constrain: Callable = _no_constraint):
        kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        d, patch = cfg.inner_dim, cfg.patch_size * cfg.patch_size
        self.cfg = cfg
        self.constrain = constrain
        self.img_in = Dense(cfg.in_channels * patch, d, ("latent", "embed"), **kw)
        self.txt_in = TextProjection(cfg, rngs=rngs)
        self.time_embed = TimestepEmbedding(cfg, rngs=rngs)
        # adaLN-Zero: zero modulation (so every gate starts at tanh(0) = 0 and every block at the identity) and a
        # zero output projection; training from scratch converges much faster. Loaded checkpoints overwrite it.
        self.modulation = Dense(d, 4 * d, ("embed", "modulation"), zero_init=True, **kw)
        self.blocks = _make_blocks(cfg, rngs)
        self.norm_out = FinalNorm(cfg, rngs=rngs)
        self.proj_out = Dense(d, patch * cfg.resolved_out_channels, ("embed", "latent"), zero_init=True, **kw)

    def __call__(
        self,
        hidden_states,
        encoder_hidden_states,
        timestep,
        layout: TokenLayout,
        encoder_hidden_states_mask=None,
        kv_cache=None,
        kv_cache_mode=None,
        return_features=False,
    ):
        """`return_features`: also return the last block's hidden states (B, seq_len, D), before the output norm
        (the trunk features a discriminator head reads; see `distill.gan`)."""
        cfg, constrain = self.cfg, self.constrain
        _check_call(
            cfg,
            hidden_states,
            encoder_hidden_states,
            timestep,
            layout,
            encoder_hidden_states_mask,
            kv_cache,
            kv_cache_mode,
            return_features,
        )
        batch = hidden_states.shape[0]
        dtype = cfg.jnp_dtype
        prefix = layout.prefix_len
        cached = kv_cache_mode == "cached"

        # Joint sequence: text rows and image latents, gathered into the layout's token order.
        if cached:
            x = self.img_in(hidden_states[:, -layout.target_tokens :])
        else:
            text = self.txt_in(encoder_hidden_states)
            image = self.img_in(hidden_states)
            x = jnp.take(jnp.concatenate([text.astype(dtype), image], axis=1), layout.source_index, axis=1)
        x = constrain(x, ("batch", "seq", "act_embed"))

        # Keys that may be attended to: padded prompt positions never are.
        if encoder_hidden_states_mask is None:
            key_valid = None
        else:
            ones = jnp.ones((batch, layout.num_image_tokens), bool)
            key_valid = jnp.take(
                jnp.concatenate([encoder_hidden_states_mask.astype(bool), ones], axis=1), layout.source_index, axis=1
            )
        # Cached: the target's queries see every prefix and target key, so only the padding masks.
        mask = AttentionMask(None if cached else layout.attention_mask, key_valid)

        # One shared modulation; with causal_condition a t = 0 row modulates the text/condition prefix. That row is
        # embedded on its own, not appended to the batch: B + 1 rows do not divide over a sharded batch axis, and
        # slicing them apart again cost ~100 collective-permutes per DMD step on an 8-way fsdp mesh.
        t = timestep.astype(jnp.float32).reshape(-1)
        if t.shape[0] == 1 and batch > 1:
            t = jnp.broadcast_to(t, (batch,))
        temb = self.time_embed(t)
        if cfg.causal_condition:
            temb_prefix = self.time_embed(jnp.zeros((1,), t.dtype))
            target_mask = np.arange(layout.prefix_len if cached else 0, layout.seq_len) >= prefix
        else:
            temb_prefix, target_mask = None, None

        def chunks(temb):  # mod1.scale, mod1.gate, mod2.scale, mod2.gate
            return (None,) * 4 if temb is None else jnp.split(self.modulation(jax.nn.silu(temb)), 4, axis=-1)

        per_token = tuple(_rows_per_token(c, c0, target_mask) for c, c0 in zip(chunks(temb), chunks(temb_prefix)))

        if key_valid is None:
            rope = tuple(jnp.asarray(r) for r in rope_tables(layout, cfg.axes_dims_rope))
        else:  # each sample's positions as if its prompt were not padded
            rope = per_sample_rope(layout, cfg.axes_dims_rope, key_valid)
        if cached:
            rope = tuple(r[..., prefix:, :] for r in rope)

        x, new_cache = self._run_blocks(
            x, per_token, rope, mask, kv_cache if cached else None, extract=kv_cache_mode == "extract", prefix=prefix
        )

        out = self.proj_out(self.norm_out(x, temb, temb_prefix, target_mask))
        if kv_cache_mode == "extract":
            return out, new_cache
        if return_features:
            return out, x
        return out

    def _run_blocks(self, x, modulation, rope, mask, kv_cache, *, extract, prefix):
        graphdef, block_state = nnx.split(self.blocks)
        constrain = self.constrain

        def body(x, layer):
            layer_state, layer_kv = layer
            block = nnx.merge(graphdef, layer_state)
            prefix_kv = None if layer_kv is None else (layer_kv["k"], layer_kv["v"])
            x, (k, v) = block(x, modulation, rope, mask, constrain, prefix_kv)
            out_kv = {"k": k[:, :prefix], "v": v[:, :prefix]} if extract else None
            return x, out_kv

        policy = self.cfg.remat_policy
        if policy != "none":
            saveable = {
                "full": None,
                "dots_saveable": jax.checkpoint_policies.dots_saveable,
                "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            }[policy]
            body = jax.checkpoint(body, policy=saveable, prevent_cse=False)
        if self.cfg.scan_layers:
            return jax.lax.scan(body, x, (block_state, kv_cache))
        outputs = []
        for i in range(self.cfg.num_layers):
            x, out_kv = body(x, jax.tree.map(lambda a, i=i: a[i], (block_state, kv_cache)))
            outputs.append(out_kv)
        return x, (jax.tree.map(lambda *a: jnp.stack(a), *outputs) if extract else None)


def _make_blocks(cfg: TransformerConfig, rngs: nnx.Rngs) -> Block:
    """`num_layers` blocks as one Block whose parameters carry a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return Block(cfg, rngs=rngs)

    return create(rngs)


def _rows_per_token(rows, prefix_row, target_mask):
    """Per-token modulation rows: (B, 1, D) if every token uses its sample's row, else (B, S, D) where target
    tokens read their sample's row (`rows`, (B, D)) and prefix tokens the t = 0 row (`prefix_row`, (1, D))."""
    if target_mask is None or target_mask.all():
        return rows[:, None, :]
    return jnp.where(jnp.asarray(target_mask)[None, :, None], rows[:, None, :], prefix_row[:, None, :])


@functools.lru_cache(maxsize=64)
def rope_tables(layout: TokenLayout, axes_dims: tuple[int, int, int]):
    """(cos, sin), each (seq_len, head_dim // 2) float32: angle = position * theta^(-2i/d) per axis."""
    positions = layout.rope_positions
    angles = []
    for axis, dim in enumerate(axes_dims):
        angles.append(positions[axis].astype(np.float32)[:, None] * _inv_freq(dim)[None, :])
    angles = np.concatenate(angles, axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _inv_freq(dim: int) -> np.ndarray:
    return (1.0 / np.power(float(ROPE_THETA), np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _axis_tables(layout: TokenLayout, axes_dims: tuple[int, int, int]):
    """Per axis: (lowest position, cos table, sin table), the tables (positions, dim // 2) float32 over every position
    the layout can take on that axis, from its lowest to the highest unpadded one."""
    positions = layout.rope_positions
    tables = []
    for axis, dim in enumerate(axes_dims):
        lo = min(int(positions[axis].min()), 0)
        span = np.arange(lo, int(positions[axis].max()) + 1)
        angles = span.astype(np.float32)[:, None] * _inv_freq(dim)[None, :]
        tables.append((lo, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))
    return tables


def per_sample_rope(layout: TokenLayout, axes_dims: tuple[int, int, int], key_valid):
    """(cos, sin), each (B, seq_len, head_dim // 2) float32: the layout's positions with every sample's padding
    removed, so a right-padded prompt gives its tokens the positions the same prompt has alone.

    The layout advances one position per prompt row, pads included; a pad therefore moves every later text token
    (all three axes) and every later image block's frame axis by one (an image's height/width grid is centred on
    zero and does not move). `key_valid` (B, seq_len) bool marks the valid joint-sequence tokens. The angles are
    gathered from host tables, so an unpadded sample gets exactly `rope_tables`' values.
    """
    invalid = (~key_valid).astype(jnp.int32)
    pads_before = jnp.cumsum(invalid, axis=1) - invalid  # (B, S)
    is_text = jnp.asarray(layout.image_ids < 0)[None, :]
    positions = layout.rope_positions
    cos, sin = [], []
    for axis, (lo, cos_table, sin_table) in enumerate(_axis_tables(layout, axes_dims)):
        moved = pads_before if axis == 0 else jnp.where(is_text, pads_before, 0)
        index = jnp.clip(jnp.asarray(positions[axis])[None, :] - moved - lo, 0, cos_table.shape[0] - 1)
        cos.append(jnp.take(jnp.asarray(cos_table), index, axis=0))
        sin.append(jnp.take(jnp.asarray(sin_table), index, axis=0))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x, rope):
    """Rotates consecutive channel pairs (x[2i], x[2i+1]) as complex numbers; x: (B, S, H, D). The tables are
    (S, D // 2), shared by the batch, or (B, S, D // 2) per sample."""
    cos, sin = rope
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = x32[..., 0], x32[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def _check_call(
    cfg, hidden_states, encoder_hidden_states, timestep, layout, enc_mask, kv_cache, mode, return_features=False
):
    if mode not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache_mode must be one of {KV_CACHE_MODES}, got {mode!r}")
    if mode is not None and not cfg.causal_condition:
        raise ValueError(
            "the prefix KV cache requires causal_condition=True: only then are text and "
            "condition-image activations independent of the timestep"
        )
    if return_features and mode is not None:
        raise ValueError("return_features needs kv_cache_mode=None (the features span the whole sequence)")
    if (mode == "cached") != (kv_cache is not None):
        raise ValueError("pass kv_cache exactly when kv_cache_mode='cached'")
    batch, n_img, _ = hidden_states.shape
    if n_img != layout.num_image_tokens:
        raise ValueError(
            f"hidden_states has {n_img} image tokens but img_shapes accounts for {layout.num_image_tokens}"
        )
    if encoder_hidden_states.shape[:2] != (batch, layout.text_len):
        raise ValueError(
            f"encoder_hidden_states is {encoder_hidden_states.shape[:2]}, expected "
            f"(batch={batch}, text_len={layout.text_len}) from img_mask"
        )
    if enc_mask is not None and enc_mask.shape != (batch, layout.text_len):
        raise ValueError(f"encoder_hidden_states_mask is {enc_mask.shape}, expected {(batch, layout.text_len)}")
    if np.size(timestep) not in (1, batch):
        raise ValueError(f"timestep must have 1 or batch={batch} entries, got shape {np.shape(timestep)}")
