"""Properties of the Flax transformer that need no reference implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_flash_jax.loading import build_transformer
from qwen_flash_jax.models import TransformerConfig, make_layout
from tests.torch_reference import TINY, make_inputs


def _loss_and_grads(remat_policy, scan_layers=True):
    model = build_transformer(TransformerConfig(**TINY, remat_policy=remat_policy, scan_layers=scan_layers), seed=0)
    # adaLN-Zero starts gates and output projection at 0 (no gradient would reach the blocks): perturb everything.
    leaves, treedef = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    inputs = make_inputs(
        np.random.default_rng(0), batch=2, conditions=[(1, 4, 4)], target=(1, 4, 6), text_runs=[5, 3], padding=[0, 2]
    )
    layout = make_layout(inputs["img_shapes"], inputs["img_mask"])

    def loss(params):
        out = model.forward(
            params,
            layout,
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            jnp.asarray(inputs["timestep"]),
            inputs["encoder_hidden_states_mask"],
        )
        return jnp.mean(out[:, -24:] ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_give_the_same_gradients(policy):
    loss_ref, grads_ref = _loss_and_grads("none")
    loss, grads = _loss_and_grads(policy)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, grads_ref)
    assert float(jnp.abs(grads["blocks"]["attn"]["to_q"]["kernel"]).max()) > 0


@pytest.mark.parametrize("policy", ["none", "dots_saveable"])
def test_unrolled_layers_match_the_scan(policy):
    """scan_layers=False runs the same stacked parameters as a loop: same loss and gradients, and the prefix KV
    cache it extracts has the scan's layout and values."""
    loss_ref, grads_ref = _loss_and_grads(policy)
    loss, grads = _loss_and_grads(policy, scan_layers=False)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, grads_ref)

    scanned = build_transformer(TransformerConfig(**TINY), seed=0)
    unrolled = build_transformer(TransformerConfig(**TINY, scan_layers=False), seed=0)
    rng = np.random.default_rng(2)
    first = make_inputs(rng, batch=2, conditions=[(1, 4, 4)], target=(1, 4, 4), text_runs=[5, 3])
    later = dict(first, timestep=first["timestep"] * 0.5)
    out_ref, cache_ref = scanned.apply(scanned.params, **first, kv_cache_mode="extract")
    out, cache = unrolled.apply(scanned.params, **first, kv_cache_mode="extract")
    np.testing.assert_allclose(out, out_ref, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), cache, cache_ref)
    np.testing.assert_allclose(
        unrolled.apply(scanned.params, **later, kv_cache=cache, kv_cache_mode="cached"),
        scanned.apply(scanned.params, **later, kv_cache=cache_ref, kv_cache_mode="cached"),
        rtol=1e-6,
        atol=1e-6,
    )


def test_forward_compiles_once_per_layout():
    model = build_transformer(TransformerConfig(**TINY), seed=0)
    rng = np.random.default_rng(1)
    t2i = make_inputs(rng, batch=1, conditions=[], target=(1, 4, 4), text_runs=[5])
    edit = make_inputs(rng, batch=1, conditions=[(1, 2, 2)], target=(1, 4, 4), text_runs=[3, 2])
    for _ in range(3):
        model.apply(model.params, **t2i)
        model.apply(model.params, **edit)
        model.apply(model.params, **(t2i | {"timestep": t2i["timestep"] * 0.5}))
    assert model._jitted_forward._cache_size() == 2
