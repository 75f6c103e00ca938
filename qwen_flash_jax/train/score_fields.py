"""Score fields for inspection (notebooks/score_fields.ipynb): what each teacher's real score asks of a sample.

For a few held-out prompts of one category, a sample x (a real render, or any images you pass) is re-noised to
time t, and every teacher's CFG x0 prediction is decoded, together with the step-wise blend sum_m lambda[k, m](c)
x0_m at each student step k and, given fake-score parameters, the DMD direction x0_fake - x0_real. All are images
(uint8, (N, H, W, 3)) so they can be laid side by side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import flow
from qwen_flash_jax.diffusion import conditioning, sampling
from qwen_flash_jax.distill import dmd
from qwen_flash_jax.eval import bench_sets
from qwen_flash_jax.loading import build_transformer
from qwen_flash_jax.train import components
from qwen_flash_jax.train.components import CONDITIONS


def score_fields(
    config, *, category: str = "text", n: int = 4, t: float = 0.6, seed: int = 0, fake_params=None, log=print
) -> dict[str, np.ndarray]:
    """Decoded fields for `n` T2I prompts of `category`: keys `x`, `x_t`, `x0/<teacher>`, `blend/k<k>`, and
    `dmd_direction` (|x0_fake - x0_real| at the last step's blend, scaled to [0, 255]) when `fake_params` is given."""
    parts = components.build(config, log, initial_networks=False)
    assets, teachers = parts.assets, parts.teachers
    names = tuple(config.guidance.teachers)
    model = build_transformer(parts.model_config, mesh=parts.mesh, rules=parts.rules)
    bench = bench_sets.t2i_bench(int(config.data.image_size), n, int(config.eval.seed))[category]
    spec, codec = assets.tasks["t2i"], assets.codec
    h, w = spec.latent_hw
    ids, mask = zip(*(assets.prompts(c) for c in bench.captions))
    cond = conditioning.encode(assets.text_encoder, spec, jnp.asarray(np.stack(ids)), jnp.asarray(np.stack(mask)))
    neg = conditioning.encode(assets.text_encoder, spec, *conditioning.empty_prompt(spec, n))
    x = jnp.asarray(codec.pack(codec.encode(bench.real)), jnp.float32)
    times = jnp.full((n,), t)
    x_t = flow.interpolate(x, jax.random.normal(jax.random.key(seed), x.shape), times)
    cfg = float(config.guidance.cfg_scale)

    def image(tokens):
        return codec.to_uint8(codec.decode(codec.unpack(np.asarray(tokens), h, w)))

    out = {"x": bench.real, "x_t": image(x_t)}
    for name, params in teachers.items():
        v, _ = sampling.guided_velocity(model, params, cond, neg, x_t, times, cfg)
        out[f"x0/{name}"] = image(flow.x0_from_velocity(x_t, v, times))
    table = dmd.guidance_table(dict(config.guidance.weights), names, CONDITIONS, int(config.student.num_steps))
    condition = jnp.full((n,), CONDITIONS.index(f"t2i/{category}"))
    real = None
    for k in range(int(config.student.num_steps)):
        real = dmd.real_x0(model, teachers, dmd.step_weights(table, k, condition), cond, neg, x_t, times, cfg)
        out[f"blend/k{k}"] = image(real)
    if fake_params is not None:
        v_fake, _ = sampling.velocity(model, fake_params, cond, x_t, times)
        diff = np.abs(np.asarray(flow.x0_from_velocity(x_t, v_fake, times) - real))
        diff = codec.unpack(diff, h, w).reshape(n, h, w, -1, 3).mean(axis=3)  # per latent token, per colour
        out["dmd_direction"] = np.clip(255 * diff / max(float(diff.max()), 1e-8), 0, 255).astype(np.uint8)
    return out
