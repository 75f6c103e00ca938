"""The scheduler read from a diffusers pipeline folder against diffusers' FlowMatchEulerDiscreteScheduler: the
sigmas `set_timesteps` leaves (as QwenImage21Pipeline calls it) and its step, deterministic and stochastic."""

import json

import jax
import numpy as np
import pytest

from qwen_flash_jax import flow
from qwen_flash_jax.diffusion.scheduler import FlowMatchScheduler
from qwen_flash_jax.distill import dmd
from qwen_flash_jax.models.config import ConfigError

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

CONFIGS = {
    "qwen_image_2.1": dict(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
    ),
    "defaults_dynamic": dict(use_dynamic_shifting=True),
    "linear_shift": dict(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1, max_shift=2.0),
    "static_shift": dict(shift=3.0),
    "static_terminal": dict(shift=1.0, shift_terminal=0.05),
    "turbo": dict(shift=1.0, use_dynamic_shifting=False),
}
TURBO_GRID = [1.0, 0.978453, 0.95418, 0.926626, 0.89508, 0.845148, 0.704534, 0.414568]


def _diffusers(config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def _pipeline_sigmas(ref, num_steps, image_seq_len, sigmas=None):
    """`QwenImage21Pipeline.__call__`'s schedule: its default grid, `calculate_shift`, `retrieve_timesteps`."""
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift, retrieve_timesteps

    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    c = ref.config
    mu = calculate_shift(
        image_seq_len,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )
    retrieve_timesteps(ref, num_steps, "cpu", sigmas=sigmas, mu=mu)
    return ref.sigmas.numpy(), ref.timesteps.numpy()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps,tokens", [(4, 64), (8, 1024), (40, 4096), (3, 16384)])
def test_pipeline_sigmas_equal_diffusers(name, steps, tokens):
    ref = _diffusers(CONFIGS[name])
    expected, timesteps = _pipeline_sigmas(ref, steps, tokens)
    ours = FlowMatchScheduler.from_config(dict(ref.config)).sigmas(steps, tokens)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,) and ours[-1] == 0.0
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(FlowMatchScheduler().timesteps(ours), timesteps / 1000, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_custom_and_sample_sigmas_equal_diffusers(name):
    ref = _diffusers(CONFIGS[name])
    expected, _ = _pipeline_sigmas(ref, len(TURBO_GRID), 1024, sigmas=TURBO_GRID)
    sched = FlowMatchScheduler.from_config(dict(ref.config))
    np.testing.assert_allclose(sched.sigmas(image_seq_len=1024, sigmas=TURBO_GRID), expected, rtol=0, atol=1e-6)
    with_grid = FlowMatchScheduler.from_config(dict(ref.config), sample_sigmas=TURBO_GRID)
    np.testing.assert_allclose(with_grid.sigmas(40, 1024), expected, rtol=0, atol=1e-6)  # the grid sets N


@pytest.mark.parametrize("name", ["static_shift", "static_terminal", "linear_shift"])
def test_set_timesteps_own_grid_equals_diffusers(name):
    ref = _diffusers(CONFIGS[name])
    mu = 0.8 if ref.config.use_dynamic_shifting else None
    ref.set_timesteps(6, mu=mu)
    ours = FlowMatchScheduler.from_config(dict(ref.config)).set_timesteps(6, mu=mu)
    np.testing.assert_allclose(ours, ref.sigmas.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stochastic", [False, True])
def test_step_equals_diffusers(stochastic):
    config = dict(CONFIGS["qwen_image_2.1"], stochastic_sampling=stochastic)
    ref = _diffusers(config)
    _pipeline_sigmas(ref, 4, 256)
    ours = FlowMatchScheduler.from_config(dict(ref.config))
    sigmas = ours.sigmas(4, 256)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 16, 8)).astype(np.float32)
    ref.set_begin_index(0)
    x_ref, x_ours = torch.tensor(sample), sample
    for i, t in enumerate(ref.timesteps):
        v = rng.standard_normal(sample.shape).astype(np.float32)
        generator = torch.Generator().manual_seed(i)
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(i)).numpy()
        x_ref = ref.step(torch.tensor(v), t, x_ref, generator=generator, return_dict=False)[0]
        x_ours = ours.step(v, sigmas[i], sigmas[i + 1], x_ours, noise if stochastic else None)
        np.testing.assert_allclose(np.asarray(x_ours), x_ref.numpy(), rtol=0, atol=1e-6)


def test_from_pretrained_reads_the_folder(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(CONFIGS["qwen_image_2.1"]))
    sched = FlowMatchScheduler.from_pretrained(tmp_path)
    assert sched.shift_terminal == 0.02 and sched.max_image_seq_len == 8192 and sched.sample_sigmas is None
    (tmp_path / "model_index.json").write_text(json.dumps({"sample_sigmas": TURBO_GRID}))
    assert FlowMatchScheduler.from_pretrained(tmp_path).sigmas(40, 256).shape == (9,)
    # to_config round-trips through diffusers
    ref = _diffusers({k: v for k, v in sched.to_config().items() if k != "_class_name"})
    assert FlowMatchScheduler.from_config(dict(ref.config)) == sched


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(use_karras_sigmas=True), "not supported"),
        (dict(time_shift_type="cosine"), "time_shift_type"),
        (dict(shift_terminal=1.5), "shift_terminal"),
        (dict(shift="big"), "invalid value"),
    ],
)
def test_bad_configs_are_config_errors(config, match):
    with pytest.raises(ConfigError, match=match):
        FlowMatchScheduler.from_config(config)


def test_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        FlowMatchScheduler.from_pretrained(tmp_path)


def test_toy_schedule_is_unchanged_bit_for_bit():
    """The toy's schedule (flow.sampling_sigmas, the student's default times) through the scheduler, as before."""
    for n, mu in [(1, 0.5), (4, 0.47), (40, 0.5), (4, 1.15)]:
        base = np.linspace(1.0, 1.0 / n, n)
        before = np.append(np.exp(mu) / (np.exp(mu) + (1.0 / base - 1.0)), 0.0).astype(np.float32)
        np.testing.assert_array_equal(flow.sampling_sigmas(n, mu), before)
        np.testing.assert_array_equal(dmd.student_timesteps(n, mu), before[:-1])
    toy = FlowMatchScheduler.dynamic()
    np.testing.assert_array_equal(toy.sigmas(4, 256), flow.sampling_sigmas(4, 0.5))


def test_stochastic_step_jits():
    sched = FlowMatchScheduler(stochastic_sampling=True)
    x = jax.jit(lambda v, s, n: sched.step(v, 0.5, 0.25, s, n))(np.ones((1, 2)), np.ones((1, 2)), np.zeros((1, 2)))
    np.testing.assert_allclose(np.asarray(x), 0.75 * 0.5)
