"""The distillation job: teachers (cached or trained), DMD training with resume, evaluation and reports.

    python -m qwen_flash_jax.main --config=configs/5to5.py:toy --workdir=/tmp/qf

Per generator update the loop runs `fake_score.updates_per_student` critic updates, each on its own batch; the
batch stream interleaves T2I and edit batches by the configured ratio. The host syncs only at log steps. Teachers
stay frozen outside the optimiser and the checkpoint. A run of non-finite steps stops the job, naming the last
good checkpoint.
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np

from qwen_flash_jax import cache, config_lib, sharding, training_loop
from qwen_flash_jax.data import edit_images, edit_layouts, mixing
from qwen_flash_jax.data import pipeline as pipeline_lib
from qwen_flash_jax.diffusion import sampling
from qwen_flash_jax.distill import dmd
from qwen_flash_jax.distill import pairs as pairs_lib
from qwen_flash_jax.eval import judge_io, report, vlm_bench
from qwen_flash_jax.eval.generate import Generator
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train import assets as assets_lib
from qwen_flash_jax.train import components, teacher
from qwen_flash_jax.train import text_states as text_states_lib
from qwen_flash_jax.train.checkpoint import open_and_resume
from qwen_flash_jax.train.components import CONDITION_OFFSET, CONDITIONS
from qwen_flash_jax.training_loop import NonFiniteError

__all__ = ["NonFiniteError", "check_config", "distill", "run_evaluation"]


def distill(config, workdir, *, log=print, history=None, stop_at=None, evaluate=True, view=None):
    """Runs (or resumes) the distillation in `workdir`; returns the evaluation results (None if stopped early).
    `view`: `check_config(config)`'s result when the caller has validated `config` already."""
    workdir = training_loop.workdir_path(workdir)  # gs:// stays a cloud path
    view = view or check_config(config)
    names = view.guidance.teachers
    parts = components.build(config, log)
    assets, teachers, base, mu = parts.assets, parts.teachers, parts.base, parts.mu
    if config.eval.judge == "vlm" and config.text_encoder.kind == "toy":  # the toy tokenizer exists only now
        _check_vlm_prompts_fit(config, assets.prompts)
    model = components.student_model(parts)
    setup = components.distill_setup(config, model, mu, view=view)
    state = components.initial_state(config, parts, setup)
    steps = view.train.steps
    ratio = view.fake_score.updates_per_student
    warmup = view.fake_score.warmup_updates
    # With precomputed text states the batches carry the prompts' states and the steps run no text encoder; the
    # job holds the encoder only while it samples (probes, the evaluation).
    text_states = text_states_lib.ensure_store(config, assets, log) if text_states_lib.enabled(config) else None
    if text_states is not None:
        log(f"distill: the steps read precomputed text states from {text_states}")
        text_states_lib.release_encoder(assets)

    def sampling_encoder():
        return text_states_lib.encoder_for_sampling(config, assets, log)

    # One student update takes `ratio` critic batches and one generator batch, all of one task: the T2I:Edit
    # pattern steps once per update, so the generator and the critic both see the configured ratio.
    iterator = iter(
        pipeline_lib.build_pipeline(
            config_lib.distill_data_config(config),
            assets.sources,
            assets.tokenizer,
            assets.codec,
            condition_pixels=assets.condition_pixels,
            slot_batches=ratio + 1,
            text_states=text_states,
        )
    )
    ckpt, state = open_and_resume(workdir / "checkpoints", view.train, state, iterator, label="distill", log=log)

    critic, generator = components.jitted_steps(setup, state=state, text_encoder=assets.text_encoder)
    batch_sharding = sharding.batch_sharding(parts.mesh, parts.rules)

    def next_batch():
        batch = next(iterator)
        task = batch.pop("task")
        return task, pipeline_lib.to_global(batch, batch_sharding)

    writer = training_loop.metric_writer(workdir / "logs")
    log(
        f"distill: {steps} student updates x {ratio} critic updates, {view.student.num_steps}-step student, "
        f"teachers {list(names)}, ratio {config.data.task_ratio}, T2I {dict(config.data.t2i_weights)}"
    )
    # One sampler cache for the regression bank, the probes and the final evaluation.
    gen = Generator(
        model,
        assets,
        mu,
        student_timesteps=setup.timesteps,
        student_renoise=setup.renoise,
        scheduler=teacher.target_scheduler(config),
    )
    bank = {}
    if setup.regression_weight:
        bank = pairs_lib.build_pair_bank(
            config, gen, base, lambda b: pipeline_lib.to_global(b, batch_sharding), log=log
        )

    def updates(start):
        """Per student update: its step and its batches, drawn lazily (critic batches, then the generator's)."""
        for step in range(start, steps):
            # Before the first student update the fake score gets `warmup` extra updates: it starts as the
            # teacher's score, so the first DMD gradients are only the CFG direction. No checkpoint precedes step 1,
            # so a resumed run repeats the warm-up exactly. Batches skipped first keep the update's batches in one
            # task slot.
            critic_updates = ratio + (warmup if step == 0 else 0)
            if step == 0:
                for _ in range(-warmup % (ratio + 1)):
                    next(iterator)
            yield step, critic_updates, (next_batch() for _ in range(critic_updates + 1))

    def student_update(state, update):
        step, critic_updates, batches = update
        for _ in range(critic_updates):
            task, batch = next(batches)
            state, m_critic = critic(state, assets.text_encoder, batch, spec=assets.tasks[task])
        task, batch = next(batches)
        spec = assets.tasks[task]  # `task` is the batch's key: an edit layout's (`data.edit_layouts`) or its task
        state, m_gen = generator(
            state,
            assets.text_encoder,
            teachers,
            batch,
            spec=spec,
            condition_offset=CONDITION_OFFSET[spec.task],
            pairs=pairs_lib.bank_batch(bank, task, step),
        )
        return state, {**m_gen, **{k: v for k, v in m_critic.items() if k != "skipped"}}

    start = int(state.step)
    state, finished = training_loop.run(
        state,
        student_update,
        updates(start),
        start=start,
        steps=steps,
        label="distill",
        log=log,
        log_every=view.train.log_every,
        writer=writer,
        history=history,
        sums=("skipped",),  # steps whose update was skipped for non-finite values, counted
        nonfinite=training_loop.NonFiniteGuard(lambda state: state.nonfinite_run, view.nonfinite_limit),
        probe=_make_probe(config, workdir, gen, writer, log, sampling_encoder),
        probe_every=view.train.sample_every,
        checkpointer=ckpt,
        data_iterator=iterator,
        stop_at=stop_at,
    )
    if not finished or not evaluate:
        return None
    # The reference teacher is the one the student starts from, guiding or not (a single-specialist run has
    # only the specialist in `teachers`).
    with sampling_encoder():
        results = run_evaluation(config, workdir, gen, state, base, log)
    writer.flush()
    return results


def _sample_prompts(config, sources: dict, count: int):
    """Up to `count` T2I captions and (source, instruction) edits for unjudged sample grids: the first records of
    each category the run trains on, in turn (deterministic). The grids sample an edit from one square source of
    `data.image_size`: with `data.edit_layouts`, the first one-image records of each category, centre-cropped to a
    square (edits of several images are left out)."""
    ratio = mixing.parse_ratio(config.data.task_ratio)
    size = int(config.data.image_size)
    layouts = edit_layouts.from_config(config.data)

    def square_source(record):
        images = record["source"] if isinstance(record["source"], (list, tuple)) else [record["source"]]
        if len(images) != 1:
            return None
        return edit_images.fit(images[0], size, size) if layouts else _fit(images[0], size)

    picked = {"t2i": [], "edit": []}
    for task, share in zip(mixing.TASKS, ratio):
        cats = [c for c, w in dict(config.data[f"{task}_weights"]).items() if w > 0 and c in sources.get(task, {})]
        usable = {c: _usable(sources[task][c], square_source if task == "edit" else None, count) for c in cats}
        for i in range(count if share and cats else 0):
            records = usable[cats[i % len(cats)]]
            if i // len(cats) < len(records):
                picked[task].append(records[i // len(cats)])
    captions = [r["caption"] for r in picked["t2i"]]
    edits = [(square_source(r), r["instruction"]) for r in picked["edit"]]
    return captions, edits


def _usable(source, square_source, count: int) -> list:
    """Up to `count` of the source's first records, of those `square_source` can show (all, if None); a few times
    `count` records are looked at, no more."""
    records = []
    for i in range(min(len(source), 8 * count)):
        record = source[i]
        if square_source is None or square_source(record) is not None:
            records.append(record)
            if len(records) == count:
                break
    return records


def _fit(image, size: int):
    image = np.asarray(image)
    if image.shape[:2] != (size, size):
        raise ConfigError(f"an edit source of shape {image.shape} is not {size}x{size} (data.image_size)")
    return image


def check_config(config) -> config_lib.DistillView:
    """Everything a user can get wrong, checked before any work starts (one clear ConfigError); returns the
    distillation's typed view of `config`, which the job reads."""
    pipeline_lib.check_data_config(config.data)
    text_states_lib.enabled(config)
    check_batch_fits_mesh(config)
    judge = config.eval.get("judge", "toy")
    if judge not in ("toy", "none", "vlm"):
        raise ConfigError(f"eval.judge must be 'toy', 'none' or 'vlm', got {judge!r}")
    if judge == "vlm":
        if not config.eval.get("vlm_judges"):
            raise ConfigError("eval.judge='vlm' needs at least one judge in eval.vlm_judges (NAME=MODEL@BASE_URL)")
        vlm_bench.check_config(config.eval)
        te_path = config.text_encoder.get("path") or ""
        if config.text_encoder.kind == "qwen3_vl" and os.path.isdir(te_path):  # else check_text_encoder says why
            tokenizer = assets_lib.hf_tokenizer(pathlib.Path(te_path))
            _check_vlm_prompts_fit(config, pipeline_lib.PromptEncoder.from_config(tokenizer, config.data))
    view = config_lib.distill_view(config)
    student, fake, guidance = view.student, view.fake_score, view.guidance
    for role in (student.init_from, fake.init_from):
        if role not in config.teachers:
            raise ConfigError(f"student/fake_score init_from={role!r} is not a teacher of this config")
    for name in dict.fromkeys((student.init_from, fake.init_from, *guidance.teachers)):
        teacher.check_source(config, name)
    dmd.guidance_table(dict(guidance.weights), guidance.teachers, CONDITIONS, student.num_steps)
    dmd.student_timesteps(student.num_steps, 0.0, student.timesteps)
    teacher.target_scheduler(config)  # the teachers' pipeline scheduler, if any, read and checked
    dmd.check_renoise(student.renoise)
    dmd.check_schedule(guidance.schedule)
    dmd.critic_step_probs(student.num_steps, fake.step_probs)
    if not 0.0 <= student.ema_decay < 1.0:
        raise ConfigError(f"student.ema_decay must lie in [0, 1) (0 turns the EMA off), got {student.ema_decay}")
    if student.first_step_fm_weight < 0:
        raise ConfigError(
            f"student.first_step_fm_weight must be >= 0 (0 turns it off), got {student.first_step_fm_weight}"
        )
    if student.regression_weight < 0:
        raise ConfigError(f"student.regression_weight must be >= 0 (0 turns it off), got {student.regression_weight}")
    if student.regression_weight > 0:
        if text_states_lib.enabled(config):
            raise ConfigError(
                "student.regression_weight > 0 needs the text encoder in the step (its teacher pairs are encoded "
                "there); it does not combine with data.precompute_text=True"
            )
        if student.renoise != "predicted":
            raise ConfigError(
                "student.regression_weight > 0 needs student.renoise='predicted': with fresh noise "
                "between steps the student's sample is no function of its first noise"
            )
        if student.regression_batches < 1:
            raise ConfigError(f"student.regression_batches must be >= 1, got {student.regression_batches}")
        if len(edit_layouts.from_config(config.data)) > 1:
            raise ConfigError(
                "student.regression_weight > 0 takes one edit layout (its teacher pairs are conditioned with the "
                "generator batch's layout); data.edit_layouts has several"
            )
    if fake.warmup_updates < 0:
        raise ConfigError(f"fake_score.warmup_updates must be >= 0, got {fake.warmup_updates}")
    for field, weight in (("student.gan_weight", student.gan_weight), ("fake_score.gan_weight", fake.gan_weight)):
        if weight < 0:
            raise ConfigError(f"{field} must be >= 0 (0 turns the GAN term off), got {weight}")
    unknown = sorted(set(student.gan_tasks) - set(mixing.TASKS))
    if unknown:
        raise ConfigError(f"student.gan_tasks names unknown tasks {unknown}; the tasks are {list(mixing.TASKS)}")
    trained_tasks = {task for task, share in zip(mixing.TASKS, mixing.parse_ratio(config.data.task_ratio)) if share}
    if student.gan_weight > 0 and not trained_tasks & set(student.gan_tasks):
        raise ConfigError(
            f"student.gan_weight > 0 but no task in student.gan_tasks {list(student.gan_tasks)} "
            f"is trained at data.task_ratio {config.data.task_ratio!r}: the GAN term would never run"
        )
    if student.gan_weight > 0 and fake.gan_head_learning_rate <= 0:
        raise ConfigError(
            "student.gan_weight > 0 needs fake_score.gan_head_learning_rate > 0: the discriminator "
            "head starts from zero and would never learn"
        )
    return view


def _check_vlm_prompts_fit(config, encode) -> None:
    """The VLM benches' prompts fit the job's fixed prompt lengths (a bench prompt is sampled as training's are)."""
    side = int(config.data.image_size) // assets_lib.latent_scale(config)
    vlm_bench.check_prompts_fit(
        config.eval, encode, image_size=int(config.data.image_size), edit_slots=side * side // 4
    )


def check_batch_fits_mesh(config) -> None:
    """The global batch must split evenly over the mesh axes that shard the batch."""
    mesh = config_lib.make_mesh(config)
    spec = sharding.batch_sharding(mesh, config_lib.mesh_rules(config)).spec[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    ways = int(np.prod([mesh.shape[a] for a in axes]))
    if int(config.data.batch_size) % ways:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} does not split over the {ways} devices of the "
            f"mesh axes {list(axes)} that shard the batch; use a multiple of {ways}"
        )


def _make_probe(config, workdir, gen, writer, log, sampling_encoder):
    """Every `train.sample_every` student updates: 4-NFE sample grids in workdir/samples/step_N and toy-judge
    scores on a small validation set (eval.seed + 1, disjoint from the final evaluation's seeds), logged as
    `probe/*` scalars. None when sampling is off."""
    every = int(config.train.sample_every)
    if every <= 0 or config.eval.judge != "toy":  # the probe needs the toy judge: a VLM judge is paid per call
        return None
    k = int(config.student.num_steps)
    judge = judge_io.load_or_train_judge(
        cache.cache_category(config, "judge", log), size=int(config.data.image_size), log=log
    )

    def probe(step, state):
        with sampling_encoder():
            _probe(step, state)

    def _probe(step, state):
        params = state.evaluated_student()
        # At step 0 the student is still its initial teacher weights, shared by every run from that teacher.
        key = _images_key(config, gen, cache.params_fingerprint(params), student=True) if step == 0 else None
        student = report.Contender(
            "student",
            k,
            lambda c: gen.t2i(params, c, num_steps=k, student=True),
            lambda s, i: gen.edit(params, s, i, num_steps=k, student=True),
            cache_key=key,
        )
        results = report.evaluate(
            [student],
            judge,
            size=int(config.data.image_size),
            prompts_per_category=int(config.eval.probe_prompts_per_category),
            edits_per_category=int(config.eval.probe_edits_per_category),
            seed=int(config.eval.seed) + 1,
            grid_dir=workdir / "samples" / f"step_{step:06d}",
            image_cache=_image_cache(config),
            log=lambda *_: None,
        )["student"]
        scalars = {"probe/t2i_average": results["t2i_average"], "probe/edit_average": results["edit_average"]}
        writer.write_scalars(step, scalars)
        log(
            f"probe at step {step}: T2I {scalars['probe/t2i_average']:.3f}, edit {scalars['probe/edit_average']:.3f} "
            f"(grids in {workdir / 'samples' / f'step_{step:06d}'})"
        )

    return probe


def _image_cache(config) -> pathlib.Path:
    """Benchmark images of the frozen teachers' samplers, shared by every run on this cache (report.evaluate)."""
    return cache.cache_category(config, "eval_images")


def _images_key(config, gen, params_digest: str | None, **sampler) -> str | None:
    """Everything a sampler's benchmark images depend on besides the benchmark itself (report.Contender.cache_key):
    the network's parameters, the text encoder, tokenizer and codec, the sampler and the jax version. None (not
    cached) when a digest cannot be taken on this process."""
    text_digest = params_digest and cache.params_fingerprint(gen.assets.text_encoder)
    if text_digest is None:
        return None
    d = config.data
    if sampler.pop("student", False):
        sampler.update(student=True, timesteps=gen.student_timesteps, renoise=gen.student_renoise)
    return cache.config_hash(
        params_digest,
        text_digest,
        config.model,
        config.text_encoder,
        config.codec,
        [d.source, d.image_size, d.examples_per_category, d.seed, d.max_prompt_tokens, d.get("edit_prompt_tokens", 0)],
        [gen.mu, gen.batch_size, gen.use_kv_cache, *([gen.scheduler.to_config()] if gen.scheduler else [])],
        sampler,
        jax.__version__,
        "images-v1",
    )


def run_evaluation(config, workdir, gen, state, base, log):
    """Student (4 NFE) beside the base teacher at 4 and at `sampling.teacher_steps` steps, same prompts and seeds."""
    cfg = float(config.sampling.cfg_scale)
    k = int(config.student.num_steps)
    n_teacher = int(config.sampling.teacher_steps)
    student = state.evaluated_student()

    # Only the toy judge's benchmark images are cached (a digest reads every weight to the host: toy sizes only).
    base_digest = cache.params_fingerprint(base) if config.eval.judge == "toy" else None

    def euler(params, steps, timesteps=None, label=""):
        kw = dict(num_steps=steps, cfg_scale=cfg, timesteps=timesteps)
        return report.Contender(
            f"teacher {config.student.init_from} ({steps} steps{label})",
            sampling.nfe(steps, cfg),
            lambda c: gen.t2i(params, c, **kw),
            lambda s, i: gen.edit(params, s, i, **kw),
            cache_key=_images_key(config, gen, base_digest, **kw),
        )

    contenders = [euler(base, n_teacher), euler(base, k)]
    if not np.allclose(gen.student_timesteps, dmd.student_timesteps(k, gen.mu, scheduler=gen.scheduler)):
        # The teacher's own sampler on the student's times: how much of the student's lead is the schedule.
        contenders.append(euler(base, k, gen.student_timesteps, ", student's times"))
    contenders.append(
        report.Contender(
            f"student ({k} steps)",
            k,
            lambda c: gen.t2i(student, c, num_steps=k, student=True),
            lambda s, i: gen.edit(student, s, i, num_steps=k, student=True),
        )
    )
    if config.eval.judge != "toy":
        vlm_tables = None
        if config.eval.judge == "vlm":
            # The paper's protocol: T2I-Bench / Editing-Bench images of every contender, scored by the VLM judges.
            # Before results.json, which marks a finished run (a sweep skips such rows): a killed run judges again.
            vlm_tables = vlm_bench.run_recipe_from_config(
                config.eval, workdir, contenders, image_size=int(config.data.image_size), log=log
            )
        captions, edits = _sample_prompts(config, gen.assets.sources, int(config.eval.unjudged_samples))
        results = report.sample_unjudged(
            workdir,
            contenders,
            captions,
            edits,
            title=f"Distillation samples: {workdir.name}",
            vlm_tables=vlm_tables,
            log=log,
        )
        log(f"samples of {len(contenders)} models written to {workdir}/grid_*.png (not scored by the toy judge)")
        return results
    judge = judge_io.load_or_train_judge(
        cache.cache_category(config, "judge", log), size=int(config.data.image_size), log=log
    )
    results = report.evaluate(
        contenders,
        judge,
        size=int(config.data.image_size),
        prompts_per_category=int(config.eval.prompts_per_category),
        edits_per_category=int(config.eval.edits_per_category),
        seed=int(config.eval.seed),
        grid_dir=workdir,
        image_cache=_image_cache(config),
        log=log,
    )
    report.write_results(
        workdir,
        results,
        title=f"Distillation results: {workdir.name}",
        notes="NFE counts CFG's two forwards per teacher step; the student needs no CFG.",
        reference=contenders[1].name,
    )  # the teacher's own 4-step sampling
    log((workdir / "results.md").read_text())
    return results
