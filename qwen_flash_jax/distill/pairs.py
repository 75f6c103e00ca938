"""A bank of teacher ODE pairs for DMD's regression term (DMD1's regression loss, for a K-step student).

Each pair is (condition, noise n, teacher sample y(n)): the base teacher's multi-step Euler sample with CFG from
n, the sampler the evaluation calls "teacher (40 steps)". With `student.renoise="predicted"` a student that
reproduces the teacher's sampler exactly predicts y(n) at every one of its steps along its own trajectory from n
(each step is then an Euler step whose x0 is y(n)), so the regression target at the sampled step k is y(n) too.
With fresh noise between steps the student's output is no function of n, so the term needs predicted
re-noising (checked in `trainer.check_config`).

The bank is drawn once per run from its own pipeline (seed `data.seed + 1`, so the training stream is
untouched), `student.regression_batches` batches split between the tasks by the T2I:Edit ratio, and the
generator step at update s uses the bank batch `s mod n` of its task: deterministic, so a resumed run sees the
same pairs without extra iterator state.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import flow, sampling
from qwen_flash_jax.data import pipeline as pipeline_lib
from qwen_flash_jax.train import conditioning

BANK_SEED_OFFSET = 1


def build_pair_bank(config, assets, model, teacher_params, mu: float, to_device, *,
                    log=print) -> dict[str, list[dict]]:
    """{task: [batch, ...]} with each batch's pipeline fields plus "noise" and "target", as device arrays.

    `to_device` places a process-local numpy batch on the mesh (the trainer's `pipeline.to_global`), so the bank
    is sharded like the training batches and never gathered to one host."""
    num_batches = int(config.student.regression_batches)
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.seed = int(data.seed) + BANK_SEED_OFFSET
    iterator = iter(pipeline_lib.build_pipeline(data, assets.sources, assets.tokenizer, assets.codec))
    sigmas = tuple(float(s) for s in flow.sampling_sigmas(int(config.sampling.teacher_steps), mu))
    cfg = float(config.sampling.cfg_scale)

    @functools.partial(jax.jit, static_argnames=("spec",))
    def teacher_sample(params, te_params, batch, key, spec):
        cond = conditioning.encode(te_params, spec, batch["input_ids"], batch["attention_mask"],
                                   batch.get("condition_latents"))
        neg_ids, neg_mask = conditioning.empty_prompt(spec, batch["input_ids"].shape[0])
        neg = conditioning.encode(te_params, spec, neg_ids, neg_mask, batch.get("condition_latents"))
        noise = jax.random.normal(key, batch["target_latents"].shape, jnp.float32)
        target = sampling.euler_sample(model, params, noise, cond, np.asarray(sigmas), neg_cond=neg,
                                       cfg_scale=cfg)
        return noise, target

    bank: dict[str, list[dict]] = {}
    started = time.perf_counter()
    key = jax.random.key(int(config.seed) + 3)
    for i in range(num_batches):
        batch = next(iterator)
        task = batch.pop("task")
        arrays = to_device(batch)
        noise, target = teacher_sample(teacher_params, assets.text_encoder, arrays, jax.random.fold_in(key, i),
                                       spec=assets.tasks[task])
        entry = {k: v for k, v in arrays.items() if k != "target_latents"}
        entry["noise"], entry["target"] = noise, jax.block_until_ready(target)
        bank.setdefault(task, []).append(entry)
    log(f"regression pairs: {num_batches} batches ({', '.join(f'{t} {len(b)}' for t, b in bank.items())}) of "
        f"{len(sigmas) - 1}-step teacher samples with CFG {cfg} in {time.perf_counter() - started:.0f}s")
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
