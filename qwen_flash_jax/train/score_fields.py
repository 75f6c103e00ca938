"""Score fields for inspection (notebooks/score_fields.ipynb): what each teacher's real score asks of a sample.

For a few held-out prompts of one category, a sample x (a real render, or any images you pass) is re-noised to
time t, and every teacher's CFG x0 prediction is decoded, together with the step-wise blend sum_m lambda[k, m](c)
x0_m at each student step k and, given fake-score parameters, the DMD direction x0_fake - x0_real. All are images
(uint8, (N, H, W, 3)) so they can be laid side by side.

`dmd_fields` shows what DMD trains a run's student on (notebooks/pipeline.ipynb): for one prompt, the student's
sample at each of its K steps, re-noised to several noise levels t, and the fake score's x0 minus the step-wise
real x0 there, as the generator update computes them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import flow
from qwen_flash_jax.data.world import T2I_CATEGORIES
from qwen_flash_jax.diffusion import conditioning, sampling
from qwen_flash_jax.distill import dmd
from qwen_flash_jax.eval import bench_sets
from qwen_flash_jax.loading import build_transformer, from_params
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train import components
from qwen_flash_jax.train.components import CONDITIONS


def score_fields(
    config, *, category: str = "text", n: int = 4, t: float = 0.6, seed: int = 0, fake_params=None, log=print
) -> dict[str, np.ndarray]:
    """Decoded fields for `n` T2I prompts of `category`: keys `x`, `x_t`, `x0/<teacher>`, `blend/k<k>`, and
    `dmd_direction` (|x0_fake - x0_real| at the last step's blend, scaled to [0, 255]) when `fake_params` is given."""
    parts = components.build(config, log, initial_networks=False)
    assets, teachers = parts.assets, parts.teachers
    names = tuple(config.guidance.teachers)
    model = build_transformer(parts.model_config, mesh=parts.mesh, rules=parts.rules)
    bench = bench_sets.t2i_bench(int(config.data.image_size), n, int(config.eval.seed))[category]
    spec, codec = assets.tasks["t2i"], assets.codec
    h, w = spec.latent_hw
    ids, mask = zip(*(assets.prompts(c) for c in bench.captions))
    cond = conditioning.encode(assets.text_encoder, spec, jnp.asarray(np.stack(ids)), jnp.asarray(np.stack(mask)))
    neg = conditioning.encode(assets.text_encoder, spec, *conditioning.empty_prompt(spec, n))
    x = jnp.asarray(codec.pack(codec.encode(bench.real)), jnp.float32)
    times = jnp.full((n,), t)
    x_t = flow.interpolate(x, jax.random.normal(jax.random.key(seed), x.shape), times)
    cfg = float(config.guidance.cfg_scale)

    def image(tokens):
        return codec.to_uint8(codec.decode(codec.unpack(np.asarray(tokens), h, w)))

    out = {"x": bench.real, "x_t": image(x_t)}
    for name, params in teachers.items():
        v, _ = sampling.guided_velocity(model, params, cond, neg, x_t, times, cfg)
        out[f"x0/{name}"] = image(flow.x0_from_velocity(x_t, v, times))
    table = dmd.guidance_table(dict(config.guidance.weights), names, CONDITIONS, int(config.student.num_steps))
    condition = jnp.full((n,), CONDITIONS.index(f"t2i/{category}"))
    real = None
    for k in range(int(config.student.num_steps)):
        real = dmd.real_x0(model, teachers, dmd.step_weights(table, k, condition), cond, neg, x_t, times, cfg)
        out[f"blend/k{k}"] = image(real)
    if fake_params is not None:
        v_fake, _ = sampling.velocity(model, fake_params, cond, x_t, times)
        diff = np.abs(np.asarray(flow.x0_from_velocity(x_t, v_fake, times) - real))
        diff = codec.unpack(diff, h, w).reshape(n, h, w, -1, 3).mean(axis=3)  # per latent token, per colour
        out["dmd_direction"] = np.clip(255 * diff / max(float(diff.max()), 1e-8), 0, 255).astype(np.uint8)
    return out


@dataclasses.dataclass(frozen=True)
class DMDFields:
    """The DMD direction x0_fake - x0_real of one prompt at each student step k (rows) and noise level t (columns)."""

    prompt: str
    category: str
    timesteps: tuple[float, ...]  # the student's K input times
    noise_levels: tuple[float, ...]  # the T times its samples are re-noised to
    samples: np.ndarray  # (K, H, W, 3) uint8: the student's x0 at step k, the sample DMD re-noises
    magnitude: np.ndarray  # (K, T, h, w) float32: |x0_fake - x0_real| per latent position, mean over channels
    rms: np.ndarray  # (K, T) float32: the RMS of x0_fake - x0_real over the latent
    gradient_rms: np.ndarray  # (K, T) float32: the RMS of the generator's gradient, rms / mean|x - x0_real|


def dmd_fields(
    config,
    student_params,
    fake_params,
    prompt: str,
    *,
    category: str = T2I_CATEGORIES[0],
    noise_levels=(0.1, 0.3, 0.5, 0.7, 0.9),
    seed: int = 0,
    log=print,
) -> DMDFields:
    """The fields DMD trains the student on, for T2I `prompt` (guided as a `category` prompt: the guidance
    table's row). The student (its weights `student_params`) samples steps 0..k from seeded noise as in training
    (backward simulation); its x0 at step k is re-noised with one noise draw to every level in `noise_levels`, and
    the fake score (`fake_params`) and the teachers' step-k blend predict x0 there, as `distill.steps.
    generator_step` does (with the decoupled schedule, against the conditional teachers, CFG scale 1)."""
    if category not in T2I_CATEGORIES:
        raise ConfigError(f"category must be one of the T2I categories {T2I_CATEGORIES}, got {category!r}")
    parts = components.build(config, log, initial_networks=False)
    assets, teachers = parts.assets, parts.teachers
    model = from_params(parts.model_config, student_params, mesh=parts.mesh, rules=parts.rules)
    fake = from_params(parts.model_config, fake_params, mesh=parts.mesh, rules=parts.rules).params
    setup = components.distill_setup(config, model, parts.mu)
    spec, codec = assets.tasks["t2i"], assets.codec
    h, w = spec.latent_hw
    times = jnp.asarray(noise_levels, jnp.float32)
    count = len(noise_levels)
    ids, mask = assets.prompts(prompt)
    cond_one = conditioning.encode(assets.text_encoder, spec, jnp.asarray(ids[None]), jnp.asarray(mask[None]))
    cond = conditioning.encode(
        assets.text_encoder,
        spec,
        jnp.asarray(np.repeat(ids[None], count, 0)),
        jnp.asarray(np.repeat(mask[None], count, 0)),
    )
    neg = conditioning.encode(assets.text_encoder, spec, *conditioning.empty_prompt(spec, count))
    channels = codec.channels
    noise = jax.random.normal(jax.random.key(seed), (1, h * w, channels), jnp.float32)
    eps = jnp.broadcast_to(jax.random.normal(jax.random.key(seed + 1), noise.shape), (count, h * w, channels))
    condition = jnp.full((count,), CONDITIONS.index(f"t2i/{category}"))
    decoupled = setup.schedule == "decoupled"
    cfg, rescale = (1.0, 0.0) if decoupled else (setup.cfg_scale, setup.cfg_rescale)

    @jax.jit
    def at_step(student, fake, teachers, k):
        _, x0 = dmd.student_sample(
            model, student, cond_one, noise, k, setup.timesteps, jax.random.key(seed + 2), setup.renoise
        )
        x = jnp.broadcast_to(x0, eps.shape)
        x_t = flow.interpolate(x, eps, times)
        weights = dmd.step_weights(setup.guidance, k, condition)
        real = dmd.real_x0(model, teachers, weights, cond, neg, x_t, times, cfg, rescale)
        v_fake, _ = sampling.velocity(model, fake, cond, x_t, times)
        direction = flow.x0_from_velocity(x_t, v_fake, times) - real
        return x0, direction, jnp.mean(jnp.abs(x - real), axis=(1, 2))

    samples, magnitude, rms, gradient_rms = [], [], [], []
    for k in range(len(setup.timesteps)):
        x0, direction, normaliser = jax.device_get(at_step(model.params, fake, teachers, jnp.int32(k)))
        samples.append(codec.to_uint8(codec.decode(codec.unpack(x0, h, w)))[0])
        magnitude.append(np.abs(codec.unpack(direction, h, w)).mean(axis=-1))
        field_rms = np.sqrt(np.mean(np.square(direction), axis=(1, 2)))
        rms.append(field_rms)
        gradient_rms.append(field_rms / np.maximum(normaliser, 1e-8))
    return DMDFields(
        prompt,
        category,
        tuple(float(t) for t in setup.timesteps),
        tuple(float(t) for t in noise_levels),
        np.stack(samples),
        np.stack(magnitude).astype(np.float32),
        np.stack(rms).astype(np.float32),
        np.stack(gradient_rms).astype(np.float32),
    )
