"""Builders the test modules share: tiny toy configs and the pipeline's synthetic records.

Test modules import these from here, never from one another (a test module is collected; this one is not).
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qwen_flash_jax import config_lib
from qwen_flash_jax.data import pipeline, world
from qwen_flash_jax.diffusion import sampling
from qwen_flash_jax.loading import build_transformer, from_params
from qwen_flash_jax.models import TransformerConfig, make_layout
from tests.torch_reference import TINY, make_inputs

# The pipeline tests' image side: 16 px, 4x4 latents under a patch-4 space-to-depth codec.
SIZE = 16


def tiny_config(cache_dir):
    """configs/teacher.py:toy shrunk to a 2-layer transformer on 16 px images: a teacher trains in seconds."""
    config = config_lib.load_config("configs/teacher.py:toy")
    config.cache_dir = str(cache_dir)
    config.model.update(num_layers=2, num_attention_heads=2, attention_head_dim=32, axes_dims_rope=(8, 12, 12))
    config.data.update(image_size=16, examples_per_category=24, max_prompt_tokens=80)
    config.text_encoder.pretrain_steps = 20
    config.teachers.base.train.update(steps=12, batch_size=8, warmup_steps=2, learning_rate=1e-2)
    config.train.update(log_every=1, checkpoint_every=4)
    config.sampling.teacher_steps = 2
    config.eval.seed = 3
    return config


def tiny_distill_config(cache_dir):
    """The tiny world of `tiny_config` as a 6-step distillation job with a checkpoint every 2 steps."""
    config = tiny_config(cache_dir)
    config.job = "distill"
    config.teachers.text.train.update(steps=4, batch_size=8, warmup_steps=1)
    config.data.update(batch_size=8, task_ratio="1:1")
    config.train.update(steps=6, log_every=1, checkpoint_every=2)
    config.fake_score.updates_per_student = 1
    config.eval.update(
        prompts_per_category=2, edits_per_category=2, probe_prompts_per_category=2, probe_edits_per_category=1
    )
    config.train.sample_every = 0  # the probe is exercised by the evaluation test only
    return config


def config_overrides(config, base, prefix="") -> list[str]:
    """`section.field=value` texts (as `--config.section.field=value` and `distilled.load_run_config` take them)
    that turn the config `base` into `config`, e.g. a config file's toy config into `tiny_distill_config`."""
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += config_overrides(value, base[key], f"{prefix}{key}.")
        elif value != base[key] and not (isinstance(value, tuple) and tuple(base[key]) == value):
            out.append(f"{prefix}{key}={value!r}")
    return out


def world_records(task, category, n, seed):
    """`n` toy-world records of one category, as a data source yields them."""
    rng = np.random.default_rng([seed, pipeline.CATEGORIES[task].index(category)])
    out = []
    for i in range(n):
        if task == "t2i":
            s = world.sample_t2i(rng, category, SIZE)
            out.append(
                {
                    "id": f"{category}-{i}",
                    "category": category,
                    "caption": s.caption,
                    "image": s.image,
                    "spec": json.dumps(s.spec),
                }
            )
        else:
            s = world.sample_edit(rng, category, SIZE)
            out.append(
                {
                    "id": f"{category}-{i}",
                    "category": category,
                    "instruction": s.instruction,
                    "source": s.source,
                    "target": s.target,
                    "spec": json.dumps(s.spec),
                }
            )
    return out


def pipeline_config(**overrides):
    """The `data` section the pipeline reads, at 7:3 over every category unless overridden."""
    fields = dict(
        task_ratio="7:3",
        batch_size=4,
        max_prompt_tokens=160,
        image_size=SIZE,
        seed=0,
        t2i_weights=dict(landscape=1.0, portrait=1.0, text=1.0),
        edit_weights={c: 1.0 for c in world.EDIT_CATEGORIES},
    )
    return ml_collections.ConfigDict(fields | overrides)


# One unrolled layer: what the DMD and GAN functions compute does not depend on depth, and this model compiles
# ~3x faster than TINY's two scanned layers (the scanned stack has tests of its own: test_transformer, test_sampling).
ONE_LAYER = TINY | dict(num_layers=1, scan_layers=False)


def random_transformer(seed, config=ONE_LAYER):
    """A tiny transformer with every weight random: the init zeroes the output projection, and with it every
    velocity, which would make each x0 equal its input and comparisons of x0 predictions hold trivially."""
    config = TransformerConfig(**config)
    params = build_transformer(config, seed=seed).params

    @jax.jit  # one program: op by op, every weight shape would compile a random draw of its own
    def perturbed(params):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        return jax.tree.unflatten(
            treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        )

    return from_params(config, perturbed(params))


def tiny_teachers():
    """(model, {"base", "text"} parameters, conditioning, negative conditioning, a noisy T2I sample of 2 rows)."""
    model, other = random_transformer(0), random_transformer(1)
    inputs = make_inputs(np.random.default_rng(0), batch=2, conditions=[], target=(1, 4, 4), text_runs=[6])
    layout = make_layout(inputs["img_shapes"], inputs["img_mask"])
    cond = sampling.Conditioning(
        jnp.asarray(inputs["encoder_hidden_states"]),
        jnp.asarray(inputs["encoder_hidden_states_mask"]),
        jnp.zeros((2, 0, 8)),
        layout,
    )
    neg = cond.replace(encoder_hidden_states=jnp.zeros_like(cond.encoder_hidden_states))
    x_t = jax.random.normal(jax.random.key(3), (2, 16, 8))
    return model, {"base": model.params, "text": other.params}, cond, neg, x_t
