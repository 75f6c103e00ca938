"""One process of the multi-process tests (run by tests/test_multiprocess.py, not collected by pytest).

    python -m tests.multiprocess_worker batch COORDINATOR PROCESS_ID
    python -m tests.multiprocess_worker peer_dies COORDINATOR PROCESS_ID
    python -m tests.multiprocess_worker distill COORDINATOR PROCESS_ID CACHE WORKDIR [KILL_AT]
    python -m tests.multiprocess_worker distill_one_process CACHE WORKDIR

Each joins a 2-process jax.distributed cluster on localhost (gloo CPU collectives, `sharding.initialize_distributed`).

`batch`: reads this process's shard of the grain pipeline, assembles global arrays on a mesh spanning both processes,
and runs a sharded transformer forward and a global reduction. Prints one JSON line with what it saw.

`peer_dies`: both processes run one cross-process reduction (so both have joined), then process 1 exits abruptly
while process 0 keeps reducing; process 0 must end with an error, not hang. Each prints `joined` once it has.

`distill`: the tiny distillation of tests/helpers.py, data parallel over both processes (one device each); with
KILL_AT, each process SIGKILLs itself once update KILL_AT is logged and the checkpoint before it is committed. Prints
the per-update metrics as one JSON line.

`distill_one_process`: the same distillation in one process with two devices, uninterrupted. Each process of
`distill` reads its own shard of every global batch (`pipeline.build_pipeline`: example i of the stream goes to
process i % 2) and contributes it as its half of the global batch, so this run reads both shards and lays them
out the same way: the global batches, and so every loss, are those of the two-process run.
"""

import json
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import sharding
from qwen_flash_jax.data import pipeline
from qwen_flash_jax.loading import build_transformer
from qwen_flash_jax.models import TransformerConfig, make_layout
from qwen_flash_jax.models.codec import SpaceToDepthCodec
from qwen_flash_jax.text.tokenizer import train_tokenizer
from qwen_flash_jax.train import distill_job
from tests.helpers import SIZE, pipeline_config, tiny_distill_config, world_records

PROCESSES = 2
DISTILL_STEPS = 4  # a checkpoint every 2: killed after update 3, a run resumes from 2 and repeats 3 and 4


def shared_batch():
    sources = {"t2i": {c: world_records("t2i", c, 12, 0) for c in pipeline.CATEGORIES["t2i"]}}
    tokenizer = train_tokenizer([r["caption"] for recs in sources["t2i"].values() for r in recs], vocab_size=1024)
    data = pipeline.build_pipeline(
        pipeline_config(task_ratio="1:0", batch_size=8), sources, tokenizer, SpaceToDepthCodec(patch=4)
    )
    mesh = sharding.make_mesh([("fsdp", -1)])
    rules = (("batch", "fsdp"), ("embed", "fsdp"))
    local = next(iter(data))
    local.pop("task")
    batch = pipeline.to_global(local, sharding.batch_sharding(mesh, rules))
    latents = batch["target_latents"]  # (8, tokens, 48), each process holds 4 rows

    config = TransformerConfig(
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=48,
        out_channels=48,
        context_in_dim=8,
        axes_dims_rope=(4, 6, 6),
    )
    model = build_transformer(config, seed=0, mesh=mesh, rules=rules)
    tokens = latents.shape[1]
    slot_mask = np.array([False] * 4 + [True] * (tokens // 4))
    layout = make_layout([[(1, SIZE // 4, SIZE // 4)]], slot_mask)
    text = jax.device_put(jnp.ones((8, 4, 8)), sharding.batch_sharding(mesh, rules))
    out = jax.jit(lambda p, x, e: model.forward(p, layout, x, e, jnp.full((8,), 0.5)))(model.params, latents, text)
    return {
        "process": jax.process_index(),
        "devices": jax.device_count(),
        "local_rows": [s.data.shape[0] for s in latents.addressable_shards],
        "global_shape": list(latents.shape),
        "latent_sum": float(jax.jit(jnp.sum)(latents)),
        "output_sum": float(jax.jit(jnp.sum)(out)),
        "local_first": float(np.asarray(local["target_latents"])[:, 0, 0].sum()),
    }


def peer_dies():
    mesh = sharding.make_mesh([("data", -1)])
    spec = sharding.NamedSharding(mesh, sharding.PartitionSpec("data"))
    total = jax.jit(jnp.sum)
    ones = jax.make_array_from_process_local_data(spec, np.ones((jax.local_device_count(),), np.float32))
    assert float(total(ones)) == jax.device_count()
    print("joined", flush=True)
    if jax.process_index() == 1:
        os._exit(3)  # no shutdown, no goodbye: as a host that loses power
    started = time.monotonic()
    while True:  # every reduction needs the dead peer
        total(ones).block_until_ready()
        if time.monotonic() - started > 600:
            print("still running after 600 s", flush=True)
            return


class _KilledAfter(list):
    """A distillation history that SIGKILLs this process when update `step` is appended (logged), once the
    checkpoint of an earlier update is committed (orbax saves in the background)."""

    def __init__(self, step, checkpoints: pathlib.Path):
        super().__init__()
        self.step, self.checkpoints = step, checkpoints

    def append(self, entry):
        super().append(entry)
        if entry[0] == self.step:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(
                p.name.isdigit() and int(p.name) < self.step for p in self.checkpoints.iterdir()
            ):
                time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)


class _BothShards:
    """The pipeline iterators of both processes of a 2-process run, as one iterator of their global batches."""

    def __init__(self, shards):
        self.shards = shards

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(s) for s in self.shards]
        assert len({p["task"] for p in parts}) == 1
        return {
            k: np.concatenate([p[k] for p in parts]) if isinstance(v, np.ndarray) else v for k, v in parts[0].items()
        }

    def get_state(self):
        return {"shards": [s.get_state() for s in self.shards]}

    def set_state(self, state):
        for s, shard_state in zip(self.shards, state["shards"]):
            s.set_state(shard_state)


def _distill(cache, workdir, history):
    config = tiny_distill_config(cache)
    config.train.steps = DISTILL_STEPS
    config.data.task_ratio = "1:0"  # one task: half the compilations in each of the five processes
    distill_job.distill(config, workdir, history=history, log=lambda *_: None, evaluate=False)
    print(json.dumps(history), flush=True)


def main():
    mode = sys.argv[1]
    if mode == "distill_one_process":
        build = pipeline.build_pipeline

        def both_shards(*args, **kwargs):
            return _BothShards(
                [iter(build(*args, **kwargs, process_index=i, process_count=PROCESSES)) for i in range(PROCESSES)]
            )

        pipeline.build_pipeline = both_shards
        _distill(sys.argv[2], sys.argv[3], [])
        return
    coordinator, process_id = sys.argv[2], int(sys.argv[3])
    sharding.initialize_distributed(coordinator, PROCESSES, process_id)
    if mode == "batch":
        print(json.dumps(shared_batch()))
    elif mode == "peer_dies":
        peer_dies()
    elif mode == "distill":
        cache, workdir = sys.argv[4], pathlib.Path(sys.argv[5])
        history = _KilledAfter(int(sys.argv[6]), workdir / "checkpoints") if len(sys.argv) > 6 else []
        _distill(cache, workdir, history)
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
