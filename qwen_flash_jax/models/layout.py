"""Host-side layout of the joint text/image token sequence.

Qwen-Image 2.x runs one sequence per sample: the vision-language encoder's prompt sequence, in which each
condition image occupies image *slots* (one slot stands for a 2x2 group of latent tokens), followed by the target
image's slots. The transformer expands every slot into 4 tokens and drops the image latents into them.

Everything here depends only on `img_shapes` and the slot mask, never on activations, so it is computed once in
numpy and enters the jitted forward as constants. `TokenLayout` is hashable and is the static argument of the
jitted forward: one compilation per layout (T2I and each edit layout), never one per step.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

TOKENS_PER_SLOT = 4  # one vision-language image slot = 2x2 latent tokens


class LayoutError(ValueError):
    """Inconsistent `img_shapes` / `img_mask` / input shapes; the message names the mismatch."""


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    img_shapes: tuple[tuple[int, int, int], ...]  # (frame, height, width) per image, conditions first, target last
    slot_mask: tuple[bool, ...]  # the vision-language sequence: True at image slots (incl. trailing target slots)

    # --- sizes ------------------------------------------------------------------------------------------------------
    @functools.cached_property
    def _slot_mask_np(self) -> np.ndarray:
        return np.asarray(self.slot_mask, dtype=bool)

    @property
    def target_tokens(self) -> int:
        return int(np.prod(self.img_shapes[-1]))

    @property
    def num_image_tokens(self) -> int:
        return int(sum(np.prod(s) for s in self.img_shapes))

    @property
    def text_len(self) -> int:
        """Length of `encoder_hidden_states`: the vision-language sequence without the target's slots."""
        return len(self.slot_mask) - self.target_tokens // TOKENS_PER_SLOT

    @functools.cached_property
    def image_token_mask(self) -> np.ndarray:
        """(seq_len,) bool over the joint sequence: True at image tokens."""
        return np.repeat(self._slot_mask_np, np.where(self._slot_mask_np, TOKENS_PER_SLOT, 1))

    @property
    def seq_len(self) -> int:
        return int(self.image_token_mask.shape[0])

    @property
    def prefix_len(self) -> int:
        """Text + condition-image tokens; the target image is the suffix `[prefix_len, seq_len)`."""
        return self.seq_len - self.target_tokens

    # --- gathers --------------------------------------------------------------------------------------------------
    @functools.cached_property
    def source_index(self) -> np.ndarray:
        """(seq_len,) int32: joint position -> row of `concat([text (text_len rows), image tokens], axis=1)`.

        Text positions read the vision-language row they came from; image positions read the image tokens in order.
        The same gather maps the text padding mask onto the joint sequence.
        """
        slot_of_token = np.repeat(np.arange(len(self.slot_mask)), np.where(self._slot_mask_np, TOKENS_PER_SLOT, 1))
        index = slot_of_token.copy()
        image = self.image_token_mask
        index[image] = self.text_len + np.arange(int(image.sum()))
        return index.astype(np.int32)

    # --- block structure --------------------------------------------------------------------------------------------
    @functools.cached_property
    def image_ids(self) -> np.ndarray:
        """(seq_len,) int32: -1 at text tokens, the image block index (0.. conditions, last = target) elsewhere."""
        ids = np.full(self.seq_len, -1, np.int32)
        lengths = [int(np.prod(s)) for s in self.img_shapes]
        ids[self.image_token_mask] = np.repeat(np.arange(len(lengths)), lengths)
        return ids

    @functools.cached_property
    def attention_mask(self) -> np.ndarray:
        """(seq_len, seq_len) bool block-causal mask: causal over the sequence, bidirectional inside an image block."""
        pos = np.arange(self.seq_len)
        ids = self.image_ids
        same_block = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
        return (pos[:, None] >= pos[None, :]) | same_block

    # --- rotary positions ---------------------------------------------------------------------------------------
    @functools.cached_property
    def rope_positions(self) -> np.ndarray:
        """(3, seq_len) int32 (frame, height, width) positions.

        Text advances one shared position on all three axes. An image block freezes the frame axis at the position
        reached so far, lays a height/width grid centred on zero (negative indices included), and then advances the
        shared position by max(height, width).
        """
        frame = np.empty(self.seq_len, np.int64)
        height = np.empty(self.seq_len, np.int64)
        width = np.empty(self.seq_len, np.int64)
        image = self.image_token_mask
        cursor, position = 0, 0
        for _, h, w in self.img_shapes:
            start = cursor + int(np.argmax(image[cursor:]))
            n_text = start - cursor
            text = np.arange(position, position + n_text)
            frame[cursor:start] = height[cursor:start] = width[cursor:start] = text
            position += n_text
            end = start + h * w
            frame[start:end] = position
            height[start:end] = np.repeat(np.arange(-(h - h // 2), h // 2), w)
            width[start:end] = np.tile(np.arange(-(w - w // 2), w // 2), h)
            position += max(h, w)
            cursor = end
        if cursor < self.seq_len:  # text after the last image block
            tail = np.arange(position, position + self.seq_len - cursor)
            frame[cursor:] = height[cursor:] = width[cursor:] = tail
        return np.stack([frame, height, width]).astype(np.int32)


def make_layout(img_shapes, img_mask) -> TokenLayout:
    """Builds and validates the layout from diffusers-style `img_shapes` and `img_mask`.

    `img_shapes` is either one list of (frame, height, width) or diffusers' per-sample list of such lists (all samples
    must share a layout, as in diffusers). `img_mask` is (batch, vlm_len) or (vlm_len,) and must be concrete
    (numpy or a committed array), since the layout is static.
    """
    shapes = _normalise_shapes(img_shapes)
    try:
        mask = np.asarray(img_mask)
    except Exception as e:  # a tracer: the layout must be known at trace time
        raise LayoutError(
            "img_mask must be a concrete array (numpy); inside jit, build the layout outside with make_layout"
        ) from e
    mask = mask.astype(bool)
    if mask.ndim == 2:
        if not (mask == mask[:1]).all():
            raise LayoutError("all samples must share one img_mask layout (as in diffusers)")
        mask = mask[0]
    if mask.ndim != 1:
        raise LayoutError(f"img_mask must be (batch, vlm_len) or (vlm_len,), got shape {np.shape(img_mask)}")

    target = int(np.prod(shapes[-1]))
    for f, h, w in shapes:
        if f != 1:
            raise LayoutError(f"only single-frame images are supported, got frame={f} in img_shapes")
        if (h * w) % TOKENS_PER_SLOT:
            raise LayoutError(f"an image of {h}x{w} latent tokens does not fill whole 2x2 slots")
    target_slots = target // TOKENS_PER_SLOT
    if target_slots > mask.size or not mask[mask.size - target_slots :].all():
        raise LayoutError(f"img_mask must end with the target image's {target_slots} slots (all True)")
    image_slots = int(mask.sum())
    expected = sum(int(np.prod(s)) for s in shapes) // TOKENS_PER_SLOT
    if image_slots != expected:
        raise LayoutError(
            f"img_shapes accounts for {expected} image slots ({expected * TOKENS_PER_SLOT} tokens) "
            f"but img_mask marks {image_slots}"
        )
    return TokenLayout(img_shapes=shapes, slot_mask=tuple(bool(b) for b in mask))


def _normalise_shapes(img_shapes) -> tuple[tuple[int, int, int], ...]:
    shapes = list(img_shapes)
    if not shapes:
        raise LayoutError("img_shapes is empty; it needs at least the target image")
    if isinstance(shapes[0][0], (list, tuple)):  # diffusers' per-sample form
        first = [tuple(map(int, s)) for s in shapes[0]]
        for other in shapes[1:]:
            if [tuple(map(int, s)) for s in other] != first:
                raise LayoutError("all samples must share one img_shapes layout (as in diffusers)")
        shapes = first
    out = tuple(tuple(int(v) for v in s) for s in shapes)
    if any(len(s) != 3 for s in out):
        raise LayoutError(f"each img_shapes entry must be (frame, height, width), got {out}")
    return out
