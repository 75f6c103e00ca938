"""The optional terms of the distillation objective, one jitted update at a time on a tiny random model: the
student's EMA, DP-DMD's first-step flow-matching regulariser and the critic's own distribution of student steps.

The text encoder is replaced by a stub that scales fixed text features by the token ids, so the batch's prompt
(ids 1) gives the conditioning and the empty prompt (ids 0) the zero features CFG guides against.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen_flash_jax import config_lib
from qwen_flash_jax.diffusion import conditioning, sampling
from qwen_flash_jax.distill import dmd, gan, steps
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train import distill_job

BATCH, TEXT_LEN = 2, 6


@pytest.fixture(scope="module")
def world(tiny_teachers):
    """The shared tiny teachers (tests/helpers.py: one unrolled layer, the terms do not depend on depth), a T2I
    task spec of their layout and a batch of the stub's prompt ids."""
    model, teachers, cond, _, _ = tiny_teachers
    layout = cond.layout
    spec = conditioning.TaskSpec("t2i", layout, (4, 4), 0, (0,) * TEXT_LEN, (1,) * TEXT_LEN)
    batch = {
        "input_ids": jnp.ones((BATCH, TEXT_LEN), jnp.int32),
        "attention_mask": jnp.ones((BATCH, TEXT_LEN), jnp.int32),
        "target_latents": jax.random.normal(jax.random.key(9), (BATCH, 16, 8)),
        "category": jnp.zeros((BATCH,), jnp.int32),
    }
    return model, teachers, cond, spec, batch


def _stub_text_encoder(cond, monkeypatch):
    def encode(te_params, spec, input_ids, attention_mask, condition_latents=None, condition_pixels=None):
        return cond.replace(encoder_hidden_states=cond.encoder_hidden_states * input_ids[:, :, None])

    monkeypatch.setattr(conditioning, "encode", encode)


def _recording_sgd(learning_rate):
    """Plain SGD whose optimiser state is the last gradient, so a test reads the update's exact gradient."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(lambda g: -learning_rate * g, grads), grads),
    )


def _setup(model, num_steps, **terms):
    fields = dict(
        model=model,
        student_opt=_recording_sgd(0.05),
        fake_opt=optax.sgd(1e-3),
        timesteps=(1.0, 0.7, 0.4, 0.1)[:num_steps],
        guidance=np.tile(np.array([[[1.0, 0.0]]], np.float32), (num_steps, 1, 1)),
        teacher_names=("base", "text"),
        cfg_scale=2.0,
        cfg_rescale=0.0,
        t_min=0.02,
        t_max=0.98,
        ema_decay=0.0,
        first_step_fm_weight=0.0,
        disc_opt=optax.sgd(1e-3),
    )
    return steps.DistillSetup(**(fields | terms))


def _initial_state(setup, teachers, seed=0):
    disc = gan.init_head(jax.random.key(2), setup.model.config.inner_dim)
    return steps.initial_state(
        setup,
        teachers["base"],
        jax.tree.map(jnp.copy, teachers["base"]),
        disc,
        jax.random.key_data(jax.random.key(seed)),
    )


def _generator(setup):
    return jax.jit(functools.partial(steps.generator_step, setup), static_argnames=("spec", "condition_offset"))


def _assert_trees_close(a, b, rtol, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


FM_WEIGHT, EMA_DECAY, EMA_UPDATES = 0.5, 0.9, 3


@pytest.fixture(scope="module")
def updates(world):
    """One compiled update per setting, shared by the tests below (each compile is most of their time): a 1-step
    student (k is always 0) with both terms on, EMA_UPDATES updates from the initial state, and the same student with
    both off, one update. The text encoder stub is in place for the module."""
    model, teachers, cond, spec, batch = world
    with pytest.MonkeyPatch.context() as monkeypatch:
        _stub_text_encoder(cond, monkeypatch)
        runs = {}
        for name, terms in (("on", dict(ema_decay=EMA_DECAY, first_step_fm_weight=FM_WEIGHT)), ("off", {})):
            setup = _setup(model, 1, **terms)
            generator = _generator(setup)
            states, metrics = [_initial_state(setup, teachers)], []
            for _ in range(EMA_UPDATES if name == "on" else 1):
                state, m = generator(states[-1], None, teachers, batch, spec=spec, condition_offset=0)
                states.append(state)
                metrics.append(m)
            runs[name] = (setup, states, metrics)
    return runs


def test_the_ema_follows_the_decay_recurrence_of_the_student_and_is_what_is_evaluated(world, updates):
    """With EMA on, after N updates the EMA is decay * previous + (1 - decay) * student, starting at the initial
    student, and it is the network the job evaluates (EMA off: no EMA, the raw student is evaluated). The EMA does
    not depend on which student step an update trains, so the 1-step student shows it."""
    _, teachers, _, _, _ = world
    _, states, metrics = updates["on"]
    _assert_trees_close(states[0].ema, states[0].student, 0, 0)  # the EMA starts at the initial student
    expected = states[0].ema
    for state, m in zip(states[1:], metrics):
        assert not bool(m["skipped"])
        expected = jax.tree.map(lambda e, s: EMA_DECAY * e + (1 - EMA_DECAY) * s, expected, state.student)
    state = states[-1]
    _assert_trees_close(state.ema, expected, 1e-6, 1e-7)
    # The EMA lags the student, and it is the network the job samples and evaluates.
    lag = optax.global_norm(jax.tree.map(jnp.subtract, state.ema, state.student))
    assert float(lag) > 1e-3 * float(optax.global_norm(jax.tree.map(jnp.subtract, state.student, teachers["base"])))
    assert state.evaluated_student() is state.ema
    off = updates["off"][1][-1]
    assert off.ema is None and off.evaluated_student() is off.student


def test_the_first_step_fm_loss_is_the_velocity_error_at_step_0_only():
    keys = jax.random.split(jax.random.key(0), 2)
    v_student, v_teacher = (jax.random.normal(k, (2, 5, 3)) for k in keys)
    loss, (grad_student, grad_teacher) = jax.value_and_grad(dmd.first_step_fm_loss, argnums=(0, 1))(
        v_student, v_teacher, 0
    )
    np.testing.assert_allclose(loss, np.mean(np.square(np.asarray(v_student) - np.asarray(v_teacher))), rtol=1e-6)
    np.testing.assert_allclose(grad_student, 2 * (v_student - v_teacher) / v_student.size, rtol=1e-6)
    assert float(jnp.abs(grad_teacher).max()) == 0.0  # the teacher is a fixed target
    later, grad_later = jax.value_and_grad(dmd.first_step_fm_loss)(v_student, v_teacher, 2)
    assert float(later) == 0.0 and float(jnp.abs(grad_later).max()) == 0.0


def test_the_first_step_regulariser_adds_its_weighted_gradient_to_the_update(world, updates):
    """A 1-step student (k is always 0): the first update's reported `fm_loss` is the flow-matching loss of the
    student's velocity against the base teacher's guided velocity at the first step's noise, computed here by hand,
    and the update's gradient is the weight-0 one plus weight x that loss's gradient in the student's parameters.
    (The EMA, on in the weighted run only, changes neither the loss nor the gradient.)"""
    model, teachers, cond, spec, batch = world
    weight = FM_WEIGHT
    states, metrics = {}, {}
    for w, name in ((0.0, "off"), (weight, "on")):
        _, run_states, run_metrics = updates[name]
        states[w], metrics[w] = run_states[1], run_metrics[0]
        assert not bool(metrics[w]["skipped"]) and int(metrics[w]["k"]) == 0
    assert float(metrics[0.0]["fm_loss"]) == 0.0
    # Everything else the update drew is unchanged by the term.
    assert float(metrics[weight]["dmd_loss"]) == float(metrics[0.0]["dmd_loss"])

    # The first step's noise: the generator's first key of the state's stream (steps._split).
    _, (k_noise, *_) = steps._split(updates["on"][1][0])
    noise = jax.random.normal(k_noise, batch["target_latents"].shape, jnp.float32)
    t = jnp.ones((BATCH,))
    neg = cond.replace(encoder_hidden_states=jnp.zeros_like(cond.encoder_hidden_states))
    v_teacher, _ = jax.jit(lambda: sampling.guided_velocity(model, teachers["base"], cond, neg, noise, t, 2.0))()

    def fm_loss(params):
        v_student, _ = sampling.velocity(model, params, cond, noise, t)
        return jnp.mean(jnp.square(v_student - v_teacher))

    loss, fm_grads = jax.jit(jax.value_and_grad(fm_loss))(teachers["base"])
    np.testing.assert_allclose(metrics[weight]["fm_loss"], loss, rtol=1e-5)
    assert float(loss) > 1e-3
    # The recording optimiser's state is the update's gradient.
    added = jax.tree.map(jnp.subtract, states[weight].student_opt, states[0.0].student_opt)
    scale = float(optax.global_norm(fm_grads))
    assert scale > 0
    _assert_trees_close(added, jax.tree.map(lambda g: weight * g, fm_grads), 1e-3, 1e-4 * weight * scale)
    # And so the student moves differently.
    moved = optax.global_norm(jax.tree.map(jnp.subtract, states[weight].student, states[0.0].student))
    assert float(moved) > 0


def test_the_critic_step_distribution_is_checked_normalised_and_drawn():
    """`fake_score.step_probs`: () draws k uniformly (the generator's draw, `randint`: the toy's streams depend on
    it); a distribution draws only the steps it weights."""
    assert dmd.critic_step_probs(4, ()) == ()
    assert dmd.critic_step_probs(4, (0, 0, 1, 3)) == (0.0, 0.0, 0.25, 0.75)
    for bad in ((1, 1, 1), (1, -1, 1, 1), (0, 0, 0, 0)):
        with pytest.raises(ConfigError, match="fake_score.step_probs must be 4 non-negative"):
            dmd.critic_step_probs(4, bad)
    setup = steps.DistillSetup(
        model=None,
        student_opt=None,
        fake_opt=None,
        timesteps=(1.0, 0.7, 0.4, 0.1),
        guidance=None,
        teacher_names=(),
        cfg_scale=1.0,
        cfg_rescale=0.0,
        t_min=0.02,
        t_max=0.98,
        ema_decay=0.0,
        first_step_fm_weight=0.0,
    )
    uniform, last, noise_key = [], [], jax.random.key(1)
    for i in range(40):
        key = jax.random.key(100 + i)
        k, _, t = steps._student_step(setup, 2, (2, 3, 4), noise_key, key)
        assert int(k) == int(jax.random.randint(key, (), 0, 4))
        np.testing.assert_array_equal(t, np.full(2, setup.timesteps[int(k)], np.float32))
        uniform.append(int(k))
        last.append(
            int(steps._student_step(setup, 2, (2, 3, 4), noise_key, key, dmd.critic_step_probs(4, (0, 0, 0, 1)))[0])
        )
    assert set(uniform) == {0, 1, 2, 3} and set(last) == {3}


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("ema_decay", 1.0, r"student.ema_decay must lie in \[0, 1\)"),
        ("ema_decay", -0.1, r"student.ema_decay must lie in \[0, 1\)"),
        ("first_step_fm_weight", -1.0, "student.first_step_fm_weight must be >= 0"),
    ],
)
def test_a_bad_term_setting_is_a_config_error(field, value, match):
    config = config_lib.load_config("configs/5to5.py:toy")
    distill_job.check_config(config)
    config.student[field] = value
    with pytest.raises(ConfigError, match=match):
        distill_job.check_config(config)
