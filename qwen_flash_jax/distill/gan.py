"""DMD2's GAN term: a discriminator head on the fake score's trunk, real data against student samples.

The distribution-matching gradient can only pull the student towards the teachers' distribution; the GAN term
also pulls it towards the training data, which is how DMD2 students overtake their teachers. The head reads the
fake score network's last hidden states at the target tokens of a re-noised sample (so it is conditional: the trunk
sees the prompt and, for edits, the source image) and gives one logit per token, a patch discriminator.
The critic update trains the head and the fake trunk on both losses; the generator update differentiates the
non-saturating loss through the frozen fake network into the student sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_flash_jax import flow
from qwen_flash_jax.diffusion import sampling
from qwen_flash_jax.distill.dmd import dmd_times
from qwen_flash_jax.models.layers import layer_norm


def init_head(key, dim: int) -> dict:
    """Per-token MLP head: LayerNorm -> Dense(dim) -> SiLU -> Dense(1); the logit layer starts at zero."""
    return {
        "hidden": jax.random.normal(key, (dim, dim), jnp.float32) / jnp.sqrt(dim),
        "logit": jnp.zeros((dim, 1), jnp.float32),
    }


def head_logits(head: dict, features):
    """(B, T) float32 logits from trunk features (B, T, D)."""
    h = jax.nn.silu(layer_norm(features.astype(jnp.float32), 1e-6) @ head["hidden"])
    return (h @ head["logit"])[..., 0]


def critic_loss(real_logits, fake_logits):
    """Logistic loss of telling real (label 1) from student (label 0) tokens."""
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def generator_loss(fake_logits):
    """Non-saturating generator loss, summed over tokens and averaged over the batch (the DMD loss's reduction)."""
    return jnp.mean(jnp.sum(jax.nn.softplus(-fake_logits), axis=-1))


def generator_grad(model, fake_params, head, cond, x_t, t):
    """(v_fake, d generator_loss / d x_t, loss): one forward of the fake network serves the DMD comparison too."""

    def forward(z):
        v, features = sampling.velocity_and_features(model, fake_params, cond, z, t)
        return v, head_logits(head, features)

    (v_fake, logits), pullback = jax.vjp(forward, x_t)
    loss, dlogits = jax.value_and_grad(generator_loss)(logits)
    (grad,) = pullback((jnp.zeros_like(v_fake), dlogits))
    return v_fake, grad, loss


def critic_losses(model, fake_params, head, cond, student_x, real_x, key, t_min: float, t_max: float):
    """(flow-matching loss on the student samples, classification loss, real accuracy) from one joint forward
    over re-noised student and real samples at the DMD noise levels."""
    batch = student_x.shape[0]
    k_t, k_eps = jax.random.split(key)
    t = dmd_times(k_t, 2 * batch, t_min, t_max)
    x = sampling.pair(jax.lax.stop_gradient(student_x.astype(jnp.float32)), real_x.astype(jnp.float32))
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    z = flow.interpolate(x, eps, t)
    v, features = sampling.velocity_and_features(model, fake_params, cond.pair(cond), z, t)
    (v_student, _), (x_student, _), (eps_student, _) = (sampling.unpair(a) for a in (v, x, eps))
    fm = flow.flow_matching_loss(v_student, x_student, eps_student)
    fake_logits, real_logits = sampling.unpair(head_logits(head, features))
    accuracy = 0.5 * (jnp.mean(real_logits > 0) + jnp.mean(fake_logits < 0))
    return fm, critic_loss(real_logits, fake_logits), accuracy
