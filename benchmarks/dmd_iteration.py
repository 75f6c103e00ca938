"""Cost of one DMD iteration against the sum of the passes it is made of, and its FLOP/s against a large matmul.

    python benchmarks/dmd_iteration.py [--config=configs/5to5.py:toy] [--repeats=5]
    # an accelerator: a larger model in bfloat16 against a bfloat16 matmul of the chip's size
    python benchmarks/dmd_iteration.py --config.model.dtype=bfloat16 --config.model.num_layers=8 \
        --config.model.num_attention_heads=12 --config.model.attention_head_dim=128 \
        --config.model.axes_dims_rope='(16,56,56)' --config.data.image_size=128 --config.data.max_prompt_tokens=320 \
        --matmul_size=8192 --matmul_dtype=bfloat16

One iteration = `fake_score.updates_per_student` critic updates + one generator update: the main job's jitted
steps, setup and initial state, built by `qwen_flash_jax.train.components` from the config, on one T2I batch of
the job's input pipeline (the teachers are one random transformer: cost does not depend on values; the toy data
and text encoder of the config's image size are built on the first run and cached). The "sum of passes" counts
what the iteration must run at its expected student step k ~ U{0..K-1}: the backward simulation (step 0 in full,
later steps on its cached text/condition prefix), the student forward (+ backward for the generator), the fake
score's forward (+ backward for the critic), and the teacher forwards: per active teacher one CFG forward on the
doubled batch, and with the decoupled schedule (`guidance.schedule`, the toy default) one conditional forward
more. Each pass is timed in isolation. Ratio ~1 means no waste.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.extend import core as jax_core
from ml_collections import config_flags

from qwen_flash_jax import config_lib, sharding
from qwen_flash_jax.data import pipeline
from qwen_flash_jax.diffusion import conditioning, sampling
from qwen_flash_jax.train import components

_CONFIG = config_flags.DEFINE_config_file("config", "configs/5to5.py:toy", "Config file.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median is reported).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that sets the reference rate.")
_MATMUL_DTYPE = flags.DEFINE_enum(
    "matmul_dtype",
    "float32",
    ["float32", "bfloat16"],
    "The reference matmul's dtype: the model's matmul dtype (config.model.dtype).",
)


def _time(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _matmul_flops(fn, *args):
    """2 * M * N * K summed over the matmuls (dot_general) of fn's jaxpr, scans counted `length` times.

    Counted from the traced program, so the number is the same on every backend (a GPU's compiled cost analysis
    counts library matmuls as zero, XLA's counts a loop body once); elementwise work is left out.
    """

    def count(jaxpr):
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
                rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
                total += 2.0 * np.prod(lhs) * np.prod(rhs_free)
                continue
            inner = 0.0
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax_core.ClosedJaxpr):
                        sub_flops = count(sub.jaxpr)
                        inner = max(inner, sub_flops) if eqn.primitive.name == "cond" else inner + sub_flops
                    elif isinstance(sub, jax_core.Jaxpr):
                        inner += count(sub)
            total += inner * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def main(argv):
    del argv
    config = _CONFIG.value
    repeats = _REPEATS.value
    # The main job's components, setup, initial state and jitted steps (donation included); the teachers are one
    # random transformer, since cost does not depend on the weights.
    parts = components.build(config, log=lambda *_: None, random_teachers=True)
    model = components.student_model(parts)
    setup = components.distill_setup(config, model, parts.mu)
    state = components.initial_state(config, parts, setup)
    critic, gen = components.jitted_steps(setup, state=state, text_encoder=parts.assets.text_encoder)
    names = setup.teacher_names
    teachers = parts.teachers
    params = teachers[names[0]]  # never donated: the passes below are timed on it
    te_params = parts.assets.text_encoder
    # One T2I batch of the main job's input pipeline, on the mesh as the job places it.
    batches = pipeline.build_pipeline(
        config_lib.distill_data_config(config),
        parts.assets.sources,
        parts.assets.tokenizer,
        parts.assets.codec,
        condition_pixels=parts.assets.condition_pixels,
    )
    batch = next(b for b in batches if b["task"] == "t2i")
    batch.pop("task")
    batch = pipeline.to_global(batch, sharding.batch_sharding(parts.mesh, parts.rules))
    spec = parts.assets.tasks["t2i"]
    ids, mask, latents = batch["input_ids"], batch["attention_mask"], batch["target_latents"]
    batch_size, h, w = latents.shape[0], *spec.latent_hw
    K = int(config.student.num_steps)
    ratio = int(config.fake_score.updates_per_student)

    t2i_offset = components.CONDITION_OFFSET["t2i"]
    carried = [state]

    def iteration():
        # Each call continues from the last one's state, so the student steps k it draws vary from call to call
        # (restarting from one state would time one fixed k sequence instead of the average over k).
        s = carried[0]
        for _ in range(ratio):
            s, _ = critic(s, te_params, batch, spec=spec)
        s, m = gen(s, te_params, teachers, batch, spec=spec, condition_offset=t2i_offset)
        carried[0] = s
        return s

    t_iter = _time(iteration, repeats)

    cond = jax.jit(lambda: conditioning.encode(te_params, spec, ids, mask))()
    t = jnp.full((batch_size,), 0.5)
    fwd = jax.jit(lambda p, z: sampling.velocity(model, p, cond, z, t)[0])
    fwd2 = jax.jit(lambda p, z: sampling.velocity(model, p, cond.pair(cond), z, sampling.pair(t, t))[0])
    fwd_bwd = jax.jit(jax.grad(lambda p, z: jnp.mean(sampling.velocity(model, p, cond, z, t)[0] ** 2)))
    causal = model.config.causal_condition
    if causal:  # the backward simulation's later steps run on step 0's prefix keys and values
        _, prefix = sampling.velocity(model, params, cond, latents, t, kv_cache_mode="extract")
        fwd_cached = jax.jit(lambda p, z: sampling.velocity(model, p, cond, z, t, prefix, "cached")[0])
    else:
        fwd_cached = fwd
    t_fwd = _time(lambda: fwd(params, latents), repeats)
    t_cached = _time(lambda: fwd_cached(params, latents), repeats)
    t_fwd2 = _time(lambda: fwd2(params, jnp.concatenate([latents, latents])), repeats)
    t_fb = _time(lambda: fwd_bwd(params, latents), repeats)
    gan_on = bool(setup.gan_weight)
    decoupled = setup.schedule == "decoupled"

    def iteration_total(fwd_, cached_, fwd2_, fb_):
        """One iteration's passes at the expected k ~ U{0..K-1}, weighting either their times or their FLOPs.
        With the prefix cache a simulation to step k runs one full forward (step 0) and k - 1 cached ones."""
        if causal:
            critic_sim = fwd_ + (K - 1) / 2 * cached_  # steps 0..k-1 and the x0 at k
            gen_sim = (K - 1) / K * fwd_ + (K - 1) * (K - 2) / (2 * K) * cached_  # steps 0..k-1 only
        else:
            critic_sim, gen_sim = (K + 1) / 2 * fwd_, (K - 1) / 2 * fwd_
        # + fake fwd/bwd (on student and real samples with the GAN term)
        critic_total = critic_sim + (2 if gan_on else 1) * fb_
        # + student fwd/bwd + teachers (CFG) + fake forward (and its backward to the sample with the GAN term)
        teachers_ = len(names) * (fwd2_ + (fwd_ if decoupled else 0.0))
        gen_total = gen_sim + fb_ + teachers_ + (fb_ if gan_on else fwd_)
        return ratio * critic_total + gen_total

    passes = iteration_total(t_fwd, t_cached, t_fwd2, t_fb)
    # Useful FLOPs of the iteration (a loop over a traced k has no static FLOP count of its own).
    f_fwd = _matmul_flops(fwd, params, latents)
    f_fb = _matmul_flops(fwd_bwd, params, latents)
    flops = iteration_total(
        f_fwd,
        _matmul_flops(fwd_cached, params, latents),
        _matmul_flops(fwd2, params, jnp.concatenate([latents, latents])),
        f_fb,
    )
    n = _MATMUL_SIZE.value
    a = jax.random.normal(jax.random.key(1), (n, n), _MATMUL_DTYPE.value)
    matmul = jax.jit(lambda x: x @ x)
    t_mm = _time(lambda: matmul(a), repeats)
    mm_rate = 2 * n**3 / t_mm
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"device {jax.devices()[0].device_kind}; config {config.variant}: {n_params / 1e6:.1f}M parameters, "
        f"{config.model.dtype} matmuls, batch {batch_size}, {h * w} image tokens, {K}-step student, "
        f"{ratio} critic updates, teachers {names}, {setup.schedule} schedule"
    )
    print(
        f"passes: forward {t_fwd * 1e3:.1f} ms, on the cached prefix {t_cached * 1e3:.1f} ms, "
        f"CFG forward (2x batch) {t_fwd2 * 1e3:.1f} ms, forward+backward {t_fb * 1e3:.1f} ms"
    )
    print(
        f"DMD iteration {t_iter * 1e3:.1f} ms vs sum of its passes {passes * 1e3:.1f} ms: ratio {t_iter / passes:.2f}"
    )
    rate = lambda f, t: f"{f / t / 1e9:.1f} GFLOP/s = {f / t / mm_rate:.2f} of the matmul"  # noqa: E731
    print(f"{n}^3 {_MATMUL_DTYPE.value} matmul: {mm_rate / 1e9:.1f} GFLOP/s")
    print(f"forward {rate(f_fwd, t_fwd)}; forward+backward {rate(f_fb, t_fb)}")
    print(f"DMD iteration (matmul FLOPs of its passes, expected k): {rate(flops, t_iter)}")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"peak device memory {stats['peak_bytes_in_use'] / 2**30:.1f} GiB")


if __name__ == "__main__":
    app.run(main)
