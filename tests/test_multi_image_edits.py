"""Edits with several condition images of different sizes, in training as `qwen_flash_jax.Pipeline` samples them,
on the tiny random Qwen-Image 2.1 pipeline (tests/qwen_image_folder.py): `data.edit_condition_sizes` lays every
edit out as the pipeline lays out the same images (one implementation: `diffusion.conditioning.token_layout` and
`data.edit_images`), and the full-scale distillation trains on such edits."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402

from qwen_flash_jax import Pipeline, config_lib  # noqa: E402
from qwen_flash_jax.data import edit_images  # noqa: E402
from qwen_flash_jax.data import pipeline as pipeline_lib  # noqa: E402
from qwen_flash_jax.diffusion import conditioning, sampling  # noqa: E402
from qwen_flash_jax.models import transformer as transformer_lib  # noqa: E402
from qwen_flash_jax.models.config import ConfigError  # noqa: E402
from qwen_flash_jax.train import assets as assets_lib  # noqa: E402
from qwen_flash_jax.train import distill_job  # noqa: E402
from tests import qwen_image_folder as folder_lib  # noqa: E402

IMAGE_SIZE = 64  # data.image_size: the output resolution, as the pipeline's output_resolution
SIZES = ((64, 64), (32, 96))  # two condition images the pipeline keeps at 64px; the output takes 32x96
INSTRUCTIONS = ["make the sky green", "put the hat on the man", "turn it into a sketch"]
NATIVE = [(64, 64), (45, 140), (80, 80), (30, 100), (50, 150), (70, 60)]  # the files' own sizes (h, w)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from qwen_flash_jax.convert import convert

    root = tmp_path_factory.mktemp("multi_image_edits")
    folder = folder_lib.pipeline_folder(root / "pipeline")
    # The training job reads the processor's pixel limits beside the text encoder (the pipeline finds them there).
    (folder / "text_encoder" / "preprocessor_config.json").write_text(json.dumps(folder_lib.IMAGE_PROCESSOR))
    convert(folder / "transformer", root / "teacher", dtype="float32", progress=False)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(NATIVE):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / f"{i}.png")
    lines = [
        {"instruction": INSTRUCTIONS[0], "category": "scene", "source": ["0.png", "1.png"], "target": "4.png"},
        {"instruction": INSTRUCTIONS[1], "category": "object", "source": ["2.png", "3.png"]},
        {"instruction": INSTRUCTIONS[2], "category": "scene", "source": ["5.png", "4.png"], "target": "1.png"},
    ]
    (root / "edit.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return dict(folder=folder, teacher=root / "teacher", edit=root / "edit.jsonl")


def _config(world, cache_dir, sizes=SIZES):
    """configs/5to5.py at full scale on the tiny pipeline, edits only, every edit of `sizes`."""
    config = config_lib.load_config("configs/5to5.py")
    config.cache_dir = str(cache_dir)
    config.model.update(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in folder_lib.TRANSFORMER.items()},
        dtype="float32",
        remat_policy="none",
    )
    config.text_encoder.path = str(world["folder"] / "text_encoder")
    config.codec.path = str(world["folder"] / "vae")
    for name in ("base", "text"):
        config.teachers[name].path = str(world["teacher"])
    config.data.update(
        image_size=IMAGE_SIZE,
        edit_jsonl=str(world["edit"]),
        batch_size=2,
        max_prompt_tokens=64,
        edit_prompt_tokens=80,
        task_ratio="0:1",
        edit_condition_sizes=sizes,
    )
    config.data.edit_weights = dict(scene=1.0, enhance=0.0, object=1.0, text_edit=0.0, identity=0.0, style=0.0)
    config.train.update(steps=2, log_every=1, checkpoint_every=2)
    config.fake_score.updates_per_student = 1
    config.sampling.teacher_steps = 2
    config.eval.unjudged_samples = 2
    return config


def _positions(cond):
    """The per-sample rotary tables of the valid tokens (what the transformer rotates each token by)."""
    layout = cond.layout
    valid = np.concatenate(
        [np.asarray(cond.encoder_hidden_states_mask), np.ones((cond.batch, layout.num_image_tokens), bool)], axis=1
    )[:, layout.source_index]
    cos, sin = transformer_lib.per_sample_rope(layout, tuple(folder_lib.TRANSFORMER["axes_dims_rope"]), valid)
    return np.asarray(cos)[valid], np.asarray(sin)[valid], layout.image_ids[valid[0]]


def test_a_training_edit_is_conditioned_as_the_pipeline_conditions_the_same_images(world, tmp_path):
    config = _config(world, tmp_path / "cache")
    assets = assets_lib.build_assets(config, log=lambda *_: None)
    spec = assets.tasks["edit"]
    assert spec.condition_sizes == SIZES and spec.latent_hw == (2, 6) and spec.condition_hw == ((4, 4), (2, 6))
    assert assets.eval_tasks["edit"].latent_hw == (4, 4)  # sampling and evaluation keep one square source

    # One example through the input pipeline's own stages (the second image is cropped and resized to 32x96).
    record = assets.sources["edit"]["scene"][0]
    assert [np.shape(s) for s in record["source"]] == [(64, 64, 3), (45, 140, 3)]
    preprocess = pipeline_lib.Preprocess("edit", assets.prompts, assets.codec, IMAGE_SIZE, SIZES)
    example = preprocess(record)
    assert example["target_pixels"].shape == (32, 96, 3)
    batch = pipeline_lib.EncodeImages(assets.codec, condition_pixels=True)({k: v[None] for k, v in example.items()})
    assert batch["condition_latents"].shape == (1, 16 + 12, 8) and batch["condition_pixels"].shape == (
        1,
        4096 + 3072,
        3,
    )

    @jax.jit
    def student_conditioning(te_params, batch):
        return conditioning.encode(
            te_params, spec, batch["input_ids"], batch["attention_mask"], **conditioning.image_inputs(batch)
        )

    cond = student_conditioning(assets.text_encoder, {k: jnp.asarray(v) for k, v in batch.items()})
    images = [example["source_pixels_0"], example["source_pixels_1"]]
    pipe = Pipeline.from_pretrained(world["folder"], dtype="float32")
    ref = pipe.conditioning([record["instruction"]], images, output_resolution=IMAGE_SIZE)

    # The same image blocks, latents, prompt states and positions; the training prompt only has more padding.
    assert cond.layout.img_shapes == ref.layout.img_shapes == ((1, 4, 4), (1, 2, 6), (1, 2, 6))
    np.testing.assert_allclose(np.asarray(cond.condition_latents), np.asarray(ref.condition_latents), atol=1e-5)
    n = ref.encoder_hidden_states.shape[1]
    mask = np.asarray(ref.encoder_hidden_states_mask)
    np.testing.assert_array_equal(np.asarray(cond.encoder_hidden_states_mask)[:, :n], mask)
    assert not np.asarray(cond.encoder_hidden_states_mask)[:, n:].any()
    hidden, expected = np.asarray(cond.encoder_hidden_states)[:, :n][mask], np.asarray(ref.encoder_hidden_states)[mask]
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(hidden, expected, atol=2e-4, rtol=1e-4)  # torchvision vs PIL patch arithmetic
    for got, want in zip(_positions(cond), _positions(ref)):
        np.testing.assert_array_equal(got, want)

    # What the student computes from either conditioning.
    z = jax.random.normal(jax.random.key(0), (1, 12, 8))
    t = jnp.asarray([0.7])
    v_train, _ = sampling.velocity(pipe.transformer, pipe.transformer.params, cond, z, t)
    v_pipe, _ = sampling.velocity(pipe.transformer, pipe.transformer.params, ref, z, t)
    np.testing.assert_allclose(np.asarray(v_train), np.asarray(v_pipe), atol=1e-4)


def test_one_layout_of_the_single_square_source_is_the_default_edit(world, tmp_path):
    """`edit_spec` with the one square source of the target size gives the default edit's layout."""
    assets = assets_lib.build_assets(_config(world, tmp_path / "cache", sizes=()), log=lambda *_: None)
    vision = assets.text_encoder.vision.config
    spec = conditioning.edit_spec(assets.prompts, assets.codec, IMAGE_SIZE, [(IMAGE_SIZE, IMAGE_SIZE)], vision)
    default = assets.tasks["edit"]
    assert spec.layout == default.layout and spec.latent_hw == default.latent_hw
    assert spec.vision_grids == (default.vision_grid,) and assets.eval_tasks is assets.tasks


@pytest.mark.parametrize(
    "sizes, message",
    [
        (((64, 64), (48, 48)), "a 48x48 condition image is resized to 64x64 at 64px"),
        (((64, 64), (0, 32)), "must be positive sizes"),
    ],
)
def test_a_size_the_pipeline_would_change_is_one_line(world, tmp_path, sizes, message):
    with pytest.raises(ConfigError, match=message) as error:
        assets_lib.build_assets(_config(world, tmp_path / "cache", sizes=sizes), log=lambda *_: None)
    assert "\n" not in str(error.value)


def test_fit_crops_to_the_aspect_ratio_and_keeps_a_fitting_image():
    img = np.arange(45 * 140 * 3, dtype=np.uint8).reshape(45, 140, 3)
    assert edit_images.fit(img, 32, 96).shape == (32, 96, 3)
    fitting = img[:32, :96]
    assert edit_images.fit(fitting, 32, 96) is fitting
    assert edit_images.condition_size(IMAGE_SIZE, 45, 140) == (32, 128)  # the pipeline resizes, it does not crop
    assert edit_images.condition_size(IMAGE_SIZE, 32, 96) == (32, 96)
    assert edit_images.output_size(IMAGE_SIZE, SIZES) == (32, 96)


@pytest.mark.job
def test_full_scale_distillation_on_edits_with_two_condition_images(world, tmp_path):
    """Two student updates (critic and generator steps) on edits of two condition images of different sizes,
    fitted from image files of other sizes."""
    config = _config(world, tmp_path / "cache")
    history = []
    distill_job.distill(config, tmp_path / "run", history=history, log=lambda *_: None, evaluate=False)
    assert [step for step, _ in history] == [1, 2]
    assert all(np.isfinite(m["dmd_loss"]) and np.isfinite(m["fake_loss"]) and m["skipped"] == 0 for _, m in history)
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
