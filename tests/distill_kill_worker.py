"""Runs the tiny distillation of tests/helpers.py and SIGKILLs itself in the middle of one checkpoint save.

    python -m tests.distill_kill_worker CACHE_DIR WORKDIR KILL_STEP

The kill comes from orbax's background save thread while it writes the `meta` item of step KILL_STEP, so that
step's arrays may be on disk but it is never committed: exactly the state a pre-empted TPU VM leaves behind.
"""

import asyncio
import os
import signal
import sys

import orbax.checkpoint as ocp

from qwen_flash_jax.train import distill_job
from tests.helpers import tiny_distill_config


def main(cache_dir, workdir, kill_step):
    write_json = ocp.JsonCheckpointHandler._save_fn

    async def die_while_saving(self, item, directory):
        if item == {"step": kill_step}:
            os.kill(os.getpid(), signal.SIGKILL)
            await asyncio.sleep(60)  # never reached: SIGKILL cannot be handled
        return await write_json(self, item, directory)

    ocp.JsonCheckpointHandler._save_fn = die_while_saving
    distill_job.distill(tiny_distill_config(cache_dir), workdir, log=lambda *_: None, evaluate=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
