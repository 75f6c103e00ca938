"""Edits with several condition images of different sizes, in training as `qwen_flash_jax.Pipeline` samples them,
on the tiny random Qwen-Image 2.1 pipeline (tests/qwen_image_folder.py): `data.edit_layouts` lays every edit out as
the pipeline lays out the same images (one implementation: `diffusion.conditioning.token_layout` and
`data.edit_images`), edits of several layouts share one run (one layout per batch), and the full-scale distillation
trains on them."""

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
LAYOUTS = (SIZES, ((64, 64),))  # the two-image edits, and the one-image ones
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
        {"instruction": INSTRUCTIONS[1], "category": "scene", "source": "2.png"},  # one image: the second layout
        {"instruction": INSTRUCTIONS[0], "category": "object", "source": ["5.png"], "target": "2.png"},
    ]
    (root / "edit.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return dict(folder=folder, teacher=root / "teacher", edit=root / "edit.jsonl")


def _config(world, cache_dir, layouts=LAYOUTS):
    """configs/5to5.py at full scale on the tiny pipeline, edits only, in `layouts`."""
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
        edit_layouts=layouts,
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
    assets = assets_lib.build_assets(_config(world, tmp_path / "cache", layouts=()), log=lambda *_: None)
    vision = assets.text_encoder.vision.config
    spec = conditioning.edit_spec(assets.prompts, assets.codec, IMAGE_SIZE, [(IMAGE_SIZE, IMAGE_SIZE)], vision)
    default = assets.tasks["edit"]
    assert spec.layout == default.layout and spec.latent_hw == default.latent_hw
    assert spec.vision_grids == (default.vision_grid,) and assets.eval_tasks is assets.tasks


@pytest.mark.parametrize(
    "sizes, message",
    [
        (((64, 64), (48, 48)), "layout .*: a 48x48 condition image is resized to 64x64 at 64px"),
        (((64, 64), (0, 32)), "must hold positive sizes"),
    ],
)
def test_a_size_the_pipeline_would_change_is_one_line(world, tmp_path, sizes, message):
    with pytest.raises(ConfigError, match=message) as error:
        assets_lib.build_assets(_config(world, tmp_path / "cache", layouts=(sizes,)), log=lambda *_: None)
    assert "\n" not in str(error.value)


def test_fit_crops_to_the_aspect_ratio_and_keeps_a_fitting_image():
    img = np.arange(45 * 140 * 3, dtype=np.uint8).reshape(45, 140, 3)
    assert edit_images.fit(img, 32, 96).shape == (32, 96, 3)
    fitting = img[:32, :96]
    assert edit_images.fit(fitting, 32, 96) is fitting
    assert edit_images.condition_size(IMAGE_SIZE, 45, 140) == (32, 128)  # the pipeline resizes, it does not crop
    assert edit_images.condition_size(IMAGE_SIZE, 32, 96) == (32, 96)
    assert edit_images.output_size(IMAGE_SIZE, SIZES) == (32, 96)


def _batches(config, assets, **kwargs):
    return iter(
        pipeline_lib.build_pipeline(
            config.data, assets.sources, assets.tokenizer, assets.codec, condition_pixels=True, **kwargs
        )
    )


def test_the_edit_batches_hold_one_layout_each_in_proportion_to_its_records_and_resume(world, tmp_path):
    """Two-image records take the first layout, one-image records the second; each batch holds one layout, shaped
    as its TaskSpec says, and the layouts share the batches as the records do per category (scene 2 of 3 in the first,
    object 1 of 2, equal weights: 7/12 of the batches). A restored iterator continues the same stream."""
    config = _config(world, tmp_path / "cache")
    assets = assets_lib.build_assets(config, log=lambda *_: None)
    second = assets.tasks["edit:1"]
    assert second.condition_sizes == ((64, 64),) and second.latent_hw == (4, 4) and second.task == "edit"
    batches = _batches(config, assets)
    keys = []
    for _ in range(12):
        batch = next(batches)
        spec = assets.tasks[batch["task"]]
        keys.append(batch["task"])
        assert batch["condition_latents"].shape[1] == sum(h * w for h, w in spec.condition_shapes)
        assert batch["target_latents"].shape[1] == spec.target_tokens
        assert batch["condition_pixels"].shape[1] == sum(h * w for h, w in spec.condition_sizes)
    assert keys.count("edit") == 7 and keys.count("edit:1") == 5, keys
    state = batches.get_state()
    expected = [next(batches) for _ in range(3)]
    restored = _batches(config, assets)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert got["task"] == want["task"]
        for k in ("input_ids", "condition_latents", "target_latents"):
            np.testing.assert_array_equal(got[k], want[k])


def test_inspect_counts_the_layouts_and_draws_each_condition_image(world, tmp_path):
    from qwen_flash_jax.train import inspect_batches

    config = _config(world, tmp_path / "cache")
    lines = []
    totals = inspect_batches.inspect(config, batches=4, out=str(tmp_path / "sheet.png"), log=lines.append)
    assert totals["edit"] == 4 and 0 < totals["edit:1"] < 4, totals
    assert any("(of which edit:1=" in line for line in lines), lines
    # Batch 0 is of the first layout: per example its 64x64 and 32x96 condition images and its 32x96 target, side by
    # side (3 columns of 1-pixel gaps), in a contact sheet scaled 3x.
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape[0] >= 3 * 64 and sheet.shape[1] >= 3 * (64 + 96 + 96 + 2) and sheet.std() > 0


def test_the_sample_grids_show_the_one_image_edits_cropped_square(world, tmp_path):
    """The unjudged grids sample edits from one square source: with layouts, each category's one-image records,
    centre-cropped (the 80x80 scene source resized, the 70x60 object source cropped to 60x60 first)."""
    config = _config(world, tmp_path / "cache")
    assets = assets_lib.build_assets(config, log=lambda *_: None)
    captions, edits = distill_job._sample_prompts(config, assets.sources, 4)
    by_text = {text: image for image, text in edits}
    assert captions == [] and len(edits) == 2 and set(by_text) == {INSTRUCTIONS[1], INSTRUCTIONS[0]}
    scene, obj = assets.sources["edit"]["scene"][2]["source"], assets.sources["edit"]["object"][1]["source"][0]
    np.testing.assert_array_equal(by_text[INSTRUCTIONS[1]], edit_images.fit(scene, IMAGE_SIZE, IMAGE_SIZE))
    np.testing.assert_array_equal(by_text[INSTRUCTIONS[0]], edit_images.fit(obj[5:65], IMAGE_SIZE, IMAGE_SIZE))


def test_a_record_no_layout_takes_is_one_line_or_left_out(world, tmp_path):
    config = _config(world, tmp_path / "cache", layouts=(SIZES,))
    assets = assets_lib.build_assets(config, log=lambda *_: None)
    with pytest.raises(
        ConfigError, match=r"takes \(layouts of \[2\] images\): scene 1 record of 1 image, object 1 record of 1 image"
    ) as e:
        _batches(config, assets)
    assert "\n" not in str(e.value)
    config.data.on_bad_record = "skip"
    batches = _batches(config, assets)
    assert {next(batches)["task"] for _ in range(4)} == {"edit"}


def test_precomputed_states_are_stored_per_layout_and_reach_the_batches(world, tmp_path):
    """With `data.precompute_text` each category's records are encoded in their own layout, into one folder per
    layout, and the batches of each layout carry their records' states."""
    from qwen_flash_jax.data import text_states as store_lib
    from qwen_flash_jax.train import text_states

    config = _config(world, tmp_path / "cache")
    config.data.precompute_text = True
    assets = assets_lib.build_assets(config, log=lambda *_: None)
    folder = text_states.ensure_store(config, assets, log=lambda *_: None)
    parts = sorted(str(p.relative_to(folder)) for p in folder.glob("edit/*/*") if store_lib.is_complete(p))
    assert parts == ["edit/object/layout0", "edit/object/layout1", "edit/scene/layout0", "edit/scene/layout1"]
    stored = store_lib.CategoryStates(folder / "edit" / "scene" / "layout1")
    assert len(stored) == 1  # the one-image scene record, the category's third
    record = assets.sources["edit"]["scene"][2]
    example = pipeline_lib.Preprocess("edit", assets.prompts, assets.codec, IMAGE_SIZE, LAYOUTS[1])(record)
    batch = pipeline_lib.EncodeImages(assets.codec, condition_pixels=True)({k: v[None] for k, v in example.items()})
    cond = conditioning.batch_conditioning(assets.text_encoder, assets.tasks["edit:1"], batch)
    mask = np.asarray(cond.encoder_hidden_states_mask)[0].astype(bool)
    np.testing.assert_allclose(stored.states(0), np.asarray(cond.encoder_hidden_states)[0][mask], atol=1e-5)

    batches = _batches(config, assets, text_states=folder)
    batch = next(b for b in (next(batches) for _ in range(6)) if b["task"] == "edit:1")
    for states, valid, ids in zip(batch["prompt_embeds"], batch["prompt_embeds_mask"], batch["input_ids"]):
        # Each row holds the states of the record its prompt is (scene's one record, or object's).
        category = "scene" if np.array_equal(ids, example["input_ids"]) else "object"
        np.testing.assert_array_equal(
            states[valid.astype(bool)], store_lib.CategoryStates(folder / "edit" / category / "layout1").states(0)
        )


@pytest.mark.job
def test_full_scale_distillation_on_edits_of_two_layouts(world, tmp_path, monkeypatch):
    """Two student updates (critic and generator steps) on edits of two layouts: two condition images of different
    sizes, and one, fitted from image files of other sizes; both layouts' steps run."""
    from qwen_flash_jax.train import components

    seen = []
    jitted = components.jitted_steps

    def recording(*args, **kwargs):
        critic, generator = jitted(*args, **kwargs)

        def critic_seen(*a, spec, **k):
            seen.append(spec.condition_sizes)
            return critic(*a, spec=spec, **k)

        def generator_seen(*a, spec, **k):
            seen.append(spec.condition_sizes)
            return generator(*a, spec=spec, **k)

        return critic_seen, generator_seen

    monkeypatch.setattr(components, "jitted_steps", recording)
    config = _config(world, tmp_path / "cache")
    history = []
    distill_job.distill(config, tmp_path / "run", history=history, log=lambda *_: None, evaluate=False)
    assert [step for step, _ in history] == [1, 2]
    assert all(np.isfinite(m["dmd_loss"]) and np.isfinite(m["fake_loss"]) and m["skipped"] == 0 for _, m in history)
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert set(seen) == set(LAYOUTS), seen
