"""The DMD updates' model FLOPs (`distill.costs`): counted from the traced passes, every scanned layer included,
where XLA's cost analysis counts a loop body once (why `aot` does not take XLA's FLOPs for the step)."""

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax.diffusion import conditioning, sampling
from qwen_flash_jax.distill import costs
from qwen_flash_jax.loading import build_transformer
from qwen_flash_jax.models import TransformerConfig
from tests.torch_reference import TINY

LAYERS = 4


def test_a_scanned_matmul_counts_once_per_iteration_and_a_cond_its_larger_branch():
    x, w = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 16), jnp.float32)
    one = 2 * 8 * 16 * 16
    assert costs.matmul_flops(lambda a, b: a @ b, x, w) == one
    scanned = lambda a, b: jax.lax.scan(lambda c, _: (c @ b, None), a, None, length=5)[0]  # noqa: E731
    assert costs.matmul_flops(scanned, x, w) == 5 * one
    branchy = lambda a, b: jax.lax.cond(a.sum() > 0, lambda: a @ b @ b, lambda: a @ b)  # noqa: E731
    assert costs.matmul_flops(branchy, x, w) == 2 * one


def _forward_flops(scan_layers: bool):
    config = TransformerConfig(**(TINY | dict(num_layers=LAYERS, scan_layers=scan_layers)))
    model = build_transformer(config, seed=0)
    layout = conditioning.token_layout(np.zeros(6, bool), [], (4, 4))  # 6 text tokens, a 4x4 target
    cond = sampling.Conditioning(
        jnp.zeros((2, 6, TINY["context_in_dim"])), jnp.ones((2, 6), bool), jnp.zeros((2, 0, 8)), layout
    )
    latents = jnp.zeros((2, 16, 8))
    counted = costs.pass_flops(model, model.params, cond, latents)
    fwd = jax.jit(lambda p, z: sampling.velocity(model, p, cond, z, jnp.full((2,), 0.5))[0])
    xla = fwd.lower(model.params, latents).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    return counted, float(xla["flops"])


def test_model_flops_count_every_scanned_layer_where_xla_counts_the_body_once():
    scanned, xla_scanned = _forward_flops(True)
    unrolled, xla_unrolled = _forward_flops(False)
    assert scanned == unrolled
    assert scanned["fb"] > 2.5 * scanned["fwd"]
    np.testing.assert_allclose(scanned["fwd2"], 2 * scanned["fwd"], rtol=0.01)  # CFG: the batch doubled
    # XLA's count of the scanned forward holds one layer of the four: less than half of the unrolled one's.
    assert xla_scanned < 0.5 * xla_unrolled
    assert scanned["fwd"] <= xla_unrolled  # matmuls only: elementwise work and attention scores' softmax left out
