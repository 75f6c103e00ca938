"""Softmax attention over the joint sequence: one function, one implementation per backend.

`attention(q, k, v, mask, constrain, implementation)` is the only attention the transformer runs. q, k, v are
(B, S, heads, head_dim); `mask` is an `AttentionMask`: the layout's static (S_q, S_k) block-causal mask (or None:
every key) and the padded prompt positions (`key_valid`, (B, S_k), or None). Logits and softmax run in float32.

Implementations (`TransformerConfig.attention`; "auto" picks by the platform of the mesh the model runs on):
  * "dense": one masked einsum; materialises the (B, heads, S_q, S_k) float32 logits. The CPU path, bit for bit
    the attention the transformer had before the others existed.
  * "splash": Pallas splash attention (TPU): tiles of q and k, online softmax, no logits in memory; tiles the
    block-causal mask leaves empty are skipped. The static mask is the kernel's mask, the padded keys are segment ids
    (a query sees keys of its own segment: valid keys are segment 0, padded ones 1). Off TPU it runs in Pallas'
    interpret mode (tests). On a mesh it runs per shard (`shard_map` over the batch and head axes): a Pallas call
    has no partitioning rule, and XLA would otherwise gather q, k and v onto every device.
  * "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bfloat16/float16 only).
  * "xla": `jax.nn.dot_product_attention`'s XLA implementation (the reference the cuDNN path is checked against).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

from qwen_flash_jax import sharding
from qwen_flash_jax.models.config import ATTENTION_IMPLEMENTATIONS

SPLASH_BLOCK = 512  # splash tile (q and kv) on long sequences; short ones use one tile rounded up to 128
SPLASH_MIN_BLOCK = 128  # the TPU lane width: a tile side must be a multiple of it


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionMask:
    """Which keys each query sees: the static `block` mask (numpy (S_q, S_k) bool, None = all) and the dynamic
    `key_valid` ((B, S_k) bool array, None = all)."""

    block: np.ndarray | None
    key_valid: jax.Array | None

    def dense(self):
        """The mask as one boolean array broadcastable to (B, heads, S_q, S_k), or None."""
        if self.block is None:
            return None if self.key_valid is None else self.key_valid[:, None, None, :]
        mask = jnp.asarray(self.block)[None, None]
        if self.key_valid is not None:
            mask = mask & self.key_valid[:, None, None, :]
        return mask


def platform_of(constrain) -> str:
    """The platform the model runs on: its mesh's devices (an AOT compile for TPU traces on a CPU host), else the
    default backend."""
    mesh = getattr(constrain, "mesh", None)
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def resolve(implementation: str, platform: str, dtype) -> str:
    """The implementation "auto" means on `platform` for inputs of `dtype` (cuDNN takes only 16-bit floats)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm"):
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
    return "dense"


def attention(q, k, v, mask: AttentionMask, constrain=None, implementation: str = "auto"):
    """Softmax attention of (B, S_q, H, D) queries over (B, S_k, H, D) keys and values under `mask`; (B, S_q, H, D)
    in v's dtype. `constrain` is the model's activation sharding (`sharding.ActivationSharding`) or None."""
    chosen = resolve(implementation, platform_of(constrain), q.dtype)
    if chosen == "dense":
        return dense_attention(q, k, v, mask.dense())
    if chosen == "splash":
        return _sharded_splash(q, k, v, mask, constrain, interpret=platform_of(constrain) != "tpu")
    dense_mask = mask.dense()
    if dense_mask is not None:
        # cuDNN takes the mask as a bias whose sequence dims must be whole (it broadcasts batch and heads only)
        dense_mask = jnp.broadcast_to(dense_mask, (dense_mask.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(
        q, k, v, mask=dense_mask, scale=1.0 / math.sqrt(q.shape[-1]), implementation=chosen
    ).astype(v.dtype)


def dense_attention(q, k, v, mask):
    """Softmax attention with a boolean mask broadcastable to (B, H, S_q, S_k); logits and softmax in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


# --- splash -------------------------------------------------------------------------------------------------------


def _sharded_splash(q, k, v, mask: AttentionMask, constrain, *, interpret: bool):
    mesh = getattr(constrain, "mesh", None)
    if mesh is None or mesh.size == 1:
        return _splash(q, k, v, mask.block, mask.key_valid, interpret=interpret)
    # Batch and heads as the activations are laid out; the sequence whole on every shard (splash cannot split
    # the keys, and the block mask is per query row).
    spec = sharding.logical_to_spec(("batch", None, "act_heads", None), constrain.rules, mesh, q.shape)
    batch_spec = PartitionSpec(spec[0])
    block = mask.block

    def local(q, k, v, key_valid):
        return _splash(q, k, v, block, key_valid, interpret=interpret)

    if mask.key_valid is None:
        return jax.shard_map(
            lambda q, k, v: local(q, k, v, None), mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False
        )(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3 + (batch_spec,), out_specs=spec, check_vma=False)(
        q, k, v, mask.key_valid
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _splash(q, k, v, block, key_valid, *, interpret: bool):
    """Splash attention on one shard: q (B, S_q, H, D), k and v (B, S_k, H, D), `block` numpy (S_q, S_k) or None,
    `key_valid` (B, S_k) or None. Both sequences are padded to whole tiles; padded keys are masked out, padded
    queries dropped."""
    batch, s_q, heads, head_dim = q.shape
    s_k = k.shape[1]
    tile_q = min(SPLASH_BLOCK, _round_up(s_q, SPLASH_MIN_BLOCK))
    tile_k = min(SPLASH_BLOCK, _round_up(s_k, SPLASH_MIN_BLOCK))
    pad_q, pad_k = _round_up(s_q, tile_q) - s_q, _round_up(s_k, tile_k) - s_k
    padded = np.zeros((s_q + pad_q, s_k + pad_k), bool)
    padded[:s_q, :s_k] = True if block is None else block
    padded[s_q:, :s_k] = True  # padded queries see every real key (their rows are dropped)
    kernel = _splash_kernel(_MaskKey(padded), heads, tile_q, tile_k, interpret)

    # Scaled in float32, as the dense path scales the float32 logits; the kernel applies no scale itself.
    scaled_q = (q.astype(jnp.float32) * (1.0 / math.sqrt(head_dim))).astype(q.dtype)
    q_h = jnp.pad(scaled_q, ((0, 0), (0, pad_q), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # (B, H, S, D)
    k_h = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v_h = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    if key_valid is None:
        out = jax.vmap(kernel)(q_h, k_h, v_h)
    else:
        kv_ids = jnp.pad(jnp.where(key_valid, 0, 1).astype(jnp.int32), ((0, 0), (0, pad_k)), constant_values=1)
        q_ids = jnp.zeros((batch, s_q + pad_q), jnp.int32)
        out = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=splash.SegmentIds(qi, ki)))(
            q_h, k_h, v_h, q_ids, kv_ids
        )
    return out.transpose(0, 2, 1, 3)[:, :s_q].astype(v.dtype)


class _MaskKey:
    """A numpy mask hashed by content, so each layout's kernel (its mask preprocessing is host work) is built once."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask
        self._digest = (mask.shape, hashlib.sha1(np.packbits(mask).tobytes()).hexdigest())

    def __hash__(self):
        return hash(self._digest)

    def __eq__(self, other):
        return isinstance(other, _MaskKey) and self._digest == other._digest


@functools.lru_cache(maxsize=16)
def _splash_kernel(mask: _MaskKey, heads: int, tile_q: int, tile_k: int, interpret: bool):
    # Every head shares the layout's mask: one NumpyMask object, so the preprocessing sees one distinct mask.
    head_mask = mask_lib.NumpyMask(mask.mask)
    tiles = splash.BlockSizes(
        block_q=tile_q,
        block_kv=tile_k,
        block_kv_compute=tile_k,
        block_q_dkv=tile_q,
        block_kv_dkv=tile_k,
        block_kv_dkv_compute=tile_k,
        block_q_dq=tile_q,
        block_kv_dq=tile_k,
    )
    # Built outside any trace (it is cached across traces): its mask tables must be constants, not tracers.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(
            mask_lib.MultiHeadMask([head_mask] * heads),
            block_sizes=tiles,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )
