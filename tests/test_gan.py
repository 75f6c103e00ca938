"""DMD2's GAN term: trunk features, the discriminator head's learning, the generator's input gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen_flash_jax.diffusion import sampling
from qwen_flash_jax.distill import gan


def test_features_come_from_the_same_forward_as_the_velocity(tiny_teachers):
    model, _, cond, _, x_t = tiny_teachers
    t = jnp.array([0.6, 0.3])
    v, features = sampling.velocity_and_features(model, model.params, cond, x_t, t)
    plain, _ = sampling.velocity(model, model.params, cond, x_t, t)
    np.testing.assert_array_equal(v, plain)
    assert features.shape == (*x_t.shape[:2], model.config.inner_dim)
    with pytest.raises(ValueError, match="return_features"):
        model.forward(
            model.params,
            cond.layout,
            x_t,
            cond.encoder_hidden_states,
            t,
            cond.encoder_hidden_states_mask,
            kv_cache_mode="extract",
            return_features=True,
        )


def test_the_critic_learns_to_tell_real_from_student_samples(tiny_teachers):
    """Trunk + head, trained on the classification loss, separate two sample distributions the DMD noise levels
    blur: real samples are smooth, student samples are white noise of the same scale."""
    model, _, cond, _, x_t = tiny_teachers
    real = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, x_t.shape[1])[None, :, None], x_t.shape)
    student = jax.random.normal(jax.random.key(7), x_t.shape)
    params = {"fake": model.params, "head": gan.init_head(jax.random.key(0), model.config.inner_dim)}
    opt = optax.adam(3e-3)

    def losses(p, key):
        return gan.critic_losses(model, p["fake"], p["head"], cond, student, real, key, 0.02, 0.5)

    @jax.jit
    def step(p, opt_state, key):
        grads = jax.grad(lambda q: losses(q, key)[1])(p)
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    first = losses(params, jax.random.key(100))
    np.testing.assert_allclose(first[1], 2 * np.log(2), rtol=1e-6)  # the logit layer starts at zero
    opt_state = opt.init(params)
    for i in range(40):
        params, opt_state = step(params, opt_state, jax.random.key(i))
    # Averaged over a few draws of the noise levels: one draw can put a sample at a level that blurs it away.
    cls, accuracy = np.mean([np.asarray(losses(params, jax.random.key(100 + i))[1:]) for i in range(4)], axis=0)
    assert cls < 0.5 * first[1] and accuracy > 0.9, (float(cls), float(accuracy))


def test_generator_gradient_is_the_input_gradient_of_the_non_saturating_loss(tiny_teachers):
    model, _, cond, _, x_t = tiny_teachers
    t = jnp.array([0.6, 0.3])
    head = gan.init_head(jax.random.key(1), model.config.inner_dim)
    head["logit"] = jax.random.normal(jax.random.key(2), head["logit"].shape)  # a non-trivial discriminator
    v_fake, grad, loss = jax.jit(lambda z: gan.generator_grad(model, model.params, head, cond, z, t))(x_t)

    def direct(z):
        _, features = sampling.velocity_and_features(model, model.params, cond, z, t)
        return gan.generator_loss(gan.head_logits(head, features))

    np.testing.assert_allclose(loss, direct(x_t), rtol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(direct)(x_t), rtol=1e-4, atol=1e-7)
    # The same velocity as a plain forward (one jitted program against op by op: float32 rounding apart).
    np.testing.assert_allclose(v_fake, sampling.velocity(model, model.params, cond, x_t, t)[0], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(v_fake).max()) > 0.1
    assert float(jnp.abs(grad).max()) > 0
