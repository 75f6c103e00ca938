"""Everything a distillation builds from its config, built in one place: the mesh, the frozen text encoder and
codec (with the data sources, `assets`), the teachers, the student and fake-score networks, the DMD setup, the
initial state and the jitted steps.

The distillation job (`train.distill_job`, which `main` and `sweep` run), the score-field notebook
(`train.score_fields`) and `benchmarks/dmd_iteration.py` all build through here, so the benchmark times the very
step the main job runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from qwen_flash_jax import config_lib, sharding
from qwen_flash_jax.data.world import EDIT_CATEGORIES, T2I_CATEGORIES
from qwen_flash_jax.distill import dmd, gan
from qwen_flash_jax.distill import steps as steps_lib
from qwen_flash_jax.distill.steps import DistillSetup, DistillState, critic_step, generator_step
from qwen_flash_jax.loading import TransformerModel, build_transformer, from_params
from qwen_flash_jax.models.config import TransformerConfig
from qwen_flash_jax.train import assets as assets_lib
from qwen_flash_jax.train import optim, teacher
from qwen_flash_jax.train.checkpoint import place_on_mesh

# The conditions the guidance table has a row for: T2I categories first, then edit categories.
CONDITIONS = tuple(f"t2i/{c}" for c in T2I_CATEGORIES) + tuple(f"edit/{c}" for c in EDIT_CATEGORIES)
CONDITION_OFFSET = {"t2i": 0, "edit": len(T2I_CATEGORIES)}


@dataclasses.dataclass
class Components:
    mesh: sharding.Mesh
    rules: sharding.Rules
    model_config: TransformerConfig
    assets: assets_lib.Assets
    teachers: dict[str, Any]  # the guiding teachers' frozen parameters, by name
    base: Any  # parameters the student starts from (`student.init_from`)
    fake_init: Any  # parameters the fake score starts from (`fake_score.init_from`)
    mu: float  # the time shift of the config's image size


def build(
    config, log: Callable[[str], None] = print, *, random_teachers: bool = False, initial_networks: bool = True
) -> Components:
    """The distillation's components. Teachers come from their checkpoints or the cache (trained on first use);
    with `random_teachers`, every teacher is one randomly initialised transformer (for timing only). Without
    `initial_networks`, the student's and fake score's initial teachers are not loaded (`base` and `fake_init` are
    None) unless they guide."""
    assets = assets_lib.build_assets(config, log)
    names = tuple(config.guidance.teachers)
    model_config = config_lib.transformer_config(config)
    if random_teachers:
        mesh, rules = config_lib.make_mesh(config), config_lib.mesh_rules(config)
        params = build_transformer(model_config, seed=0, mesh=mesh, rules=rules).params
        teachers = {name: params for name in names}
        base = fake_init = params
    else:
        loaded = {name: teacher.ensure_teacher(config, name, log=log, assets=assets) for name in names}
        mesh, rules = config_lib.make_mesh(config), config_lib.mesh_rules(config)
        # The student and fake score start from their teacher at the parameters' own precision; the guiding
        # teachers are frozen and kept in the frozen dtype.
        base, fake_init = loaded.get(config.student.init_from), loaded.get(config.fake_score.init_from)
        if initial_networks:
            base = base or teacher.ensure_teacher(config, config.student.init_from)
            fake_init = fake_init or teacher.ensure_teacher(config, config.fake_score.init_from)
        teachers = {name: frozen(params, config_lib.frozen_dtype(config)) for name, params in loaded.items()}
    return Components(mesh, rules, model_config, assets, teachers, base, fake_init, teacher.target_mu(config))


def frozen(params, dtype: str):
    """`params` with its floating-point leaves in `dtype`, on the same shardings; leaves already in it are kept."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x, params
    )


def student_model(parts: Components) -> TransformerModel:
    """The student network, a copy of its initial teacher on device (no host round trip): the student and fake
    score are donated each step, the teachers not."""
    return from_params(parts.model_config, jax.tree.map(jnp.copy, parts.base), mesh=parts.mesh, rules=parts.rules)


def distill_setup(
    config, model: TransformerModel, mu: float, *, view: config_lib.DistillView | None = None
) -> DistillSetup:
    """The DMD step's static settings, from the config's typed view (`view`, read from `config` if not given)."""
    view = view or config_lib.distill_view(config)
    student, fake, guidance = view.student, view.fake_score, view.guidance
    return DistillSetup(
        model=model,
        student_opt=optim.from_config(config.optim, view.train.steps, student.learning_rate),
        fake_opt=optim.from_config(config.optim, view.critic_updates, fake.learning_rate),
        timesteps=tuple(
            float(t)
            for t in dmd.student_timesteps(student.num_steps, mu, student.timesteps, teacher.target_scheduler(config))
        ),
        guidance=dmd.guidance_table(dict(guidance.weights), guidance.teachers, CONDITIONS, student.num_steps),
        teacher_names=guidance.teachers,
        cfg_scale=guidance.cfg_scale,
        cfg_rescale=guidance.cfg_rescale,
        t_min=guidance.t_min,
        t_max=guidance.t_max,
        ema_decay=student.ema_decay,
        first_step_fm_weight=student.first_step_fm_weight,
        disc_opt=optim.from_config(config.optim, view.critic_updates, fake.gan_head_learning_rate),
        gan_weight=student.gan_weight,
        gan_critic_weight=fake.gan_weight,
        gan_tasks=student.gan_tasks,
        renoise=student.renoise,
        regression_weight=student.regression_weight,
        critic_step_probs=dmd.critic_step_probs(student.num_steps, fake.step_probs),
        schedule=guidance.schedule,
    )


def initial_state(config, parts: Components, setup: DistillSetup) -> DistillState:
    """Step 0: the student (`setup.model`'s parameters), a copy of the fake score's initial teacher, their
    optimisers, the EMA (only when EMA is on), the discriminator head and the RNG, placed on the mesh."""
    student = setup.model.params
    fake = from_params(
        parts.model_config, jax.tree.map(jnp.copy, parts.fake_init), mesh=parts.mesh, rules=parts.rules
    ).params
    seed = config_lib.distill_seed(config)
    disc = gan.init_head(jax.random.key(seed + 2), parts.model_config.inner_dim)
    rng = jax.random.key_data(jax.random.key(seed + 1))
    return place_on_mesh(steps_lib.initial_state(setup, student, fake, disc, rng), parts.mesh)


def jitted_steps(setup: DistillSetup, *, state: DistillState | None = None, text_encoder=None):
    """(critic update, generator update), jitted; each donates the state it is given.

    Called as `critic(state, text_encoder, batch, spec=...)` and `generator(state, text_encoder, teachers, batch,
    spec=..., condition_offset=..., pairs=None)`. Given the `state` (and the `text_encoder`) the steps will run on,
    and a student model built on a mesh, the shardings are explicit: the state enters and leaves in the placement it
    has (so the donated buffers are reused in place and a step never re-lays out the state), the teachers in the
    placement the mesh rules give the transformer's parameters, the text encoder in its own placement, every batch
    and pair leaf split along its leading axis as `sharding.batch_sharding` says, and the metrics replicated.
    Without them, jit infers the shardings from the arguments (the same program on one device).
    """
    mesh = setup.model.mesh
    if state is None or mesh is None:
        critic = jax.jit(functools.partial(critic_step, setup), static_argnames=("spec",), donate_argnums=(0,))
        generator = jax.jit(
            functools.partial(generator_step, setup), static_argnames=("spec", "condition_offset"), donate_argnums=(0,)
        )
        return critic, generator

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def placement(tree):
        # A leaf laid out on this mesh keeps its layout; anything else (host or single-device arrays) is replicated,
        # as `checkpoint.place_on_mesh` places the state's scalars.
        def leaf(x):
            placed = getattr(x, "sharding", None)
            return placed if isinstance(placed, jax.sharding.NamedSharding) and placed.mesh == mesh else replicated

        return jax.tree.map(leaf, tree)

    state_shardings = placement(state)
    text_shardings = placement(text_encoder)
    params = setup.model.param_shardings()
    teacher_shardings = {name: params for name in setup.teacher_names}
    batch = sharding.batch_sharding(mesh, setup.model.rules)  # a prefix: every leaf of a batch (or pair) dict
    outs = (state_shardings, replicated)  # (new state, metrics)
    # jit takes no keyword arguments beside explicit in_shardings, so the statics are positional here.
    critic_jit = jax.jit(
        lambda s, te, b, spec: critic_step(setup, s, te, b, spec),
        in_shardings=(state_shardings, text_shardings, batch),
        out_shardings=outs,
        static_argnums=(3,),
        donate_argnums=(0,),
    )
    generator_jit = jax.jit(
        lambda s, te, teachers, b, pairs, spec, offset: generator_step(setup, s, te, teachers, b, spec, offset, pairs),
        in_shardings=(state_shardings, text_shardings, teacher_shardings, batch, batch),
        out_shardings=outs,
        static_argnums=(5, 6),
        donate_argnums=(0,),
    )

    def critic(state, te_params, batch, *, spec):
        return critic_jit(state, te_params, batch, spec)

    def generator(state, te_params, teachers, batch, *, spec, condition_offset, pairs=None):
        return generator_jit(state, te_params, teachers, batch, pairs, spec, condition_offset)

    return critic, generator
