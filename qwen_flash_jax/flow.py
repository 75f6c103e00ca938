"""Flow-matching math shared by teacher training, sampling and distillation (pure, jittable).

Convention (the paper's eq. 1): z_t = (1 - t) x + t eps, t in [0, 1], t = 1 is pure noise; the network predicts the
velocity v = eps - x. The transformer takes t itself as `timestep` (diffusers' pipeline passes sigma = t/1000*1000).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def interpolate(x, eps, t):
    """z_t = (1 - t) x + t eps, with t broadcast over all but the batch axis."""
    t = _expand(t, x)
    return (1.0 - t) * x + t * eps


def velocity_target(x, eps):
    return eps - x


def x0_from_velocity(z_t, v, t):
    """The clean sample the velocity points to: x = z_t - t v."""
    return z_t - _expand(t, z_t) * v


def eps_from_velocity(z_t, v, t):
    return z_t + (1.0 - _expand(t, z_t)) * v


def cfg_combine(v_cond, v_uncond, scale: float):
    """Classifier-free guidance, diffusers' `true_cfg`: uncond + scale (cond - uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def dynamic_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Qwen-Image's resolution-dependent shift: mu is linear in the number of target image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def shift_time(t, mu: float):
    """Exponential time shift exp(mu) / (exp(mu) + (1/t - 1)); mu > 0 moves steps towards the noisy end."""
    t = jnp.asarray(t, jnp.float32)
    safe = jnp.clip(t, 1e-7, 1.0)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / safe - 1.0))
    return jnp.where(t <= 0, 0.0, shifted)


def time_shift_sigmas(sigmas, mu: float, kind: str = "exponential") -> np.ndarray:
    """diffusers' dynamic time shift of a host schedule in float64: exp(mu) / (exp(mu) + (1/s - 1)) ("exponential")
    or mu / (mu + (1/s - 1)) ("linear"). The one host implementation every schedule goes through."""
    s = np.asarray(sigmas, np.float64)
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    if kind == "linear":
        return mu / (mu + (1.0 / s - 1.0))
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def stretch_to_terminal(sigmas, terminal: float) -> np.ndarray:
    """Scales 1 - s so the schedule's last value becomes `terminal` (diffusers' `shift_terminal`); float64."""
    one_minus = 1.0 - np.asarray(sigmas, np.float64)
    return 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))


def sampling_sigmas(num_steps: int, mu: float) -> np.ndarray:
    """The Euler schedule: linspace(1, 1/N, N) shifted by mu, with a trailing 0 (N + 1 values, host constant)."""
    shifted = time_shift_sigmas(np.linspace(1.0, 1.0 / num_steps, num_steps), mu)
    return np.append(shifted, 0.0).astype(np.float32)


def sample_training_t(key, batch: int, mu: float, logit_normal_std: float = 1.0, uniform_fraction: float = 0.0):
    """Training timesteps: logit-normal draws, then the same shift the sampler uses, so training and sampling
    weight the noise levels alike.

    `uniform_fraction` of the draws are uniform in [0, 1] instead (before the shift). A logit-normal almost never
    draws the noisy end (after the toy's shift, t > 0.97 about once in 800 draws), where the prompt is all the model
    has to go on and where every sample starts; a small teacher trained so learns the prompt's attributes at t = 0.8
    (from the image still visible there) but starts its samples from an untrained t = 1.
    """
    if uniform_fraction <= 0.0:  # the key used as before, so earlier runs reproduce bit for bit
        return shift_time(jax.nn.sigmoid(logit_normal_std * jax.random.normal(key, (batch,))), mu)
    k_normal, k_pick, k_uniform = jax.random.split(key, 3)
    u = jnp.where(
        jax.random.bernoulli(k_pick, uniform_fraction, (batch,)),
        jax.random.uniform(k_uniform, (batch,)),
        jax.nn.sigmoid(logit_normal_std * jax.random.normal(k_normal, (batch,))),
    )
    return shift_time(u, mu)


def flow_matching_loss(v_pred, x, eps, weights=None):
    """Mean squared velocity error per sample (float32), averaged with optional per-sample weights."""
    err = jnp.square(v_pred.astype(jnp.float32) - velocity_target(x, eps).astype(jnp.float32))
    per_sample = jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
    if weights is None:
        return jnp.mean(per_sample)
    return jnp.sum(per_sample * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


def _expand(t, x):
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
