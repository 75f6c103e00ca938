"""Every shipped config loads, derives from the base, and validates."""

import dataclasses
import pathlib

import pytest

from qwen_flash_jax import config_lib
from qwen_flash_jax.data import mixing
from qwen_flash_jax.data.pipeline import CATEGORIES
from qwen_flash_jax.distill import dmd
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train.components import CONDITIONS

SPECS = [
    "configs/5to5.py:toy",
    "configs/5to5.py:full",
    "configs/7to3.py:toy",
    "configs/9to1.py:toy",
    "configs/t2i_only.py:toy",
    "configs/teacher.py:toy",
    "configs/teacher.py:toy,text",
    "configs/guidance.py:toy,single",
    "configs/guidance.py:toy,stepwise",
]
SPECS += [f"configs/composition.py:toy,E{i}" for i in range(1, 6)]


@pytest.mark.parametrize("spec", SPECS)
def test_config_is_valid(spec):
    config = config_lib.load_config(spec)
    config_lib.transformer_config(config)
    for task, share in zip(mixing.TASKS, mixing.parse_ratio(config.data.task_ratio)):
        if share:
            mixing.normalise_weights(dict(config.data[f"{task}_weights"]), CATEGORIES[task], task)
    dmd.guidance_table(
        dict(config.guidance.weights), tuple(config.guidance.teachers), CONDITIONS, config.student.num_steps
    )
    for name in config.guidance.teachers:
        assert name in config.teachers


def test_variants_change_only_what_they_name():
    base = config_lib.load_config("configs/5to5.py:toy").to_dict()
    for spec, changed in [
        ("configs/7to3.py:toy", {"data"}),
        ("configs/t2i_only.py:toy", {"data"}),
        ("configs/composition.py:toy,E3", {"data", "guidance"}),
    ]:
        variant = config_lib.load_config(spec).to_dict()
        assert {k for k in base if base[k] != variant[k]} == changed, spec


def test_every_config_file_is_covered():
    files = {p.name for p in pathlib.Path("configs").glob("*.py")}
    assert files == {s.split(":")[0].split("/")[1] for s in SPECS}


@pytest.mark.parametrize(
    "spec,match",
    [
        ("configs/5to5.py:tiny", "toy"),
        ("configs/composition.py:toy,E9", "E9"),
        ("configs/nope.py:toy", "does not exist"),
    ],
)
def test_bad_config_names_are_clear_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.load_config(spec)


@pytest.mark.parametrize(
    "section,values,match",
    [
        ("student", {"gan_weight": -1.0}, "student.gan_weight must be >= 0"),
        ("fake_score", {"gan_weight": -0.5}, "fake_score.gan_weight must be >= 0"),
        ("fake_score", {"gan_head_learning_rate": 0.0}, "gan_head_learning_rate > 0"),
        ("student", {"timesteps": (1.0, 0.5)}, "2 entries, student.num_steps is 4"),
        ("student", {"timesteps": (1.0, 0.7, 0.7, 0.2)}, "decrease strictly"),
        ("teachers.base.train", {"uniform_t_fraction": 1.5}, "uniform_t_fraction must lie in"),
        ("guidance", {"schedule": "Decoupled"}, "guidance.schedule must be one of"),
        ("eval", {"judge": "gpt"}, "eval.judge must be 'toy', 'none' or 'vlm'"),
        ("eval", {"judge": "vlm"}, "needs at least one judge in eval.vlm_judges"),
        ("eval", {"judge": "vlm", "vlm_judges": ("gpt=gpt-4o",)}, "gpt=gpt-4o"),
    ],
)
def test_bad_distillation_settings_are_clear_errors_before_any_work(section, values, match):
    from qwen_flash_jax.train import distill_job

    config = config_lib.load_config("configs/5to5.py:toy")
    node = config
    for part in section.split("."):
        node = node[part]
    node.update(values)
    if section == "fake_score":
        config.student.gan_weight = 1.0  # the head's settings matter only with the GAN term on
    with pytest.raises(ConfigError, match=match):
        distill_job.check_config(config)


def test_the_distillation_reads_one_typed_frozen_view_of_its_sections():
    from qwen_flash_jax.train import distill_job

    config = config_lib.load_config("configs/5to5.py:toy")
    view = distill_job.check_config(config)
    assert view == config_lib.distill_view(config)
    assert view.train.steps == config.train.steps and isinstance(view.student.ema_decay, float)
    assert view.guidance.teachers == ("base", "text")
    assert view.critic_updates == config.train.steps * config.fake_score.updates_per_student
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.train.steps = 1
    config.student.ema_decay = None
    with pytest.raises(ConfigError, match=r"^student.ema_decay must be float, got None$"):
        distill_job.check_config(config)


@pytest.mark.parametrize("job", ["distill", "teacher"])
@pytest.mark.parametrize(
    "values,match",
    [
        ({"text_encoder.feature_layers": (0, 5)}, "feature_layers must be"),
        ({"model.context_in_dim": 64}, "2 feature layers"),
    ],
)
def test_bad_text_encoder_features_stop_before_the_workdir_exists(job, values, match, tmp_path):
    from qwen_flash_jax.train import jobs

    config = config_lib.load_config("configs/5to5.py:toy")
    config.job, config.teacher_name = job, "base"
    for key, value in values.items():
        section, field = key.split(".")
        config[section][field] = value
    with pytest.raises(ConfigError, match=match):
        jobs.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
