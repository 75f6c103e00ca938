"""The image path of the real text encoder: a tiny random transformers Qwen3-VL (vision tower included) and its image
processor, saved with `save_pretrained`, loaded with `qwen_flash_jax.text.qwen3_vl` and compared with transformers:
the processor's pixel_values, the vision tower's outputs, the M-RoPE positions and the image-conditioned forward
as diffusers' QwenImage21Pipeline runs it (prompt template, `<|image_pad|>` expanded, norm hooked away).
"""

import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qwen_flash_jax.models.config import ConfigError  # noqa: E402
from qwen_flash_jax.text import encoder as enc  # noqa: E402
from qwen_flash_jax.text import prompts, qwen3_vl  # noqa: E402
from qwen_flash_jax.text import qwen3_vl_vision as vis  # noqa: E402
from qwen_flash_jax.text.prompts import IMAGE_PAD, VISION_END, VISION_START, special_token_id  # noqa: E402
from qwen_flash_jax.text.tokenizer import train_tokenizer  # noqa: E402

pytestmark = pytest.mark.parity

F32_TOLERANCE = 1e-4  # max abs error relative to the reference's max magnitude (at valid positions)
VOCAB = 320  # the toy tokenizer's 300 ids, plus room for the video token
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    # 8 frequency pairs: height gets pairs 1 and 4, width 2 and 5, temporal the rest (interleaved).
    rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[4, 2, 2], mrope_interleaved=True),
)
# 3 blocks, deepstack after blocks 0 and 2 (added after decoder layers 0 and 1 of 3); a 4x4 position table that
# every test grid resamples (4x6 and 8x4 patches).
VISION = dict(
    depth=3,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    patch_size=4,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=16,
    deepstack_visual_indexes=[0, 2],
)
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PIXELS = dict(shortest_edge=64, longest_edge=4096)  # the tiny images are within; nothing is resized
IMAGE_HW = (16, 24)  # pixels: a (4, 6) patch grid, (2, 3) merged tokens
CAPTIONS = ["a red fox", "two small blue birds sitting on a long wire", "sun"]


def _processor(backend="pil"):
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl, image_processing_qwen2_vl

    cls = (
        image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil
        if backend == "pil"
        else image_processing_qwen2_vl.Qwen2VLImageProcessor
    )
    return cls(patch_size=4, temporal_patch_size=2, merge_size=2, image_mean=MEAN, image_std=STD, size=PIXELS)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS * 4, vocab_size=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLConfig(
        text_config=TEXT,
        vision_config=VISION,
        image_token_id=special_token_id(tokenizer, IMAGE_PAD),
        video_token_id=VOCAB - 1,
        vision_start_token_id=special_token_id(tokenizer, VISION_START),
        vision_end_token_id=special_token_id(tokenizer, VISION_END),
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # random everything, norm scales around 1, so that every weight matters
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    path = tmp_path_factory.mktemp("qwen3_vl") / "text_encoder"
    model.save_pretrained(path)
    _processor().save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def params(checkpoint):
    return qwen3_vl.load_qwen3_vl(checkpoint[1])


def _images(batch, hw=IMAGE_HW, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(batch, *hw, 3), dtype=np.uint8)


def _rel_err(ours, ref, valid=None):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    if valid is not None:
        ours, ref = ours[valid.astype(bool)], ref[valid.astype(bool)]
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# --- preprocessing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(16, 24), (32, 16)])
def test_image_patches_are_the_processors_pixel_values(params, hw):
    config = params.vision.config
    assert (config.image_mean, config.image_std, config.min_pixels, config.max_pixels) == (
        tuple(MEAN),
        tuple(STD),
        64,
        4096,
    )  # read from the saved preprocessor_config.json
    images = _images(2, hw)
    ref = _processor()(images=list(images), return_tensors="np")
    patches = vis.image_patches(images, config, backend="pil")
    (h, w), tokens = vis.image_grid(*hw, config)
    assert patches.shape == (2, h * w, config.patch_dim) and patches.dtype == np.float32
    np.testing.assert_array_equal(ref["image_grid_thw"], [[1, h, w]] * 2)
    np.testing.assert_array_equal(patches.reshape(-1, config.patch_dim), ref["pixel_values"])
    assert tokens == h * w // 4
    # The torchvision backend's fused (x - 255 mean) / (255 std) differs from PIL's by float32 rounding only.
    assert np.max(np.abs(vis.image_patches(images, config) - patches)) <= 1e-6


def test_image_patches_cut_on_device_equal_the_host_ones(params):
    """The training step cuts patches from uint8 pixels inside jit; the same rows as on the host (torchvision's
    arithmetic), up to XLA's float rounding."""
    import jax

    images = _images(2, (16, 24))
    host = vis.image_patches(images, params.vision.config)
    device = jax.jit(lambda x: vis.image_patches(x, params.vision.config))(jax.numpy.asarray(images))
    assert isinstance(device, jax.Array) and device.shape == host.shape
    assert np.max(np.abs(np.asarray(device) - host)) <= 1e-6


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision backend not installed")
def test_image_patches_match_the_torchvision_processor_exactly(params):
    images = _images(2)
    ref = _processor("torchvision")(images=list(images), return_tensors="np")
    np.testing.assert_array_equal(vis.image_patches(images, params.vision.config).reshape(-1, 96), ref["pixel_values"])


def test_image_sizes_that_would_be_resized_are_refused(params):
    config = params.vision.config
    with pytest.raises(ValueError, match="multiples of patch_size \\* spatial_merge_size = 8"):
        vis.image_patches(_images(1, (16, 20)), config)
    with pytest.raises(ValueError, match=r"outside the processor's \[64, 4096\]"):
        vis.image_patches(_images(1, (64, 72)), config)
    with pytest.raises(ValueError, match="uint8"):
        vis.image_patches(_images(1).astype(np.float32), config)


def test_preprocessing_defaults_and_mismatches():
    hf = {"model_type": "qwen3_vl", "vision_config": VISION}
    config = vis.vision_config_from_hf(hf)  # no preprocessor_config.json: Qwen3-VL's published preprocessing
    assert (config.image_mean, config.image_std, config.rescale_factor) == ((0.5,) * 3, (0.5,) * 3, 1 / 255)
    assert (config.min_pixels, config.max_pixels) == (256 * 256, 4096 * 4096)
    with pytest.raises(ConfigError, match="merge_size=4 but the vision tower's spatial_merge_size is 2"):
        vis.vision_config_from_hf(hf, {"merge_size": 4})


# --- vision tower -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(16, 24), (32, 16)])
def test_vision_tower_matches_transformers(checkpoint, params, hw):
    model, _ = checkpoint
    config = params.vision.config
    images = _images(2, hw, seed=1)
    (h, w), tokens = vis.image_grid(*hw, config)
    patches = vis.image_patches(images, config, backend="pil")
    with torch.no_grad():
        out = model.model.visual(
            torch.as_tensor(patches.reshape(-1, config.patch_dim)), grid_thw=torch.tensor([[1, h, w]] * 2)
        )
    embeds, deepstack = vis.vision_embeddings(params.vision, patches, (h, w))
    assert embeds.shape == (2, tokens, 64) and len(deepstack) == 2
    errors = [
        _rel_err(np.asarray(ours).reshape(2 * tokens, -1), ref.numpy())
        for ours, ref in zip((embeds, *deepstack), (out.pooler_output, *out.deepstack_features))
    ]
    print(f"vision tower {hw}: max rel error (embeds, deepstack...) {[f'{e:.1e}' for e in errors]}")
    assert max(errors) <= F32_TOLERANCE


def test_bfloat16_vision_weights(checkpoint, params):
    half = qwen3_vl.load_qwen3_vl(checkpoint[1], dtype="bfloat16")
    assert half.vision.state["blocks"][0]["qkv"]["kernel"][...].dtype == jnp.bfloat16
    patches = vis.image_patches(_images(2), params.vision.config)
    reference = vis.vision_embeddings(params.vision, patches, (4, 6))
    errors = [
        _rel_err(h, f)
        for h, f in zip(
            jax.tree.leaves(vis.vision_embeddings(half.vision, patches, (4, 6))), jax.tree.leaves(reference)
        )
    ]
    print(f"bf16 vision weights, f32 compute: max rel errors {[f'{e:.1e}' for e in errors]}")
    assert max(errors) <= 5e-2  # weight rounding only


@pytest.mark.sharded  # a mesh over several devices
def test_loading_onto_a_mesh_gives_the_same_weights_in_their_shardings(checkpoint):
    """With a mesh, each device's block is read from the file on its own (`get_slice`); the weights are bit for bit
    the unsharded load's, language model and vision tower alike, and laid out by the logical-axis rules."""
    from qwen_flash_jax import sharding

    mesh = sharding.make_mesh([("fsdp", 2), ("tensor", 2)], devices=jax.devices()[:4])
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"))
    sharded = qwen3_vl.load_qwen3_vl(checkpoint[1], dtype="bfloat16", mesh=mesh, rules=rules)
    whole = qwen3_vl.load_qwen3_vl(checkpoint[1], dtype="bfloat16")
    split = 0
    for part in ("text", "vision"):
        got = jax.tree_util.tree_leaves_with_path(getattr(sharded, part).state)
        want = jax.tree_util.tree_leaves_with_path(getattr(whole, part).state)
        assert [p for p, _ in got] == [p for p, _ in want]
        for (path, g), (_, w) in zip(got, want):
            assert g.dtype == w.dtype == jnp.bfloat16 and g.sharding.mesh == mesh, path
            np.testing.assert_array_equal(
                np.asarray(g).view(np.uint16), np.asarray(w).view(np.uint16), err_msg=jax.tree_util.keystr(path)
            )
            split += not g.sharding.is_fully_replicated
    assert split > 10  # the rules did split the kernels, so the blocks were real blocks


# --- image-conditioned language model -----------------------------------------------------------------------------


def _prompt_batch(tokenizer, config, padding, num_images=1):
    _, tokens = vis.image_grid(*IMAGE_HW, config)
    batch = prompts.tokenize_prompts(tokenizer, CAPTIONS, [tokens] * num_images)  # left-padded, pads expanded
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    if padding == "right":
        for b in range(len(ids)):
            shift = int((mask[b] == 0).sum())
            ids[b], mask[b] = np.roll(ids[b], -shift), np.roll(mask[b], -shift)
    return ids, mask


def _pipeline_hidden(model, ids, mask, pixel_values, grid_thw, image_token_id):
    """`hidden_states[-1]` as QwenImage21Pipeline._get_qwen_prompt_embeds obtains it (its norm hook included)."""
    handle = model.model.language_model.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        with torch.no_grad():
            out = model(
                input_ids=torch.as_tensor(ids),
                attention_mask=torch.as_tensor(mask),
                pixel_values=torch.as_tensor(pixel_values),
                image_grid_thw=torch.as_tensor(grid_thw),
                mm_token_type_ids=torch.as_tensor((ids == image_token_id).astype(np.int64)),
                output_hidden_states=True,
            )
    finally:
        handle.remove()
    return out.hidden_states[-1].numpy()


@pytest.mark.parametrize("padding,num_images", [("left", 1), ("right", 1), ("right", 2)])
def test_mrope_positions_match_get_rope_index(checkpoint, params, tokenizer, padding, num_images):
    model, _ = checkpoint
    ids, mask = _prompt_batch(tokenizer, params.vision.config, padding, num_images)
    pad_id = params.text.config.image_pad_id
    ref, _ = model.model.get_rope_index(
        torch.as_tensor(ids),
        torch.as_tensor((ids == pad_id).astype(np.int64)),
        image_grid_thw=torch.tensor([[1, 4, 6]] * len(ids) * num_images),
        attention_mask=torch.as_tensor(mask),
    )
    np.testing.assert_array_equal(np.asarray(qwen3_vl.mrope_positions(ids, mask, pad_id, (2, 3))), ref.numpy())


@pytest.mark.parametrize("padding", ["left", "right"])
def test_image_conditioned_encoding_matches_the_pipelines_call(checkpoint, params, tokenizer, padding):
    model, _ = checkpoint
    config = params.vision.config
    ids, mask = _prompt_batch(tokenizer, config, padding)
    images = _images(len(ids), seed=2)
    ref_inputs = _processor()(images=list(images), return_tensors="np")
    expected = _pipeline_hidden(
        model, ids, mask, ref_inputs["pixel_values"], ref_inputs["image_grid_thw"], params.text.config.image_pad_id
    )
    (h, w), _ = vis.image_grid(*IMAGE_HW, config)
    ours = qwen3_vl.encode_features(params, ids, mask, vis.image_patches(images, config, backend="pil"), (h, w))
    assert ours.shape == expected.shape and ours.dtype == jnp.float32
    err = _rel_err(ours, expected, mask)
    print(f"{padding}-padded image-conditioned encoding: max rel error {err:.2e}")
    assert err <= F32_TOLERANCE
    if padding == "right":  # jittable with the grid static, as the training step will call it
        jitted = jax.jit(qwen3_vl.encode_features, static_argnames=("grid_hw",))
        np.testing.assert_allclose(
            jitted(params, ids, mask, vis.image_patches(images, config, backend="pil"), grid_hw=(h, w)),
            ours,
            rtol=0,
            atol=1e-5,
        )
    # The images matter (deepstack included): without the deepstack features the result is far off.
    embeds, deepstack = vis.vision_embeddings(params.vision, vis.image_patches(images, config, backend="pil"), (h, w))
    no_deepstack = qwen3_vl.features_with_images(params.text, ids, mask, embeds, (), (h // 2, w // 2))
    assert _rel_err(no_deepstack, expected, mask) > 1e-2


def test_text_only_path_is_the_text_encoders(params, tokenizer, checkpoint):
    batch = prompts.tokenize_prompts(tokenizer, CAPTIONS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text_only = qwen3_vl.load_text_encoder(checkpoint[1])
    np.testing.assert_array_equal(
        np.asarray(qwen3_vl.encode_features(params, ids, mask)), np.asarray(enc.encode(text_only, ids, mask))
    )
    assert params.text.config.mrope_section == (4, 2, 2) and params.text.config.image_pad_id == 5


def test_wrong_slot_counts_are_refused(params, tokenizer):
    ids, mask = _prompt_batch(tokenizer, params.vision.config, "left")
    patches = vis.image_patches(_images(len(ids)), params.vision.config)
    with pytest.raises(ValueError, match=r"row 0 has image-token runs \[6\]; the images need 1 runs of 24"):
        qwen3_vl.encode_features(
            params, ids, mask, vis.image_patches(_images(3, (32, 48)), params.vision.config), (8, 12)
        )
    with pytest.raises(ValueError, match="patches must be"):
        qwen3_vl.encode_features(params, ids, mask, patches[:2], (4, 6))


# --- loading errors -----------------------------------------------------------------------------------------------


def _copy_without(src, dst, drop=(), config_edit=None):
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    save_file(
        {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}, dst / "model.safetensors"
    )
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))


def _one_line_error(path, match):
    with pytest.raises(ConfigError, match=match) as info:
        qwen3_vl.load_qwen3_vl(path)
    assert "\n" not in str(info.value)


def test_missing_visual_tensor_wrong_shape_and_unsupported_act_are_config_errors(checkpoint, tmp_path):
    src = checkpoint[1]
    key = "model.visual.blocks.1.attn.qkv.bias"
    _copy_without(src, tmp_path / "missing", drop=[key])
    _one_line_error(tmp_path / "missing", r"missing 1 of \d+ vision tensors: " + key.replace(".", r"\."))

    def narrower_mlp(config):
        config["vision_config"]["intermediate_size"] = 48

    _copy_without(src, tmp_path / "shape", config_edit=narrower_mlp)
    _one_line_error(
        tmp_path / "shape",
        r"9 vision tensors have the wrong shape: model\.visual\.blocks\.0\.mlp\."
        r"linear_fc1\.weight has shape \(64, 32\), expected \(48, 32\)",
    )

    def relu(config):
        config["vision_config"]["hidden_act"] = "relu"

    _copy_without(src, tmp_path / "act", config_edit=relu)
    _one_line_error(tmp_path / "act", "hidden_act 'relu' is not supported")


def test_checkpoint_without_vision_tower_encodes_text_only(checkpoint, tmp_path, tokenizer):
    from safetensors import safe_open

    src = checkpoint[1]
    with safe_open(src / "model.safetensors", "np") as f:
        visual = [k for k in f.keys() if k.startswith("model.visual.")]
    _copy_without(src, tmp_path / "ckpt", drop=visual)
    params = qwen3_vl.load_qwen3_vl(tmp_path / "ckpt")
    assert params.vision is None
    ids, mask = _prompt_batch(tokenizer, vis.read_vision_config(src), "left")
    with pytest.raises(ValueError, match="no vision tower"):
        qwen3_vl.encode_features(params, ids, mask, np.zeros((3, 24, 96), np.float32), (4, 6))
