"""Every notebook in notebooks/ executed through a Jupyter kernel (nbclient), on the tiny toy world or tiny random
pipeline folders (tests/qwen_image_folder.py), so that none can rot: its parameters cell (tagged "parameters") is
overridden by a cell inserted after it, as papermill does, and a cell that raises fails the test. The kernel is a
separate process: it runs JAX on one CPU device, and shares this test run's toy cache and compilation cache through
the environment (tests/conftest.py)."""

import os
import pathlib

import jax
import nbclient
import nbformat
import pytest

from qwen_flash_jax import config_lib
from qwen_flash_jax.train import teacher
from tests import qwen_image_folder as folder_lib
from tests.helpers import config_overrides, tiny_distill_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
TINY_BASE = "configs/teacher.py:toy"  # the config file whose toy config tiny_distill_config shrinks
CELL_TIMEOUT_S = 600


def execute(name: str, parameters: dict, tmp_path) -> "nbformat.NotebookNode":
    """The notebook `name` executed in a fresh kernel with `parameters` overriding its parameters cell; written to
    `tmp_path` as executed (for a look after a failure)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters', has {len(tagged)}"
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    # One CPU device (whatever the session emulates) and no TPU start-up attempt; the worktree's package first.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(flags),
        MPLBACKEND="module://matplotlib_inline.backend_inline",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3")
    try:
        client.execute(cwd=str(ROOT), env=env)
    finally:
        nbformat.write(nb, tmp_path / name)
    return nb


def outputs(nb, output_type=None):
    return [
        o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if output_type in (None, o.output_type)
    ]


def images(nb) -> list:
    return [o for o in outputs(nb) if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


def printed(nb) -> str:
    return "".join(o.text for o in outputs(nb, "stream") if o.name == "stdout")


@pytest.fixture(scope="module")
def tiny_run(toy_cache, tmp_path_factory):
    """(the tiny toy world's config overrides, a distillation workdir of it). The workdir's checkpoint is the state
    the distillation job saves, its student, EMA and fake score small changes of the tiny base teacher (as in
    tests/test_generate.py: what the notebooks read is the checkpoint's layout, not the training)."""
    config = tiny_distill_config(toy_cache)
    base = jax.device_get(teacher.ensure_teacher(config, "base", log=lambda *_: None))
    teacher.ensure_teacher(config, "text", log=lambda *_: None)  # the second guiding teacher, trained once here
    workdir = tmp_path_factory.mktemp("notebook_run") / "run"
    folder_lib.training_workdir(workdir, folder_lib.perturbed(base, 1, 0.01), folder_lib.perturbed(base, 2, 0.01))
    return config_overrides(config, config_lib.load_config(TINY_BASE)), workdir


def check_ran_cleanly(nb):
    assert not outputs(nb, "error"), outputs(nb, "error")
    assert all(cell.execution_count for cell in nb.cells if cell.cell_type == "code")


@pytest.mark.job
def test_score_fields_notebook(tiny_run, tmp_path):
    overrides, _ = tiny_run
    nb = execute("score_fields.ipynb", dict(CONFIG=TINY_BASE, CONFIG_OVERRIDES=overrides, N=2), tmp_path)
    check_ran_cleanly(nb)
    text = printed(nb)
    # The tiny config reached the kernel: its two teachers, its 4 student steps.
    assert "rows: ['x', 'x_t', 'x0/base', 'x0/text', 'blend/k0', 'blend/k1', 'blend/k2', 'blend/k3']" in text, text
    assert len(images(nb)) == 1


@pytest.mark.job
def test_pipeline_notebook_on_a_training_workdir(tiny_run, tmp_path):
    overrides, workdir = tiny_run
    parameters = dict(
        WORKDIR=str(workdir),
        CONFIG=TINY_BASE,
        CONFIG_OVERRIDES=overrides,
        PROMPTS=["a bright landscape with a red sun", "a portrait of a woman with short hair"],
        EDIT_INSTRUCTION="make the sky green",
        TEACHER_STEPS=2,
        NOISE_LEVELS=(0.3, 0.7),
        OUT=str(tmp_path / "out"),
    )
    nb = execute("pipeline.ipynb", parameters, tmp_path)
    check_ran_cleanly(nb)
    text = printed(nb)
    assert "student: student (ema) of run, step 5" in text, text
    # Teacher and student each made both prompts and the edit, at the tiny world's 16 px.
    assert "teacher {'00000': (16, 16, 3), '00001': (16, 16, 3), 'edit': (16, 16, 3)}" in text, text
    assert "student {'00000': (16, 16, 3), '00001': (16, 16, 3), 'edit': (16, 16, 3)}" in text, text
    (run,) = (tmp_path / "out").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["student", "teacher", "teacher_edit"]
    assert sorted(p.name for p in (run / "student").glob("*.png")) == [
        "00000.png",
        "00001.png",
        "edit.png",
        "overview.png",
    ]
    # The score fields: 4 student steps x 2 noise levels, printed, then the comparison, heat maps and curves.
    assert "RMS of x0_fake - x0_real (rows k, columns t):" in text, text
    assert len(images(nb)) == 3


@pytest.mark.job
def test_pipeline_notebook_on_pipeline_folders(tmp_path):
    pytest.importorskip("diffusers")
    base, student = folder_lib.exported_student(tmp_path, perturb_seed=1)
    parameters = dict(
        WORKDIR=None,
        PIPELINE=str(base),
        STUDENT_PIPELINE=str(student),
        DTYPE="float32",
        PROMPTS=["a red house by a lake"],
        EDIT_INSTRUCTION="make the sky green",
        # Square: the edit's source is resized to about 1024**2 pixels at its own aspect ratio (diffusers'
        # output_resolution), which only at 1:1 stays within the tiny processor's largest image.
        SIZE=(32, 32),
        TEACHER_STEPS=2,
        OUT=str(tmp_path / "out"),
    )
    nb = execute("pipeline.ipynb", parameters, tmp_path)
    check_ran_cleanly(nb)
    text = printed(nb)
    assert "teacher: qwen_image_21\nstudent: student\n" in text, text
    # The teacher in the 2 steps asked, the student in the 4 its folder's sample_sigmas name, both at SIZE.
    assert "1 image(s) with qwen_image_21, 2 steps, 32x32" in text, text
    assert "2 image(s) with student, 4 steps, 32x32" in text, text
    # RGBA: the 2.1 VAE decodes an alpha channel, and the pipeline passes it on.
    assert "teacher {'00000': (32, 32, 4), 'edit': (32, 32, 4)}" in text, text
    assert "student {'00000': (32, 32, 4), 'edit': (32, 32, 4)}" in text, text
    (run,) = (tmp_path / "out").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["student", "teacher", "teacher_edit"]
    # Each folder: its images and generate's overview.png.
    pngs = [len(list((run / name).glob("*.png"))) for name in ("teacher", "teacher_edit", "student")]
    assert pngs == [1 + 1, 1 + 1, 2 + 1]
    # A pipeline folder holds no fake score: the score fields say so and draw nothing, only the side-by-side figure.
    assert "the score fields need WORKDIR: a pipeline folder holds no fake score" in text, text
    assert len(images(nb)) == 1


# Each notebook and the tests that execute it: a notebook added to notebooks/ must be added here (and tested).
EXECUTED = {
    "score_fields.ipynb": (test_score_fields_notebook,),
    "pipeline.ipynb": (test_pipeline_notebook_on_a_training_workdir, test_pipeline_notebook_on_pipeline_folders),
}


def test_every_notebook_on_disk_is_executed_by_a_test():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXECUTED)
