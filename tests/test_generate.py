"""`python -m qwen_flash_jax.generate`: PNGs and manifest.jsonl from a toy training workdir's student, and bad input
as one line, exit status 2 and no output folder."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from qwen_flash_jax import config_lib, generate
from qwen_flash_jax.eval.generate import GridSection, grid_image
from qwen_flash_jax.loading import build_transformer
from qwen_flash_jax.models.config import TransformerConfig
from qwen_flash_jax.train import teacher
from tests import qwen_image_folder as folder_lib
from tests.helpers import config_overrides, tiny_distill_config

TOY_PROMPTS = ["a bright landscape with a red sun", "a portrait of a woman with short hair"]


@pytest.fixture(scope="module")
def toy_run(toy_cache, tmp_path_factory):
    """A toy workdir of the tiny world (tests/helpers.py) and the `--config` arguments that rebuild its config.

    Its checkpoint is the state the distillation job saves (`DistillState` through the job's `Checkpointer`),
    with the tiny base teacher plus a small change as the student and its EMA: compiling two DMD updates would
    cost minutes, and what generate reads is the checkpoint's layout, not the training."""
    config = tiny_distill_config(toy_cache)
    base = jax.device_get(teacher.ensure_teacher(config, "base", log=lambda *_: None))
    workdir = tmp_path_factory.mktemp("toy_run") / "run"
    folder_lib.training_workdir(workdir, folder_lib.perturbed(base, 1, 0.01), folder_lib.perturbed(base, 2, 0.01))
    overrides = config_overrides(config, config_lib.load_config("configs/teacher.py:toy"))
    args = ["--config=configs/teacher.py:toy", *(f"--config.{o}" for o in overrides)]
    return workdir, args, int(config.data.image_size)


def _run(argv, capsys):
    capsys.readouterr()
    try:
        generate.main([*argv, "--quiet"])
    except SystemExit as e:
        return e.code, capsys.readouterr().err.strip()
    return 0, capsys.readouterr().err.strip()


@pytest.mark.job
def test_a_toy_workdirs_student_makes_the_prompts_pngs_and_manifest(toy_run, tmp_path, capsys):
    workdir, config_args, size = toy_run
    argv = ["--workdir", str(workdir), *config_args, "--out", str(tmp_path / "out"), "--seed", "3"]
    code, err = _run([*argv, *(x for p in TOY_PROMPTS for x in ("--prompt", p))], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == TOY_PROMPTS
    for line in lines:
        assert set(line) == {"id", "model", "prompt", "image", "steps", "seed"}
        assert line["steps"] == 4 and line["seed"] == 3 and "student" in line["model"]
        image = np.asarray(Image.open(tmp_path / "out" / line["image"]))
        assert image.shape == (size, size, 3) and image.std() > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [*(x["image"] for x in lines), "manifest.jsonl", "overview.png"]
    )
    # overview.png: the prompts over the student's images, in input order.
    images = [np.asarray(Image.open(tmp_path / "out" / x["image"])) for x in lines]
    expected = grid_image([GridSection("T2I", TOY_PROMPTS, [(lines[0]["model"], images)])])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "overview.png")), expected)


@pytest.mark.job
def test_edits_from_a_jsonl_carry_instruction_source_and_category(toy_run, tmp_path, capsys):
    workdir, config_args, size = toy_run
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(tmp_path / "src.png")
    requests = [
        {"id": "edit-a", "instruction": "make the sky green", "source": "src.png", "category": "scene"},
        {"id": "t2i-a", "prompt": TOY_PROMPTS[0], "category": "landscape"},
    ]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    out = tmp_path / "out"
    argv = ["--workdir", str(workdir), *config_args, "--jsonl", str(tmp_path / "requests.jsonl"), "--out", str(out)]
    code, err = _run([*argv, "--batch", "1"], capsys)
    assert code == 0, err
    lines = {x["id"]: x for x in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert lines["edit-a"]["instruction"] == "make the sky green" and lines["edit-a"]["source"] == "src.png"
    assert lines["edit-a"]["category"] == "scene" and "prompt" not in lines["edit-a"]
    assert lines["t2i-a"]["category"] == "landscape" and "instruction" not in lines["t2i-a"]
    assert lines["t2i-a"]["seed"] != lines["edit-a"]["seed"]  # one batch each (--batch 1)
    assert np.asarray(Image.open(out / lines["edit-a"]["image"])).shape == (size, size, 3)
    # overview.png: the T2I block, then the edit's source above its output.
    image = {k: np.asarray(Image.open(out / x["image"])) for k, x in lines.items()}
    model = lines["edit-a"]["model"]
    expected = grid_image(
        [
            GridSection("T2I", [TOY_PROMPTS[0]], [(model, [image["t2i-a"]])]),
            GridSection(
                "edits",
                ["make the sky green"],
                [("source 1", [np.asarray(Image.open(tmp_path / "src.png"))]), (model, [image["edit-a"]])],
            ),
        ]
    )[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "overview.png")), expected)


@pytest.mark.job
def test_a_prompt_longer_than_the_encoder_allows_is_one_line(toy_run, tmp_path, capsys):
    workdir, config_args, _ = toy_run
    argv = ["--workdir", str(workdir), *config_args, "--out", str(tmp_path / "out")]
    code, err = _run([*argv, "--prompt", TOY_PROMPTS[0], "--prompt", " ".join(["a red sun"] * 60)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "data.max_prompt_tokens is 80" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A distillation workdir of a tiny transformer and pipeline folders that hold only what is checked before a
    model is loaded (the index, the component folders, the transformer's and scheduler's configs)."""
    root = tmp_path_factory.mktemp("generate_inputs")
    config = TransformerConfig(**folder_lib.TRANSFORMER)
    workdir = folder_lib.training_workdir(root / "run", build_transformer(config).params)
    folders = {}
    for name, transformer_class, components in [
        ("pipeline", config.to_diffusers_config()["_class_name"], ("vae", "text_encoder", "processor")),
        ("flux", "FluxTransformer2DModel", ("vae", "text_encoder", "processor")),
        ("no_vae", config.to_diffusers_config()["_class_name"], ("text_encoder", "processor")),
    ]:
        folder = root / name
        for component in (*components, "transformer", "scheduler"):
            (folder / component).mkdir(parents=True)
        index = {"_class_name": "QwenImage21Pipeline", "transformer": ["diffusers", "QwenImage21Transformer2DModel"]}
        index.update({c: ["x", "y"] for c in ("vae", "text_encoder", "processor", "scheduler")})
        (folder / "model_index.json").write_text(json.dumps(index))
        transformer = {**config.to_diffusers_config(), "_class_name": transformer_class}
        (folder / "transformer" / "config.json").write_text(json.dumps(transformer))
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(folder_lib.SCHEDULER))
        folders[name] = folder
    (root / "garbage.png").write_bytes(b"not an image")
    (root / "edits.jsonl").write_text(json.dumps({"instruction": "add a hat", "source": "garbage.png"}) + "\n")
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32)).save(root / name)
    (root / "pair.jsonl").write_text(json.dumps({"instruction": "add a hat", "source": ["a.png", "b.png"]}) + "\n")
    return dict(root=root, workdir=workdir, **folders)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing workdir", "does not exist or is not a directory"),
        ("missing pipeline folder", "does not exist or is not a directory"),
        ("pipeline folder missing a component", "lacks the component folder(s) vae"),
        ("wrong model class", "describes a FluxTransformer2DModel, not a QwenImage21Transformer2DModel"),
        ("unreadable image", "cannot read source image"),
        ("size the model cannot take", "samples 1024x1024 images only"),
        ("missing jsonl", "does not exist or is not a file"),
        ("bad size", "--size must be H or HxW"),
        ("student steps", "samples in its own 4 steps, not 8"),
        ("several sources for a workdir", "edits from one source image, not 2; export it"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(fake_run, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    model = ["--workdir", str(fake_run["workdir"])]
    inputs = ["--prompt", "a red house"]
    extra = []
    if case == "missing workdir":
        model = ["--workdir", str(tmp_path / "nope")]
    elif case == "missing pipeline folder":
        model = ["--pipeline", str(tmp_path / "nope")]
    elif case == "pipeline folder missing a component":
        model = ["--pipeline", str(fake_run["no_vae"])]
    elif case == "wrong model class":
        model = ["--pipeline", str(fake_run["flux"])]
    elif case == "unreadable image":
        inputs = ["--jsonl", str(fake_run["root"] / "edits.jsonl")]
    elif case == "size the model cannot take":
        extra = ["--size", "48"]
    elif case == "missing jsonl":
        inputs = ["--jsonl", str(tmp_path / "nope.jsonl")]
    elif case == "bad size":
        extra = ["--size", "big"]
    elif case == "student steps":
        extra = ["--steps", "8"]
    elif case == "several sources for a workdir":
        inputs = ["--jsonl", str(fake_run["root"] / "pair.jsonl")]
    code, err = _run([*model, *inputs, "--out", str(out), *extra], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.job
def test_an_output_folder_that_cannot_be_written_is_one_line_before_sampling(toy_run, tmp_path, capsys):
    workdir, config_args, _ = toy_run
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out"
    code, err = _run(["--workdir", str(workdir), *config_args, "--out", str(out), "--prompt", TOY_PROMPTS[0]], capsys)
    assert code == 2 and err == f"error: --out {out}: cannot write there: {tmp_path / 'a_file'} is not a directory", err


@pytest.mark.job
def test_a_configs_teacher_samples_its_steps_with_cfg(toy_run, tmp_path, capsys):
    _, config_args, size = toy_run
    argv = ["--teacher", "base", *config_args, "--out", str(tmp_path / "out"), "--steps", "2", "--cfg", "2"]
    code, err = _run([*argv, "--prompt", TOY_PROMPTS[0]], capsys)
    assert code == 0, err
    (line,) = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert line["model"] == "teacher base" and line["steps"] == 2
    assert np.asarray(Image.open(tmp_path / "out" / line["image"])).shape == (size, size, 3)


@pytest.mark.job
def test_an_exported_students_pipeline_folder_makes_pngs_of_the_asked_size(tmp_path, capsys, monkeypatch):
    pytest.importorskip("diffusers")
    _, student = folder_lib.exported_student(tmp_path)
    monkeypatch.setattr(generate, "OVERVIEW_REQUESTS", 1)  # overview.png shows the first request only
    argv = ["--pipeline", str(student), "--dtype", "float32", "--size", "64x96", "--out"]
    code, err = _run([*argv, str(tmp_path / "out"), "--prompt", "a red house", "--prompt", "a dark forest"], capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["a red house", "a dark forest"] and {x["steps"] for x in lines} == {4}
    for line in lines:
        assert np.asarray(Image.open(tmp_path / "out" / line["image"])).shape[:2] == (64, 96)
    first = np.asarray(Image.open(tmp_path / "out" / lines[0]["image"]).convert("RGB"))
    expected = grid_image([GridSection("T2I", ["a red house"], [(lines[0]["model"], [first])])])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "overview.png")), expected)
    # A 1:2 source resized to about 1024**2 pixels (736x1440) is more than the tiny processor's 1024**2 largest.
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "edits.jsonl").write_text(json.dumps({"instruction": "add a hat", "source": "wide.png"}) + "\n")
    code, err = _run([*argv, str(tmp_path / "out_edit"), "--jsonl", str(tmp_path / "edits.jsonl")], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: condition image 1, resized for the pipeline: image of 736x1440") and "1048576" in err
    assert not (tmp_path / "out_edit").exists()


def test_overview_blocks_shrink_large_images_and_leave_missing_sources_empty():
    Request = generate.Request
    rng = np.random.default_rng(0)
    t2i = [Request(f"t{i}", f"prompt {i}") for i in range(generate.OVERVIEW_COLUMNS + 1)]
    edits = [Request("e0", "two sources", ("a.png", "b.png")), Request("e1", "one source", ("c.png",))]
    images = {r.id: rng.integers(0, 256, (600, 300, 3), np.uint8) for r in t2i + edits}
    sources = {"e0": [Image.new("RGB", (40, 20)), Image.new("RGBA", (20, 40))], "e1": [Image.new("RGB", (8, 8))]}
    sections = generate.overview_sections(t2i[:3] + edits[:1] + t2i[3:] + edits[1:], images, sources, "model")
    assert [(s.title, len(s.columns)) for s in sections] == [("T2I", 8), ("", 1), ("edits", 2)]
    assert [c for s in sections[:2] for c in s.columns] == [r.text for r in t2i]  # input order within a task
    (name, shrunk), *_ = sections[0].rows
    assert name == "model" and shrunk[0].shape == (256, 128, 3)  # the longer side to OVERVIEW_SIDE
    rows = dict(sections[2].rows)
    assert list(rows) == ["source 1", "source 2", "model"]
    assert rows["source 1"][0].shape == (20, 40, 3) and rows["source 2"][0].shape == (40, 20, 3)  # RGBA -> RGB
    assert rows["source 2"][1].shape == (1, 1, 3) and (rows["source 2"][1] == 255).all()  # e1 has one source
    assert grid_image(sections)[0].ndim == 3
