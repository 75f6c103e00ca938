"""A bank of teacher ODE pairs for DMD's regression term (DMD1's regression loss, for a K-step student).

Each pair is (condition, noise n, teacher sample y(n)): the base teacher's multi-step Euler sample with CFG from
n, the sampler the evaluation calls "teacher (40 steps)". With `student.renoise="predicted"` a student that
reproduces the teacher's sampler exactly predicts y(n) at every one of its steps along its own trajectory from n
(each step is then an Euler step whose x0 is y(n)), so the regression target at the sampled step k is y(n) too.
With fresh noise between steps the student's output is no function of n, so the term needs predicted
re-noising (checked in `train.distill_job.check_config`).

The bank is drawn once per run from its own pipeline (the run's shuffle seed + 1, so the training stream is
untouched), `student.regression_batches` batches split between the tasks by the T2I:Edit ratio, and the
generator step at update s uses the bank batch `s mod n` of its task: deterministic, so a resumed run sees the
same pairs without extra iterator state.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import config_lib
from qwen_flash_jax.data import pipeline as pipeline_lib
from qwen_flash_jax.diffusion import conditioning

BANK_SEED_OFFSET = 1


def build_pair_bank(config, gen, teacher_params, to_device, *, log=print) -> dict[str, list[dict]]:
    """{task: [batch, ...]} with each batch's pipeline fields plus "noise" and "target", as device arrays.

    `gen` is the run's `eval.generate.Generator` (its compiled teacher sampler is reused). `to_device` places a
    process-local numpy batch on the mesh (the trainer's `pipeline.to_global`), so the bank is sharded like the
    training batches and never gathered to one host."""
    num_batches = int(config.student.regression_batches)
    data = config_lib.distill_data_config(config, offset=BANK_SEED_OFFSET)
    assets = gen.assets
    iterator = iter(
        pipeline_lib.build_pipeline(
            data, assets.sources, assets.tokenizer, assets.codec, condition_pixels=assets.condition_pixels
        )
    )
    steps, cfg = int(config.sampling.teacher_steps), float(config.sampling.cfg_scale)
    key = jax.random.key(config_lib.distill_seed(config) + 3)
    bank: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for i in range(num_batches):
        batch = next(iterator)
        task = batch.pop("task")
        # Noise drawn per process for its own rows, then placed with the batch (one global array, any host count).
        key_i = jax.random.fold_in(key, i)
        if jax.process_count() > 1:
            key_i = jax.random.fold_in(key_i, jax.process_index())
        batch["noise"] = np.asarray(jax.random.normal(key_i, batch["target_latents"].shape, jnp.float32))
        del batch["target_latents"]
        entry = to_device(batch)
        entry["target"] = gen.teacher_latents(
            teacher_params,
            assets.tasks[task],
            entry["input_ids"],
            entry["attention_mask"],
            conditioning.image_inputs(entry),
            entry["noise"],
            num_steps=steps,
            cfg_scale=cfg,
        )
        bank.setdefault(task, []).append(entry)
    jax.block_until_ready(bank)
    log(
        f"regression pairs: {num_batches} batches ({', '.join(f'{t} {len(b)}' for t, b in bank.items())}) of "
        f"{steps}-step teacher samples with CFG {cfg} in {time.perf_counter() - started:.0f}s"
    )
    return bank


def bank_batch(bank: dict[str, list[dict]], task: str, step: int) -> dict | None:
    """The pairs the generator update `step` regresses on (None if the bank holds no batch of `task`)."""
    batches = bank.get(task)
    if not batches:
        return None
    return batches[step % len(batches)]


def regression_loss(x, target):
    """0.5 * per-sample squared error summed over the sample, averaged over the batch: the same per-element scale
    as `dmd.dmd_loss`, whose gradient is the normalised score difference."""
    diff = x.astype(jnp.float32) - jax.lax.stop_gradient(target.astype(jnp.float32))
    return 0.5 * jnp.mean(jnp.sum(jnp.square(diff).reshape(x.shape[0], -1), axis=-1))
