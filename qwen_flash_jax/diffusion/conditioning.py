"""From a data batch to the transformer's conditioning, inside jit.

The frozen text encoder runs on device as part of each step (at scale it is sharded like the transformer); only
token ids, latents and (for Qwen3-VL edits) the condition image's uint8 pixels cross the host boundary. The token
layout of each task is static and derived once from the prompt template, since the system prefix and the image
slots sit at fixed positions of every right-padded prompt.

An edit's condition image reaches the text encoder in the form it reads: the toy encoder projects the condition
latents into the image slots; Qwen3-VL's vision tower reads patches cut from the pixels (on device, inside jit).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from qwen_flash_jax.data.pipeline import PromptEncoder
from qwen_flash_jax.diffusion.sampling import Conditioning
from qwen_flash_jax.models.layout import TokenLayout, make_layout
from qwen_flash_jax.text import encoder as text_encoder
from qwen_flash_jax.text import qwen3_vl
from qwen_flash_jax.text import qwen3_vl_vision as vision_lib

IMAGE_INPUTS = ("condition_latents", "condition_pixels")  # batch fields an edit's conditioning reads


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Static facts of one task's batches: layout, latent grid, empty-prompt tokens for CFG / caption dropout."""

    task: str
    layout: TokenLayout
    latent_hw: tuple[int, int]
    drop_idx: int
    empty_ids: tuple[int, ...]
    empty_mask: tuple[int, ...]
    vision_grid: tuple[int, int] | None = None  # Qwen3-VL edits: the condition image's grid in vision patches

    @property
    def target_tokens(self) -> int:
        return self.latent_hw[0] * self.latent_hw[1]

    @property
    def condition_shapes(self):
        return (self.latent_hw,) if self.task == "edit" else None


def task_specs(prompts: PromptEncoder, codec, image_size: int, vision_config=None) -> dict[str, TaskSpec]:
    """Per task; `vision_config` (Qwen3-VL's) when the text encoder reads edit images through its vision tower."""
    h, w, _ = codec.latent_shape(image_size, image_size)
    vision_grid = None
    if vision_config is not None:
        vision_grid, tokens = vision_lib.image_grid(image_size, image_size, vision_config)
        if tokens != h * w // 4:  # the prompt's image slots are the vision tokens, one per 2x2 latent group
            raise ValueError(
                f"a {image_size}px condition image gives {tokens} vision tokens but {h * w // 4} "
                "2x2 latent groups; the vision tower and the VAE do not fit together"
            )
    specs = {}
    for task, slots in (("t2i", []), ("edit", [h * w // 4])):
        ids, mask = prompts("", slots)
        slot_mask = ids[prompts.drop_idx :] == prompts.image_pad_id
        slot_mask = np.concatenate([slot_mask, np.ones(h * w // 4, bool)])
        shapes = [(1, h, w)] * (2 if task == "edit" else 1)
        specs[task] = TaskSpec(
            task,
            make_layout(shapes, slot_mask),
            (h, w),
            prompts.drop_idx,
            tuple(int(i) for i in ids),
            tuple(int(m) for m in mask),
            vision_grid if task == "edit" else None,
        )
    return specs


def image_inputs(batch: dict) -> dict:
    """The image fields of a batch that `encode` takes (none for T2I)."""
    return {k: batch[k] for k in IMAGE_INPUTS if k in batch}


def encode(
    te_params, spec: TaskSpec, input_ids, attention_mask, condition_latents=None, condition_pixels=None
) -> Conditioning:
    """Runs the text encoder and assembles the Conditioning (call inside jit). `condition_pixels`: the edit's
    uint8 condition images (B, H, W, 3), needed by Qwen3-VL (`te_params` a `Qwen3VLParams`)."""
    if isinstance(te_params, qwen3_vl.Qwen3VLParams):
        patches = None
        if spec.vision_grid is not None:
            if condition_pixels is None:
                raise ValueError("Qwen3-VL edit conditioning needs the condition images' pixels")
            patches = vision_lib.image_patches(jnp.asarray(condition_pixels), te_params.vision.config)
        hidden = qwen3_vl.encode_features(te_params, input_ids, attention_mask, patches, spec.vision_grid)
    else:
        cond = None if condition_latents is None else (condition_latents,)
        hidden = text_encoder._model(te_params).features(input_ids, attention_mask, cond, spec.condition_shapes)
    batch = input_ids.shape[0]
    if condition_latents is None:
        condition_latents = jnp.zeros((batch, 0, 1), jnp.float32)
    return Conditioning(
        encoder_hidden_states=hidden[:, spec.drop_idx :],
        encoder_hidden_states_mask=attention_mask[:, spec.drop_idx :].astype(bool),
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
