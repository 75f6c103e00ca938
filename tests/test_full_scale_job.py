"""The full-scale configuration end to end, shrunk: `configs/5to5.py` (not :toy) reads its Qwen3-VL text encoder
and tokenizer, VAE and teacher from local Hugging Face / converted directories, here tiny random ones, distils a
few steps on JSONL data and writes unscored sample grids (full scale has no toy judge)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from qwen_flash_jax import config_lib, distilled  # noqa: E402
from qwen_flash_jax.diffusion.scheduler import FlowMatchScheduler  # noqa: E402
from qwen_flash_jax.eval.generate import Generator  # noqa: E402
from qwen_flash_jax.models.config import ConfigError  # noqa: E402
from qwen_flash_jax.train import assets as assets_lib  # noqa: E402
from qwen_flash_jax.train import components, distill_job, jobs  # noqa: E402
from qwen_flash_jax.train import teacher as teacher_lib  # noqa: E402
from tests import qwen_image_folder as folder_lib  # noqa: E402

pytestmark = pytest.mark.job

TEXT_WIDTH = 32
LATENT_CHANNELS = 8
IMAGE_SIZE = 64  # pixels: 4x4 latents at the VAE's 16x compression
CAPTIONS = ["a red house by a lake", "a portrait of a smiling man", "a sign reading OPEN", "a dark forest"]
INSTRUCTIONS = ["make the sky green", "remove the tree", "add a hat", "turn it into a sketch"]


def _text_encoder_dir(path):
    """A tiny random Qwen3-VL with a toy Qwen-style tokenizer saved beside it (ids of the vision tokens aligned)."""
    model, tok = folder_lib.tiny_qwen3_vl(CAPTIONS + INSTRUCTIONS)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # The processor's pixel limits admit the tiny 64px condition images (the published ones start at 256x256).
    (path / "preprocessor_config.json").write_text(json.dumps(folder_lib.IMAGE_PROCESSOR))
    return path


def _vae_dir(path):
    from diffusers import AutoencoderKLQwenImage21

    vae = AutoencoderKLQwenImage21(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        patch_size=2,
        in_channels=16,
        out_channels=16,
        latents_mean=[0.1] * LATENT_CHANNELS,
        latents_std=[1.5] * LATENT_CHANNELS,
        scale_factor_spatial=16,
    )
    folder_lib.randomise(vae.eval(), 1).save_pretrained(path)
    return path


def _teacher_dir(tmp_path):
    from diffusers import QwenImage21Transformer2DModel

    from qwen_flash_jax.convert import convert

    model = QwenImage21Transformer2DModel(
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        context_in_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),
    )
    folder_lib.randomise(model.eval(), 2).save_pretrained(tmp_path / "transformer")
    convert(tmp_path / "transformer", tmp_path / "teacher", dtype="float32", progress=False)
    return tmp_path / "teacher"


def _data(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)).save(tmp_path / f"{i}.png")
    cats = ["landscape", "portrait", "text", "landscape"]
    (tmp_path / "t2i.jsonl").write_text(
        "".join(json.dumps({"prompt": c, "category": cat}) + "\n" for c, cat in zip(CAPTIONS, cats))
    )
    edit_cats = ["scene", "object", "identity", "style"]
    (tmp_path / "edit.jsonl").write_text(
        "".join(
            json.dumps({"instruction": t, "category": cat, "source": f"{i}.png", "target": f"{(i + 1) % 4}.png"}) + "\n"
            for i, (t, cat) in enumerate(zip(INSTRUCTIONS, edit_cats))
        )
    )
    return tmp_path / "t2i.jsonl", tmp_path / "edit.jsonl"


def _with_scheduler(teacher, folder, scheduler=folder_lib.SCHEDULER, **index):
    """A copy of the converted `teacher` holding a pipeline's `scheduler/` (and `model_index.json` fields)."""
    import shutil

    shutil.copytree(teacher, folder)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    if index:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline", **index}))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_scale")
    (root / "text_encoder").mkdir()
    teacher = _teacher_dir(root)
    return dict(
        text_encoder=_text_encoder_dir(root / "text_encoder"),
        vae=_vae_dir(root / "vae"),
        teacher=teacher,
        # The tiny pipeline's scheduler (tests/qwen_image_folder.py: anchors 16 -> 0.4 and 8192 -> 0.9, terminal
        # stretch to 0.02) beside the converted weights, as a teacher converted from that pipeline carries it.
        pipeline_teacher=_with_scheduler(teacher, root / "pipeline_teacher"),
        data=_data(root),
    )


# The job's programs over the 8 emulated devices with replicated parameters. XLA:CPU runs a loop that holds
# collectives (fsdp's weight all-gathers inside a layer scan) and a collective that no data orders against it in
# either order, per device, and a device waiting in one for devices waiting in the other hangs forever: this test
# hung so in CI. With the batch alone sharded no loop holds a collective (checked on the compiled steps).
DATA_PARALLEL = (("data", -1), ("fsdp", 1), ("tensor", 1))


def full_config(checkpoints, cache_dir, ratio="1:0", teacher="teacher"):
    """configs/5to5.py at full scale with every size shrunk to the tiny checkpoints; `teacher`: the checkpoint
    both teachers load ("pipeline_teacher": the one that carries its pipeline's scheduler)."""
    config = config_lib.load_config("configs/5to5.py")
    config.cache_dir = str(cache_dir)
    config.model.update(
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        context_in_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),
        dtype="float32",
        remat_policy="none",
    )
    config.text_encoder.path = str(checkpoints["text_encoder"])
    config.codec.path = str(checkpoints["vae"])
    for name in ("base", "text"):
        config.teachers[name].path = str(checkpoints[teacher])
    t2i, edit = checkpoints["data"]
    config.data.update(
        image_size=IMAGE_SIZE,
        t2i_jsonl=str(t2i),
        edit_jsonl=str(edit),
        batch_size=8,
        max_prompt_tokens=64,
        edit_prompt_tokens=80,
        task_ratio=ratio,
    )
    config.data.edit_weights = dict(scene=1.0, enhance=0.0, object=1.0, text_edit=0.0, identity=1.0, style=1.0)
    config.train.update(steps=2, log_every=1, checkpoint_every=1)
    config.fake_score.updates_per_student = 1
    config.sampling.teacher_steps = 3
    config.eval.unjudged_samples = 3
    return config


@pytest.mark.sharded
def test_full_scale_distillation_runs_from_local_checkpoints(checkpoints, tmp_path):
    """T2I and edit batches (1:1): edits read their condition images through the vision tower and the VAE; the
    schedule is the teachers' pipeline's, the guidance the full-scale default (none: 1 NFE per teacher step)."""
    config = full_config(checkpoints, tmp_path / "cache", ratio="1:1", teacher="pipeline_teacher")
    config.mesh.axes = DATA_PARALLEL
    history = []
    distill_job.distill(config, tmp_path / "run", history=history, log=lambda *_: None)
    assert [step for step, _ in history] == [1, 2]
    assert all(np.isfinite(m["dmd_loss"]) and m["skipped"] == 0 for _, m in history)
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["scored"] is False and results["t2i_prompts"] == CAPTIONS[:3]
    assert sorted(results["edit_instructions"]) == sorted(INSTRUCTIONS[:3])  # one per category
    assert [m["nfe"] for m in results["models"]] == [3, 4, 4]  # teacher 3 and 4 steps (CFG 1), student 4
    t2i = np.asarray(Image.open(tmp_path / "run" / "grid_t2i.png"))
    edit = np.asarray(Image.open(tmp_path / "run" / "grid_edit.png"))
    assert t2i.shape[1] == edit.shape[1] and t2i.shape[0] < edit.shape[0]  # 3 columns; 3 rows, sources + 3 rows
    assert t2i.std() > 0 and edit.std() > 0


def test_edit_conditioning_depends_on_the_condition_image(checkpoints, tmp_path):
    """The vision tower is really in the loop: other source pixels, other prompt states (same tokens)."""
    import jax
    import jax.numpy as jnp

    from qwen_flash_jax.diffusion import conditioning

    config = full_config(checkpoints, tmp_path / "cache", ratio="1:1")
    config.mesh.axes = DATA_PARALLEL
    assets = assets_lib.build_assets(config, log=lambda *_: None)
    spec = assets.tasks["edit"]
    ids, mask = assets.prompts("make the sky green", [16 // 4])
    ids, mask = jnp.asarray(ids[None].repeat(2, 0)), jnp.asarray(mask[None].repeat(2, 0))
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
    latents = jnp.zeros((2, 16, LATENT_CHANNELS))

    # Inside jit, as the steps call it (eagerly, every op would be a program of its own).
    @jax.jit
    def states(te_params, pixels):
        return conditioning.encode(te_params, spec, ids, mask, latents, pixels).encoder_hidden_states

    hidden = np.asarray(states(assets.text_encoder, pixels))
    assert np.abs(hidden[0] - hidden[1]).max() > 1e-3
    np.testing.assert_allclose(np.asarray(states(assets.text_encoder, pixels[::-1]))[::-1], hidden, atol=1e-5)
    with pytest.raises(ValueError, match="needs the condition images' pixels"):
        conditioning.encode(assets.text_encoder, spec, ids, mask, latents)


@pytest.mark.sharded
def test_the_tokenizer_and_text_encoder_are_the_qwen3_vl_ones(checkpoints, tmp_path):
    config = full_config(checkpoints, tmp_path / "cache")
    assets = assets_lib.build_assets(config, log=lambda *_: None)
    assert type(assets.codec).__name__ == "VAECodec" and assets.codec.scale_factor == 16
    assert assets.tasks["t2i"].latent_hw == (4, 4)
    assert assets.text_encoder.text.config.hidden_size == TEXT_WIDTH and assets.condition_pixels
    assert assets.tasks["edit"].vision_grid == (4, 4) and assets.tasks["t2i"].vision_grid is None
    # Loaded straight into shardings on the 8-device mesh (fsdp over the embedding axis), not onto one device.
    import jax

    leaves = jax.tree.leaves(assets.text_encoder)
    assert all(len(leaf.sharding.device_set) == 8 for leaf in leaves)
    assert sum(not leaf.sharding.is_fully_replicated for leaf in leaves) >= 10
    ids = assets.tokenizer.encode("a red house", add_special_tokens=False)
    assert ids and max(ids) < 300


def _set_field(config, field: str, value):
    """config.<field> = value, `field` dotted ("teachers.base.path")."""
    section, name = field.rsplit(".", 1)
    node = config
    for part in section.split("."):
        node = node[part]
    node[name] = value


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("text_encoder.path", "", "text_encoder.path is not set"),
        ("text_encoder.path", "/nonexistent/te", "text_encoder.path='/nonexistent/te' is not a directory"),
        ("codec.path", "/nonexistent/vae", "codec.path='/nonexistent/vae' is not a directory"),
        ("codec.kind", "jpeg", "codec.kind must be one of"),
        ("teachers.base.path", "/nonexistent/teacher", "holds no teacher checkpoint"),
        pytest.param(
            "data.batch_size", 6, "data.batch_size=6 does not split over the 8 devices", marks=pytest.mark.sharded
        ),
        ("data.image_size", 48, "data.image_size=48: image size 48x48 gives 3x3 latents"),
        ("model.num_layers", 3, "holds a different transformer: num_layers=2 (config: 3)"),
        ("model.context_in_dim", 48, "hidden size 32 != model.context_in_dim 48"),
        ("model.in_channels", 16, "codec gives 8 latent channels but model.in_channels=16"),
    ],
)
def test_a_bad_full_scale_config_is_one_line_before_any_work(checkpoints, tmp_path, field, value, message):
    config = full_config(checkpoints, tmp_path / "cache")
    _set_field(config, field, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        if field in ("model.context_in_dim", "model.in_channels", "data.image_size"):
            assets_lib.build_assets(config, log=lambda *_: None)
        else:
            jobs.run(config, tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def _schedules(config):
    """(the student's times, the teachers' 3-step and 40-step sampling sigmas) as the job and the export get them."""
    mu = teacher_lib.target_mu(config)
    gen = Generator(None, None, mu, scheduler=teacher_lib.target_scheduler(config))
    student = components.distill_setup(config, None, mu).timesteps
    assert distilled.student_schedule(config).timesteps == student  # the export's sample_sigmas
    return np.asarray(student, np.float32), *(np.asarray(gen._sigmas(n, False), np.float32) for n in (3, 40))


def test_the_schedule_comes_from_the_teachers_pipeline_folder(checkpoints, tmp_path):
    """Student times and teacher sigmas are FlowMatchScheduler.from_pretrained(folder)'s for the target's 16 tokens
    (shift anchors and terminal stretch of the tiny pipeline), not the config's constants; `sampling.scheduler`
    names the folder explicitly."""
    tokens = (IMAGE_SIZE // 16) ** 2
    folder = checkpoints["pipeline_teacher"]
    pipeline = FlowMatchScheduler.from_pretrained(folder)
    expected = (pipeline.sigmas(4, tokens)[:-1], pipeline.sigmas(3, tokens), pipeline.sigmas(40, tokens))
    config = full_config(checkpoints, tmp_path / "cache", teacher="pipeline_teacher")
    assert teacher_lib.schedule_folder(config) == folder
    for got, want in zip(_schedules(config), expected):
        np.testing.assert_array_equal(got, want)
    assert expected[1][-2] == pytest.approx(0.02)  # the terminal stretch

    plain = full_config(checkpoints, tmp_path / "cache")  # converted checkpoints without a scheduler
    s = plain.sampling
    constants = FlowMatchScheduler.dynamic(s.base_seq_len, s.max_seq_len, s.base_shift, s.max_shift)
    assert teacher_lib.schedule_folder(plain) is None
    np.testing.assert_array_equal(_schedules(plain)[0], constants.sigmas(4, tokens)[:-1])
    assert np.abs(_schedules(plain)[0] - expected[0]).max() > 0.1

    plain.sampling.scheduler = str(folder)
    for got, want in zip(_schedules(plain), expected):
        np.testing.assert_array_equal(got, want)


def test_a_bad_schedule_folder_is_one_line_before_any_work(checkpoints, tmp_path):
    other = dict(folder_lib.SCHEDULER, max_shift=1.3)
    fixed = str(_with_scheduler(checkpoints["teacher"], tmp_path / "fixed", sample_sigmas=[1.0, 0.5]))
    cases = [
        ({"sampling.scheduler": str(checkpoints["teacher"])}, "holds no scheduler/scheduler_config.json"),
        (
            {"teachers.text.path": str(_with_scheduler(checkpoints["teacher"], tmp_path / "other", other))},
            "teachers base, text ship different schedulers; set sampling.scheduler",
        ),
        ({"teachers.base.path": fixed, "teachers.text.path": fixed}, "fixes sample_sigmas"),
    ]
    for fields, message in cases:
        config = full_config(checkpoints, tmp_path / "cache", teacher="pipeline_teacher")
        for field, value in fields.items():
            _set_field(config, field, value)
        with pytest.raises(ConfigError, match=message) as error:
            jobs.run(config, tmp_path / "run")
        assert "\n" not in str(error.value)
        assert not (tmp_path / "run").exists()


def test_frozen_networks_are_kept_in_bfloat16_and_the_student_starts_at_full_precision(checkpoints, tmp_path):
    """At the full-scale compute dtype (bfloat16) the guiding teachers, text encoder and VAE are stored in it; the
    student and fake score start from the float32 teacher, each teacher copy being that teacher rounded."""
    import jax
    import jax.numpy as jnp

    config = full_config(checkpoints, tmp_path / "cache")
    config.model.dtype = "bfloat16"
    parts = components.build(config, log=lambda *_: None)
    for name, params in parts.teachers.items():
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}, name
    assert {x.dtype for x in jax.tree.leaves(parts.base)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(parts.fake_init)} == {jnp.dtype("float32")}
    jax.tree.map(
        lambda t, b: np.testing.assert_array_equal(np.asarray(t), np.asarray(b.astype(jnp.bfloat16))),
        parts.teachers[config.student.init_from],
        parts.base,
    )
    floats = [x for x in jax.tree.leaves(parts.assets.text_encoder) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {jnp.dtype("bfloat16")}
