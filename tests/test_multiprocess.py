"""Two processes on localhost with jax.distributed: each reads its own pipeline shard, the global arrays and a
sharded forward agree with a single-process run."""

import json
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from qwen_flash_jax.data import pipeline
from qwen_flash_jax.models.codec import SpaceToDepthCodec
from qwen_flash_jax.text.tokenizer import train_tokenizer
from tests.helpers import pipeline_config, world_records

pytestmark = pytest.mark.job


def test_two_processes_share_one_global_batch(cpu_devices_env):
    port = portpicker.pick_unused_port()
    env = cpu_devices_env(2)  # 2 devices per process
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess_worker", f"localhost:{port}", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = sorted(outputs, key=lambda o: o["process"])
    assert a["devices"] == b["devices"] == 4
    assert a["global_shape"] == b["global_shape"] == [8, 16, 48]
    assert a["local_rows"] == b["local_rows"] == [2, 2]
    # Both processes see the same global values ...
    assert a["latent_sum"] == b["latent_sum"] and a["output_sum"] == b["output_sum"]
    # ... which are exactly the single-process stream of 8 examples, split [0::2] / [1::2] between the processes.
    sources = {"t2i": {c: world_records("t2i", c, 12, 0) for c in pipeline.CATEGORIES["t2i"]}}
    tokenizer = train_tokenizer([r["caption"] for recs in sources["t2i"].values() for r in recs], vocab_size=1024)
    single = next(
        iter(
            pipeline.build_pipeline(
                pipeline_config(task_ratio="1:0", batch_size=8),
                sources,
                tokenizer,
                SpaceToDepthCodec(patch=4),
                process_index=0,
                process_count=1,
            )
        )
    )
    whole = single["target_latents"]
    np.testing.assert_allclose(a["latent_sum"], whole.sum(), rtol=1e-5)
    np.testing.assert_allclose(a["local_first"], whole[0::2, 0, 0].sum(), rtol=1e-6)
    np.testing.assert_allclose(b["local_first"], whole[1::2, 0, 0].sum(), rtol=1e-6)
