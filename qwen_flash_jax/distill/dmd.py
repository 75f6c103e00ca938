"""DMD2-style distillation as pure, jittable functions.

Notation follows the paper: the student G maps noise (and the condition) to a clean sample in K steps over a
shifted timestep list t_0 = 1 > t_1 > ... > t_{K-1}; at each step it predicts x0 = z - t v and, if more steps
follow, re-noises it to the next t: with fresh noise (DMD2, `renoise="fresh"`) or with the noise its own velocity
implies (`"predicted"`, which makes each step an Euler step of the student's flow). The generator's gradient is
the difference of a *fake* score (an auxiliary network trained on the student's own samples) and a *real* score
(frozen teachers with CFG), evaluated at a re-noised student sample; in x0 form:
grad = (x0_fake - x0_real) / mean|x - x0_real|.

Step-wise multi-teacher guidance (eq. 5-7): the real x0 is sum_m lambda[k, m](c) x0_m, with k the student step
that produced the sample and c the condition (task and category); weights come from a config table and sum to 1.

Two schedules (`SCHEDULES`). "shared" (DMD2) compares the fake x0 with the guided real x0 at one noise level.
Since guided = conditional + (s - 1)(conditional - unconditional), that gradient is a distribution-matching part
(fake - conditional) plus a CFG part; "decoupled" (after Decoupled DMD) draws each part its own noise level: the
first on [t_min, t_max], the CFG part never noisier than the trained student step (`decoupled_times`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import flow
from qwen_flash_jax.diffusion import sampling
from qwen_flash_jax.diffusion.scheduler import FlowMatchScheduler
from qwen_flash_jax.models.config import ConfigError


def student_timesteps(
    num_steps: int, mu: float, explicit=(), scheduler: FlowMatchScheduler | None = None
) -> np.ndarray:
    """The K input times of the few-step student: `explicit` if given (checked), else the K-step schedule of
    `scheduler` (the teacher's pipeline scheduler; None: the config constants' dynamic shift) at `mu`, without its
    trailing 0."""
    if not len(explicit):
        return (scheduler or FlowMatchScheduler.dynamic()).sigmas(num_steps, mu=mu)[:-1]
    times = np.asarray([float(t) for t in explicit], np.float32)
    if len(times) != num_steps:
        raise ConfigError(
            f"student.timesteps has {len(times)} entries, student.num_steps is {num_steps} "
            f"(student.timesteps=() takes the shifted schedule of any length)"
        )
    if not (times[0] <= 1.0 and times[-1] > 0.0 and np.all(np.diff(times) < 0)):
        raise ConfigError(f"student.timesteps must decrease strictly within (0, 1], got {list(explicit)}")
    return times


def student_x0(model, params, cond, z, t):
    """The student's clean-sample prediction at noisy input z and time t (B,)."""
    v, _ = sampling.velocity(model, params, cond, z, t)
    return flow.x0_from_velocity(z, v, t), v


def critic_step_probs(num_steps: int, probs=()) -> tuple[float, ...]:
    """`fake_score.step_probs`, checked and normalised: how often the critic's update learns the samples of each
    student step k. () = uniform over the K steps, as the generator's k (DMD2)."""
    if not len(probs):
        return ()
    p = np.asarray([float(x) for x in probs], np.float64)
    if len(p) != num_steps or np.any(p < 0) or p.sum() <= 0:
        raise ConfigError(
            f"fake_score.step_probs must be {num_steps} non-negative weights with a positive sum "
            f"(one per student step; () = uniform), got {list(probs)}"
        )
    return tuple(float(x) for x in p / p.sum())


RENOISE_MODES = ("fresh", "predicted")


def check_renoise(mode: str) -> str:
    if mode not in RENOISE_MODES:
        raise ConfigError(f"student.renoise must be one of {RENOISE_MODES}, got {mode!r}")
    return mode


def renoise(x0, z, v, t, t_next, key, mode: str = "fresh"):
    """The next step's input from the student's x0 at (z, t). "fresh": x0 with new Gaussian noise (DMD2).
    "predicted": x0 with the noise the student's velocity implies, eps = z + (1 - t) v, i.e. an Euler step
    z + (t_next - t) v, so the first step's noise is carried to the end as in the teacher's ODE sampler."""
    if mode == "predicted":
        eps = z + (1.0 - t)[:, None, None] * v
    else:
        eps = jax.random.normal(key, z.shape, z.dtype)
    return flow.interpolate(x0, eps, t_next)


def backward_simulation(model, params, cond, noise, k, timesteps, key, mode: str = "fresh"):
    """The noisy input of student step k, reached by running steps 0..k-1 without gradients (DMD2's backward
    simulation). `k` may be traced; the re-noising between steps follows `mode` (see `renoise`)."""
    return _simulate(model, params, cond, noise, k, timesteps, key, mode, with_x0=False)[0]


def student_sample(model, params, cond, noise, k, timesteps, key, mode: str = "fresh"):
    """(input of student step k, the student's x0 there), without gradients: the critic's sample of the student."""
    return _simulate(model, params, cond, noise, k, timesteps, key, mode, with_x0=True)


def _simulate(model, params, cond, noise, k, timesteps, key, mode, *, with_x0):
    """Steps 0..k-1 from `noise` (and the x0 of step k when `with_x0`). With the model's causal_condition the
    text/condition prefix does not depend on the noisy target or the time, so step 0 keeps its keys and values
    and the later steps run only the target tokens: the same numbers for about half the forward's cost."""
    times = jnp.asarray(timesteps, jnp.float32)
    batch = noise.shape[0]
    z0 = noise.astype(jnp.float32)
    at = lambda j: jnp.full((batch,), times[j])  # noqa: E731

    def x0_at(z, j, cache=None):
        v, _ = sampling.velocity(model, params, cond, z, at(j), cache, None if cache is None else "cached")
        return flow.x0_from_velocity(z, v, at(j)), v

    def steps(first, z, cache=None):  # steps first..k-1, then (z_k, x0_k or None)
        def body(j, z):
            x0, v = x0_at(z, j, cache)
            return renoise(x0, z, v, at(j), times[j + 1], jax.random.fold_in(key, j), mode)

        z = jax.lax.fori_loop(first, k, body, z)
        return z, x0_at(z, k, cache)[0] if with_x0 else None

    if not model.config.causal_condition or len(timesteps) == 1:  # (one step: k is always 0)
        out = steps(0, z0)
    else:

        def from_prefix_cache():
            v, cache = sampling.velocity(model, params, cond, z0, at(0), kv_cache_mode="extract")
            x0 = flow.x0_from_velocity(z0, v, at(0))

            def later():
                return steps(1, renoise(x0, z0, v, at(0), times[1], jax.random.fold_in(key, 0), mode), cache)

            return jax.lax.cond(k > 0, later, lambda: (z0, x0)) if with_x0 else later()

        # Without x0, k = 0 needs no forward at all.
        out = from_prefix_cache() if with_x0 else jax.lax.cond(k > 0, from_prefix_cache, lambda: (z0, None))
    return jax.lax.stop_gradient(out)


def generate(model, params, cond, noise, timesteps, key, mode: str = "fresh"):
    """Few-step sampling (inference), K NFEs: x0 predictions re-noised between steps as in training (`renoise`)."""
    batch = noise.shape[0]
    z = noise.astype(jnp.float32)
    x0 = z
    for j, t in enumerate(np.asarray(timesteps)):
        t = jnp.full((batch,), float(t))
        x0, v = student_x0(model, params, cond, z, t)
        if j + 1 < len(timesteps):
            z = renoise(x0, z, v, t, float(timesteps[j + 1]), jax.random.fold_in(key, j), mode)
    return x0


def real_x0(model, teacher_params: dict, weights, cond, neg_cond, x_t, t, cfg_scale: float, cfg_rescale: float = 0.0):
    """sum_m weights[:, m] * x0_m, each teacher with CFG against the empty prompt.

    `weights` is (B, M) in the order of `teacher_params`; a teacher whose weight is zero for the whole batch is not
    evaluated (lax.cond runs only the taken branch), so a specialist costs nothing at the steps it sits out.
    """

    def guided(params):
        if cfg_rescale:
            return _teacher_velocities(model, params, cond, neg_cond, x_t, t, cfg_scale, cfg_rescale)[1]
        return sampling.guided_velocity(model, params, cond, neg_cond, x_t, t, cfg_scale)[0]

    return _weighted_x0(teacher_params, weights, x_t, t, 1, lambda params: (guided(params),))[0]


def real_x0_parts(
    model, teacher_params: dict, weights, cond, neg_cond, x_t, t, cfg_scale: float, cfg_rescale: float = 0.0
):
    """(conditional x0, guided x0), each blended over the teachers like `real_x0`, from one batched forward per
    teacher. Their difference is the CFG direction the decoupled schedule applies on its own (`decoupled_times`)."""
    return _weighted_x0(
        teacher_params,
        weights,
        x_t,
        t,
        2,
        lambda params: _teacher_velocities(model, params, cond, neg_cond, x_t, t, cfg_scale, cfg_rescale),
    )


def _weighted_x0(teacher_params: dict, weights, x_t, t, count: int, velocities):
    """sum_m weights[:, m] * x0(velocities(params_m)[i]) for each of the `count` velocities; skips the teachers
    weighted 0 for the whole batch."""
    totals = None
    for m, params in enumerate(teacher_params.values()):
        w = weights[:, m][:, None, None]

        def evaluate(params=params, w=w):
            return tuple(flow.x0_from_velocity(x_t, v, t) * w for v in velocities(params))

        zeros = lambda: tuple(jnp.zeros_like(x_t) for _ in range(count))  # noqa: E731
        parts = jax.lax.cond(jnp.any(weights[:, m] > 0), evaluate, zeros)
        totals = parts if totals is None else tuple(a + b for a, b in zip(totals, parts))
    return totals


def _teacher_velocities(model, params, cond, neg_cond, x_t, t, cfg_scale, cfg_rescale):
    """One teacher's (conditional, guided) velocities, both halves from one batched forward; the guided one
    optionally rescaled towards the conditional one's per-sample norm (guards against CFG blow-up)."""
    v, _ = sampling.velocity(model, params, cond.pair(neg_cond), sampling.pair(x_t, x_t), sampling.pair(t, t))
    v_cond, v_uncond = sampling.unpair(v)
    v_guided = flow.cfg_combine(v_cond, v_uncond, cfg_scale)
    return v_cond, _mix_rescaled(v_cond, v_guided, cfg_rescale) if cfg_rescale else v_guided


def _mix_rescaled(v_cond, v_guided, phi):
    """phi * (v_guided at v_cond's per-sample RMS) + (1 - phi) * v_guided."""
    norm = lambda v: jnp.sqrt(jnp.mean(jnp.square(v), axis=(1, 2), keepdims=True) + 1e-12)  # noqa: E731
    return phi * v_guided * norm(v_cond) / norm(v_guided) + (1.0 - phi) * v_guided


SCHEDULES = ("shared", "decoupled")


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        raise ConfigError(f"guidance.schedule must be one of {SCHEDULES}, got {name!r}")
    return name


def decoupled_times(key, t_student, t_min: float, t_max: float):
    """Noise levels of the decoupled schedule's CFG term: uniform in [t_min, min(t_k, t_max)], i.e. never noisier
    than the student step's own input (Decoupled DMD: CFG augmentation sharpens detail the student step resolves,
    while distribution matching, on the full range, keeps the samples on the teacher's distribution)."""
    high = jnp.maximum(jnp.minimum(t_student, t_max), t_min)
    return t_min + (high - t_min) * jax.random.uniform(key, t_student.shape)


def dmd_loss(x, x0_real, x0_fake):
    """DMD2 generator loss, float32. Its gradient w.r.t. x is (x0_fake - x0_real) / mean|x - x0_real| per sample."""
    x = x.astype(jnp.float32)
    x0_real = jax.lax.stop_gradient(x0_real.astype(jnp.float32))
    x0_fake = jax.lax.stop_gradient(x0_fake.astype(jnp.float32))
    normaliser = jnp.mean(jnp.abs(x - x0_real), axis=tuple(range(1, x.ndim)), keepdims=True)
    grad = (x0_fake - x0_real) / jnp.maximum(jax.lax.stop_gradient(normaliser), 1e-8)
    target = jax.lax.stop_gradient(x - grad)
    return 0.5 * jnp.mean(jnp.sum(jnp.square(x - target).reshape(x.shape[0], -1), axis=-1))


def first_step_fm_loss(v_student, v_teacher, k):
    """DP-DMD's first-step flow-matching regulariser: the mean squared distance of the student's velocity at its
    first step (k = 0, from pure noise) to the teacher's guided velocity there; 0 at any later step k. Anchors the
    layout the first step fixes to the teacher's."""
    diff = (v_student - jax.lax.stop_gradient(v_teacher)) * (k == 0)
    return jnp.mean(jnp.square(diff))


def dmd_times(key, batch: int, t_min: float, t_max: float):
    """Noise levels of the DMD comparison, uniform in [t_min, t_max] (DMD2). The fake score is trained on the same
    distribution: where it is rarely trained it keeps the teacher's (unguided) score instead of tracking the
    student, and the generator would be pushed along the CFG direction there without end."""
    return t_min + (t_max - t_min) * jax.random.uniform(key, (batch,))


def fake_score_loss(model, fake_params, cond, x, key, t_min: float, t_max: float):
    """Flow matching of the fake score on detached student samples, at the noise levels the DMD loss uses."""
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    k_t, k_eps = jax.random.split(key)
    t = dmd_times(k_t, x.shape[0], t_min, t_max)
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    z = flow.interpolate(x, eps, t)
    v, _ = sampling.velocity(model, fake_params, cond, z, t)
    return flow.flow_matching_loss(v, x, eps)


# --- step-wise multi-teacher weights ----------------------------------------------------------------------------------


def guidance_table(spec: dict, teachers: tuple[str, ...], conditions: tuple[str, ...], num_steps: int) -> np.ndarray:
    """(K, C, M) float32 table lambda[k, c, m] from a config mapping.

    `spec` maps a condition name ("t2i/text", "edit/text_edit", or a task-wide default "t2i", "edit", or "*") to
    a list of K per-step weight rows {teacher: weight}; the most specific key wins. Rows must sum to 1.
    """
    table = np.zeros((num_steps, len(conditions), len(teachers)), np.float32)
    for c, condition in enumerate(conditions):
        task = condition.split("/")[0]
        key = next((k for k in (condition, task, "*") if k in spec), None)
        if key is None:
            raise ConfigError(f"guidance has no weights for {condition!r} (nor for {task!r} or '*')")
        rows = list(spec[key])
        if len(rows) != num_steps:
            raise ConfigError(f"guidance[{key!r}] has {len(rows)} step rows, the student has {num_steps} steps")
        for k, row in enumerate(rows):
            unknown = sorted(set(row) - set(teachers))
            if unknown:
                raise ConfigError(f"guidance[{key!r}] step {k} names unknown teachers {unknown}; have {list(teachers)}")
            for m, name in enumerate(teachers):
                value = float(row.get(name, 0.0))
                if not 0.0 <= value <= 1.0:
                    raise ConfigError(f"guidance[{key!r}] step {k}: weight of {name!r} must lie in [0, 1], got {value}")
                table[k, c, m] = value
            if abs(table[k, c].sum() - 1.0) > 1e-5:
                raise ConfigError(
                    f"guidance[{key!r}] step {k}: weights {dict(row)} must sum to 1, "
                    f"they sum to {table[k, c].sum():.4f}"
                )
    return table


def step_weights(table, k, condition_index):
    """lambda[k, c(b), :] for a batch: (B, M). `k` scalar, `condition_index` (B,) int."""
    return jnp.asarray(table)[k][condition_index]
