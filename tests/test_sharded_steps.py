"""The DMD steps on an (fsdp=4, tensor=2) mesh of emulated CPU devices against the same steps on one device.

One critic update and one generator update, built as the distillation job builds them (`components.distill_setup`
of the toy config, `components.jitted_steps` with explicit shardings), on a one-layer tiny transformer and a
one-layer toy text encoder, both laid out by configs/5to5.py's mesh rules. The sharded steps must give the
single-device losses and updates, keep every state leaf in the placement it came in, and donate the state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from qwen_flash_jax import config_lib, sharding
from qwen_flash_jax.diffusion import conditioning
from qwen_flash_jax.distill import gan, steps
from qwen_flash_jax.loading import TransformerModel, build_transformer, from_params
from qwen_flash_jax.models import TransformerConfig, make_layout
from qwen_flash_jax.text import encoder as text_encoder
from qwen_flash_jax.train import components
from qwen_flash_jax.train.checkpoint import place_on_mesh
from tests.torch_reference import TINY

pytestmark = pytest.mark.sharded

BATCH, TEXT_LEN, VOCAB = 8, 6, 64
MESH_AXES = (("data", 1), ("fsdp", 4), ("tensor", 2))

# Sharding changes only the order of floating-point sums (the batch mean over fsdp shards, the contractions over
# the tensor-split heads and MLP): float32 roundings of ~1e-7 relative that grow through a few dozen chained ops.
# The gradients (read from the Adam moments) and losses are compared tightly. Measured (jax 0.10.2, XLA:CPU), critic
# and generator: losses 0 and 7e-7 relative, moments 1e-6 and 7e-6 of their largest element. Adam's first update is
# lr * g / (|g| + eps), which amplifies the rounding of a near-zero gradient element by up to 1/eps, so the parameter
# updates get a looser bound (measured 1e-3 and 2e-3 of the largest update; the generator's 2.8e-2 once per-sample
# RoPE positions changed its gradients, while its moments still agreed within MOMENT_TOL). A wrong sharding (a
# dropped all-reduce, a mis-split batch) changes all of them by O(1).
LOSS_RTOL = 1e-5
MOMENT_TOL = 1e-4  # max |sharded - single| / max |single|, per leaf
UPDATE_TOL = 5e-2


def _config():
    config = config_lib.load_config("configs/5to5.py:toy")
    config.mesh.axes = MESH_AXES
    config.mesh.rules = config_lib.load_config("configs/5to5.py").mesh.rules  # the full scale's fsdp/tensor rules
    config.optim.warmup_steps = 0  # the first update has its full learning rate (warm-up would start it at 0)
    config.guidance.schedule = "shared"
    return config


def _model_config():
    return TransformerConfig(**(TINY | dict(num_layers=1, scan_layers=False)))


def _random_params(model_config, seed):
    """Every weight random (the init zeroes the output projection, and with it every velocity and gradient)."""
    params = build_transformer(model_config, seed=seed).params
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _run(config, mesh, rules):
    """(state before, state after the critic, state after the generator, critic metrics, generator metrics) on
    `mesh` (None: one device, jit's own shardings)."""
    model_config = _model_config()
    base, other = _random_params(model_config, 0), _random_params(model_config, 1)
    model = from_params(model_config, base, mesh=mesh, rules=rules)
    teachers = {"base": model.params, "text": from_params(model_config, other, mesh=mesh, rules=rules).params}
    setup = components.distill_setup(config, model, mu=0.5)
    fake = from_params(model_config, jax.tree.map(jnp.copy, base), mesh=mesh, rules=rules).params
    disc = gan.init_head(jax.random.key(2), model_config.inner_dim)
    state = steps.initial_state(
        setup, jax.tree.map(jnp.copy, model.params), fake, disc, jax.random.key_data(jax.random.key(1))
    )

    te_config = text_encoder.TextEncoderConfig(
        vocab_size=VOCAB, hidden_size=24, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32
    )
    te = text_encoder.init_params(te_config, seed=3)
    layout = make_layout([[(1, 4, 4)]], np.array([False] * TEXT_LEN + [True] * 4))
    spec = conditioning.TaskSpec("t2i", layout, (4, 4), 0, (1,) + (0,) * (TEXT_LEN - 1), (1,) + (0,) * (TEXT_LEN - 1))
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(2, VOCAB, (BATCH, TEXT_LEN)).astype(np.int32),
        "attention_mask": np.ones((BATCH, TEXT_LEN), np.int32),
        "target_latents": rng.standard_normal((BATCH, 16, 8)).astype(np.float32),
        "category": rng.integers(0, 3, (BATCH,)).astype(np.int32),
    }
    if mesh is not None:
        state = place_on_mesh(state, mesh)
        # The text encoder in its own rules' layout (vocab and heads over `tensor`, embed over `fsdp`).
        te_state = jax.device_put(nnx.to_pure_dict(te.state), sharding.param_shardings(te.state, mesh, rules))
        nnx.replace_by_pure_dict(te.state, te_state)
        batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
    else:
        batch = jax.tree.map(jnp.asarray, batch)
    before = jax.device_get(state)
    critic, generator = components.jitted_steps(setup, state=state, text_encoder=te)
    placed = jax.tree.map(lambda x: x.sharding, state)
    fake_in = jax.tree.leaves(state.fake)
    state, m_critic = critic(state, te, batch, spec=spec)
    after_critic = jax.device_get(state)
    student_in = jax.tree.leaves(state.student)
    state, m_gen = generator(state, te, teachers, batch, spec=spec, condition_offset=0)
    if mesh is not None:  # the state was donated: the updated networks' sharded input buffers are gone
        # (XLA:CPU keeps the fully replicated ones, the norm scales, on this 8-device mesh: jax 0.10.2)
        assert all(x.is_deleted() for x in fake_in + student_in if not x.sharding.is_fully_replicated)
        assert jax.tree.map(lambda x: x.sharding, state) == placed
    return before, after_critic, jax.device_get(state), jax.device_get(m_critic), jax.device_get(m_gen)


@pytest.fixture(scope="module")
def runs():
    assert jax.device_count() == 8
    config = _config()
    rules = config_lib.mesh_rules(config)
    mesh = config_lib.make_mesh(config)
    return _run(config, None, rules), _run(config, mesh, rules)


def _max_relative_difference(sharded, single):
    """max over leaves of max |sharded - single| / max |single| (a leaf of zeros compares absolutely)."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-30)))
    return worst


def test_the_mesh_rules_split_the_student_over_both_axes():
    """The comparison below is not vacuous: the rules put the tiny student's MLP kernels over fsdp and tensor."""
    config = _config()
    model = TransformerModel(_model_config(), None, None, config_lib.make_mesh(config), config_lib.mesh_rules(config))
    specs = {s.spec for s in jax.tree.leaves(model.param_shardings())}
    # (the blocks' parameters are stacked: the leading axis is the layer)
    assert PartitionSpec(None, "fsdp", "tensor") in specs and PartitionSpec(None, "tensor", "fsdp") in specs


def test_the_critic_step_matches_one_device(runs):
    (before, critic, _, m, _), (s_before, s_critic, _, s_m, _) = runs
    assert not m["skipped"] and not s_m["skipped"]
    np.testing.assert_allclose(s_m["fake_loss"], m["fake_loss"], rtol=LOSS_RTOL)
    update = jax.tree.map(np.subtract, critic.fake, before.fake)
    s_update = jax.tree.map(np.subtract, s_critic.fake, s_before.fake)
    assert max(float(np.max(np.abs(u))) for u in jax.tree.leaves(update)) > 0  # the step moved the fake score
    differences = (
        _max_relative_difference(s_update, update),
        _max_relative_difference(s_critic.fake_opt, critic.fake_opt),
    )
    print(
        f"critic: loss {abs(s_m['fake_loss'] / m['fake_loss'] - 1):.1e}, "
        f"update {differences[0]:.1e}, Adam {differences[1]:.1e}"
    )
    assert differences[0] < UPDATE_TOL and differences[1] < MOMENT_TOL


def test_the_generator_step_matches_one_device(runs):
    (_, critic, gen, _, m), (_, s_critic, s_gen, _, s_m) = runs
    assert not m["skipped"] and not s_m["skipped"]
    assert s_m["k"] == m["k"]
    for name in ("dmd_loss", "grad_norm"):
        np.testing.assert_allclose(s_m[name], m[name], rtol=LOSS_RTOL)
    update = jax.tree.map(np.subtract, gen.student, critic.student)
    s_update = jax.tree.map(np.subtract, s_gen.student, s_critic.student)
    assert max(float(np.max(np.abs(u))) for u in jax.tree.leaves(update)) > 0
    differences = (
        _max_relative_difference(s_update, update),
        _max_relative_difference(s_gen.student_opt, gen.student_opt),
    )
    print(
        f"generator: loss {abs(s_m['dmd_loss'] / m['dmd_loss'] - 1):.1e}, "
        f"update {differences[0]:.1e}, Adam {differences[1]:.1e}"
    )
    assert differences[0] < UPDATE_TOL and differences[1] < MOMENT_TOL
