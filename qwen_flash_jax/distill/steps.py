"""The two jitted DMD steps: the critic (fake score) update and the generator (student) update.

Both are pure functions of (state, frozen inputs, batch) compiled once per task layout. The generator step never
differentiates through a teacher or the fake score: it takes the student sample's VJP, evaluates the frozen
networks on the detached sample, and pulls the DMD gradient back through the VJP. A step whose loss or gradients
are not finite leaves the state untouched and is counted.

Optional terms, each off at weight 0: DMD2's GAN term (`gan_weight > 0`: the critic also trains a discriminator
head on the fake trunk and the generator adds its non-saturating loss, `gan.py`); DMD1's regression onto teacher
pairs (`regression_weight > 0`, `pairs.py`); DP-DMD's first-step flow-matching regulariser
(`first_step_fm_weight > 0`, `dmd.first_step_fm_loss`); an EMA of the student (`ema_decay > 0`), the weights that
are evaluated. With `schedule="decoupled"` the generator's DMD gradient is two terms at separate noise levels
(dmd.py says why).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qwen_flash_jax import flow
from qwen_flash_jax.diffusion import conditioning, sampling
from qwen_flash_jax.distill import dmd, gan
from qwen_flash_jax.distill import pairs as pairs_lib


@struct.dataclass
class DistillState:
    step: jax.Array  # generator updates done
    student: dict
    fake: dict
    student_opt: object
    fake_opt: object
    ema: dict | None  # EMA of the student (same tree as `student`); None when EMA is off (ema_decay = 0)
    rng: jax.Array  # raw key data
    nonfinite_total: jax.Array
    nonfinite_run: jax.Array  # consecutive skipped steps
    disc: dict  # discriminator head on the fake trunk (untouched while the GAN term is off)
    disc_opt: object

    def evaluated_student(self) -> dict:
        """The student weights that are sampled and evaluated: the EMA when EMA is on, else the raw weights."""
        return self.student if self.ema is None else self.ema


@dataclasses.dataclass(frozen=True)
class DistillSetup:
    """Static pieces the steps close over (hashable parts only enter as jit statics)."""

    model: object
    student_opt: object
    fake_opt: object
    timesteps: tuple[float, ...]  # student input times, K of them
    guidance: np.ndarray  # (K, C, M)
    teacher_names: tuple[str, ...]
    cfg_scale: float
    cfg_rescale: float
    t_min: float
    t_max: float
    ema_decay: float  # > 0: keep an EMA of the student (`ema_update`); 0 = off, and `DistillState.ema` is None
    first_step_fm_weight: float  # DP-DMD's first-step regulariser (dmd.first_step_fm_loss); 0 = off
    disc_opt: object = None
    gan_weight: float = 0.0  # generator's GAN loss weight; 0 = pure DMD (the paper's objective)
    gan_tasks: tuple[str, ...] = ("t2i", "edit")  # the tasks whose updates carry the GAN term
    gan_critic_weight: float = 0.01  # weight of the head's classification loss in the critic update
    renoise: str = "fresh"  # how the student re-noises between its steps (dmd.renoise)
    regression_weight: float = 0.0  # weight of the regression onto teacher ODE pairs (pairs.py); 0 = off
    # The critic's distribution of the student step k whose samples the fake score learns (dmd.critic_step_probs);
    # () = uniform, as the generator's k always is (DMD2).
    critic_step_probs: tuple[float, ...] = ()
    # "shared": DMD2, one comparison against the guided real score. "decoupled": distribution matching against the
    # conditional real score on [t_min, t_max] plus the CFG term at noise levels up to the student step's time.
    schedule: str = "shared"


def _uses_gan(setup, spec) -> bool:
    """Whether this task's updates carry the GAN term (a static fact: `spec` is a jit static)."""
    return bool(setup.gan_weight) and spec.task in setup.gan_tasks


def _split(state):
    key = jax.random.wrap_key_data(state.rng)
    key, *subkeys = jax.random.split(key, 6)
    return jax.random.key_data(key), subkeys


def initial_state(setup: DistillSetup, student: dict, fake: dict, disc: dict, rng) -> DistillState:
    """The state before the first update. The EMA starts as a copy of the student and exists only when EMA is on;
    `rng` is raw key data."""
    return DistillState(
        step=jnp.zeros((), jnp.int32),
        student=student,
        fake=fake,
        student_opt=setup.student_opt.init(student),
        fake_opt=setup.fake_opt.init(fake),
        ema=jax.tree.map(jnp.copy, student) if setup.ema_decay else None,
        rng=rng,
        nonfinite_total=jnp.zeros((), jnp.int32),
        nonfinite_run=jnp.zeros((), jnp.int32),
        disc=disc,
        disc_opt=setup.disc_opt.init(disc),
    )


def ema_update(ema: dict, student: dict, decay: float) -> dict:
    """One step of the student's exponential moving average: decay * ema + (1 - decay) * student, per leaf."""
    return jax.tree.map(lambda e, s: decay * e + (1 - decay) * s, ema, student)


def _student_step(setup, batch_size, shape, key_noise, key_k, probs=()):
    """Draws the student step k (from `probs`; () = uniform), its time and the first step's noise."""
    if probs:
        k = jax.random.choice(key_k, len(setup.timesteps), p=jnp.asarray(probs, jnp.float32))
    else:  # (`choice` with equal weights would draw other k from the same key than `randint`)
        k = jax.random.randint(key_k, (), 0, len(setup.timesteps))
    noise = jax.random.normal(key_noise, shape, jnp.float32)
    t = jnp.full((batch_size,), jnp.asarray(setup.timesteps)[k])
    return k, noise, t


def _student_input(setup, state, cond, batch_size, shape, key_noise, key_k, key_sim):
    """Draws the student step k and its noisy input by backward simulation."""
    k, noise, t = _student_step(setup, batch_size, shape, key_noise, key_k)
    z = dmd.backward_simulation(setup.model, state.student, cond, noise, k, setup.timesteps, key_sim, setup.renoise)
    return k, z, t


def _finite(*trees):
    leaves = [x for tree in trees for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _guarded(state, new_state, ok):
    merged = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    return merged.replace(
        nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
        nonfinite_run=jnp.where(ok, 0, state.nonfinite_run + 1),
    )


def critic_step(setup: DistillSetup, state: DistillState, te_params, batch, spec):
    rng, (k_noise, k_k, k_sim, k_loss, _) = _split(state)
    cond = conditioning.batch_conditioning(te_params, spec, batch)
    shape = batch["target_latents"].shape
    k, noise, _ = _student_step(setup, shape[0], shape, k_noise, k_k, setup.critic_step_probs)
    _, x = dmd.student_sample(setup.model, state.student, cond, noise, k, setup.timesteps, k_sim, setup.renoise)

    def losses(fake, disc):
        if not _uses_gan(setup, spec):
            fm = dmd.fake_score_loss(setup.model, fake, cond, x, k_loss, setup.t_min, setup.t_max)
            return fm, (fm, {})
        fm, cls, accuracy = gan.critic_losses(
            setup.model, fake, disc, cond, x, batch["target_latents"], k_loss, setup.t_min, setup.t_max
        )
        return fm + setup.gan_critic_weight * cls, (fm, {"critic_gan_loss": cls, "disc_accuracy": accuracy})

    (_, (loss, extra)), (grads, disc_grads) = jax.value_and_grad(losses, argnums=(0, 1), has_aux=True)(
        state.fake, state.disc
    )
    updates, fake_opt = setup.fake_opt.update(grads, state.fake_opt, state.fake)
    new = state.replace(fake=jax.tree.map(jnp.add, state.fake, updates), fake_opt=fake_opt, rng=rng)
    if _uses_gan(setup, spec):
        disc_updates, disc_opt = setup.disc_opt.update(disc_grads, state.disc_opt, state.disc)
        new = new.replace(disc=jax.tree.map(jnp.add, state.disc, disc_updates), disc_opt=disc_opt)
    ok = _finite(loss, grads, disc_grads, *extra.values())
    return _guarded(state.replace(rng=rng), new, ok), {"fake_loss": loss, **extra, "skipped": ~ok}


def generator_step(
    setup: DistillSetup, state: DistillState, te_params, teachers: dict, batch, spec, condition_offset: int, pairs=None
):
    rng, (k_noise, k_k, k_sim, k_t, k_xi) = _split(state)
    cond = conditioning.batch_conditioning(te_params, spec, batch)
    neg = conditioning.batch_conditioning(te_params, spec, batch, negative=True)
    shape = batch["target_latents"].shape
    # DMD2's backward simulation: the input z of step k comes from the student's own earlier steps, without
    # gradients; the generator's gradient reaches only step k's network call.
    k, z, t = _student_input(setup, state, cond, shape[0], shape, k_noise, k_k, k_sim)
    (x, v_student), pullback = jax.vjp(lambda p: dmd.student_x0(setup.model, p, cond, z, t), state.student)

    # Re-noise the detached sample and compare the fake score with the step-wise multi-teacher real score.
    x_sg = jax.lax.stop_gradient(x)
    t_dmd = dmd.dmd_times(k_t, shape[0], setup.t_min, setup.t_max)
    x_t = flow.interpolate(x_sg, jax.random.normal(k_xi, shape, jnp.float32), t_dmd)
    weights = dmd.step_weights(setup.guidance, k, batch["category"] + condition_offset)
    decoupled = setup.schedule == "decoupled"
    # Decoupled: the distribution-matching comparison is against the conditional teachers (CFG scale 1).
    x0_real = dmd.real_x0(
        setup.model,
        teachers,
        weights,
        cond,
        neg,
        x_t,
        t_dmd,
        1.0 if decoupled else setup.cfg_scale,
        0.0 if decoupled else setup.cfg_rescale,
    )
    use_gan = _uses_gan(setup, spec)
    if use_gan:
        v_fake, grad_xt, gan_loss = gan.generator_grad(setup.model, state.fake, state.disc, cond, x_t, t_dmd)
    else:
        v_fake, _ = sampling.velocity(setup.model, state.fake, cond, x_t, t_dmd)
    x0_fake = flow.x0_from_velocity(x_t, v_fake, t_dmd)
    loss, grad_x = jax.value_and_grad(dmd.dmd_loss)(x_sg, x0_real, x0_fake)
    schedule_metrics = {}
    if decoupled and setup.cfg_scale != 1.0:  # (at CFG 1 the guided x0 is the conditional one: no CFG term)
        # The CFG term on its own noise levels, never above the student step's time: the guided minus the
        # conditional teacher x0, the conditional one in the fake score's place (dmd_loss's normalisation).
        # Its keys derive from the shared ones, so the distribution-matching term draws what "shared" draws.
        t_ca = dmd.decoupled_times(jax.random.fold_in(k_t, 1), t, setup.t_min, setup.t_max)
        x_ca = flow.interpolate(x_sg, jax.random.normal(jax.random.fold_in(k_xi, 1), shape, jnp.float32), t_ca)
        x0_cond, x0_guided = dmd.real_x0_parts(
            setup.model, teachers, weights, cond, neg, x_ca, t_ca, setup.cfg_scale, setup.cfg_rescale
        )
        ca_loss, grad_ca = jax.value_and_grad(dmd.dmd_loss)(x_sg, x0_guided, x0_cond)
        schedule_metrics = {"dm_loss": loss, "ca_loss": ca_loss}
        loss, grad_x = loss + ca_loss, grad_x + grad_ca
    gan_metrics = {}
    if use_gan:
        gan_grad_x = setup.gan_weight * grad_xt * (1.0 - t_dmd)[:, None, None]  # x_t = (1 - t) x + t noise
        gan_metrics = {
            "gan_loss": gan_loss,
            "gan_grad_ratio": jnp.linalg.norm(gan_grad_x) / jnp.maximum(jnp.linalg.norm(grad_x), 1e-12),
        }
        grad_x = grad_x + gan_grad_x

    grad_v = jnp.zeros_like(v_student)
    fm_loss = jnp.zeros(())
    if setup.first_step_fm_weight:
        # DP-DMD's first-step regulariser: at k = 0, match the base teacher's guided velocity from pure noise. Its
        # velocity gradient joins the DMD gradient in one pull-back through the student.
        base = teachers[setup.teacher_names[0]]
        v_teacher, _ = sampling.guided_velocity(setup.model, base, cond, neg, z, t, setup.cfg_scale)
        fm_loss, grad_v = jax.value_and_grad(dmd.first_step_fm_loss)(v_student, v_teacher, k)
        grad_v = setup.first_step_fm_weight * grad_v
    (grads,) = pullback((grad_x, grad_v))
    reg_loss = jnp.zeros(())
    if setup.regression_weight and pairs is not None:
        # DMD1's regression onto teacher ODE pairs, at the same student step k along the student's own
        # (predicted-noise) trajectory from the pair's noise (pairs.py says why the target is the same at every k).
        cond_p = conditioning.batch_conditioning(te_params, spec, pairs)
        z_p = dmd.backward_simulation(
            setup.model, state.student, cond_p, pairs["noise"], k, setup.timesteps, k_sim, setup.renoise
        )
        reg_loss, reg_grads = jax.value_and_grad(
            lambda p: pairs_lib.regression_loss(dmd.student_x0(setup.model, p, cond_p, z_p, t)[0], pairs["target"])
        )(state.student)
        grads = jax.tree.map(lambda g, r: g + setup.regression_weight * r, grads, reg_grads)

    updates, student_opt = setup.student_opt.update(grads, state.student_opt, state.student)
    student = jax.tree.map(jnp.add, state.student, updates)
    ema = ema_update(state.ema, student, setup.ema_decay) if setup.ema_decay else state.ema
    new = state.replace(step=state.step + 1, student=student, student_opt=student_opt, ema=ema, rng=rng)
    ok = _finite(loss, grads, reg_loss, *gan_metrics.values())
    metrics = {
        "dmd_loss": loss,
        "fm_loss": fm_loss,
        "regression_loss": reg_loss,
        "k": k,
        "skipped": ~ok,
        **gan_metrics,
        **schedule_metrics,
        "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
    }
    guarded = _guarded(state.replace(rng=rng), new, ok)
    return guarded.replace(step=state.step + 1), metrics
