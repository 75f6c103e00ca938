"""DMD pure functions: the generator gradient, multi-teacher weights, backward simulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen_flash_jax import flow
from qwen_flash_jax.diffusion import sampling
from qwen_flash_jax.distill import dmd, pairs
from qwen_flash_jax.loading import build_transformer
from qwen_flash_jax.models import TransformerConfig
from qwen_flash_jax.models.config import ConfigError
from tests.helpers import ONE_LAYER


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    keys = jax.random.split(jax.random.key(0), 3)
    x, real, fake = (jax.random.normal(k, (3, 4, 5)) for k in keys)
    grad = jax.grad(dmd.dmd_loss)(x, real, fake)
    normaliser = jnp.mean(jnp.abs(x - real), axis=(1, 2), keepdims=True)
    expected = (fake - real) / normaliser / 3  # mean over the batch of 3
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def _gaussian_x0(x_t, t, mean, std):
    """E[x | x_t] for x ~ N(mean, diag(std^2)) and x_t = (1 - t) x + t eps: the exact x0-prediction of a score."""
    t = t[:, None]
    return mean + (1 - t) * std**2 / ((1 - t) ** 2 * std**2 + t**2) * (x_t - (1 - t) * mean)


def test_dmd_loss_moves_a_generator_onto_the_target_distribution():
    """With exact real and fake scores (Gaussians), following dmd_loss at uniform DMD noise levels matches the
    generator's mean and spread to the target's, including shrinking and widening it: the loss's sign and its
    per-sample normalisation carry no bias of their own."""
    target_mean, target_std = jnp.array([1.5, -0.5, 0.0, 2.0]), jnp.array([0.5, 1.5, 0.2, 1.0])
    params = {"mean": jnp.zeros(4), "log_std": jnp.zeros(4)}  # the generator x = mean + exp(log_std) z
    opt = optax.adam(0.02)

    @jax.jit
    def update(params, opt_state, key):
        k_z, k_t, k_eps = jax.random.split(key, 3)
        z, eps = jax.random.normal(k_z, (512, 4)), jax.random.normal(k_eps, (512, 4))
        t = dmd.dmd_times(k_t, 512, 0.02, 0.98)

        def loss(p):
            std = jnp.exp(p["log_std"])
            x = p["mean"] + std * z
            x_t = flow.interpolate(jax.lax.stop_gradient(x), eps, t)
            fake = _gaussian_x0(x_t, t, jax.lax.stop_gradient(p["mean"]), jax.lax.stop_gradient(std))
            return dmd.dmd_loss(x, _gaussian_x0(x_t, t, target_mean, target_std), fake)

        updates, opt_state = opt.update(jax.grad(loss)(params), opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    for i in range(400):
        params, opt_state = update(params, opt_state, jax.random.fold_in(jax.random.key(0), i))
    np.testing.assert_allclose(params["mean"], target_mean, atol=0.02)
    np.testing.assert_allclose(jnp.exp(params["log_std"]), target_std, rtol=0.05)


def test_guidance_table_picks_the_most_specific_rule_and_checks_sums():
    spec = {"*": [{"base": 1.0}] * 2, "t2i/text": [{"base": 1.0}, {"base": 0.5, "text": 0.5}]}
    table = dmd.guidance_table(spec, ("base", "text"), ("t2i/landscape", "t2i/text"), 2)
    np.testing.assert_array_equal(table[:, 0], [[1, 0], [1, 0]])
    np.testing.assert_array_equal(table[:, 1], [[1, 0], [0.5, 0.5]])
    with pytest.raises(ConfigError, match="sum to 1"):
        dmd.guidance_table({"*": [{"base": 0.7}] * 2}, ("base",), ("t2i/text",), 2)
    with pytest.raises(ConfigError, match="unknown teachers"):
        dmd.guidance_table({"*": [{"bass": 1.0}] * 2}, ("base",), ("t2i/text",), 2)
    with pytest.raises(ConfigError, match="step rows"):
        dmd.guidance_table({"*": [{"base": 1.0}]}, ("base",), ("t2i/text",), 2)
    with pytest.raises(ConfigError, match="no weights"):
        dmd.guidance_table({"edit": [{"base": 1.0}] * 2}, ("base",), ("t2i/text",), 2)


def test_real_x0_blends_teachers_and_skips_unused_ones(tiny_teachers):
    model, teachers, cond, neg, x_t = tiny_teachers
    t = jnp.array([0.6, 0.3])

    def x0_of(params):
        v, _ = sampling.guided_velocity(model, params, cond, neg, x_t, t, 3.0)
        return flow.x0_from_velocity(x_t, v, t)

    weights = jnp.array([[1.0, 0.0], [0.25, 0.75]])
    blended = dmd.real_x0(model, teachers, weights, cond, neg, x_t, t, 3.0)
    np.testing.assert_allclose(blended[0], x0_of(teachers["base"])[0], rtol=1e-5, atol=1e-5)
    expected = 0.25 * x0_of(teachers["base"])[1] + 0.75 * x0_of(teachers["text"])[1]
    np.testing.assert_allclose(blended[1], expected, rtol=1e-5, atol=1e-5)
    # A teacher with zero weight for the whole batch is never run: NaN parameters cannot leak in.
    poisoned = {"base": teachers["base"], "text": jax.tree.map(lambda p: p * jnp.nan, teachers["text"])}
    only_base = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    out = jax.jit(lambda w: dmd.real_x0(model, poisoned, w, cond, neg, x_t, t, 3.0))(only_base)
    assert bool(jnp.isfinite(out).all())


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_real_x0_parts_are_the_conditional_and_the_guided_blend(tiny_teachers, rescale):
    """The decoupled schedule's two real x0s: the guided one is `real_x0`'s (also rescaled), the conditional one is
    `real_x0` at CFG 1, both blended with the same weights."""
    model, teachers, cond, neg, x_t = tiny_teachers
    t = jnp.array([0.6, 0.3])
    weights = jnp.array([[1.0, 0.0], [0.25, 0.75]])
    conditional, guided = dmd.real_x0_parts(model, teachers, weights, cond, neg, x_t, t, 3.0, rescale)
    np.testing.assert_allclose(
        guided, dmd.real_x0(model, teachers, weights, cond, neg, x_t, t, 3.0, rescale), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        conditional, dmd.real_x0(model, teachers, weights, cond, neg, x_t, t, 1.0), rtol=1e-4, atol=1e-4
    )
    assert float(jnp.max(jnp.abs(guided - conditional))) > 1e-2  # CFG 3 moves the random teachers' x0


def test_rescaled_cfg_takes_the_conditional_velocitys_norm():
    v_cond, v_guided = (
        jax.random.normal(k, (3, 5, 4)) * s for k, s in zip(jax.random.split(jax.random.key(0)), (1.0, 4.0))
    )
    rms = lambda v: jnp.sqrt(jnp.mean(jnp.square(v), axis=(1, 2)))  # noqa: E731
    np.testing.assert_allclose(rms(dmd._mix_rescaled(v_cond, v_guided, 1.0)), rms(v_cond), rtol=1e-5)
    half = dmd._mix_rescaled(v_cond, v_guided, 0.5)
    np.testing.assert_allclose(half, 0.5 * dmd._mix_rescaled(v_cond, v_guided, 1.0) + 0.5 * v_guided, rtol=1e-5)


def test_decoupled_times_never_exceed_the_student_steps_time():
    t_student = jnp.repeat(jnp.array([1.0, 0.8, 0.5, 0.2, 0.01]), 2000)
    t = dmd.decoupled_times(jax.random.key(0), t_student, 0.02, 0.98)
    high = jnp.maximum(jnp.minimum(t_student, 0.98), 0.02)
    assert bool(jnp.all(t >= 0.02)) and bool(jnp.all(t <= high + 1e-7))
    # Uniform below the bound: each step's draws fill its interval (max near the bound, mean at its middle).
    for i, bound in enumerate([0.98, 0.8, 0.5, 0.2]):
        drawn = np.asarray(t[i * 2000 : (i + 1) * 2000])
        assert drawn.max() > bound - 0.01 and abs(drawn.mean() - (0.02 + bound) / 2) < 0.02
    np.testing.assert_allclose(t[-2000:], 0.02)  # a step below t_min: the CFG term sits at t_min
    with pytest.raises(ConfigError, match="guidance.schedule"):
        dmd.check_schedule("split")


def test_backward_simulation_runs_the_earlier_steps(tiny_teachers):
    model, teachers, cond, _, noise = tiny_teachers
    times = dmd.student_timesteps(4, 0.5)
    key = jax.random.key(5)
    sim = jax.jit(lambda k: dmd.backward_simulation(model, model.params, cond, noise, k, times, key))
    np.testing.assert_array_equal(sim(0), noise)
    z = noise
    for j in range(2):
        x0, _ = dmd.student_x0(model, model.params, cond, z, jnp.full((2,), times[j]))
        z = flow.interpolate(x0, jax.random.normal(jax.random.fold_in(key, j), z.shape), times[j + 1])
    np.testing.assert_allclose(sim(2), z, rtol=1e-5, atol=1e-5)
    # Few-step generation is the same recursion carried to the last step.
    out = dmd.generate(model, model.params, cond, noise, times[:3], key)
    x0, _ = dmd.student_x0(model, model.params, cond, z, jnp.full((2,), times[2]))
    np.testing.assert_allclose(out, x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_the_critic_sample_on_the_prefix_cache_matches_full_forwards(tiny_teachers, causal):
    """`student_sample` (and the backward simulation) reuse step 0's text/condition keys and values when the model
    has causal_condition: every k reaches the input and x0 of the plain loop of full forwards, with a traced k."""
    _, _, cond, _, noise = tiny_teachers
    # One unrolled layer, as the shared tiny teachers: the prefix cache of the scanned stack is checked against
    # full forwards in test_sampling (the Euler sampler) and test_transformer.
    model = build_transformer(TransformerConfig(**(ONE_LAYER | dict(causal_condition=causal))), seed=2)
    times = dmd.student_timesteps(4, 0.5)
    key = jax.random.key(11)
    # The reference full forward, compiled once for every step and mode below (op by op, each call would dispatch
    # the whole scanned stack again).
    x0_of = jax.jit(lambda z, t: dmd.student_x0(model, model.params, cond, z, jnp.full((2,), t)))
    for mode in ("fresh", "predicted"):
        # Both are called within this iteration only, so they see this iteration's mode.
        sample = jax.jit(lambda k: dmd.student_sample(model, model.params, cond, noise, k, times, key, mode))  # noqa: B023
        simulate = jax.jit(lambda k: dmd.backward_simulation(model, model.params, cond, noise, k, times, key, mode))  # noqa: B023
        z = noise
        for k in range(4):
            x0, v = x0_of(z, times[k])
            z_k, x0_k = sample(k)
            np.testing.assert_allclose(z_k, z, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(simulate(k), z, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(x0_k, x0, rtol=1e-5, atol=1e-5)
            if k < 3:
                z = dmd.renoise(x0, z, v, jnp.full((2,), times[k]), times[k + 1], jax.random.fold_in(key, k), mode)
    one_step = dmd.student_sample(model, model.params, cond, noise, 0, times[:1], key)
    np.testing.assert_allclose(one_step[1], x0_of(noise, times[0])[0], rtol=1e-5, atol=1e-5)


def test_predicted_renoising_makes_the_student_the_euler_sampler(tiny_teachers):
    """With the noise its velocity implies, each student step is an Euler step: the student at initialisation
    samples exactly as the teacher's Euler sampler (without CFG) over the same times, and its backward simulation
    reaches the Euler iterate. With fresh noise the samples differ."""
    model, _, cond, _, noise = tiny_teachers
    times = dmd.student_timesteps(4, 0.5)
    key = jax.random.key(3)
    out = dmd.generate(model, model.params, cond, noise, times, key, "predicted")
    sigmas = np.append(times, 0.0)
    euler = sampling.euler_sample(model, model.params, noise, cond, sigmas, use_kv_cache=False)
    np.testing.assert_allclose(out, euler, rtol=1e-4, atol=1e-4)
    z2 = sampling.euler_sample(model, model.params, noise, cond, sigmas[:3], use_kv_cache=False)
    sim = dmd.backward_simulation(model, model.params, cond, noise, 2, times, key, "predicted")
    np.testing.assert_allclose(sim, z2, rtol=1e-4, atol=1e-4)
    fresh = dmd.generate(model, model.params, cond, noise, times, key, "fresh")
    assert float(jnp.max(jnp.abs(fresh - euler))) > 1e-2
    with pytest.raises(ConfigError, match="student.renoise must be one of"):
        dmd.check_renoise("ddim")


def test_student_timesteps_default_to_the_shifted_schedule_and_check_an_explicit_list():
    np.testing.assert_array_equal(dmd.student_timesteps(4, 0.5), flow.sampling_sigmas(4, 0.5)[:-1])
    np.testing.assert_allclose(dmd.student_timesteps(4, 0.5, (1.0, 0.75, 0.5, 0.25)), [1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ConfigError, match="3 entries, student.num_steps is 4"):
        dmd.student_timesteps(4, 0.5, (1.0, 0.5, 0.25))
    with pytest.raises(ConfigError, match="decrease strictly"):
        dmd.student_timesteps(3, 0.5, (1.0, 0.5, 0.5))
    with pytest.raises(ConfigError, match="decrease strictly"):
        dmd.student_timesteps(2, 0.5, (1.0, 0.0))


def test_the_regression_loss_gradient_is_the_distance_to_the_target_over_the_batch():
    """The segment term's loss (pairs.regression_loss): dmd_loss's scale, gradient x - target over the batch."""
    x = jax.random.normal(jax.random.key(0), (3, 4, 2))
    target = jax.random.normal(jax.random.key(1), (3, 4, 2))
    loss, grad = jax.value_and_grad(pairs.regression_loss)(x, target)
    np.testing.assert_allclose(grad, (x - target) / 3, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.5 * float(jnp.sum(jnp.square(x - target))) / 3, rtol=1e-5)
