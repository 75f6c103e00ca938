"""Encodes every training record's prompt once, into the run's text-state store (`data.precompute_text`).

    python -m qwen_flash_jax.precompute_text --config=configs/5to5.py [--config.x=y ...]

A single-process distillation with `data.precompute_text=True` makes its store itself; a multi-process one needs it
made beforehand by this command, on one host, and copied to every host's `cache_dir` (`train/text_states.py`). The
last line names the store's folder. Bad input ends with one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import sys

from absl import app, logging
from ml_collections import config_flags

from qwen_flash_jax.train import assets as assets_lib
from qwen_flash_jax.train import jobs, text_states

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/5to5.py", lock_config=True)


def run(config) -> None:
    jobs.validate(config)  # everything checkable before the minutes the text encoder takes to load
    assets = assets_lib.build_assets(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    folder = text_states.ensure_store(config, assets, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"text states of {len(text_states.needed(config))} categories in {folder}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    jobs.exit_on_failure(run, _CONFIG.value)


if __name__ == "__main__":
    app.run(main)
