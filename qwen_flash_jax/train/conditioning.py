"""From a data batch to the transformer's conditioning, inside jit.

The frozen text encoder runs on device as part of each step (at scale it is sharded like the transformer); only
token ids and latents cross the host boundary. The token layout of each task is static and derived once from the
prompt template, since the system prefix and the image slots sit at fixed positions of every right-padded prompt.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from qwen_flash_jax.data.pipeline import PromptEncoder
from qwen_flash_jax.models.layout import TokenLayout, make_layout
from qwen_flash_jax.sampling import Conditioning
from qwen_flash_jax.text import encoder as text_encoder


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Static facts of one task's batches: layout, latent grid, empty-prompt tokens for CFG / caption dropout."""

    task: str
    layout: TokenLayout
    latent_hw: tuple[int, int]
    drop_idx: int
    empty_ids: tuple[int, ...]
    empty_mask: tuple[int, ...]

    @property
    def target_tokens(self) -> int:
        return self.latent_hw[0] * self.latent_hw[1]

    @property
    def condition_shapes(self):
        return (self.latent_hw,) if self.task == "edit" else None


def task_specs(prompts: PromptEncoder, codec, image_size: int) -> dict[str, TaskSpec]:
    h, w, _ = codec.latent_shape(image_size, image_size)
    specs = {}
    for task, slots in (("t2i", []), ("edit", [h * w // 4])):
        ids, mask = prompts("", slots)
        slot_mask = ids[prompts.drop_idx:] == prompts.image_pad_id
        slot_mask = np.concatenate([slot_mask, np.ones(h * w // 4, bool)])
        shapes = [(1, h, w)] * (2 if task == "edit" else 1)
        specs[task] = TaskSpec(task, make_layout(shapes, slot_mask), (h, w), prompts.drop_idx,
                               tuple(int(i) for i in ids), tuple(int(m) for m in mask))
    return specs


def encode(te_params, spec: TaskSpec, input_ids, attention_mask, condition_latents=None) -> Conditioning:
    """Runs the text encoder and assembles the Conditioning (call inside jit)."""
    cond = None if condition_latents is None else (condition_latents,)
    hidden = text_encoder._model(te_params).features(input_ids, attention_mask, cond, spec.condition_shapes)
    batch = input_ids.shape[0]
    if condition_latents is None:
        condition_latents = jnp.zeros((batch, 0, 1), jnp.float32)
    return Conditioning(
        encoder_hidden_states=hidden[:, spec.drop_idx:],
        encoder_hidden_states_mask=attention_mask[:, spec.drop_idx:].astype(bool),
        condition_latents=condition_latents,
        layout=spec.layout,
    )


def empty_prompt(spec: TaskSpec, batch: int):
    """(input_ids, attention_mask) of the empty prompt " " for a batch: CFG's negative and caption dropout."""
    ids = jnp.broadcast_to(jnp.asarray(spec.empty_ids, jnp.int32), (batch, len(spec.empty_ids)))
    mask = jnp.broadcast_to(jnp.asarray(spec.empty_mask, jnp.int32), (batch, len(spec.empty_mask)))
    return ids, mask


def drop_captions(key, spec: TaskSpec, input_ids, attention_mask, rate: float):
    """Replaces each sample's prompt by the empty prompt with probability `rate` (teacher training, for CFG)."""
    import jax

    empty_ids, empty_mask = empty_prompt(spec, input_ids.shape[0])
    drop = jax.random.bernoulli(key, rate, (input_ids.shape[0], 1))
    return jnp.where(drop, empty_ids, input_ids), jnp.where(drop, empty_mask, attention_mask)
