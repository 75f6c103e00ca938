"""Shows what the input pipeline feeds a run: task and category counts per batch, and a contact sheet.

python -m qwen_flash_jax.inspect_data --config=configs/7to3.py:toy --batches=20 [--out=batch0.png]
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from qwen_flash_jax.train.inspect_batches import inspect
from qwen_flash_jax.train.jobs import USER_ERRORS

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/5to5.py:toy", lock_config=True)
_BATCHES = flags.DEFINE_integer("batches", 10, "How many batches to read.")
_OUT = flags.DEFINE_string("out", "inspect_batch0.png", "Where to write the first batch's contact sheet (PNG).")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    try:
        inspect(_CONFIG.value, _BATCHES.value, _OUT.value)
    except USER_ERRORS + (ValueError,) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
