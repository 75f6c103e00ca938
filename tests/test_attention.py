"""Every attention implementation against the dense path on CPU: splash in Pallas' interpret mode, and
`jax.nn.dot_product_attention`'s XLA implementation (the cuDNN path's reference; cuDNN itself needs a GPU). Each
honours the layout's block-causal mask and the padded prompt keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_flash_jax import sharding
from qwen_flash_jax.loading import build_transformer
from qwen_flash_jax.models import TransformerConfig, make_layout
from qwen_flash_jax.models.attention import AttentionMask, attention, dense_attention, resolve
from qwen_flash_jax.models.config import ConfigError
from tests.helpers import ONE_LAYER
from tests.torch_reference import TINY, make_inputs

HEADS, HEAD_DIM = 2, 32


def _edit_layout():
    """A condition image between two text runs, then the target image: 4 + 16 + 3 + 24 = 47 tokens."""
    inputs = make_inputs(
        np.random.default_rng(0), batch=2, conditions=[(1, 4, 4)], target=(1, 4, 6), text_runs=[4, 3], padding=[0, 2]
    )
    layout = make_layout(inputs["img_shapes"], inputs["img_mask"])
    key_valid = np.ones((2, layout.seq_len), bool)
    text = np.flatnonzero(~layout.image_token_mask)
    key_valid[1, text[-2:]] = False  # sample 1's last two prompt positions are padding
    return layout, jnp.asarray(key_valid)


def _qkv(s_q, s_k, seed=0, batch=2):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = [(batch, s_q, HEADS, HEAD_DIM), (batch, s_k, HEADS, HEAD_DIM), (batch, s_k, HEADS, HEAD_DIM)]
    return [jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes)]


def _loss_and_grads(implementation, q, k, v, mask):
    weights = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, mask, None, implementation) * weights)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("implementation", ["splash", "xla"])
def test_matches_dense_under_the_block_causal_mask_and_padding(implementation):
    layout, key_valid = _edit_layout()
    mask = AttentionMask(layout.attention_mask, key_valid)
    q, k, v = _qkv(layout.seq_len, layout.seq_len)
    out = jax.jit(lambda q, k, v: attention(q, k, v, mask, None, implementation))(q, k, v)
    ref = dense_attention(q, k, v, mask.dense())
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # The mask matters here: without it the result differs by far more than the tolerance.
    assert float(jnp.abs(dense_attention(q, k, v, None) - ref).max()) > 0.1
    loss, grads = _loss_and_grads(implementation, q, k, v, mask)
    loss_ref, grads_ref = _loss_and_grads("dense", q, k, v, mask)
    np.testing.assert_allclose(loss, loss_ref, atol=1e-4, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("implementation", ["splash", "xla"])
def test_cached_target_queries_see_every_valid_key(implementation):
    """The prefix KV cache's mode: target queries only (S_q < S_k), no block mask, padded keys still masked."""
    _, key_valid = _edit_layout()
    q, k, v = _qkv(24, key_valid.shape[1], seed=1)
    mask = AttentionMask(None, key_valid)
    out = jax.jit(lambda q, k, v: attention(q, k, v, mask, None, implementation))(q, k, v)
    np.testing.assert_allclose(out, dense_attention(q, k, v, mask.dense()), atol=1e-4, rtol=0)


def test_auto_picks_by_platform_and_dtype():
    assert resolve("auto", "tpu", jnp.float32) == "splash"
    assert resolve("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert resolve("auto", "gpu", jnp.float32) == "xla"  # cuDNN's flash attention takes 16-bit inputs only
    assert resolve("auto", "cpu", jnp.bfloat16) == "dense"
    assert resolve("splash", "cpu", jnp.float32) == "splash"
    with pytest.raises(ValueError, match="attention implementation"):
        resolve("flash", "cpu", jnp.float32)
    with pytest.raises(ConfigError, match="attention must be one of"):
        TransformerConfig(**TINY, attention="flash")


def test_cpu_auto_is_the_dense_path_bit_for_bit():
    layout, key_valid = _edit_layout()
    mask = AttentionMask(layout.attention_mask, key_valid)
    q, k, v = _qkv(layout.seq_len, layout.seq_len, seed=2)
    np.testing.assert_array_equal(attention(q, k, v, mask), dense_attention(q, k, v, mask.dense()))


def _forward(attention_impl):
    """The transformer's output with `attention_impl` in every attention layer. One unrolled layer (ONE_LAYER): the
    splash kernel in Pallas' interpret mode is the costliest program to compile here, and which implementation a
    layer calls does not depend on the depth or on scanning."""
    model = build_transformer(TransformerConfig(**ONE_LAYER, attention=attention_impl), seed=0)

    @jax.jit  # one program: op by op, every weight shape would compile a random draw of its own
    def perturbed(params):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    params = perturbed(model.params)
    inputs = make_inputs(
        np.random.default_rng(0), batch=2, conditions=[(1, 4, 4)], target=(1, 4, 6), text_runs=[5, 3], padding=[0, 2]
    )
    return model.apply(
        params, **{k: v for k, v in inputs.items() if k != "img_shapes"}, img_shapes=inputs["img_shapes"]
    )


def test_transformer_with_splash_matches_dense():
    np.testing.assert_allclose(_forward("splash"), _forward("dense"), atol=1e-4, rtol=0)


@pytest.mark.sharded
def test_splash_runs_per_shard_on_a_mesh():
    """On an (fsdp=2, tensor=2) mesh splash runs under shard_map over the batch and head axes."""
    mesh = sharding.make_mesh((("fsdp", 2), ("tensor", 2)), jax.devices()[:4])
    constrain = sharding.ActivationSharding(mesh, (("batch", "fsdp"), ("act_heads", "tensor")))
    layout, key_valid = _edit_layout()
    mask = AttentionMask(layout.attention_mask, key_valid)
    q, k, v = _qkv(layout.seq_len, layout.seq_len, seed=3)
    out = jax.jit(lambda q, k, v: attention(q, k, v, mask, constrain, "splash"))(q, k, v)
    assert out.sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(out, dense_attention(q, k, v, mask.dense()), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cached", [False, True])
def test_cudnn_gets_a_mask_its_layout_check_accepts(monkeypatch, cached):
    """cuDNN needs a GPU, but the mask handed to it can be checked here: jax's cuDNN layout check wants the bias's
    sequence dims whole (a (B, 1, 1, S_k) key mask failed on an H200), so the mask is broadcast to (B, 1, S_q, S_k)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    layout, key_valid = _edit_layout()
    s_q = layout.seq_len - layout.prefix_len if cached else layout.seq_len
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(s_q, layout.seq_len))
    block = None if cached else layout.attention_mask
    seen = []

    def checked(q, k, v, *, mask, scale, implementation):
        assert implementation == "cudnn"
        seen.append(mask.shape)
        cudnn.check_layout(q, k, v, mask, *[None] * 6, cudnn.AttentionLayout.BTNH)
        return dense_attention(q, k, v, mask)

    monkeypatch.setattr(jax.nn, "dot_product_attention", checked)
    out = attention(q, k, v, AttentionMask(block, key_valid), implementation="cudnn")
    assert seen == [(2, 1, s_q, layout.seq_len)]
    expected = dense_attention(q, k, v, AttentionMask(block, key_valid).dense())
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
