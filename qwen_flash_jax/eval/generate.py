"""Generation for evaluation and sample grids: T2I and edits with any transformer parameters and step count.

`Generator.t2i(params, captions, ...)` / `.edit(params, sources, instructions, ...)` return uint8 images. Batches
are padded to a fixed size so each (task, steps, cfg) pair compiles once. The same code serves a teacher sampled
with N Euler steps (CFG with the empty prompt, prefix KV cache) and, with `student_steps`, the few-step student
(x0 predictions re-noised between steps, no CFG: the guidance is distilled into it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import flow
from qwen_flash_jax.data.world import contact_sheet, save_png
from qwen_flash_jax.diffusion import conditioning, sampling
from qwen_flash_jax.distill import dmd


@dataclasses.dataclass(eq=False)
class Generator:
    model: object  # TransformerModel
    assets: object  # train.assets.Assets
    mu: float
    batch_size: int = 16
    use_kv_cache: bool = True
    student_timesteps: tuple[float, ...] | None = None  # the student's input times; None: the shifted Euler list
    student_renoise: str = "fresh"  # how the student re-noises between steps (distill.dmd.renoise)

    def t2i(self, params, captions, *, num_steps: int, cfg_scale: float = 1.0, seed: int = 0,
            student: bool = False, timesteps=None) -> np.ndarray:
        return self._run(params, "t2i", captions, None, num_steps, cfg_scale, seed, student, timesteps)

    def edit(self, params, sources: np.ndarray, instructions, *, num_steps: int, cfg_scale: float = 1.0,
             seed: int = 0, student: bool = False, timesteps=None) -> np.ndarray:
        return self._run(params, "edit", instructions, sources, num_steps, cfg_scale, seed, student, timesteps)

    def _run(self, params, task, texts, sources, num_steps, cfg_scale, seed, student, timesteps=None):
        """`timesteps`: the input times of a teacher's Euler steps (decreasing; 0 is appended); None = the shifted
        schedule of `num_steps` steps."""
        spec = self.assets.tasks[task]
        codec = self.assets.codec
        h, w = spec.latent_hw
        outputs = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            n = len(chunk)
            chunk += [""] * (self.batch_size - n)
            slots = [h * w // 4] if task == "edit" else []
            ids, mask = zip(*(self.assets.prompts(t, slots) for t in chunk))
            images = {}
            if task == "edit":
                src = np.asarray(sources[start:start + self.batch_size])
                src = np.concatenate([src, np.repeat(src[:1], self.batch_size - n, axis=0)])
                images["condition_latents"] = jnp.asarray(codec.pack(codec.encode(src)), jnp.float32)
                if self.assets.condition_pixels:
                    images["condition_pixels"] = jnp.asarray(src, jnp.uint8)
            key = jax.random.fold_in(jax.random.key(seed), start)
            noise = jax.random.normal(key, (self.batch_size, h * w, self.model.config.in_channels))
            z = self._sample(params, self.assets.text_encoder, jnp.asarray(np.stack(ids)),
                             jnp.asarray(np.stack(mask)), images, noise, key, spec=spec,
                             sigmas=self._sigmas(num_steps, student, timesteps),
                             cfg_scale=float(cfg_scale), student=student)
            images = codec.to_uint8(codec.decode(codec.unpack(np.asarray(z), h, w)))
            outputs.append(images[:n])
        return np.concatenate(outputs)

    def teacher_latents(self, params, spec, input_ids, attention_mask, images: dict, noise, *, num_steps: int,
                        cfg_scale: float):
        """A teacher's Euler sample as packed latents (on device) from given tokens and noise: the sampler of `t2i`
        and `edit` without tokenising, padding or decoding (the regression bank, distill/pairs.py). `images`: the
        edit's `conditioning.IMAGE_INPUTS` fields ({} for T2I)."""
        return self._sample(params, self.assets.text_encoder, input_ids, attention_mask, images, noise,
                            jax.random.key(0), spec=spec, sigmas=self._sigmas(num_steps, False),
                            cfg_scale=float(cfg_scale), student=False)

    def _sigmas(self, num_steps: int, student: bool, timesteps=None) -> tuple[float, ...]:
        if timesteps is not None and not student:
            if len(timesteps) != num_steps:
                raise ValueError(f"{len(timesteps)} timesteps given for {num_steps} steps")
            return (*(float(t) for t in timesteps), 0.0)
        if student and self.student_timesteps is not None:
            if len(self.student_timesteps) != num_steps:
                raise ValueError(f"the student has {len(self.student_timesteps)} timesteps, asked for {num_steps}")
            return (*(float(t) for t in self.student_timesteps), 0.0)
        return tuple(flow.sampling_sigmas(num_steps, self.mu).tolist())

    @functools.cached_property
    def _sample(self):
        def sample(params, te_params, ids, mask, images, noise, key, *, spec, sigmas, cfg_scale, student):
            cond = conditioning.encode(te_params, spec, ids, mask, **images)
            if student:
                return dmd.generate(self.model, params, cond, noise, sigmas[:-1], jax.random.fold_in(key, 1),
                                    self.student_renoise)
            neg_ids, neg_mask = conditioning.empty_prompt(spec, ids.shape[0])
            neg = conditioning.encode(te_params, spec, neg_ids, neg_mask, **images)
            return sampling.euler_sample(self.model, params, noise, cond, np.asarray(sigmas), neg_cond=neg,
                                         cfg_scale=cfg_scale, use_kv_cache=self.use_kv_cache)

        return jax.jit(sample, static_argnames=("spec", "sigmas", "cfg_scale", "student"))


def save_grid(path, rows: list[np.ndarray], scale: int = 4) -> None:
    """Writes a PNG grid: each entry of `rows` is (N, H, W, 3) uint8, one row of the grid (pixel-doubled)."""
    cols = max(len(r) for r in rows)
    images = []
    for r in rows:
        images += list(r) + [np.full_like(r[0], 255)] * (cols - len(r))
    save_png(contact_sheet(images, cols=cols, scale=scale), str(path))
