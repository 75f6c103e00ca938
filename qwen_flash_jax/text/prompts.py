"""Qwen-Image 2.x prompt conventions, as pure functions (mirrors diffusers' `QwenImage21Pipeline`).

The pipeline wraps each prompt in a chat template with a fixed system prompt, tokenizes a batch with *left*
padding, runs the vision-language encoder and takes the last decoder layer's hidden states *before* the final norm.
It then keeps each sample's valid (unpadded) tokens, drops the leading system-message tokens (`drop_idx`), and
right-pads the batch again with a 0/1 mask. `img_mask` marks the `<|image_pad|>` positions of that result (the
condition images' slots), and the pipeline appends one True slot per 2x2 group of target latents.

In the real model the processor expands each `<|image_pad|>` placeholder into as many vision tokens as the image
has 2x2-merged patches. In the toy world a condition image of (h, w) latent tokens takes h*w/4 slots (one per 2x2
latent tokens), which is what `qwen_flash_jax.models.layout` expects; `tokenize_prompts` does that expansion.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Qwen's chat and vision special tokens (each a single id in Qwen3-VL's tokenizer and in the toy one).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."

_SYSTEM_MESSAGE = f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
PROMPT_TEMPLATE_T2I = f"{_SYSTEM_MESSAGE}{IM_START}user\n{{}}{IM_END}\n{IM_START}assistant\n"
_FIRST_IMAGE = f"<image1>{VISION_START}{IMAGE_PAD}{VISION_END}"
PROMPT_TEMPLATE_TI2I = f"{_SYSTEM_MESSAGE}{IM_START}user\n{_FIRST_IMAGE}{{}}{IM_END}\n{IM_START}assistant\n"

TOKENS_PER_SLOT = 4  # one image slot = a 2x2 group of latent tokens (as in `qwen_flash_jax.models.layout`)


def build_prompt(prompt: str, num_condition_images: int = 0) -> str:
    """The templated prompt string: T2I template without condition images, else one placeholder per image.

    An empty prompt becomes " " (Qwen has no BOS token, so an empty user turn would leave nothing to read).
    """
    if num_condition_images < 0:
        raise ValueError(f"num_condition_images must be >= 0, got {num_condition_images}")
    prompt = prompt or " "
    if num_condition_images == 0:
        return PROMPT_TEMPLATE_T2I.format(prompt)
    images = _FIRST_IMAGE + "".join(
        f" <image{i}>{VISION_START}{IMAGE_PAD}{VISION_END}" for i in range(2, num_condition_images + 1)
    )
    return PROMPT_TEMPLATE_TI2I.replace(_FIRST_IMAGE, images).format(prompt)


def special_token_id(tokenizer, token: str) -> int:
    """The single id of a special token; raises if the tokenizer splits it or does not know it."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{token!r} is not a single token in this tokenizer (got ids {ids})")
    return int(ids[0])


def system_prefix_len(tokenizer) -> int:
    """`drop_idx`: the number of leading tokens of the system message, dropped from the encoder's output."""
    return len(tokenizer.encode(_SYSTEM_MESSAGE, add_special_tokens=False))


def condition_slots_for(shapes: Sequence[tuple[int, int]]) -> list[int]:
    """Image slots per condition image of (h, w) latent tokens: h*w/4 (one per 2x2 group)."""
    slots = []
    for h, w in shapes:
        if h % 2 or w % 2:
            raise ValueError(
                f"a condition image of {h}x{w} latent tokens does not split into 2x2 groups; "
                "height and width must be even"
            )
        slots.append(h * w // TOKENS_PER_SLOT)
    return slots


def tokenize_prompts(tokenizer, prompts: str | Sequence[str], condition_slots: Sequence[int] = ()) -> dict:
    """Templates, tokenizes and left-pads a batch of prompts.

    All prompts share the condition images (as in the pipeline); the i-th `<|image_pad|>` placeholder of every
    prompt is expanded to `condition_slots[i]` pad tokens. Returns numpy int32 `input_ids` and `attention_mask`
    (B, L), left-padded with the tokenizer's pad token, plus `drop_idx` and `image_pad_id`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    condition_slots = [int(n) for n in condition_slots]
    if any(n <= 0 for n in condition_slots):
        raise ValueError(f"every condition image needs at least one slot, got condition_slots={condition_slots}")
    image_pad_id = special_token_id(tokenizer, IMAGE_PAD)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token")

    rows = []
    for prompt in prompts:
        ids = tokenizer.encode(build_prompt(prompt, len(condition_slots)), add_special_tokens=False)
        placeholders = [k for k, t in enumerate(ids) if t == image_pad_id]
        if len(placeholders) != len(condition_slots):
            raise ValueError(
                f"prompt {prompt!r} yields {len(placeholders)} {IMAGE_PAD} placeholders for "
                f"{len(condition_slots)} condition images; prompts must not contain {IMAGE_PAD} themselves"
            )
        expanded: list[int] = []
        start = 0
        for position, n in zip(placeholders, condition_slots):
            expanded.extend(ids[start:position])
            expanded.extend([image_pad_id] * n)
            start = position + 1
        expanded.extend(ids[start:])
        rows.append(expanded)

    length = max(len(r) for r in rows)
    input_ids = np.full((len(rows), length), pad_id, np.int32)
    attention_mask = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row) :] = row
        attention_mask[b, length - len(row) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "drop_idx": system_prefix_len(tokenizer),
        "image_pad_id": image_pad_id,
    }


def extract_prompt_embeds(hidden, input_ids, attention_mask, drop_idx: int, image_pad_id: int):
    """Mirrors `_get_qwen_prompt_embeds` after the encoder forward (host-side numpy: lengths vary per sample).

    Keeps each sample's valid tokens (wherever the padding is), drops the first `drop_idx` of them (the system
    message), and right-pads to the longest result. Returns `prompt_embeds` (B, L, D) in `hidden`'s dtype with zero
    rows at padding, `prompt_mask` (B, L) bool, and `image_slot_mask` (B, L) bool: True at `<|image_pad|>` tokens.
    """
    hidden = np.asarray(hidden)
    input_ids = np.asarray(input_ids)
    valid = np.asarray(attention_mask).astype(bool)
    if hidden.ndim != 3 or hidden.shape[:2] != input_ids.shape or input_ids.shape != valid.shape:
        raise ValueError(
            f"hidden (B, S, D) must match input_ids and attention_mask (B, S); got {hidden.shape}, "
            f"{input_ids.shape}, {valid.shape}"
        )
    embeds = [h[m][drop_idx:] for h, m in zip(hidden, valid)]
    slots = [(ids[m] == image_pad_id)[drop_idx:] for ids, m in zip(input_ids, valid)]
    length = max(e.shape[0] for e in embeds)
    if length == 0:
        raise ValueError(f"no tokens left after dropping the {drop_idx}-token system prefix")
    batch, dim = hidden.shape[0], hidden.shape[2]
    prompt_embeds = np.zeros((batch, length, dim), hidden.dtype)
    prompt_mask = np.zeros((batch, length), bool)
    image_slot_mask = np.zeros((batch, length), bool)
    for b, (e, s) in enumerate(zip(embeds, slots)):
        prompt_embeds[b, : len(e)] = e
        prompt_mask[b, : len(e)] = True
        image_slot_mask[b, : len(s)] = s
    return prompt_embeds, prompt_mask, image_slot_mask


def append_target_slots(image_slot_mask, target_tokens: int):
    """The transformer's `img_mask`: the prompt's slot mask followed by one True slot per 2x2 target latents."""
    image_slot_mask = np.asarray(image_slot_mask).astype(bool)
    if target_tokens <= 0 or target_tokens % TOKENS_PER_SLOT:
        raise ValueError(
            f"the target image's {target_tokens} latent tokens do not fill whole 2x2 slots "
            f"(need a positive multiple of {TOKENS_PER_SLOT})"
        )
    ones = np.ones((image_slot_mask.shape[0], target_tokens // TOKENS_PER_SLOT), bool)
    return np.concatenate([image_slot_mask, ones], axis=1)
