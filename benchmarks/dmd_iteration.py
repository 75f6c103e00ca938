"""Cost of the DMD updates: per update (critic, generator) its time, matmul FLOPs and FLOP/s against a large matmul
(and a chip's peak: MFU), and the whole iteration against the sum of the passes it is made of.

    python benchmarks/dmd_iteration.py [--config=configs/5to5.py:toy] [--repeats=5]
    # a GPU: the full-scale config at 5 of its 32 layers (1.21B parameters), 1024^2 images (4096 image tokens), on
    # synthetic inputs, against the H200's bfloat16 peak (benchmarks/gpu_dmd_iteration.sh runs this at two attentions)
    python benchmarks/dmd_iteration.py --config=configs/5to5.py --inputs=synthetic --nopasses \
        --config.model.num_layers=5 --config.text_encoder.kind=toy --config.model.context_in_dim=64 \
        --config.data.batch_size=8 --attention=auto --matmul_size=8192 --matmul_dtype=bfloat16 \
        --peak_tflops=989

The updates are the main job's jitted, donating steps, setup and initial state, built by
`qwen_flash_jax.train.components` from the config; the teachers are one random transformer (cost does not depend on
the weights). Inputs (`--inputs`):
  * "pipeline": one T2I batch of the job's input pipeline and the config's text encoder (the toy data and text
    encoder of the config's image size are built on the first run and cached);
  * "synthetic": no data and no trained encoder: a T2I batch of the config's shapes (the empty prompt padded to
    `data.max_prompt_tokens`, random latents, the T2I categories in turn) and a randomly initialised toy text encoder
    (`text_encoder.kind="toy"`, its width = `model.context_in_dim`). For configs whose data or encoder cannot be
    built where the benchmark runs (full scale, a GPU machine without TensorFlow Datasets).

Each update is timed on its own, `--repeats` times after a first call (the compile, reported apart), each call
continuing from the last one's state, so the student steps k the updates draw vary from call to call as in a run.
Its FLOPs are the matmul FLOPs of the passes it runs at the expected k (k ~ `fake_score.step_probs` for the critic,
uniform for the generator), counted from the traced passes: the backward simulation (step 0 in full, later steps on
its cached text/condition prefix), the student forward (+ backward for the generator), the fake score's forward
(+ backward for the critic), and the teacher forwards: per teacher that the batch's conditions weight above 0 at k,
one CFG forward on the doubled batch, and with the decoupled schedule one conditional forward more. The text encoder,
the optimizer and elementwise work are left out. FLOP/s = those FLOPs / the mean time of the calls.

With `--passes` (the default) each pass is also timed in isolation, and one iteration
(`fake_score.updates_per_student` critic updates + one generator update) against the sum of its passes at the
expected k: ratio ~1 means no waste.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from qwen_flash_jax import config_lib, sharding
from qwen_flash_jax.data import pipeline
from qwen_flash_jax.data.world import T2I_CATEGORIES
from qwen_flash_jax.diffusion import conditioning, sampling
from qwen_flash_jax.distill.costs import matmul_flops, update_costs
from qwen_flash_jax.loading import build_transformer
from qwen_flash_jax.models.codec import SpaceToDepthCodec
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.text import encoder as text_encoder
from qwen_flash_jax.text import prompts as prompt_lib
from qwen_flash_jax.text.tokenizer import train_tokenizer
from qwen_flash_jax.train import assets as assets_lib
from qwen_flash_jax.train import components, teacher

_CONFIG = config_flags.DEFINE_config_file("config", "configs/5to5.py:toy", "Config file.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median and mean are reported).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that sets the reference rate.")
_MATMUL_DTYPE = flags.DEFINE_enum(
    "matmul_dtype",
    "float32",
    ["float32", "bfloat16"],
    "The reference matmul's dtype: the model's matmul dtype (config.model.dtype).",
)
_INPUTS = flags.DEFINE_enum(
    "inputs", "pipeline", ["pipeline", "synthetic"], "The job's input pipeline and text encoder, or synthetic ones."
)
_PASSES = flags.DEFINE_bool("passes", True, "Also time each pass in isolation and the iteration against their sum.")
_ATTENTION = flags.DEFINE_string(
    "attention", "", "Attention implementation instead of model.attention's (auto: cuDNN on GPU), e.g. dense"
)
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", 0.0, "The chip's dense peak in the matmul dtype, e.g. 989 (H200, bfloat16): prints the MFU."
)


def _calls(fn, repeats):
    """(seconds of the first call, seconds of each of `repeats` calls after it)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, times


def _time(fn, repeats):
    return statistics.median(_calls(fn, repeats)[1])


def _random_components(config):
    """`components.build(config, random_teachers=True)` without the assets (no data, no text encoder)."""
    mesh, rules = config_lib.make_mesh(config), config_lib.mesh_rules(config)
    model_config = config_lib.transformer_config(config)
    params = build_transformer(model_config, seed=0, mesh=mesh, rules=rules).params
    teachers = {name: params for name in config.guidance.teachers}
    return components.Components(mesh, rules, model_config, None, teachers, params, params, teacher.target_mu(config))


def synthetic_inputs(config, mesh, rules):
    """(random toy text encoder, T2I task spec, T2I batch on the mesh) of the config's shapes."""
    te = config.text_encoder
    if te.kind != "toy":
        raise ConfigError("--inputs=synthetic runs a random toy text encoder: set --config.text_encoder.kind=toy")
    # A tokenizer that knows the prompt template (its system prefix and special tokens); the prompt is empty.
    tokenizer = train_tokenizer([prompt_lib.build_prompt("a photo", 0)] * 4, vocab_size=int(te.vocab_size))
    te_config = assets_lib.toy_text_encoder_config(
        config, tokenizer, feature_layers=tuple(int(i) for i in te.feature_layers)
    )
    if te_config.output_size != int(config.model.context_in_dim):
        raise ConfigError(
            f"the toy text encoder's width {te_config.output_size} (hidden_size x feature_layers) != "
            f"model.context_in_dim {config.model.context_in_dim}"
        )
    prompts = pipeline.PromptEncoder.from_config(tokenizer, config.data)
    grid = SpaceToDepthCodec(patch=assets_lib.latent_scale(config))  # only the latent grid: the batch has latents
    spec = conditioning.task_specs(prompts, grid, int(config.data.image_size))["t2i"]
    batch_size = int(config.data.batch_size)
    batch = {
        "input_ids": np.tile(np.asarray(spec.empty_ids, np.int32), (batch_size, 1)),
        "attention_mask": np.tile(np.asarray(spec.empty_mask, np.int32), (batch_size, 1)),
        "target_latents": np.random.default_rng(0).standard_normal(
            (batch_size, spec.target_tokens, int(config.model.in_channels)), np.float32
        ),
        "category": np.arange(batch_size, dtype=np.int32) % len(T2I_CATEGORIES),
    }
    batch = pipeline.to_global(batch, sharding.batch_sharding(mesh, rules))
    return text_encoder.init_params(te_config, seed=0), spec, batch


def _pipeline_batch(config, parts):
    """One T2I batch of the main job's input pipeline, on the mesh as the job places it."""
    batches = pipeline.build_pipeline(
        config_lib.distill_data_config(config),
        parts.assets.sources,
        parts.assets.tokenizer,
        parts.assets.codec,
        condition_pixels=parts.assets.condition_pixels,
    )
    batch = next(b for b in batches if b["task"] == "t2i")
    batch.pop("task")
    return pipeline.to_global(batch, sharding.batch_sharding(parts.mesh, parts.rules))


def _peak_gib():
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def main(argv):
    del argv
    config = _CONFIG.value
    repeats = _REPEATS.value
    if _ATTENTION.value:
        with config.unlocked():
            config.model.attention = _ATTENTION.value
    if _INPUTS.value == "synthetic":
        parts = _random_components(config)
        te_params, spec, batch = synthetic_inputs(config, parts.mesh, parts.rules)
    else:
        parts = components.build(config, log=lambda *_: None, random_teachers=True)
        te_params, spec = parts.assets.text_encoder, parts.assets.tasks["t2i"]
        batch = _pipeline_batch(config, parts)
    # The main job's setup, initial state and jitted steps (donation included).
    model = components.student_model(parts)
    setup = components.distill_setup(config, model, parts.mu)
    state = components.initial_state(config, parts, setup)
    critic, gen = components.jitted_steps(setup, state=state, text_encoder=te_params)
    names = setup.teacher_names
    teachers = parts.teachers
    params = teachers[names[0]]  # never donated: the passes below run on it
    ids, mask, latents = batch["input_ids"], batch["attention_mask"], batch["target_latents"]
    batch_size, h, w = latents.shape[0], *spec.latent_hw
    ratio = int(config.fake_score.updates_per_student)
    t2i_offset = components.CONDITION_OFFSET["t2i"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"device {jax.devices()[0].device_kind}; config {config.variant}: {n_params / 1e6:.1f}M parameters, "
        f"{config.model.dtype} matmuls, attention {config.model.get('attention', 'auto')}, batch {batch_size}, "
        f"{h * w} image + {spec.layout.seq_len - h * w} text tokens, {len(setup.timesteps)}-step student, {ratio} "
        f"critic updates, teachers {names}, {setup.schedule} schedule, {_INPUTS.value} inputs",
        flush=True,
    )

    # Each call continues from the last one's state, so the student steps k drawn vary from call to call
    # (restarting from one state would time one fixed k sequence instead of the average over k).
    carried = [state]
    drawn_k = []

    def critic_update():
        carried[0], _ = critic(carried[0], te_params, batch, spec=spec)
        return carried[0]

    def generator_update():
        carried[0], metrics = gen(carried[0], te_params, teachers, batch, spec=spec, condition_offset=t2i_offset)
        drawn_k.append(metrics["k"])
        return carried[0]

    critic_first, critic_times = _calls(critic_update, repeats)
    critic_peak = _peak_gib()
    gen_first, gen_times = _calls(generator_update, repeats)
    gen_peak = _peak_gib()

    cond = jax.jit(lambda: conditioning.encode(te_params, spec, ids, mask))()
    t = jnp.full((batch_size,), 0.5)
    fwd = jax.jit(lambda p, z: sampling.velocity(model, p, cond, z, t)[0])
    fwd2 = jax.jit(lambda p, z: sampling.velocity(model, p, cond.pair(cond), z, sampling.pair(t, t))[0])
    fwd_bwd = jax.jit(jax.grad(lambda p, z: jnp.mean(sampling.velocity(model, p, cond, z, t)[0] ** 2)))
    # The backward simulation's later steps run on step 0's prefix keys and values.
    extract = jax.jit(lambda p, z: sampling.velocity(model, p, cond, z, t, kv_cache_mode="extract")[1])
    if model.config.causal_condition:
        fwd_cached = jax.jit(lambda p, z, prefix: sampling.velocity(model, p, cond, z, t, prefix, "cached")[0])
    else:
        fwd_cached = jax.jit(lambda p, z, prefix: fwd(p, z))
    latents2 = jnp.concatenate([latents, latents])
    abstract_prefix = jax.eval_shape(extract, params, latents)
    flops = {
        "fwd": matmul_flops(fwd, params, latents),
        "cached": matmul_flops(fwd_cached, params, latents, abstract_prefix),
        "fwd2": matmul_flops(fwd2, params, latents2),
        "fb": matmul_flops(fwd_bwd, params, latents),
    }
    gan = bool(setup.gan_weight) and "t2i" in setup.gan_tasks
    categories = np.asarray(jax.device_get(batch["category"])) + t2i_offset
    critic_flops, gen_flops = update_costs(setup, flops, categories, gan)

    n = _MATMUL_SIZE.value
    a = jax.random.normal(jax.random.key(1), (n, n), _MATMUL_DTYPE.value)
    matmul = jax.jit(lambda x: x @ x)
    mm_rate = 2 * n**3 / _time(lambda: matmul(a), repeats)
    peak = _PEAK_TFLOPS.value * 1e12
    print(
        f"{n}^3 {_MATMUL_DTYPE.value} matmul: {mm_rate / 1e12:.4g} TFLOP/s"
        + (f" = {mm_rate / peak:.3f} of the {_PEAK_TFLOPS.value:g} TFLOP/s peak" if peak else "")
    )

    def rate(f, seconds):
        line = f"{f / seconds / 1e12:.4g} TFLOP/s = {f / seconds / mm_rate:.3f} of the matmul"
        return line + (f", MFU {f / seconds / peak:.3f}" if peak else "")

    def update_line(name, first, times, f, peak_gib):
        mean = statistics.mean(times)
        memory = f"; peak device memory {peak_gib:.1f} GiB" if peak_gib is not None else ""
        return (
            f"{name}: first call (compile) {first:.1f} s; {len(times)} calls median "
            f"{statistics.median(times) * 1e3:.1f} ms, mean {mean * 1e3:.1f} ms; {f / 1e12:.4g} TFLOP at the "
            f"expected k -> {rate(f, mean)}{memory}"
        )

    print(update_line("critic update", critic_first, critic_times, critic_flops, critic_peak))
    print(update_line("generator update", gen_first, gen_times, gen_flops, gen_peak))
    print(f"generator's student steps k, in call order: {[int(k) for k in jax.device_get(drawn_k)]}")
    iteration_time = ratio * statistics.mean(critic_times) + statistics.mean(gen_times)
    iteration_flops = ratio * critic_flops + gen_flops
    print(
        f"DMD iteration ({ratio} critic + 1 generator updates, from the means): {iteration_time * 1e3:.1f} ms, "
        f"{iteration_flops / 1e12:.4g} TFLOP -> {rate(iteration_flops, iteration_time)}"
    )
    if not _PASSES.value:
        return

    def iteration():
        for _ in range(ratio):
            critic_update()
        return generator_update()

    t_iter = _time(iteration, repeats)
    prefix = extract(params, latents)
    times = {
        "fwd": _time(lambda: fwd(params, latents), repeats),
        "cached": _time(lambda: fwd_cached(params, latents, prefix), repeats),
        "fwd2": _time(lambda: fwd2(params, latents2), repeats),
        "fb": _time(lambda: fwd_bwd(params, latents), repeats),
    }
    critic_passes, gen_passes = update_costs(setup, times, categories, gan)
    passes = ratio * critic_passes + gen_passes
    print(
        f"passes: forward {times['fwd'] * 1e3:.1f} ms, on the cached prefix {times['cached'] * 1e3:.1f} ms, "
        f"CFG forward (2x batch) {times['fwd2'] * 1e3:.1f} ms, forward+backward {times['fb'] * 1e3:.1f} ms"
    )
    print(
        f"DMD iteration {t_iter * 1e3:.1f} ms (median) vs sum of its passes {passes * 1e3:.1f} ms: ratio "
        f"{t_iter / passes:.2f}"
    )
    print(f"forward {rate(flops['fwd'], times['fwd'])}; forward+backward {rate(flops['fb'], times['fb'])}")
    print(f"DMD iteration (median) {rate(iteration_flops, t_iter)}")


if __name__ == "__main__":
    app.run(main)
