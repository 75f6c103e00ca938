"""Job dispatch for `qwen_flash_jax.main`: what a config's `job` field runs."""

from __future__ import annotations

import pathlib

from qwen_flash_jax.data.pipeline import PromptTooLongError
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.models.layout import LayoutError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, LayoutError, PromptTooLongError, FileNotFoundError)
try:  # data-source errors (bad records, unreadable files)
    from qwen_flash_jax.data.sources import DataError

    USER_ERRORS += (DataError,)
except ImportError:  # pragma: no cover
    pass


def run(config, workdir) -> None:
    from qwen_flash_jax.data.pipeline import check_data_config

    workdir = pathlib.Path(workdir)
    check_data_config(config.data)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.job == "teacher":
        from qwen_flash_jax.train import teacher

        if config.teacher_name not in config.teachers:
            raise ConfigError(f"unknown teacher {config.teacher_name!r}; the config defines "
                              f"{sorted(config.teachers.keys())}")
        parent = config.teachers[config.teacher_name].init_from
        init = teacher.ensure_teacher(config, parent) if parent else None  # cached, trained on first use
        teacher.train_teacher(config, config.teacher_name, workdir, init_params=init)
    elif config.job == "distill":
        from qwen_flash_jax.distill.trainer import distill

        distill(config, workdir)
    else:
        raise ConfigError(f"config.job must be 'teacher' or 'distill', got {config.job!r}")
