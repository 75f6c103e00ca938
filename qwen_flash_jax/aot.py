"""Compile the DMD steps ahead of time for a TPU slice, on abstract state: does the config fit, and what would a
step cost?

    python -m qwen_flash_jax.aot --config=configs/5to5.py --topology=v5p-16 [--mesh=fsdp:4,tensor:2] \
        [--teacher_dtype=bfloat16] [--config.model.remat_policy=full ...]

No weights and no data: every parameter, optimizer state, text-encoder weight and batch is a `jax.ShapeDtypeStruct`
with its `NamedSharding` on a mesh over the slice's devices (libtpu describes them; no TPU is needed). The critic
and generator steps are built by the same code the distillation job runs (`train.components`, `distill.steps`)
and compiled with `jax.jit(...).lower(...).compile()` for the run's batches at the config's sizes (T2I, edit, and one
edit per layout of `data.edit_layouts`, whose several condition images make longer sequences). Per step it
prints XLA's per-device memory (arguments, outputs, temporaries, peak) against the chip's HBM, the update's model
FLOPs per device (its matmuls at the expected student step, counted from the traced passes: `distill.costs`), the
projected MFU (XLA's cost model: the FLOP rate it projects for the program, over the chip's bf16 peak) and the
estimated time (the model FLOPs at that rate). XLA's own FLOPs and time are printed beside them but are not the
step's: its cost analysis counts each loop body once (the 32 scanned layers, the backward simulation's loop). The
last line says `fits` or `does not fit` with the largest per-device peak; the exit status is 0 only if every step
fits (1 if one does not, 2 for a bad argument).

The Qwen3-VL text encoder's sizes come from `text_encoder.path`'s config.json when it is set (no weights are read),
else from the published Qwen3-VL-8B (`QWEN3_VL_8B`). Prompts are laid out by the project's template with a
stand-in tokenizer: the system prefix it drops may differ from Qwen's by a few tokens of the 512.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from qwen_flash_jax import config_lib, sharding, topologies
from qwen_flash_jax.data import edit_layouts, mixing
from qwen_flash_jax.data import pipeline as pipeline_lib
from qwen_flash_jax.diffusion import conditioning
from qwen_flash_jax.diffusion.conditioning import edit_spec, task_specs
from qwen_flash_jax.distill import costs, gan
from qwen_flash_jax.distill import steps as steps_lib
from qwen_flash_jax.loading import build_transformer
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.text import encoder as text_encoder
from qwen_flash_jax.text import prompts as prompt_lib
from qwen_flash_jax.text import qwen3_vl
from qwen_flash_jax.text import qwen3_vl_vision as vision_lib
from qwen_flash_jax.text.tokenizer import train_tokenizer
from qwen_flash_jax.train import assets as assets_lib
from qwen_flash_jax.train import components, jobs, teacher, text_states

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/5to5.py", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, f"TPU slice: {', '.join(topologies.SLICES)}, or e.g. v5p:2x2x1")
_MESH = flags.DEFINE_string("mesh", "", "Mesh axes instead of the config's, e.g. fsdp:8,tensor:2 (-1 = the rest)")
_TEACHER_DTYPE = flags.DEFINE_string(
    "teacher_dtype", "", "Stored dtype of the frozen teachers (default: config_lib.frozen_dtype, as the job keeps them)"
)
_ATTENTION = flags.DEFINE_string(
    "attention", "", "Attention implementation instead of model.attention's (auto: splash on TPU), e.g. dense"
)
_TASKS = flags.DEFINE_list(
    "tasks", [], "Batches to compile for: t2i, edit, edit:1 ... (one per data.edit_layouts layout); default: the run's"
)
STEPS = ("critic", "generator")
_STEPS = flags.DEFINE_list("steps", list(STEPS), "Steps to compile (at full size each takes minutes)")
flags.mark_flags_as_required(["config", "topology"])

GIB = 2**30
# Qwen3-VL-8B-Instruct's config.json (language model and vision tower), the text encoder Qwen-Image 2.x reads.
QWEN3_VL_8B = dict(
    model_type="qwen3_vl",
    image_token_id=151655,
    text_config=dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20]),
    ),
    vision_config=dict(
        depth=27,
        hidden_size=1152,
        intermediate_size=4304,
        num_heads=16,
        out_hidden_size=4096,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
    ),
)


@dataclasses.dataclass(frozen=True)
class StepReport:
    name: str  # "critic/t2i", ...
    arguments: int  # bytes per device
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int
    flops: float  # per device, XLA's count: each loop body once
    seconds: float  # XLA's estimate of that program, 0 when it gives none (not valid unless positive)
    out_of_memory: bool = False  # XLA refused the program: `temporaries` is what it said they need, the rest unknown
    model_flops: float = 0.0  # per device: the update's matmul FLOPs at the expected k (`distill.costs`)

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def utilisation(self) -> float | None:
        """XLA's projected FLOP rate over the chip's peak for the program it costs (None without a valid time)."""
        return self.flops / self.seconds if self.seconds > 0 and self.flops > 0 else None

    @property
    def estimate(self) -> float | None:
        """Seconds for the whole update: its model FLOPs at the FLOP rate XLA projects for what it counts. XLA
        counts each loop body once (the scanned layers, the backward simulation), so its own seconds fall short by
        about the layer count; the rate is what carries over."""
        rate = self.utilisation
        return self.model_flops / rate if rate and self.model_flops else None


@dataclasses.dataclass(frozen=True)
class _LatentGrid:
    """The codec's latent shape without its weights (task layouts need only that)."""

    scale: int
    channels: int

    def latent_shape(self, height: int, width: int):
        return height // self.scale, width // self.scale, self.channels


def parse_mesh(text: str, axes) -> tuple[tuple[str, int], ...]:
    """'fsdp:8,tensor:2' -> the config's axes with those sizes (unnamed axes become 1)."""
    names = [name for name, _ in axes]
    sizes = {name: 1 for name in names}
    for part in text.split(","):
        name, _, size = part.partition(":")
        if name not in sizes or not size.lstrip("-").isdigit():
            raise ConfigError(f"--mesh takes name:size pairs over the axes {names}, got {part!r}")
        sizes[name] = int(size)
    return tuple((name, sizes[name]) for name in names)


def abstract_params(model_config, mesh, rules, dtype=None):
    """(model, parameters as ShapeDtypeStructs with their shardings): the model is built under `jax.eval_shape`, so
    nothing is materialised."""
    built = []

    def build():
        model = build_transformer(model_config, mesh=mesh, rules=rules)
        built.append(model)
        return model.params

    shapes = jax.eval_shape(build)
    model = dataclasses.replace(built[0], params=None)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sh), shapes, model.param_shardings()
    )
    return model, abstract


def _leaf_names(path) -> tuple[str, ...]:
    """The trailing dict keys of a tree path: a parameter's path inside the optimizer state or the EMA."""
    names = []
    for key in reversed(path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        names.append(str(key.key))
    return tuple(reversed(names))


def shard_like_params(tree, params, mesh):
    """Shardings for `tree` (abstract): a leaf whose path ends in a parameter's path and has its shape is sharded
    like that parameter (optimizer moments, EMA), everything else is replicated."""
    by_path = {
        _leaf_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if _leaf_names(path)
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def shard(path, leaf):
        param = by_path.get(_leaf_names(path))
        sharding_ = param.sharding if param is not None and param.shape == leaf.shape else replicated
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_)

    return jax.tree_util.tree_map_with_path(shard, tree)


def abstract_state(config, setup, student, mesh):
    fake = student
    disc = jax.eval_shape(lambda: gan.init_head(jax.random.key(0), setup.model.config.inner_dim))
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = jax.eval_shape(lambda s, f, d, r: steps_lib.initial_state(setup, s, f, d, r), student, fake, disc, rng)
    return shard_like_params(state, student, mesh)


def _qwen3_vl_configs(config):
    """(text config, vision config): from `text_encoder.path`'s config.json when set, else Qwen3-VL-8B's."""
    path = config.text_encoder.path
    if path:
        return qwen3_vl.read_config(path), vision_lib.read_vision_config(path)
    text = qwen3_vl.config_from_hf(QWEN3_VL_8B)
    return text, vision_lib.vision_config_from_hf(QWEN3_VL_8B)


def _abstract_module_params(module_fn, mesh, rules, dtype):
    abstract = nnx.eval_shape(module_fn)
    _, state = nnx.split(abstract)
    shardings = sharding.param_shardings(state, mesh, rules)
    pure = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sh), nnx.to_pure_dict(state), shardings
    )
    nnx.replace_by_pure_dict(state, pure)
    return state


def _encoder_dtype(config):
    """The text encoder's dtype as the job stores it (train.assets): the transformer's compute dtype."""
    return jnp.dtype("bfloat16" if config.model.dtype == "bfloat16" else "float32")


def abstract_text_encoder(config, mesh, rules, image_pad_id: int):
    """The frozen Qwen3-VL encoder's parameters, abstract, stored in the job's frozen dtype and sharded by the rules."""
    if config.text_encoder.kind != "qwen3_vl":
        raise ConfigError("the AOT compile is for full-scale configs: text_encoder.kind must be 'qwen3_vl'")
    text_config, vision_config = _qwen3_vl_configs(config)
    if text_config.output_size != int(config.model.context_in_dim):
        raise ConfigError(
            f"the text encoder's hidden size {text_config.output_size} != model.context_in_dim "
            f"{config.model.context_in_dim}"
        )
    # The stand-in tokenizer's <|image_pad|> id, so that the encoder finds the template's image slots.
    text_config = dataclasses.replace(text_config, image_pad_id=image_pad_id)
    dtype = _encoder_dtype(config)
    text = _abstract_module_params(lambda: text_encoder.TextEncoder(text_config, rngs=nnx.Rngs(0)), mesh, rules, dtype)
    vision = _abstract_module_params(
        lambda: vision_lib.VisionTower(vision_config, rngs=nnx.Rngs(0)), mesh, rules, dtype
    )
    return qwen3_vl.Qwen3VLParams(
        text_encoder.TextEncoderParams(text_config, text), vision_lib.VisionParams(vision_config, vision)
    )


def stand_in_prompts(config):
    """A PromptEncoder over a small tokenizer trained on the prompt templates: the task layouts (prefix, image slots,
    prompt lengths) without Qwen's tokenizer files."""
    tokenizer = train_tokenizer(
        [prompt_lib.build_prompt("a photo", 0), prompt_lib.build_prompt("make it red", 1)] * 4, vocab_size=400
    )
    return pipeline_lib.PromptEncoder.from_config(tokenizer, config.data)


def abstract_batch(config, spec, mesh, rules, with_pixels: bool, states_dtype=None):
    """The batch the job's pipeline gives the steps; with `states_dtype`, precomputed text states too (in it)."""
    batch_size = int(config.data.batch_size)
    shard = sharding.batch_sharding(mesh, rules)
    length = len(spec.empty_ids)
    tokens, channels = spec.target_tokens, int(config.model.in_channels)

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct((batch_size,) + shape, dtype, sharding=shard)

    batch = {
        "input_ids": sds((length,), jnp.int32),
        "attention_mask": sds((length,), jnp.int32),
        "target_latents": sds((tokens, channels), jnp.float32),
        "category": sds((), jnp.int32),
    }
    if states_dtype is not None:
        width = int(config.model.context_in_dim)
        for prefix in ("", "negative_"):
            batch[f"{prefix}prompt_embeds"] = sds((length - spec.drop_idx, width), states_dtype)
            batch[f"{prefix}prompt_embeds_mask"] = sds((length - spec.drop_idx,), jnp.int32)
    if spec.task == "edit":
        condition_tokens = sum(h * w for h, w in spec.condition_shapes)
        batch["condition_latents"] = sds((condition_tokens, channels), jnp.float32)
        if with_pixels and spec.condition_sizes:  # several images (`data.edit_layouts`): their pixels flattened
            batch["condition_pixels"] = sds((sum(h * w for h, w in spec.condition_sizes), 3), jnp.uint8)
        elif with_pixels:
            size = int(config.data.image_size)
            batch["condition_pixels"] = sds((size, size, 3), jnp.uint8)
    return batch


def _compile(name, lowered, model_flops: float) -> StepReport:
    """Compiles for the slice; a program whose temporaries alone exceed HBM is refused by XLA, and reported so."""
    try:
        return dataclasses.replace(_report(name, lowered.compile()), model_flops=model_flops)
    except jax.errors.JaxRuntimeError as e:
        needed = re.search(r"HLO temporaries \(([0-9.]+)([KMGT])\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or needed is None:
            raise
        temporaries = int(float(needed.group(1)) * 2 ** (10 * "KMGT".index(needed.group(2)) + 10))
        return StepReport(name, 0, 0, 0, temporaries, 0.0, 0.0, out_of_memory=True, model_flops=model_flops)


def _report(name, compiled) -> StepReport:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return StepReport(
        name,
        int(memory.argument_size_in_bytes),
        int(memory.output_size_in_bytes),
        int(memory.alias_size_in_bytes),
        int(memory.temp_size_in_bytes),
        float(cost.get("flops", 0.0)),
        float(cost.get("optimal_seconds", 0.0)),
    )


def compile_steps(
    config, slice_: topologies.Slice, mesh_axes, teacher_dtype: str, tasks, log=print, attention="", steps=STEPS
):
    """Compiles the critic and/or generator step for each task; returns their StepReports (each also logged as soon
    as it is compiled: a full-size compile takes minutes)."""
    unknown = sorted(set(steps) - set(STEPS))
    if unknown or not steps:
        raise ConfigError(f"--steps: takes some of {', '.join(STEPS)}, got {', '.join(steps) or 'none'}")
    devices = topologies.devices(slice_)
    try:
        mesh = sharding.make_mesh(mesh_axes, devices)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    rules = config_lib.mesh_rules(config)
    model_config = config_lib.transformer_config(config)
    model_config = model_config.replace(attention=attention) if attention else model_config
    model, student = abstract_params(model_config, mesh, rules)
    frozen = jnp.dtype(teacher_dtype or config_lib.frozen_dtype(config))
    teacher_params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, frozen, sharding=p.sharding), student)
    names = tuple(config.guidance.teachers)
    teachers = {name: teacher_params for name in names}  # each teacher its own copy, as the job holds them
    setup = components.distill_setup(config, model, teacher.target_mu(config))
    state = abstract_state(config, setup, student, mesh)
    prompts = stand_in_prompts(config)
    te_params = abstract_text_encoder(config, mesh, rules, prompts.image_pad_id)
    # With precomputed text states the steps take the states in the batch and no text encoder (the job's
    # `data.precompute_text`); the encoder's sizes still lay out the tasks.
    precomputed = text_states.enabled(config)
    step_encoder = None if precomputed else te_params
    states_dtype = _encoder_dtype(config) if precomputed else None  # the states come out in the encoder's dtype
    specs = _task_specs(config, prompts, te_params.vision.config)
    tasks = tasks or run_tasks(config)

    state_shardings = jax.tree.map(lambda s: s.sharding, state)
    replicated = NamedSharding(mesh, PartitionSpec())
    critic = jax.jit(
        functools.partial(steps_lib.critic_step, setup),
        static_argnames=("spec",),
        donate_argnums=(0,),
        out_shardings=(state_shardings, replicated),
    )
    generator = jax.jit(
        functools.partial(steps_lib.generator_step, setup),
        static_argnames=("spec", "condition_offset"),
        donate_argnums=(0,),
        out_shardings=(state_shardings, replicated),
    )
    reports = []
    for task in tasks:
        if task not in specs:
            raise ConfigError(f"--tasks: unknown task {task!r}; one of {', '.join(specs)}")
        spec = specs[task]
        batch = abstract_batch(config, spec, mesh, rules, with_pixels=not precomputed, states_dtype=states_dtype)
        critic_flops, generator_flops = (
            f / len(devices) for f in update_flops(config, setup, step_encoder, spec, batch, mesh, rules)
        )
        if "critic" in steps:
            log(f"compiling critic/{task} ({spec.layout.seq_len} tokens) ...")
            lowered = critic.lower(state, step_encoder, batch, spec=spec)
            reports.append(_compile(f"critic/{task}", lowered, critic_flops))
            log(format_report(reports[-1], slice_))
        if "generator" in steps:
            log(f"compiling generator/{task} ({spec.layout.seq_len} tokens) ...")
            lowered = generator.lower(
                state, step_encoder, teachers, batch, spec=spec, condition_offset=components.CONDITION_OFFSET[spec.task]
            )
            reports.append(_compile(f"generator/{task}", lowered, generator_flops))
            log(format_report(reports[-1], slice_))
    return reports


def _task_specs(config, prompts, vision_config) -> dict:
    """The TaskSpecs of the job's batches, by key: "t2i", "edit", and one per edit layout (`data.edit_layouts`), as
    `train.assets.build_assets` makes them (here over a latent grid instead of a codec)."""
    grid = _LatentGrid(assets_lib.latent_scale(config), int(config.model.in_channels))
    size = int(config.data.image_size)
    try:
        specs = task_specs(prompts, grid, size, vision_config)
    except ValueError as e:
        raise ConfigError(f"data.image_size={config.data.image_size}: {e}") from None
    for index, layout in enumerate(edit_layouts.from_config(config.data)):
        try:
            specs[edit_layouts.task_key(index)] = edit_spec(prompts, grid, size, layout, vision_config)
        except ValueError as e:
            raise ConfigError(f"data.edit_layouts, layout {[list(s) for s in layout]}: {e}") from None
    return specs


def run_tasks(config) -> tuple[str, ...]:
    """The batch keys a run of `config` trains on: T2I and each edit layout, as far as the ratio has them."""
    t2i, edit = mixing.parse_ratio(config.data.task_ratio)
    layouts = edit_layouts.from_config(config.data)
    edits = [edit_layouts.task_key(i) for i in range(len(layouts))] if layouts else ["edit"]
    return (*(["t2i"] if t2i else []), *(edits if edit else []))


def update_flops(config, setup, step_encoder, spec, batch, mesh, rules) -> tuple[float, float]:
    """(critic, generator) update's matmul FLOPs over the global batch at the expected student step k, the text
    encoder's passes included when the steps run it (once in the critic, twice in the generator: prompt and CFG's
    empty prompt). Traced, not compiled. Attention is counted as the dense path computes it (every query against
    every key): a Pallas kernel's traced body is one tile of its grid."""
    dense, params = abstract_params(setup.model.config.replace(attention="dense"), mesh, rules)
    states = abstract_batch(config, spec, mesh, rules, with_pixels=False, states_dtype=_encoder_dtype(config))
    cond = jax.eval_shape(lambda b: conditioning.batch_conditioning(None, spec, b), states)
    passes = costs.pass_flops(dense, params, cond, batch["target_latents"])
    offset = components.CONDITION_OFFSET[spec.task]
    categories = offset + np.arange(len(pipeline_lib.CATEGORIES[spec.task]))
    gan = bool(setup.gan_weight) and spec.task in setup.gan_tasks
    critic, generator = costs.update_costs(setup, passes, categories, gan)
    if step_encoder is not None:
        encode = costs.matmul_flops(lambda te, b: conditioning.batch_conditioning(te, spec, b), step_encoder, batch)
        critic, generator = critic + encode, generator + 2 * encode
    return critic, generator


def format_report(report: StepReport, slice_: topologies.Slice) -> str:
    if report.out_of_memory:
        return (
            f"{report.name:16s} out of memory: XLA's HLO temporaries alone need {report.temporaries / GIB:.2f} GiB "
            f"per device of {slice_.chip.hbm_gib:g} GiB"
        )
    if report.estimate is not None:
        timing = f"est {report.estimate:8.3f} s  MFU {100 * report.utilisation / slice_.peak_flops:5.1f}%"
    else:  # libtpu's cost model gives no time, or a negative one (v6e, libtpu 0.0.42): no MFU either
        timing = f"est none (XLA's estimate: {report.seconds:.4g} s)"
    return (
        f"{report.name:16s} args {report.arguments / GIB:7.2f}  out {report.outputs / GIB:7.2f}  "
        f"(donated {report.aliased / GIB:6.2f})  temp {report.temporaries / GIB:7.2f}  "
        f"peak {report.peak / GIB:7.2f} / {slice_.chip.hbm_gib:.0f} GiB  {report.model_flops / 1e12:9.1f} TFLOP  "
        f"{timing}  (XLA: {report.flops / 1e12:.1f} TFLOP, {report.seconds:.3g} s, loop bodies once)"
    )


def run(config, topology: str, mesh_text: str, teacher_dtype: str, tasks, attention: str = "", steps=STEPS) -> bool:
    slice_ = topologies.get(topology)
    if teacher_dtype and teacher_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--teacher_dtype must be float32 or bfloat16, got {teacher_dtype!r}")
    axes = tuple(tuple(a) for a in config.mesh.axes)
    if mesh_text:
        axes = parse_mesh(mesh_text, axes)
    model = config_lib.transformer_config(config)
    model = model.replace(attention=attention) if attention else model
    tasks = tuple(tasks) or run_tasks(config)
    print(
        f"{slice_.name} ({slice_.topology}, {slice_.chips} x {slice_.chip.kind}, {slice_.chip.hbm_gib:.0f} GiB HBM, "
        f"{slice_.chip.bf16_tflops:.0f} TFLOP/s bf16); mesh {dict(axes)}; remat {model.remat_policy}; attention "
        f"{model.attention}; teachers {teacher_dtype or config_lib.frozen_dtype(config)}; "
        f"global batch {config.data.batch_size}; text "
        f"{'precomputed states' if text_states.enabled(config) else 'encoder in the steps'}"
    )
    reports = compile_steps(
        config,
        slice_,
        axes,
        teacher_dtype,
        tasks,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        attention=attention,
        steps=steps,
    )
    return summarise(reports, slice_, int(config.fake_score.updates_per_student), tasks)


def summarise(reports, slice_: topologies.Slice, ratio: int, tasks) -> bool:
    """Prints the per-step table, each task's DMD iteration (`ratio` critic updates and one generator update) and
    the verdict line; True if every step fits the chip's HBM."""
    for report in reports:
        print(format_report(report, slice_))
    by_name = {r.name: r for r in reports}
    for task in tasks:
        critic, generator = by_name.get(f"critic/{task}"), by_name.get(f"generator/{task}")
        if critic is None or generator is None:
            continue  # --steps compiled only one of them
        if critic.out_of_memory or generator.out_of_memory:
            print(f"iteration/{task}: no estimate (a step is out of memory)")
            continue
        if critic.estimate is None or generator.estimate is None:
            print(f"iteration/{task}: no estimate (XLA gives no valid time for a step)")
            continue
        seconds = ratio * critic.estimate + generator.estimate
        flops = ratio * critic.model_flops + generator.model_flops
        mfu = flops / (seconds * slice_.peak_flops)
        print(
            f"iteration/{task}: {ratio} critic + 1 generator updates: est {seconds:.2f} s, "
            f"{flops / 1e15:.3f} PFLOP per device, MFU {100 * mfu:.1f}%"
        )
    worst = max(reports, key=lambda r: r.peak)
    fits = all(r.peak <= slice_.hbm_bytes for r in reports)
    verdict = "fits" if fits else "does not fit"
    print(
        f"{verdict}: largest per-device peak {worst.peak / GIB:.2f} GiB ({worst.name}) of {slice_.chip.hbm_gib:g} GiB"
    )
    return fits


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    # Traced on the host's CPU; only the compile targets the slice (libtpu's topology, not a TPU backend).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    fits = jobs.exit_on_failure(
        run,
        _CONFIG.value,
        _TOPOLOGY.value,
        _MESH.value,
        _TEACHER_DTYPE.value,
        tuple(_TASKS.value),
        _ATTENTION.value,
        tuple(_STEPS.value),
    )
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    app.run(main)
