"""Sharded forwards on 8 emulated CPU devices agree with unsharded ones, with parameters partitioned by the rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwen_flash_jax import sharding
from qwen_flash_jax.diffusion import sampling
from qwen_flash_jax.loading import build_transformer, from_params
from qwen_flash_jax.models import TransformerConfig, make_layout
from tests.torch_reference import make_inputs

CONFIG = TransformerConfig(
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    in_channels=8,
    out_channels=8,
    context_in_dim=24,
    axes_dims_rope=(4, 6, 6),
)
pytestmark = pytest.mark.sharded

RULES = (
    ("batch", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.fail("sharded tests run on 8 emulated CPU devices (tests/conftest.py)")
    return sharding.make_mesh([("fsdp", 4), ("tensor", 2)])


def test_parameters_are_partitioned_as_the_rules_say(mesh):
    model = build_transformer(CONFIG, seed=0, mesh=mesh, rules=RULES)
    d, mlp = CONFIG.inner_dim, CONFIG.mlp_dim
    expected = {
        ("blocks", "attn", "to_q", "kernel"): (P(None, "fsdp", "tensor"), (2, d // 4, d // 2)),
        ("blocks", "attn", "to_out", "kernel"): (P(None, "tensor", "fsdp"), (2, d // 2, d // 4)),
        ("blocks", "mlp", "gate_layer", "kernel"): (P(None, "fsdp", "tensor"), (2, d // 4, mlp // 2)),
        ("blocks", "attn", "norm_q", "scale"): (P(None, None), (2, 16)),
        ("modulation", "kernel"): (P("fsdp", None), (d // 4, 4 * d)),
        ("txt_in", "in_layer", "kernel"): (P(None, "fsdp"), (24, d // 4)),
    }
    for path, (spec, shard_shape) in expected.items():
        leaf = model.params
        for part in path:
            leaf = leaf[part]
        assert leaf.sharding.spec == spec, path
        assert {s.data.shape for s in leaf.addressable_shards} == {shard_shape}, path
        assert len(leaf.devices()) == 8


def test_sharded_init_equals_unsharded_init(mesh):
    sharded = build_transformer(CONFIG, seed=3, mesh=mesh, rules=RULES)
    plain = build_transformer(CONFIG, seed=3)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded.params, plain.params)


@pytest.mark.parametrize("conditions,text_runs", [([], [6]), ([(1, 4, 4)], [5, 3])])
def test_sharded_forward_matches_unsharded(mesh, conditions, text_runs):
    plain = build_transformer(CONFIG, seed=1)
    params = jax.tree.map(np.asarray, plain.params)
    sharded = from_params(CONFIG, params, mesh=mesh, rules=RULES)
    inputs = make_inputs(
        np.random.default_rng(0),
        batch=4,
        conditions=conditions,
        target=(1, 4, 6),
        text_runs=text_runs,
        padding=[0, 1, 2, 0],
    )
    expected = np.asarray(plain.apply(plain.params, **inputs))
    batch_sharding = jax.sharding.NamedSharding(mesh, P("fsdp"))
    placed = {
        k: jax.device_put(v, batch_sharding) if k in ("hidden_states", "encoder_hidden_states") else v
        for k, v in inputs.items()
    }
    out = sharded.apply(sharded.params, **placed)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_cfg_on_an_edit_layout_needs_no_collective_permutes(mesh):
    """Guided velocity on a batch-sharded edit: the doubled CFG batch and the prefix's t = 0 modulation row keep
    every sample's rows on its own device, so the compiled program moves no rows between devices (it did: ~100
    collective-permutes per DMD step, and XLA:CPU could hang on them), and it still equals the unsharded one."""
    plain = build_transformer(CONFIG, seed=2)
    sharded = from_params(CONFIG, jax.tree.map(np.asarray, plain.params), mesh=mesh, rules=RULES)
    inputs = make_inputs(
        np.random.default_rng(1),
        batch=4,
        conditions=[(1, 4, 4)],
        target=(1, 4, 4),
        text_runs=[5, 3],
        padding=[0, 2, 1, 0],
    )
    layout = make_layout(inputs["img_shapes"], inputs["img_mask"])
    rows = jax.sharding.NamedSharding(mesh, P("fsdp"))
    cond = sampling.Conditioning(
        jax.device_put(inputs["encoder_hidden_states"], rows),
        jax.device_put(inputs["encoder_hidden_states_mask"], rows),
        jax.device_put(inputs["hidden_states"][:, :16], rows),
        layout,
    )
    neg = cond.replace(encoder_hidden_states=cond.encoder_hidden_states * 0)
    z = jax.device_put(inputs["hidden_states"][:, 16:], rows)
    t = jax.device_put(np.asarray([0.9, 0.6, 0.3, 0.1], np.float32), rows)

    def guided(model):
        return jax.jit(lambda p, c, n, z, t: sampling.guided_velocity(model, p, c, n, z, t, 4.0)[0])

    compiled = guided(sharded).lower(sharded.params, cond, neg, z, t).compile()
    assert "collective-permute" not in compiled.as_text()
    expected = guided(plain)(plain.params, *jax.device_get((cond, neg, z, t)))
    out = compiled(sharded.params, cond, neg, z, t)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(expected)).max()
    )
