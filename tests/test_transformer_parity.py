"""Parity of the Flax transformer with diffusers' QwenImage21Transformer2DModel on tiny random configs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from qwen_flash_jax.loading import from_params  # noqa: E402
from qwen_flash_jax.models import TransformerConfig, make_layout  # noqa: E402
from qwen_flash_jax.models.hf_keys import state_dict_to_params  # noqa: E402
from tests.torch_reference import TINY, make_inputs, random_diffusers_transformer, state_dict_numpy, torch_forward  # noqa: E402

pytestmark = pytest.mark.parity

F32_TOLERANCE = 1e-4  # max abs error relative to the output's max magnitude
# bf16 params and activations against the float32 reference (random weights of std 0.2, 2 layers). Measured over
# these cases and 3 input seeds: max error 1.7e-2..6.1e-2 of the output scale, RMS error 1.5e-2..4.1e-2 of the
# output RMS. (diffusers' own model cast with `.to(bfloat16)` drifts 0.1..0.7 from its float32 output here, mostly
# because the cast also rounds its timestep-frequency buffer.)
BF16_MAX_TOLERANCE = 8e-2
BF16_RMS_TOLERANCE = 5e-2

CASES = {
    "t2i": dict(batch=1, conditions=[], target=(1, 4, 6), text_runs=[7]),
    "edit_one_condition": dict(batch=1, conditions=[(1, 4, 4)], target=(1, 4, 6), text_runs=[5, 3]),
    # Two adjacent condition images: separate blocks even with no text between them.
    "edit_two_conditions": dict(batch=1, conditions=[(1, 2, 4), (1, 4, 2)], target=(1, 4, 4), text_runs=[4, 0, 3]),
    "right_padded_batch": dict(batch=3, conditions=[(1, 4, 4)], target=(1, 4, 6), text_runs=[6, 5], padding=[0, 2, 4]),
    "odd_grid": dict(batch=2, conditions=[], target=(1, 2, 6), text_runs=[5], padding=[1, 0]),
}


def _pair(causal_condition=True, seed=0, **runtime):
    reference = random_diffusers_transformer(seed, causal_condition=causal_condition)
    config = TransformerConfig(**TINY, causal_condition=causal_condition, **runtime)
    params = state_dict_to_params(state_dict_numpy(reference), config)
    return reference, from_params(config, params)


def _rel_err(ours, ref):
    """Max abs error over the reference's max magnitude; NaN reference entries (padding) are not compared."""
    ours, valid = np.asarray(ours, np.float32), ~np.isnan(ref)
    return float(np.max(np.abs(ours - ref)[valid]) / np.max(np.abs(ref[valid])))


def _alone(inputs, b):
    """Sample b's inputs with its prompt padding stripped, and where its tokens sit in the padded joint sequence."""
    keep = inputs["encoder_hidden_states_mask"][b]
    slots = inputs["img_mask"][b]
    alone = dict(
        hidden_states=inputs["hidden_states"][b : b + 1],
        encoder_hidden_states=inputs["encoder_hidden_states"][b : b + 1, keep],
        timestep=inputs["timestep"][b : b + 1],
        img_shapes=inputs["img_shapes"][b : b + 1],
        img_mask=np.concatenate([slots[: keep.size][keep], slots[keep.size :]])[None],
        encoder_hidden_states_mask=np.ones((1, int(keep.sum())), bool),
    )
    layout = make_layout(inputs["img_shapes"][b], slots)
    return alone, np.concatenate([keep, np.ones(layout.num_image_tokens, bool)])[layout.source_index]


def torch_forward_alone(reference, inputs):
    """diffusers' output for each sample run alone, its prompt padding stripped, laid back into the padded joint
    sequence (NaN at the padding): what a right-padded batch must give (diffusers' own batched call moves a
    padded sample's positions). Without padding, the batch as diffusers runs it."""
    mask = inputs["encoder_hidden_states_mask"]
    if mask.all():
        return torch_forward(reference, inputs)
    out = []
    for b in range(mask.shape[0]):
        alone, valid = _alone(inputs, b)
        single = torch_forward(reference, alone)
        full = np.full((1, valid.size, single.shape[-1]), np.nan, np.float32)
        full[0, valid] = single[0]
        out.append(full)
    return np.concatenate(out)


@pytest.fixture(scope="module")
def models():
    return {cc: _pair(causal_condition=cc) for cc in (True, False)}


@pytest.mark.parametrize("causal_condition", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_matches_diffusers(models, case, causal_condition):
    reference, ours = models[causal_condition]
    inputs = make_inputs(np.random.default_rng(1), **CASES[case])
    expected = torch_forward_alone(reference, inputs)
    out = ours.apply(ours.params, **inputs)
    assert out.shape == expected.shape  # the whole joint sequence, like diffusers
    assert _rel_err(out, expected) <= F32_TOLERANCE


def test_timestep_changes_only_target_rows_under_causal_condition(models):
    """With causal_condition the prefix is modulated from t = 0, so its outputs do not depend on the timestep."""
    _, ours = models[True]
    inputs = make_inputs(np.random.default_rng(2), **CASES["edit_one_condition"])
    out_a = np.asarray(ours.apply(ours.params, **inputs))
    out_b = np.asarray(ours.apply(ours.params, **(inputs | {"timestep": inputs["timestep"] * 0.5})))
    prefix = out_a.shape[1] - 24
    np.testing.assert_array_equal(out_a[:, :prefix], out_b[:, :prefix])
    assert np.abs(out_a[:, prefix:] - out_b[:, prefix:]).max() > 1e-3


@pytest.mark.parametrize("case", ["t2i", "edit_two_conditions", "right_padded_batch"])
def test_kv_cache_matches_uncached_and_diffusers(models, case):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    reference, ours = models[True]
    rng = np.random.default_rng(3)
    first = make_inputs(rng, **CASES[case])
    # A later sampling step: new target latents and timestep, same prompt and condition latents.
    later = dict(first)
    target = int(np.prod(CASES[case]["target"]))
    later["hidden_states"] = first["hidden_states"].copy()
    later["hidden_states"][:, -target:] = rng.standard_normal(later["hidden_states"][:, -target:].shape)
    later["timestep"] = first["timestep"] * 0.5

    out_first, cache = ours.apply(ours.params, **first, kv_cache_mode="extract")
    np.testing.assert_allclose(out_first, ours.apply(ours.params, **first), rtol=0, atol=0)
    cached = np.asarray(ours.apply(ours.params, **later, kv_cache=cache, kv_cache_mode="cached"))
    uncached = np.asarray(ours.apply(ours.params, **later))[:, -target:]
    assert cached.shape == uncached.shape
    assert _rel_err(cached, uncached) <= 1e-5

    expected = []
    for b in range(cached.shape[0]):  # each sample alone, its padding stripped (see torch_forward_alone)
        torch_cache = QwenImage21KVCache(TINY["num_layers"])
        torch_forward(reference, _alone(first, b)[0], kv_cache=torch_cache, kv_cache_mode="extract")
        expected.append(torch_forward(reference, _alone(later, b)[0], kv_cache=torch_cache, kv_cache_mode="cached"))
    assert _rel_err(cached, np.concatenate(expected)) <= F32_TOLERANCE


def test_kv_cache_rejected_without_causal_condition(models):
    _, ours = models[False]
    inputs = make_inputs(np.random.default_rng(4), **CASES["t2i"])
    with pytest.raises(ValueError, match="causal_condition"):
        ours.apply(ours.params, **inputs, kv_cache_mode="extract")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bfloat16_within_measured_tolerance(case):
    """bf16 params and activations against the float32 reference.

    A bf16 pipeline rounds the timestep to bf16 before the sinusoidal embedding (diffusers casts it to the
    activation dtype), which moves 1000*t by up to ~2 units and so changes the features for real; the reference gets
    the same rounded timestep so that only arithmetic error is measured.
    """
    import ml_dtypes

    reference, ours = _pair(param_dtype="bfloat16", dtype="bfloat16")
    inputs = make_inputs(np.random.default_rng(5), **CASES[case])
    inputs["timestep"] = inputs["timestep"].astype(ml_dtypes.bfloat16).astype(np.float32)
    expected = torch_forward_alone(reference, inputs)
    out = ours.apply(ours.params, **inputs)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    valid = ~np.isnan(expected)
    rms_err = float(np.sqrt(np.mean((out - expected)[valid] ** 2) / np.mean(expected[valid] ** 2)))
    assert _rel_err(out, expected) <= BF16_MAX_TOLERANCE
    assert rms_err <= BF16_RMS_TOLERANCE


def test_bad_layout_is_a_clear_error(models):
    from qwen_flash_jax.models import LayoutError

    _, ours = models[True]
    inputs = make_inputs(np.random.default_rng(6), **CASES["t2i"])
    with pytest.raises(LayoutError, match="img_shapes accounts for"):
        ours.apply(ours.params, **(inputs | {"img_shapes": [[(1, 4, 6), (1, 2, 2)]]}))
    with pytest.raises(ValueError, match="image tokens"):
        ours.apply(ours.params, **(inputs | {"hidden_states": inputs["hidden_states"][:, :-4]}))


def test_converted_checkpoint_loads_and_matches_diffusers(tmp_path):
    """The user path: diffusers dir -> `python -m qwen_flash_jax.convert` -> `load_transformer` -> apply."""
    from qwen_flash_jax import convert, load_transformer

    reference = random_diffusers_transformer(7)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    convert.convert(tmp_path / "hf", tmp_path / "converted", dtype="float32", progress=False)
    model = load_transformer(tmp_path / "converted")
    assert model.config == TransformerConfig(**TINY)
    inputs = make_inputs(np.random.default_rng(8), **CASES["edit_one_condition"])
    assert _rel_err(model.apply(model.params, **inputs), torch_forward(reference, inputs)) <= F32_TOLERANCE
