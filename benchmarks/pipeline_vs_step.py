"""Input pipeline throughput against what the training step consumes, measured side by side in one run.

    python benchmarks/pipeline_vs_step.py [--config=configs/teacher.py:toy] [--batches=40] [--config.cache_dir=...]

Prints batches/s of the grain pipeline alone, batches/s of the jitted teacher train step alone (fed one cached
batch per task), and their ratio; the pipeline must never be the bottleneck (ratio > 1).
"""

import time

import jax
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/teacher.py:toy", "Config file.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Batches to time for each side.")


def main(argv):
    del argv
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qwen_flash_jax import config_lib, sharding
    from qwen_flash_jax.data import pipeline as pipeline_lib
    from qwen_flash_jax.loading import build_transformer
    from qwen_flash_jax.train import assets as assets_lib
    from qwen_flash_jax.train import optim, teacher

    config = _CONFIG.value
    run = config_lib.teacher_run_config(config, config.teacher_name or "base")
    assets = assets_lib.build_assets(run, log=lambda *_: None)
    n = _BATCHES.value

    iterator = iter(
        pipeline_lib.build_pipeline(
            run.data, assets.sources, assets.tokenizer, assets.codec, condition_pixels=assets.condition_pixels
        )
    )
    next(iterator)
    start = time.perf_counter()
    batches = [next(iterator) for _ in range(n)]
    pipeline_rate = n / (time.perf_counter() - start)

    mesh = config_lib.make_mesh(config)
    rules = config_lib.mesh_rules(config)
    model = build_transformer(config_lib.transformer_config(config), mesh=mesh, rules=rules)
    train = config.teachers[config.teacher_name or "base"].train
    opt = optim.adamw(float(train.learning_rate), 1000)
    state = teacher.TeacherState(
        step=jax.numpy.zeros((), "int32"),
        params=model.params,
        ema=jax.tree.map(jax.numpy.copy, model.params),
        opt_state=opt.init(model.params),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    step = teacher._make_step(model, opt, teacher.target_mu(config), 0.1, 0.99)
    shard = NamedSharding(mesh, P(sharding.logical_to_spec(("batch",), rules, mesh)[0]))
    staged = []
    for b in batches:
        b = dict(b)
        task = b.pop("task")
        staged.append((task, pipeline_lib.to_global(b, shard)))
    for task in {t for t, _ in staged}:  # compile each task's step outside the timing
        state, _ = step(state, assets.text_encoder, next(b for t, b in staged if t == task), spec=assets.tasks[task])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for task, b in staged:
        state, metrics = step(state, assets.text_encoder, b, spec=assets.tasks[task])
    jax.block_until_ready(state)
    step_rate = n / (time.perf_counter() - start)
    bs = run.data.batch_size
    print(f"global batch {bs}, ratio {run.data.task_ratio}, {n} batches each side")
    print(f"pipeline:   {pipeline_rate:8.1f} batches/s  ({pipeline_rate * bs:8.0f} examples/s)")
    print(f"train step: {step_rate:8.1f} batches/s  ({step_rate * bs:8.0f} examples/s)")
    print(f"pipeline / step throughput = {pipeline_rate / step_rate:.1f}x (must stay > 1)")


if __name__ == "__main__":
    app.run(main)
