"""Entry point: `python -m qwen_flash_jax.main --config=configs/5to5.py:toy --workdir=/tmp/qf`.

Thin by design: parse `--config` (an ml_collections config file, `path[:arg]`, overridable with
`--config.section.field=value`) and `--workdir`, then hand over to `qwen_flash_jax.train.jobs.run`. User mistakes
(a bad config value, unreadable data) end with one `error: ...` line and exit status 2. The console shows the
job's progress and results; library INFO logging goes to `WORKDIR/logs/`.
"""

import functools

from absl import app, flags, logging
from ml_collections import config_flags

from qwen_flash_jax import sharding
from qwen_flash_jax.train import jobs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/5to5.py:toy", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and results.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-host JAX cluster first (TPU pods, see tpu/).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Until the job has a workdir to log into (jobs.send_library_logs_to_file), library INFO stays off the console.
    logging.set_verbosity(logging.WARNING)
    if _DISTRIBUTED.value:
        sharding.initialize_distributed()
    jobs.exit_on_failure(functools.partial(jobs.run, library_logs_to_file=True), _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
