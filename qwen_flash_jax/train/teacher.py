"""Teacher training by flow matching: z_t = (1 - t) x + t eps, target velocity eps - x, Qwen-Image's time shift.

T2I and edit batches arrive interleaved by the configured ratio; each task's step compiles once (its layout is
static). Captions are dropped to the empty prompt at `caption_dropout` so the teacher supports CFG. The run
resumes from its last complete checkpoint; its final parameters are written to `<workdir>/params` (orbax) with a
`teacher.json` marker, which is what the distillation job loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import struct

from qwen_flash_jax import cache, checkpoint_io, config_lib, flow, sharding, training_loop
from qwen_flash_jax.data import pipeline as pipeline_lib
from qwen_flash_jax.diffusion import conditioning, sampling
from qwen_flash_jax.diffusion import scheduler as scheduler_lib
from qwen_flash_jax.diffusion.scheduler import SCHEDULER_CONFIG, FlowMatchScheduler
from qwen_flash_jax.errors import CheckpointError
from qwen_flash_jax.eval import bench_sets, report
from qwen_flash_jax.eval.generate import Generator, save_grid
from qwen_flash_jax.loading import build_transformer, from_params
from qwen_flash_jax.train import assets as assets_lib
from qwen_flash_jax.train import optim
from qwen_flash_jax.train.checkpoint import open_and_resume, place_on_mesh

MARKER = "teacher.json"


@struct.dataclass
class TeacherState:
    step: jax.Array
    params: dict
    ema: dict  # EMA of params (what the teacher samples with); equals params when ema_decay is 0
    opt_state: object
    rng: jax.Array  # raw uint32 key data, so the state checkpoints as plain arrays


def is_trained(workdir) -> bool:
    return (training_loop.workdir_path(workdir) / MARKER).exists()


def load_params(workdir, model):
    """The final parameters of a finished teacher run, restored into `model`'s shardings."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), model.params)
    return ocp.StandardCheckpointer().restore(training_loop.workdir_path(workdir) / "params", target)


def target_tokens(config) -> int:
    """The target image's packed latent token count: what the scheduler's dynamic shift is a function of."""
    return (int(config.data.image_size) // assets_lib.latent_scale(config)) ** 2


def schedule_folder(config) -> pathlib.Path | None:
    """The pipeline folder whose scheduler sets the run's schedule: `sampling.scheduler` if set, else the folder of
    the student's initial teacher or of a guiding teacher that holds `scheduler/scheduler_config.json` (a converted
    checkpoint with its pipeline's `scheduler/` beside `params/`). None: the config's `sampling` constants (the
    toy, and converted checkpoints without a scheduler)."""
    explicit = config.sampling.get("scheduler", "")  # absent from configs saved before the field existed
    if explicit:
        folder = pathlib.Path(explicit)
        if not (folder / SCHEDULER_CONFIG).is_file():
            raise config_lib.ConfigError(
                f"sampling.scheduler={explicit!r} holds no {SCHEDULER_CONFIG} (expected a diffusers pipeline folder)"
            )
        return folder
    names = dict.fromkeys((config.student.init_from, *config.guidance.teachers))
    folders = {}
    for name in names:
        path = config.teachers[name].path if name in config.teachers else ""
        if path and (pathlib.Path(path) / SCHEDULER_CONFIG).is_file():
            folders[name] = pathlib.Path(path)
    # One schedule serves every teacher (the student has one set of times): teachers that ship different ones
    # would each be sampled off their own.
    configs = {name: FlowMatchScheduler.from_pretrained(folder) for name, folder in folders.items()}
    if len(set(configs.values())) > 1:
        raise config_lib.ConfigError(
            f"teachers {', '.join(configs)} ship different schedulers; set sampling.scheduler to the one to use"
        )
    return next(iter(folders.values()), None)


def target_scheduler(config) -> FlowMatchScheduler | None:
    """The scheduler of `schedule_folder(config)` (None: the config's `sampling` constants). The teachers' and the
    student's samplers, the student's times (`distill.dmd.student_timesteps`) and the export all take their
    schedule from it."""
    folder = schedule_folder(config)
    if folder is None:
        return None
    scheduler = FlowMatchScheduler.from_pretrained(folder)
    if scheduler.sample_sigmas is not None:
        # A fixed grid is a distilled pipeline's own step list (Turbo's 8 steps); a teacher is sampled at
        # `sampling.teacher_steps` and the student at its own K, which such a grid does not give.
        raise config_lib.ConfigError(
            f"{folder / scheduler_lib.MODEL_INDEX} fixes sample_sigmas ({len(scheduler.sample_sigmas)} steps): a "
            "teacher's schedule must come from its scheduler config alone"
        )
    return scheduler


def target_mu(config) -> float:
    """The time shift of the config's target size: from the teacher's scheduler, else the `sampling` constants."""
    scheduler = target_scheduler(config)
    if scheduler is not None:
        return scheduler.mu(target_tokens(config))
    s = config.sampling
    return flow.dynamic_shift_mu(target_tokens(config), s.base_seq_len, s.max_seq_len, s.base_shift, s.max_shift)


def train_teacher(
    config,
    name: str,
    workdir,
    *,
    log=print,
    init_params=None,
    assets=None,
    stop_at=None,
    history=None,
    write_samples=True,
):
    """Trains teacher `name` of `config` in `workdir` (resuming if interrupted); returns its parameters.

    `history`, if given, receives (step, metrics) at every log step; `stop_at` ends the run early after that step
    without finishing it (a stand-in for preemption in tests).
    """
    workdir = training_loop.workdir_path(workdir)  # gs:// stays a cloud path
    run = config_lib.teacher_run_config(config, name)
    train_cfg = config_lib.teacher_train_view(config, name)
    steps = train_cfg.steps
    assets = assets or assets_lib.build_assets(run, log)
    mesh = config_lib.make_mesh(config)
    rules = config_lib.mesh_rules(config)
    model_cfg = config_lib.transformer_config(config)
    model = build_transformer(model_cfg, seed=int(config.seed), mesh=mesh, rules=rules)
    if init_params is not None:
        model = from_params(model_cfg, init_params, mesh=mesh, rules=rules)
    optimizer = optim.adamw(
        train_cfg.learning_rate,
        steps,
        warmup_steps=train_cfg.warmup_steps,
        weight_decay=float(config.optim.weight_decay),
        clip_norm=float(config.optim.clip_norm),
    )
    state = TeacherState(
        step=jnp.zeros((), jnp.int32),
        params=model.params,
        ema=jax.tree.map(jnp.copy, model.params),
        opt_state=optimizer.init(model.params),
        rng=jax.random.key_data(jax.random.key(int(config.seed))),
    )
    state = place_on_mesh(state, mesh)

    data = pipeline_lib.build_pipeline(
        run.data, assets.sources, assets.tokenizer, assets.codec, condition_pixels=assets.condition_pixels
    )
    iterator = iter(data)
    ckpt, state = open_and_resume(
        workdir / "checkpoints", config.train, state, iterator, label=f"teacher {name}", log=log
    )

    mu = target_mu(config)
    step_fn = _make_step(
        model,
        optimizer,
        mu,
        train_cfg.caption_dropout,
        train_cfg.ema_decay,
        train_cfg.uniform_t_fraction,
    )
    batch_sharding = sharding.batch_sharding(mesh, rules)
    writer = training_loop.metric_writer(workdir / "logs")
    log(
        f"teacher {name}: {steps} steps, batch {run.data.batch_size}, ratio {run.data.task_ratio}, "
        f"T2I {dict(run.data.t2i_weights)}, edit {dict(run.data.edit_weights)}"
    )

    def batches():
        for batch in iterator:
            task = batch.pop("task")
            yield task, pipeline_lib.to_global(batch, batch_sharding)

    def train_step(state, task_batch):
        task, batch = task_batch
        return step_fn(state, assets.text_encoder, batch, spec=assets.tasks[task])

    state, finished = training_loop.run(
        state,
        train_step,
        batches(),
        start=int(state.step),
        steps=steps,
        label=f"teacher {name}",
        log=log,
        log_every=int(config.train.log_every),
        writer=writer,
        history=history,
        checkpointer=ckpt,
        data_iterator=iterator,
        stop_at=stop_at,
    )
    if not finished:
        return None

    _write_final(workdir, state.ema, {"name": name, "steps": steps})
    if write_samples:
        generator = Generator(model, assets, mu, scheduler=target_scheduler(config))
        _write_samples(workdir, name, config, generator, state.ema, writer)
    writer.flush()
    return state.ema


def _make_step(model, optimizer, mu: float, caption_dropout: float, ema_decay: float, uniform_t_fraction: float = 0.0):
    def train_step(state: TeacherState, te_params, batch, *, spec):
        key = jax.random.wrap_key_data(state.rng)
        key, k_t, k_eps, k_drop = jax.random.split(key, 4)
        ids, mask = conditioning.drop_captions(
            k_drop, spec, batch["input_ids"], batch["attention_mask"], caption_dropout
        )
        cond = conditioning.encode(te_params, spec, ids, mask, **conditioning.image_inputs(batch))
        x = batch["target_latents"]
        t = flow.sample_training_t(k_t, x.shape[0], mu, uniform_fraction=uniform_t_fraction)
        eps = jax.random.normal(k_eps, x.shape, x.dtype)
        z = flow.interpolate(x, eps, t)

        def loss_fn(params):
            v, _ = sampling.velocity(model, params, cond, z, t)
            return flow.flow_matching_loss(v, x, eps)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = jax.tree.map(jnp.add, state.params, updates)
        # EMA with bias warm-up (decay ramps as (1 + n) / (10 + n)) so early weights do not linger.
        n = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
        metrics = {f"loss_{spec.task}": loss, "grad_norm": _global_norm(grads)}
        return state.replace(
            step=state.step + 1, params=params, ema=ema, opt_state=opt_state, rng=jax.random.key_data(key)
        ), metrics

    return jax.jit(train_step, static_argnames=("spec",), donate_argnums=(0,))


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _write_final(workdir: epath.Path, params, meta: dict):
    path = workdir / "params"
    if path.exists():
        path.rmtree()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()
    (workdir / MARKER).write_text(json.dumps(meta))


def _write_samples(workdir, name, config, generator: Generator, params, writer):
    """PNG grids of the teacher at its full step count and at 4 steps, same prompts and seeds."""
    size = int(config.data.image_size)
    t2i = bench_sets.t2i_bench(size, 6, int(config.eval.seed))
    edits = bench_sets.edit_bench(size, 4, int(config.eval.seed))
    cfg = float(config.sampling.cfg_scale)
    images = {}
    for steps in (int(config.sampling.teacher_steps), 4):
        samples = (
            {cat: generator.t2i(params, b.captions, num_steps=steps, cfg_scale=cfg) for cat, b in t2i.items()},
            {
                cat: generator.edit(params, b.sources, b.instructions, num_steps=steps, cfg_scale=cfg)
                for cat, b in edits.items()
            },
        )
        t2i_sections, edit_sections = report.benchmark_sections(
            t2i, edits, {f"teacher {name}, {steps} steps + CFG {cfg:g}\n{sampling.nfe(steps, cfg)} NFE": samples}
        )
        path = workdir / f"samples_{name}_{steps}steps.png"
        save_grid(path, t2i_sections + edit_sections)
        images[f"samples_{steps}steps"] = np.asarray(_read_png(path))[None]
    writer.write_images(0, images)


def _read_png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def cache_dir(config, name: str) -> pathlib.Path:
    """Where the cached toy teacher `name` lives: keyed by everything that determines its weights."""
    if name not in config.teachers:
        raise config_lib.ConfigError(f"unknown teacher {name!r}; the config defines {sorted(config.teachers.keys())}")
    spec = config.teachers[name]
    parent = cache_dir(config, spec.init_from).name if spec.init_from else ""
    d = config.data
    # How the blocks run (scanned or unrolled) and how the work is laid out over devices (the mesh) change only
    # float rounding, so they stay out of the key: a teacher trained with fsdp serves a data-parallel run.
    model = {k: v for k, v in config.model.to_dict().items() if k != "scan_layers"}
    key = cache.config_hash(
        model,
        config.text_encoder,
        config.codec,
        spec.train.to_dict(),
        [
            d.source,
            d.image_size,
            d.examples_per_category,
            d.seed,
            d.max_prompt_tokens,
            # only when set, so that the keys of teachers cached before it existed hold
            *([d.edit_prompt_tokens] if d.get("edit_prompt_tokens") else []),
        ],
        config.seed,
        parent,
        # v2: every sample's RoPE positions are its own, as if its prompt were not padded; a v1 teacher was trained
        # on positions moved by the padding and samples off its own distribution under v2's transformer
        "v2",
    )
    return cache.cache_category(config, "teachers") / f"{name}-{key}"


def ensure_teacher(config, name: str, *, log=print, assets=None):
    """Parameters of teacher `name`: from `teachers.<name>.path`, the cache, or trained now (parents first)."""
    check_source(config, name)
    spec = config.teachers[name]
    if spec.path:
        return _restore_standalone(config, spec.path)
    cache.cache_category(config, "teachers", log)  # says so when the package's trained toy teachers are used
    directory = cache_dir(config, name)
    if not is_trained(directory):
        init = ensure_teacher(config, spec.init_from, log=log, assets=assets) if spec.init_from else None
        with _exclusive(directory):
            if not is_trained(directory):  # another run may have finished it while we waited for the lock
                log(f"teacher {name!r} is not cached: training it in {directory}")
                train_teacher(config, name, directory, log=log, init_params=init, assets=assets)
    return _restore_standalone(config, directory)


@contextlib.contextmanager
def _exclusive(directory: pathlib.Path):
    """One trainer per cached teacher: concurrent runs sharing a cache would write into the same checkpoints."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(str(directory) + ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise config_lib.ConfigError(
                f"another run is training the cached teacher in {directory}; wait for it to finish "
                "(later runs reuse it) or give this run its own --config.cache_dir"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_source(config, name: str) -> None:
    """Fails fast, with one line, when teacher `name` has neither a usable checkpoint nor toy training steps, or
    when its training settings are out of range."""
    train = config_lib.teacher_train_view(config, name)  # also: the name must be one of the config's teachers
    spec = config.teachers[name]
    if not 0.0 <= train.uniform_t_fraction <= 1.0:
        raise config_lib.ConfigError(
            f"teachers.{name}.train.uniform_t_fraction must lie in [0, 1], got {train.uniform_t_fraction}"
        )
    if spec.path:
        if not (pathlib.Path(spec.path) / "params").exists():
            raise config_lib.ConfigError(
                f"teachers.{name}.path={spec.path!r} holds no teacher checkpoint "
                "(expected a directory with params/ written by a teacher run or by "
                "`python -m qwen_flash_jax.convert`)"
            )
        if (pathlib.Path(spec.path) / "config.json").exists():
            _check_converted(config, spec.path, f"teachers.{name}.path")
    elif train.steps <= 0:
        raise config_lib.ConfigError(f"teacher {name!r} needs a checkpoint: set --config.teachers.{name}.path")
    if spec.init_from:
        check_source(config, spec.init_from)


def _restore_standalone(config, directory):
    mesh = config_lib.make_mesh(config)
    model = build_transformer(
        config_lib.transformer_config(config), seed=0, mesh=mesh, rules=config_lib.mesh_rules(config)
    )
    if not (pathlib.Path(directory) / "params").exists():
        raise config_lib.ConfigError(f"no teacher parameters at {directory}/params")
    if (pathlib.Path(directory) / "config.json").exists():  # a converted diffusers checkpoint (orbax v1 layout)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), model.params)
        return checkpoint_io.restore_params(directory, target)  # cast to the model's param_dtype on read
    return load_params(directory, model)


# Fields that only say how the blocks run or are stored; the rest must match the converted checkpoint.
_RUNTIME_FIELDS = ("param_dtype", "dtype", "remat_policy", "scan_layers", "attention")


def _check_converted(config, directory, field: str) -> None:
    """A converted checkpoint's architecture against `config.model`, one line naming what differs."""
    try:
        stored = dataclasses.asdict(checkpoint_io.read_config(directory))
    except CheckpointError as e:
        raise config_lib.ConfigError(f"{field}: {e}") from None
    wanted = dataclasses.asdict(config_lib.transformer_config(config))
    diff = [
        f"{k}={stored[k]!r} (config: {wanted[k]!r})"
        for k in wanted
        if k not in _RUNTIME_FIELDS and stored.get(k) != wanted[k]
    ]
    if diff:
        raise config_lib.ConfigError(
            f"{field}={str(directory)!r} holds a different transformer: "
            + ", ".join(diff)
            + "; set model.* to match the checkpoint"
        )
