"""Job dispatch for `qwen_flash_jax.main`: what a config's `job` field runs."""

from __future__ import annotations

import pathlib
import sys

from absl import flags, logging

from qwen_flash_jax import config_lib, training_loop
from qwen_flash_jax.data.pipeline import PromptTooLongError, check_data_config
from qwen_flash_jax.data.sources import DataError
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.models.layout import LayoutError
from qwen_flash_jax.train import distill_job, teacher
from qwen_flash_jax.train.assets import check_text_encoder
from qwen_flash_jax.training_loop import NonFiniteError

# Data-source errors are bad records or unreadable files: the user's to fix.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, LayoutError, PromptTooLongError, FileNotFoundError, DataError)


def exit_on_failure(fn, *args):
    """Runs a command-line job: a user mistake ends with one `error: ...` line and status 2, a run stopped by
    non-finite steps with its message and status 1; anything else is a bug and keeps its traceback."""
    try:
        return fn(*args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def send_library_logs_to_file(log_dir) -> None:
    """Keeps the console to the job's own progress and results: absl INFO records (orbax's checkpoint chatter,
    clu's metric lines) go to `log_dir/<program>.*.INFO` instead; warnings and errors still reach stderr.
    `--logtostderr` or an explicit `--stderrthreshold` keeps absl's own behaviour."""
    if flags.FLAGS["logtostderr"].value:
        return
    if not flags.FLAGS["stderrthreshold"].present:
        flags.FLAGS.stderrthreshold = "warning"
    if "://" in str(log_dir):  # absl writes its log files locally only: a cloud workdir's go to absl's default
        logging.get_absl_handler().use_absl_log_file()
    else:
        pathlib.Path(log_dir).mkdir(parents=True, exist_ok=True)
        logging.get_absl_handler().use_absl_log_file(log_dir=str(log_dir))
    logging.set_verbosity(logging.INFO)


def validate(config) -> config_lib.DistillView | None:
    """Everything about `config` that can be checked before any work, for the job it names (one ConfigError line);
    the distillation's typed view for a distillation job, None for a teacher job."""
    view = None
    if config.job == "teacher":
        check_data_config(config.data)
        teacher.check_source(config, config.teacher_name)
    elif config.job == "distill":
        view = distill_job.check_config(config)
    else:
        raise ConfigError(f"config.job must be 'teacher' or 'distill', got {config.job!r}")
    check_text_encoder(config)  # kinds, checkpoint directories, the toy encoder's width
    return view


def make_workdir(workdir) -> None:
    """Creates `workdir` (and its parents); one ConfigError where it cannot be (a file in the way, no permission)."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot create it: {e.strerror or e}") from None


def run(config, workdir, *, library_logs_to_file: bool = False) -> None:
    """Validates `config` (once), then runs its job in `workdir`. With `library_logs_to_file` (the command lines),
    library INFO logging goes to `workdir/logs` rather than the console."""
    workdir = training_loop.workdir_path(workdir)  # gs:// stays a cloud path
    view = validate(config)  # first: a bad config must not leave a half-made workdir behind
    make_workdir(workdir)
    if library_logs_to_file:
        send_library_logs_to_file(workdir / "logs")
    if config.job == "teacher":
        parent = config.teachers[config.teacher_name].init_from
        init = teacher.ensure_teacher(config, parent) if parent else None  # cached, trained on first use
        teacher.train_teacher(config, config.teacher_name, workdir, init_params=init)
    else:
        distill_job.distill(config, workdir, view=view)
