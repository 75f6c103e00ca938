"""The command-line entry points: one clear line and exit status 2 for user mistakes, nothing half-written."""

import subprocess
import sys

import pytest

from qwen_flash_jax import config_lib
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train import jobs
from qwen_flash_jax.train.inspect_batches import inspect

pytestmark = pytest.mark.job  # the main job's command line, in subprocesses


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([], "teacher 'base' needs a checkpoint"),  # full scale without converted teachers
        (["--config.data.task_ratio=3-7"], "task ratio must look like"),
    ],
)
def test_main_rejects_bad_configs_with_one_line(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    result = _run(
        "qwen_flash_jax.main",
        "--config=configs/5to5.py",
        f"--workdir={workdir}",
        f"--config.cache_dir={tmp_path / 'cache'}",
        *overrides,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_inspect_prints_counts_and_writes_a_contact_sheet(tmp_path):
    out = tmp_path / "sheet.png"
    result = _run(
        "qwen_flash_jax.inspect_data",
        "--config=configs/7to3.py:toy",
        "--batches=10",
        f"--out={out}",
        f"--config.cache_dir={tmp_path / 'cache'}",
        "--config.data.examples_per_category=16",
        "--config.text_encoder.pretrain_steps=5",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batches: t2i=7 edit=3" in result.stdout
    assert out.exists() and out.stat().st_size > 1000


def test_inspect_wants_a_png_path_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="give a path ending in .png"):
        inspect(config_lib.load_config("configs/7to3.py:toy"), 1, str(tmp_path / "sheet"), log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_a_workdir_that_cannot_be_made_is_a_config_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="--workdir .*a_file/run: cannot create it"):
        jobs.make_workdir(tmp_path / "a_file" / "run")
