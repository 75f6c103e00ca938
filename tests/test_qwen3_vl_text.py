"""The text path of the real text encoder: a tiny random transformers Qwen3-VL, saved with `save_pretrained`, loaded
with `qwen_flash_jax.text.qwen3_vl` and run by the toy's decoder, against what diffusers' QwenImage21Pipeline reads.
"""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from qwen_flash_jax.models.config import ConfigError  # noqa: E402
from qwen_flash_jax.text import encoder as enc  # noqa: E402
from qwen_flash_jax.text import qwen3_vl  # noqa: E402

pytestmark = pytest.mark.parity

F32_TOLERANCE = 1e-4  # max abs error relative to the reference's max magnitude, at the unpadded positions
HEAD_DIM = 16
TEXT = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=HEAD_DIM,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    # mrope_section sums to head_dim / 2, as (24, 20, 20) does for the real head_dim of 128.
    rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[4, 2, 2], mrope_interleaved=True),
)
VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    patch_size=4,
    num_position_embeddings=16,
    deepstack_visual_indexes=[0],
)  # built, saved, never used
LENGTHS = (11, 7, 3)  # three prompts, left-padded to the longest


def _tiny_qwen3_vl(seed=0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=TEXT,
        vision_config=VISION,
        image_token_id=290,
        video_token_id=291,
        vision_start_token_id=292,
        vision_end_token_id=293,
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # random everything, norm scales around 1, so that every weight matters
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = _tiny_qwen3_vl()
    path = tmp_path_factory.mktemp("qwen3_vl") / "text_encoder"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def params(checkpoint):
    return qwen3_vl.load_text_encoder(checkpoint[1])


def _batch():
    rng = np.random.default_rng(1)
    s = max(LENGTHS)
    ids = rng.integers(0, 290, size=(len(LENGTHS), s))
    mask = np.zeros((len(LENGTHS), s), np.int64)
    for b, n in enumerate(LENGTHS):
        mask[b, s - n :] = 1
        ids[b, : s - n] = 0  # pad id: masked out either way
    return ids, mask


def _pipeline_hidden(model, ids, mask, **kwargs):
    """`hidden_states[-1]` as QwenImage21Pipeline._get_qwen_prompt_embeds obtains it (its norm hook included)."""
    norm = model.model.language_model.norm
    handle = norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        with torch.no_grad():
            out = model(
                input_ids=torch.as_tensor(ids),
                attention_mask=torch.as_tensor(mask),
                output_hidden_states=True,
                **kwargs,
            )
    finally:
        handle.remove()
    return out.hidden_states[-1].numpy()


def _rel_err(ours, ref, mask):
    valid = mask.astype(bool)
    ours, ref = np.asarray(ours, np.float32)[valid], np.asarray(ref, np.float32)[valid]
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_config_mapping(params):
    c = params.config
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim) == (
        300,
        64,
        2,
        4,
        2,
        16,
        128,
    )
    assert c.rope_theta == 5e6 and c.eps == 1e-6 and c.feature_layers == (-1,) and c.output_size == 64
    assert c.condition_channels == 0  # no toy condition projection: images go through the vision tower
    assert c.image_pad_id == 290 and c.mrope_section == (4, 2, 2)  # image_token_id, rope mrope_section


def test_text_path_matches_transformers_as_the_pipeline_calls_it(checkpoint, params):
    """Left-padded, text only: transformers gives every row positions arange(S), we count from the first real token;
    RoPE's shift invariance makes those the same hidden states at the unpadded positions."""
    model, _ = checkpoint
    ids, mask = _batch()
    expected = _pipeline_hidden(model, ids, mask)
    ours = enc.encode(params, ids, mask)
    assert ours.shape == expected.shape and ours.dtype == jnp.float32
    err = _rel_err(ours, expected, mask)
    print(f"f32 max rel error vs the pipeline's call: {err:.2e}")
    assert err <= F32_TOLERANCE


def test_positions_from_the_mask_give_the_same_hidden_states_in_transformers(checkpoint, params):
    """The same comparison at identical positions: transformers fed our mask-cumsum positions explicitly."""
    model, _ = checkpoint
    ids, mask = _batch()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = _pipeline_hidden(model, ids, mask, position_ids=torch.as_tensor(positions))
    assert _rel_err(enc.encode(params, ids, mask), expected, mask) <= F32_TOLERANCE
    # ... and transformers' own two position conventions agree with each other.
    assert _rel_err(_pipeline_hidden(model, ids, mask), expected, mask) <= 1e-5


def test_interleaved_mrope_with_equal_streams_is_plain_rope():
    """Qwen3VLTextRotaryEmbedding with the three position streams equal == 1-D RoPE cos/sin, rotate-half layout."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    config = transformers.Qwen3VLTextConfig(**TEXT)
    rotary = Qwen3VLTextRotaryEmbedding(config)
    positions = torch.arange(40).view(1, 1, -1).expand(3, 2, -1) + torch.tensor([0, 7]).view(1, 2, 1)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    theta = TEXT["rope_parameters"]["rope_theta"]
    inv_freq = 1.0 / (theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM))
    angles = positions[0].numpy()[..., None].astype(np.float32) * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    np.testing.assert_allclose(cos.numpy(), np.cos(angles), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin.numpy(), np.sin(angles), rtol=0, atol=1e-6)


def test_which_state_transformers_returns_as_the_last_hidden_state(checkpoint, params):
    """Why the pipeline hooks the norm: unhooked, transformers 5's hidden_states[-1] is the final-normed state
    (transformers 4 returned the pre-norm state there, which `encode` gives)."""
    normed_last = int(transformers.__version__.split(".")[0]) >= 5
    model, _ = checkpoint
    ids, mask = _batch()
    with torch.no_grad():
        unhooked = (
            model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
            .hidden_states[-1]
            .numpy()
        )
    hidden = enc.encode(params, ids, mask)
    expected = enc._model(params).final_norm(hidden) if normed_last else hidden
    assert _rel_err(expected, unhooked, mask) <= F32_TOLERANCE
    assert _rel_err(hidden, unhooked, mask) > 0.1


def test_sharded_checkpoint_and_bfloat16_weights(checkpoint, params, tmp_path):
    model, _ = checkpoint
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / qwen3_vl.INDEX_FILE).is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    sharded = qwen3_vl.load_text_encoder(tmp_path)
    ids, mask = _batch()
    reference = np.asarray(enc.encode(params, ids, mask))
    np.testing.assert_array_equal(np.asarray(enc.encode(sharded, ids, mask)), reference)

    half = qwen3_vl.load_text_encoder(tmp_path, dtype="bfloat16")
    assert half.state["layers"][0]["attn"]["q_proj"]["kernel"][...].dtype == jnp.bfloat16
    err = _rel_err(enc.encode(half, ids, mask), reference, mask)
    print(f"bf16 weights, f32 compute: max rel error {err:.2e}")
    assert err <= 5e-2  # weight rounding only (2**-9 relative per weight), through 2 layers


def test_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        qwen3_vl.load_text_encoder(tmp_path / "nowhere")


def _copy_without(src, dst, drop=(), config_edit=None):
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    save_file(tensors, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))


def test_missing_key_is_a_config_error(checkpoint, tmp_path):
    key = "model.language_model.layers.1.self_attn.k_norm.weight"
    _copy_without(checkpoint[1], tmp_path / "ckpt", drop=[key])
    with pytest.raises(ConfigError, match=r"missing 1 of 24 language-model tensors: " + key.replace(".", r"\.")):
        qwen3_vl.load_text_encoder(tmp_path / "ckpt")


def test_truncated_or_corrupt_file_is_a_one_line_config_error(checkpoint, tmp_path):
    _copy_without(checkpoint[1], tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(ConfigError, match=r"model\.safetensors: not a valid safetensors file") as info:
        qwen3_vl.load_text_encoder(tmp_path / "ckpt")
    assert "\n" not in str(info.value)
    weights.write_bytes(b"not safetensors at all")
    with pytest.raises(ConfigError, match=r"model\.safetensors: not a valid safetensors file") as info:
        qwen3_vl.load_text_encoder(tmp_path / "ckpt")
    assert "\n" not in str(info.value)


def test_vision_tower_and_lm_head_are_not_needed(checkpoint, params, tmp_path):
    src = checkpoint[1]
    _copy_without(src, tmp_path / "ckpt", drop=[k for k in _keys(src) if not k.startswith("model.language_model.")])
    ids, mask = _batch()
    np.testing.assert_array_equal(
        np.asarray(enc.encode(qwen3_vl.load_text_encoder(tmp_path / "ckpt"), ids, mask)),
        np.asarray(enc.encode(params, ids, mask)),
    )


def test_wrong_shape_and_unsupported_config_are_config_errors(checkpoint, tmp_path):
    def wider_mlp(config):
        config["text_config"]["intermediate_size"] = 96

    _copy_without(checkpoint[1], tmp_path / "mlp", config_edit=wider_mlp)
    with pytest.raises(
        ConfigError,
        match=r"6 tensors have the wrong shape: .*gate_proj\.weight has shape "
        r"\(128, 64\), expected \(96, 64\)",
    ):
        qwen3_vl.load_text_encoder(tmp_path / "mlp")

    def yarn(config):
        config["text_config"]["rope_parameters"]["rope_type"] = "yarn"

    _copy_without(checkpoint[1], tmp_path / "yarn", config_edit=yarn)
    with pytest.raises(ConfigError, match="rotary type 'yarn' is not supported"):
        qwen3_vl.load_text_encoder(tmp_path / "yarn")

    shutil.copytree(checkpoint[1], tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="'llama' is not a Qwen3-VL model"):
        qwen3_vl.load_text_encoder(tmp_path / "other")


def test_toy_condition_latents_are_refused_by_the_real_encoder(params):
    ids, mask = _batch()
    ids[:, -1] = 290  # one <|image_pad|> slot per prompt
    with pytest.raises(ValueError, match="no condition projection"):
        enc.encode(params, ids, mask, [np.zeros((3, 4, 48), np.float32)], [(2, 2)])


def _keys(path):
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "np") as f:
        return list(f.keys())
