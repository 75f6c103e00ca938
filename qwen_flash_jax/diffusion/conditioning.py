"""From a data batch to the transformer's conditioning, inside jit.

The frozen text encoder runs on device as part of each step (at scale it is sharded like the transformer); only
token ids, latents and (for Qwen3-VL edits) the condition image's uint8 pixels cross the host boundary. With
`data.precompute_text` the batch carries the prompts' states instead, encoded once before training by this same
code (`batch_conditioning`, `train.text_states`), and the steps take no encoder. The token
layout of each task is static and derived once from the prompt template, since the system prefix and the image
slots sit at fixed positions of every right-padded prompt.

An edit's condition image reaches the text encoder in the form it reads: the toy encoder projects the condition
latents into the image slots; Qwen3-VL's vision tower reads patches cut from the pixels (on device, inside jit).

Edits with several condition images of different sizes (`task_specs(..., condition_sizes=...)`) are laid out as
`qwen_flash_jax.Pipeline` lays them out, by the same code (`token_layout`, `data.edit_images`): the images' VAE
latents before the target, one run of vision tokens per image in the prompt, the output's aspect ratio from the last
image. A batch holds one such layout (jit shapes are static): `condition_latents` (B, sum of h_k*w_k, C) and
`condition_pixels` (B, sum of H_k*W_k, 3), each image's pixels flattened, in order.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from qwen_flash_jax.data import edit_images
from qwen_flash_jax.data.pipeline import PromptEncoder
from qwen_flash_jax.diffusion.sampling import Conditioning
from qwen_flash_jax.models.layout import TokenLayout, make_layout
from qwen_flash_jax.text import encoder as text_encoder
from qwen_flash_jax.text import prompts as prompts_lib
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
    # An edit with its layout given (`task_specs(condition_sizes=...)`): per condition image its (height, width)
    # in pixels, in latents and (Qwen3-VL) in vision patches. Empty for T2I and the one square source of the target.
    condition_sizes: tuple[tuple[int, int], ...] = ()
    condition_hw: tuple[tuple[int, int], ...] = ()
    vision_grids: tuple[tuple[int, int], ...] = ()

    @property
    def target_tokens(self) -> int:
        return self.latent_hw[0] * self.latent_hw[1]

    @property
    def condition_shapes(self):
        if self.condition_hw:
            return self.condition_hw
        return (self.latent_hw,) if self.task == "edit" else None


def token_layout(slot_mask, condition_hw, target_hw) -> TokenLayout:
    """The transformer's layout: condition images of latent sizes `condition_hw`, in order, then the target of
    `target_hw`; `slot_mask` (L,) or (B, L): True at the prompt's image slots (`qwen_flash_jax.Pipeline` and
    `task_specs` both build their layouts here)."""
    shapes = [(1, int(h), int(w)) for h, w in condition_hw] + [(1, int(target_hw[0]), int(target_hw[1]))]
    slot_mask = np.atleast_2d(np.asarray(slot_mask, bool))
    return make_layout(shapes, prompts_lib.append_target_slots(slot_mask, shapes[-1][1] * shapes[-1][2]))


def _vision_grid(height: int, width: int, latent_hw, vision_config):
    grid, tokens = vision_lib.image_grid(height, width, vision_config)
    # The prompt's image slots are the vision tokens, one per 2x2 latents.
    if tokens != latent_hw[0] * latent_hw[1] // 4:
        raise ValueError(
            f"a {height}x{width}px condition image gives {tokens} vision tokens but "
            f"{latent_hw[0] * latent_hw[1] // 4} 2x2 latent groups; the vision tower and the VAE do not fit together"
        )
    return grid


def task_specs(
    prompts: PromptEncoder, codec, image_size: int, vision_config=None, condition_sizes=()
) -> dict[str, TaskSpec]:
    """Per task; `vision_config` (Qwen3-VL's) when the text encoder reads edit images through its vision tower.
    `condition_sizes`: the edit's condition images' (height, width) in pixels, each one the pipeline keeps at
    `image_size` (see `data.edit_images`); empty: one square source of the target's size."""
    h, w, _ = codec.latent_shape(image_size, image_size)
    vision_grid = None
    if vision_config is not None:
        vision_grid = _vision_grid(image_size, image_size, (h, w), vision_config)
    specs = {}
    for task, condition_hw in (("t2i", []), ("edit", [(h, w)])):
        ids, mask = prompts("", prompts_lib.condition_slots_for(condition_hw))
        specs[task] = TaskSpec(
            task,
            token_layout(ids[prompts.drop_idx :] == prompts.image_pad_id, condition_hw, (h, w)),
            (h, w),
            prompts.drop_idx,
            tuple(int(i) for i in ids),
            tuple(int(m) for m in mask),
            vision_grid if task == "edit" else None,
        )
    if condition_sizes:
        specs["edit"] = edit_spec(prompts, codec, image_size, condition_sizes, vision_config)
    return specs


def edit_spec(prompts: PromptEncoder, codec, image_size: int, condition_sizes, vision_config=None) -> TaskSpec:
    """The edit task of condition images of `condition_sizes` (pixels, in order) at output resolution
    `image_size`: the layout `qwen_flash_jax.Pipeline` gives those images."""
    sizes = tuple((int(a), int(b)) for a, b in condition_sizes)
    for height, width in sizes:
        kept = edit_images.condition_size(image_size, height, width)
        if kept != (height, width):
            raise ValueError(
                f"a {height}x{width} condition image is resized to {kept[0]}x{kept[1]} at {image_size}px "
                "(about image_size**2 pixels at its aspect ratio, multiples of 32); give sizes it keeps"
            )
    condition_hw = tuple(codec.latent_shape(height, width)[:2] for height, width in sizes)
    target_hw = codec.latent_shape(*edit_images.output_size(image_size, sizes))[:2]
    grids = ()
    if vision_config is not None:
        grids = tuple(_vision_grid(a, b, hw, vision_config) for (a, b), hw in zip(sizes, condition_hw))
    ids, mask = prompts("", prompts_lib.condition_slots_for(condition_hw))
    return TaskSpec(
        "edit",
        token_layout(ids[prompts.drop_idx :] == prompts.image_pad_id, condition_hw, target_hw),
        target_hw,
        prompts.drop_idx,
        tuple(int(i) for i in ids),
        tuple(int(m) for m in mask),
        condition_sizes=sizes,
        condition_hw=condition_hw,
        vision_grids=grids,
    )


def split_condition_pixels(spec: TaskSpec, condition_pixels):
    """(B, sum of H_k*W_k, 3) flattened pixels -> one (B, H_k, W_k, 3) array per condition image."""
    out, start = [], 0
    for height, width in spec.condition_sizes:
        part = condition_pixels[:, start : start + height * width]
        out.append(part.reshape(part.shape[0], height, width, part.shape[-1]))
        start += height * width
    return out


def image_inputs(batch: dict) -> dict:
    """The image fields of a batch that `encode` takes (none for T2I)."""
    return {k: batch[k] for k in IMAGE_INPUTS if k in batch}


def encode(
    te_params, spec: TaskSpec, input_ids, attention_mask, condition_latents=None, condition_pixels=None
) -> Conditioning:
    """Runs the text encoder and assembles the Conditioning (call inside jit). `condition_pixels`: the edit's
    uint8 condition images (B, H, W, 3), or for a spec with `condition_sizes` every image's pixels flattened
    (B, sum of H_k*W_k, 3), needed by Qwen3-VL (`te_params` a `Qwen3VLParams`)."""
    if isinstance(te_params, qwen3_vl.Qwen3VLParams) and spec.vision_grids:
        if condition_pixels is None:
            raise ValueError("Qwen3-VL edit conditioning needs the condition images' pixels")
        config = te_params.vision.config
        patches = tuple(vision_lib.image_patches(p, config) for p in split_condition_pixels(spec, condition_pixels))
        hidden = qwen3_vl.encode_features_per_row(te_params, input_ids, attention_mask, patches, spec.vision_grids)
    elif isinstance(te_params, qwen3_vl.Qwen3VLParams):
        patches = None
        if spec.vision_grid is not None:
            if condition_pixels is None:
                raise ValueError("Qwen3-VL edit conditioning needs the condition images' pixels")
            patches = vision_lib.image_patches(jnp.asarray(condition_pixels), te_params.vision.config)
        hidden = qwen3_vl.encode_features(te_params, input_ids, attention_mask, patches, spec.vision_grid)
    elif spec.condition_hw and condition_latents is not None:
        cond, start = [], 0
        for h, w in spec.condition_hw:
            cond.append(condition_latents[:, start : start + h * w])
            start += h * w
        hidden = text_encoder._model(te_params).features(input_ids, attention_mask, tuple(cond), spec.condition_hw)
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


def batch_conditioning(te_params, spec: TaskSpec, batch: dict, negative: bool = False) -> Conditioning:
    """A training batch's conditioning (call inside jit), or with `negative` CFG's: the empty prompt with the batch's
    images. A batch with precomputed text states (`data.text_states.FIELDS`) is read as it is (`te_params` unused,
    None in the job); otherwise the text encoder runs."""
    if "prompt_embeds" in batch:
        prefix = "negative_" if negative else ""
        latents = batch.get("condition_latents")
        if latents is None:
            latents = jnp.zeros((batch["prompt_embeds"].shape[0], 0, 1), jnp.float32)
        return Conditioning(
            encoder_hidden_states=batch[f"{prefix}prompt_embeds"],
            encoder_hidden_states_mask=batch[f"{prefix}prompt_embeds_mask"].astype(bool),
            condition_latents=latents,
            layout=spec.layout,
        )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if negative:
        ids, mask = empty_prompt(spec, ids.shape[0])
    return encode(te_params, spec, ids, mask, **image_inputs(batch))


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
