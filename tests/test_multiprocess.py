"""Two processes on localhost with jax.distributed (tests/multiprocess_worker.py): each reads its own pipeline shard
and the global arrays and a sharded forward agree with a single-process run; a distillation killed in both processes
resumes and repeats the losses of an uninterrupted single-process run exactly; and when one process dies, the other
exits with an error within two minutes instead of hanging."""

import json
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from qwen_flash_jax.data import pipeline
from qwen_flash_jax.models.codec import SpaceToDepthCodec
from qwen_flash_jax.text.tokenizer import train_tokenizer
from tests import multiprocess_worker
from tests.helpers import pipeline_config, world_records

pytestmark = pytest.mark.job


def _launch(mode, env, *args):
    """The two processes of a cluster on a fresh localhost port, running the worker's `mode`."""
    port = portpicker.pick_unused_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess_worker", mode, f"localhost:{port}", str(i), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]


def _json_outputs(procs, timeout=600):
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


def test_two_processes_share_one_global_batch(cpu_devices_env):
    outputs = _json_outputs(_launch("batch", cpu_devices_env(2)), timeout=300)  # 2 devices per process
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


def test_a_distillation_killed_in_both_processes_resumes_with_the_single_process_losses(
    toy_cache, cpu_devices_env, tmp_path
):
    """Two processes (one device each) run the tiny distillation, SIGKILL themselves after update 3 (the checkpoint
    of update 2 committed), and are started again: the resumed updates 3 and 4 repeat, exactly, an uninterrupted
    one-process run on two devices over the same global batches (the worker's `distill_one_process` says how)."""
    single = subprocess.run(
        [sys.executable, "-m", "tests.multiprocess_worker", "distill_one_process", str(toy_cache), str(tmp_path / "a")],
        capture_output=True,
        text=True,
        env=cpu_devices_env(2),
        timeout=1200,
    )  # (first: it builds any toy asset the cache lacks, before two processes would race for it)
    assert single.returncode == 0, single.stderr[-3000:]
    reference = json.loads(single.stdout.strip().splitlines()[-1])
    assert [step for step, _ in reference] == list(range(1, multiprocess_worker.DISTILL_STEPS + 1))

    workdir = tmp_path / "b"
    killed = _launch("distill", cpu_devices_env(1), toy_cache, workdir, 3)
    for p in killed:
        _, err = p.communicate(timeout=600)
        assert p.returncode == -9, err[-3000:]  # SIGKILL
    assert (workdir / "checkpoints" / "2").is_dir()
    resumed = _json_outputs(_launch("distill", cpu_devices_env(1), toy_cache, workdir))
    assert resumed[0] == resumed[1]  # both processes log the same global metrics
    assert resumed[0][0][0] == 3  # resumed from the checkpoint of update 2
    assert resumed[0] == [entry for entry in reference if entry[0] > 2]


def test_when_one_process_dies_the_other_exits_with_an_error_within_two_minutes(cpu_devices_env):
    procs = _launch("peer_dies", cpu_devices_env(1))
    dead, survivor = procs[1], procs[0]
    while (line := dead.stdout.readline()) and line.strip() != "joined":  # (gloo prints its connections first)
        pass
    assert line.strip() == "joined"
    dead.communicate(timeout=120)
    assert dead.returncode == 3
    died = time.monotonic()
    _, err = survivor.communicate(timeout=300)
    waited = time.monotonic() - died
    assert survivor.returncode != 0 and waited < 120, (survivor.returncode, waited)
    assert "heartbeat timeout" in err and "another task died" in err, err[-3000:]
