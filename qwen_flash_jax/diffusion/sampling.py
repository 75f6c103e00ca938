"""Conditioning bundles, the velocity call, and the multi-step Euler sampler (CFG + prefix KV cache).

A `Conditioning` is what the transformer needs besides the noisy target: encoded prompt, its mask, the packed
condition-image latents (edits) and the static token layout. Positive and negative (empty) prompts of a task are
padded to the same length, so they share a layout and CFG runs as one forward over a doubled batch
(`pair`: interleaved, so a sharded batch axis needs no communication to double and split).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qwen_flash_jax import flow
from qwen_flash_jax.diffusion.scheduler import FlowMatchScheduler
from qwen_flash_jax.models.layout import TokenLayout


@struct.dataclass
class Conditioning:
    encoder_hidden_states: jax.Array  # (B, text_len, context_dim)
    encoder_hidden_states_mask: jax.Array  # (B, text_len) bool
    condition_latents: jax.Array  # (B, condition_tokens, C); condition_tokens = 0 for T2I
    layout: TokenLayout = struct.field(pytree_node=False)

    @property
    def batch(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def pair(self, other: "Conditioning") -> "Conditioning":
        """Both conditionings as one batch of 2B rows in `pair`'s interleaved order."""
        if other.layout != self.layout:
            raise ValueError(
                "positive and negative conditioning must share a token layout to be batched together; "
                "pad both prompts to the same length"
            )
        return jax.tree.map(pair, self, other)


def pair(a, b):
    """Two (B, ...) batches as one (2B, ...) batch, interleaved row by row: a0, b0, a1, b1, ...

    Not `concatenate`: with the batch axis sharded, sample i's two rows then stay on sample i's device, whereas
    the halves of a concatenation sit on different devices and splitting them apart costs collective-permutes.
    """
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def unpair(x):
    """The inverse of `pair`: (a, b)."""
    x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
    return x[:, 0], x[:, 1]


def _hidden(cond: Conditioning, z):
    if cond.condition_latents.shape[1]:
        return jnp.concatenate([cond.condition_latents.astype(z.dtype), z], axis=1)
    return z  # T2I: no condition tokens


def velocity_and_features(model, params, cond: Conditioning, z, t):
    """(velocity (B, T, C) float32, trunk features of the target tokens (B, T, D)) in one forward."""
    out, features = model.forward(
        params,
        cond.layout,
        _hidden(cond, z),
        cond.encoder_hidden_states,
        t,
        cond.encoder_hidden_states_mask,
        return_features=True,
    )
    return out[:, -z.shape[1] :].astype(jnp.float32), features[:, -z.shape[1] :]


def velocity(model, params, cond: Conditioning, z, t, kv_cache=None, kv_cache_mode=None):
    """Velocity for the packed noisy target `z` (B, T, C) at times `t` (B,). Returns (v, kv_cache or None)."""
    hidden = _hidden(cond, z)
    out = model.forward(
        params,
        cond.layout,
        hidden,
        cond.encoder_hidden_states,
        t,
        cond.encoder_hidden_states_mask,
        kv_cache=kv_cache,
        kv_cache_mode=kv_cache_mode,
    )
    if kv_cache_mode == "extract":
        out, kv_cache = out
    if kv_cache_mode != "cached":
        out = out[:, -z.shape[1] :]
    return out.astype(jnp.float32), kv_cache


def guided_velocity(model, params, cond, neg_cond, z, t, cfg_scale, kv_cache=None, kv_cache_mode=None):
    """CFG velocity; with `neg_cond` None or scale 1 it is the plain conditional velocity."""
    if neg_cond is None or cfg_scale == 1.0:
        return velocity(model, params, cond, z, t, kv_cache, kv_cache_mode)
    v, kv_cache = velocity(model, params, cond.pair(neg_cond), pair(z, z), pair(t, t), kv_cache, kv_cache_mode)
    v_cond, v_uncond = unpair(v)
    return flow.cfg_combine(v_cond, v_uncond, cfg_scale), kv_cache


def nfe(num_steps: int, cfg_scale: float) -> int:
    """Transformer evaluations of an N-step sample: two per step under CFG, one at scale 1 (`guided_velocity`
    then skips the unconditional pass)."""
    return int(num_steps) * (1 if float(cfg_scale) == 1.0 else 2)


def euler_sample(
    model,
    params,
    noise,
    cond: Conditioning,
    sigmas,
    *,
    neg_cond: Conditioning | None = None,
    cfg_scale: float = 1.0,
    use_kv_cache: bool = True,
    scheduler: FlowMatchScheduler | None = None,
    key=None,
):
    """Integrates the flow ODE from sigmas[0] (noise) to sigmas[-1] (= 0) with Euler steps; returns the sample.

    `sigmas` is a host array of N + 1 values (see `flow.sampling_sigmas`, `FlowMatchScheduler.sigmas`). With the
    KV cache (requires the model's causal_condition) the first step prefills the text/condition prefix and the
    remaining steps, run under `lax.scan`, recompute only the target tokens. A `scheduler` with
    `stochastic_sampling` re-noises each step's x0 prediction with fresh noise drawn from `key` (step i uses
    `fold_in(key, i)`); otherwise every step is the Euler step. Jit the caller; `sigmas` must be concrete.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    use_kv_cache = use_kv_cache and model.config.causal_condition
    stochastic = scheduler is not None and scheduler.stochastic_sampling
    if stochastic and key is None:
        raise ValueError("stochastic sampling needs a key for its fresh noise")
    batch = noise.shape[0]
    z = noise.astype(jnp.float32)

    def step(z, i, cache, mode):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t = jnp.full((batch,), sigma)
        v, cache = guided_velocity(model, params, cond, neg_cond, z, t, cfg_scale, cache, mode)
        if stochastic:
            fresh = jax.random.normal(jax.random.fold_in(key, i), z.shape, jnp.float32)
            return scheduler.step(v, sigma, sigma_next, z, fresh), cache
        return z + (sigma_next - sigma) * v, cache

    steps = jnp.arange(sigmas.shape[0] - 1)
    if use_kv_cache:
        z, cache = step(z, 0, None, "extract")
        rest = steps[1:]

        def body(z, i):
            z, _ = step(z, i, cache, "cached")
            return z, None
    else:
        rest = steps

        def body(z, i):
            z, _ = step(z, i, None, None)
            return z, None

    z, _ = jax.lax.scan(body, z, rest)
    return z
