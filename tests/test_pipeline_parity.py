"""`qwen_flash_jax.Pipeline` against diffusers' `QwenImage21Pipeline` on a tiny random Qwen-Image 2.1 pipeline
folder built here: a tiny transformer, VAE (RGBA) and Qwen3-VL encoder with its vision tower, a locally trained
tokenizer, the image processor's settings nested in processor/processor_config.json (as transformers 5 saves them)
and a scheduler with non-default shift anchors and a terminal stretch. Float32 images agree within 2e-3 max abs on
[0, 1], from the same packed latents.

transformers cannot build `Qwen3VLProcessor` here (its class check imports torchvision, which does not load against
this torch), so the reference gets one built with that check bypassed; the processor itself is transformers'.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from qwen_flash_jax import Pipeline  # noqa: E402
from qwen_flash_jax.models.config import ConfigError  # noqa: E402
from tests.qwen_image_folder import (  # noqa: E402
    CAPTIONS,
    IMAGE_PROCESSOR,
    LATENT_CHANNELS,
    TRANSFORMER,
    _vae,
    processor,
    randomise,
    tiny_qwen3_vl,
)

pytestmark = pytest.mark.parity

INSTRUCTIONS = ["make the sky green", "remove the tree", "add a hat", "turn it into a sketch"]

TOLERANCE = 2e-3  # max abs on [0, 1] images
RESOLUTION = 64  # output_resolution: condition images are resized to about 64x64 pixels
SCHEDULER = dict(
    use_dynamic_shifting=True,
    base_image_seq_len=16,
    max_image_seq_len=96,
    base_shift=0.3,
    max_shift=1.3,
    shift_terminal=0.02,
)


def _transformer(path):
    from diffusers import QwenImage21Transformer2DModel

    randomise(QwenImage21Transformer2DModel(**TRANSFORMER).eval(), 2).save_pretrained(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = tmp_path_factory.mktemp("qwen_image_21")
    model, tok = tiny_qwen3_vl(CAPTIONS + INSTRUCTIONS)
    model.save_pretrained(root / "text_encoder")
    # The tokenizer and the image processor's settings live in processor/, as a saved pipeline has them.
    tok.save_pretrained(root / "processor")
    (root / "processor" / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen3VLProcessor", "image_processor": IMAGE_PROCESSOR})
    )
    _vae(root)
    _transformer(root / "transformer")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline"}))
    return root


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline
    from transformers import Qwen3VLForConditionalGeneration

    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=AutoencoderKLQwenImage21.from_pretrained(folder / "vae").eval(),
        text_encoder=Qwen3VLForConditionalGeneration.from_pretrained(folder / "text_encoder").eval(),
        processor=processor(folder),
        transformer=QwenImage21Transformer2DModel.from_pretrained(folder / "transformer").eval(),
    )


@pytest.fixture(scope="module")
def ours(folder):
    return Pipeline.from_pretrained(folder, dtype="float32")


def _noise(batch, height, width, seed=0):
    tokens = (height // 16) * (width // 16)
    return np.random.default_rng(seed).standard_normal((batch, tokens, LATENT_CHANNELS)).astype(np.float32)


def _reference(reference, latents, **kwargs):
    with torch.no_grad():
        out = reference(latents=torch.from_numpy(latents), output_type="np", output_resolution=RESOLUTION, **kwargs)
    return np.asarray(out.images, np.float32)


def _images(seed, sizes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes]


def _check(ours_images, ref_images, case):
    assert ours_images.shape == ref_images.shape
    assert ref_images.std() > 0.05  # a real image to compare, not a flat one
    err = float(np.abs(ours_images - ref_images).max())
    print(f"{case}: max abs error {err:.2e} on [0, 1] images {ref_images.shape}")
    assert err <= TOLERANCE
    return err


def test_t2i_true_cfg_non_square(ours, reference):
    kwargs = dict(
        prompt=CAPTIONS[0],
        negative_prompt="a dark forest",
        true_cfg_scale=3.0,
        height=64,
        width=96,
        num_inference_steps=8,
    )
    latents = _noise(1, 64, 96)
    expected = _reference(reference, latents, **kwargs)
    out = ours(**kwargs, latents=latents, output_resolution=RESOLUTION)
    assert out.images.shape == (1, 64, 96, 4) and out.images.dtype == np.float32  # the VAE decodes RGBA
    _check(out.images, expected, "t2i, 8 steps, true CFG, 64x96")
    # The same with the prefix KV cache off (diffusers' use_kv_cache=False).
    uncached = ours(**kwargs, latents=latents, output_resolution=RESOLUTION, use_kv_cache=False)
    _check(uncached.images, expected, "t2i without the KV cache")


def test_padded_batch_gives_each_prompt_its_own_image(ours, reference):
    """Two prompts of different lengths in one batch: each image is the pipeline's image for that prompt alone
    (diffusers' own batched call pads the shorter prompt, which moves its image positions)."""
    prompts = ["sun", ", ".join(CAPTIONS + INSTRUCTIONS)]  # 2 and ~40 tokens
    kwargs = dict(height=64, width=64, num_inference_steps=4, negative_prompt=" ", true_cfg_scale=2.0)
    latents = _noise(2, 64, 64, seed=1)
    alone = np.concatenate(
        [_reference(reference, latents[b : b + 1], prompt=p, **kwargs) for b, p in enumerate(prompts)]
    )
    batched = ours(prompt=prompts, latents=latents, output_resolution=RESOLUTION, **kwargs).images
    _check(batched, alone, "padded batch of 2, each against its prompt alone")
    # Padded positions (diffusers' batched call; this project's layout before per-sample positions) are far off.
    padded = _reference(reference, latents, prompt=prompts, **(kwargs | dict(negative_prompt=[" ", " "])))
    before = float(np.abs(padded - alone).max())
    print(f"padded positions (diffusers' batched call) against each prompt alone: max abs error {before:.2e}")
    assert before > 10 * float(np.abs(batched - alone).max())


def test_edit_with_one_condition_image(ours, reference):
    (image,) = _images(2, [(40, 90)])  # resized to 96x32 pixels; the output takes its aspect
    kwargs = dict(prompt=CAPTIONS[2], image=image, num_inference_steps=4)
    latents = _noise(1, 32, 96, seed=2)
    expected = _reference(reference, latents, **kwargs)
    _check(ours(**kwargs, latents=latents, output_resolution=RESOLUTION).images, expected, "edit, 1 image")


def test_edit_with_two_condition_images_of_different_sizes(ours, reference):
    images = _images(3, [(64, 64), (90, 45)])  # resized to 64x64 and 96x32 (h x w)
    kwargs = dict(prompt="make the sky green", image=images, num_inference_steps=4, negative_prompt=" ")
    kwargs["true_cfg_scale"] = 2.0
    h, w = 96, 32  # the output takes the last image's aspect: about 64**2 pixels at 90:45, multiples of 32
    latents = _noise(1, h, w, seed=3)
    expected = _reference(reference, latents, **kwargs)
    _check(ours(**kwargs, latents=latents, output_resolution=RESOLUTION).images, expected, "edit, 2 images")


def test_bad_folders_are_one_line_config_errors(folder, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="model_index.json"):
        Pipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    with pytest.raises(ConfigError, match="not a QwenImage21Pipeline"):
        Pipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline"}))
    with pytest.raises(ConfigError, match="has no transformer/"):
        Pipeline.from_pretrained(tmp_path)
