"""Flow-matching helpers and the Euler sampler (CFG, prefix KV cache)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_flash_jax import flow
from qwen_flash_jax.diffusion import sampling
from qwen_flash_jax.loading import build_transformer
from qwen_flash_jax.models import TransformerConfig, make_layout
from tests.torch_reference import TINY, make_inputs


def test_velocity_identities():
    key = jax.random.key(0)
    x, eps = jax.random.normal(key, (2, 5, 3)), jax.random.normal(jax.random.key(1), (2, 5, 3))
    t = jnp.array([0.2, 0.9])
    z = flow.interpolate(x, eps, t)
    v = flow.velocity_target(x, eps)
    np.testing.assert_allclose(flow.x0_from_velocity(z, v, t), x, atol=1e-6)
    np.testing.assert_allclose(flow.eps_from_velocity(z, v, t), eps, atol=1e-6)
    assert float(flow.flow_matching_loss(v, x, eps)) == 0.0


def test_sampling_sigmas_are_shifted_and_end_at_zero():
    sigmas = flow.sampling_sigmas(4, mu=0.0)
    np.testing.assert_allclose(sigmas, [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-6)
    shifted = flow.sampling_sigmas(4, mu=1.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and (np.diff(shifted) < 0).all()
    assert (shifted[1:-1] > sigmas[1:-1]).all()  # mu > 0 spends more steps at high noise
    assert flow.dynamic_shift_mu(256) == pytest.approx(0.5) and flow.dynamic_shift_mu(4096) == pytest.approx(1.15)


@pytest.fixture(scope="module")
def setup():
    model = build_transformer(TransformerConfig(**TINY), seed=0)
    inputs = make_inputs(
        np.random.default_rng(0), batch=2, conditions=[(1, 4, 4)], target=(1, 4, 4), text_runs=[5, 3], padding=[0, 2]
    )
    layout = make_layout(inputs["img_shapes"], inputs["img_mask"])
    cond = sampling.Conditioning(
        jnp.asarray(inputs["encoder_hidden_states"]),
        jnp.asarray(inputs["encoder_hidden_states_mask"]),
        jnp.asarray(inputs["hidden_states"][:, :16]),
        layout,
    )
    neg = cond.replace(encoder_hidden_states=jnp.zeros_like(cond.encoder_hidden_states))
    noise = jax.random.normal(jax.random.key(0), (2, 16, 8))
    return model, cond, neg, noise


def _sample(model, cond, neg, noise, steps, cfg, cache):
    fn = jax.jit(
        lambda p, n: sampling.euler_sample(
            model, p, n, cond, flow.sampling_sigmas(steps, 0.5), neg_cond=neg, cfg_scale=cfg, use_kv_cache=cache
        )
    )
    return np.asarray(fn(model.params, noise))


def test_training_times_cover_the_noisy_end_with_a_uniform_share():
    key, n, mu = jax.random.key(0), 200_000, 0.47
    plain = np.asarray(flow.sample_training_t(key, n, mu))
    np.testing.assert_array_equal(plain, np.asarray(flow.sample_training_t(key, n, mu, uniform_fraction=0.0)))
    mixed = np.asarray(flow.sample_training_t(key, n, mu, uniform_fraction=0.5))
    assert 0.0 <= mixed.min() and mixed.max() <= 1.0
    # Unshift (inverse of shift_time) and compare with the mixture's known CDF at a few points.
    u = 1.0 / (1.0 + np.exp(mu) * (1.0 / np.clip(mixed, 1e-7, 1.0) - 1.0))
    for q in (0.1, 0.5, 0.9, 0.99):
        logit_normal_cdf = 0.5 * (1.0 + math.erf(math.log(q / (1 - q)) / math.sqrt(2.0)))
        assert abs(np.mean(u <= q) - (0.5 * q + 0.5 * logit_normal_cdf)) < 0.005, q
    # The noisy end (t > 0.97), where every sample starts, is drawn ~20x as often as with the logit-normal alone.
    assert np.mean(mixed > 0.97) > 15 * np.mean(plain > 0.97) > 0


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_kv_cache_sampling_matches_uncached(setup, cfg):
    model, cond, neg, noise = setup
    cached = _sample(model, cond, neg, noise, 6, cfg, True)
    uncached = _sample(model, cond, neg, noise, 6, cfg, False)
    np.testing.assert_allclose(cached, uncached, rtol=1e-4, atol=1e-4 * np.abs(uncached).max())


def test_one_euler_step_is_noise_minus_velocity(setup):
    model, cond, neg, noise = setup
    out = _sample(model, cond, None, noise, 1, 1.0, False)
    v, _ = sampling.velocity(model, model.params, cond, noise, jnp.ones((2,)))
    np.testing.assert_allclose(out, noise - v, rtol=1e-5, atol=1e-5)


def test_cfg_extrapolates_from_the_negative(setup):
    model, cond, neg, noise = setup
    t = jnp.full((2,), 0.7)
    v_c, _ = sampling.velocity(model, model.params, cond, noise, t)
    v_u, _ = sampling.velocity(model, model.params, neg, noise, t)
    v_g, _ = sampling.guided_velocity(model, model.params, cond, neg, noise, t, 4.0)
    np.testing.assert_allclose(v_g, v_u + 4.0 * (v_c - v_u), rtol=1e-4, atol=1e-4)


def test_mismatched_layouts_cannot_be_batched(setup):
    model, cond, neg, noise = setup
    other = make_inputs(np.random.default_rng(1), batch=2, conditions=[], target=(1, 4, 4), text_runs=[12])
    bad = neg.replace(layout=make_layout(other["img_shapes"], other["img_mask"]))
    with pytest.raises(ValueError, match="share a token layout"):
        cond.pair(bad)
