"""The grain input pipeline: sources -> per-task example streams -> fixed-shape batches -> global arrays.

Per task (T2I, edit) the chain is
    one MapDataset per category (shuffled by seed, repeated)  -> MapDataset.mix(weights from config)
    -> [process_index::process_count] (each host reads its own disjoint shard) -> preprocess -> batch -> encode
and `mixing.TaskInterleaveIterDataset` interleaves the two batch streams by the exact T2I:Edit pattern. Every
stage is deterministic for the seed and the iterator state is a small dict (checkpointed with the model), so a
restored pipeline yields the identical stream.

Fixed shapes: prompts are tokenized with Qwen-Image's template and RIGHT-padded to `max_prompt_tokens` (the text
encoder is causal with mask-derived positions, so the valid tokens' states equal those of the diffusers pipeline's
left-padded batch); dropping the system prefix is then a static slice. Images become packed latent tokens with the
codec. A T2I batch and an edit batch therefore each have one static layout. With `data.edit_layouts` set, edits
come in several layouts, one per batch (`data.edit_layouts`): each record takes the layout of its number of
condition images (a record's "source" list, in order) and nearest aspect ratios, its images fitted to the layout's
sizes and its target to the output size the last one gives (`data.edit_images`). Each layout has its own batch
stream, tagged with its `edit_layouts.task_key`, and the edit batches mix the streams in proportion to the records
each layout holds, per category.

With `data.precompute_text` each category's source is wrapped to hand out its records' stored text states
(`data.text_states`), and the examples carry them padded to the prompt's length (`text_states.FIELDS`).

Threads: grain's prefetch threads run `Preprocess` (tokenizing, numpy pixels) only; `EncodeImages` runs the codec
once per batch in the thread that draws the batch, the one that dispatches the train steps. A VAE codec is a jitted
program: one call per batch instead of one per image, and no JAX dispatch from 16 threads at once (which once
aborted a CI run).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import grain
import jax
import numpy as np

from qwen_flash_jax.data import edit_images, edit_layouts, mixing
from qwen_flash_jax.data import text_states as text_states_lib
from qwen_flash_jax.data.world import EDIT_CATEGORIES, T2I_CATEGORIES
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.text import prompts as prompt_lib
from qwen_flash_jax.text.prompts import IMAGE_PAD, special_token_id

CATEGORIES = {"t2i": T2I_CATEGORIES, "edit": EDIT_CATEGORIES}


class PromptTooLongError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
    """Templates, tokenizes and right-pads one prompt to a fixed length (runs inside grain workers): `max_tokens`
    for T2I prompts, `max_edit_tokens` (0: the same) for edit prompts, which also hold the image slots."""

    tokenizer: Any
    max_tokens: int
    max_edit_tokens: int = 0

    @classmethod
    def from_config(cls, tokenizer, data_config) -> "PromptEncoder":
        return cls(tokenizer, int(data_config.max_prompt_tokens), int(data_config.get("edit_prompt_tokens", 0)))

    @property
    def drop_idx(self) -> int:
        return prompt_lib.system_prefix_len(self.tokenizer)

    @property
    def image_pad_id(self) -> int:
        return special_token_id(self.tokenizer, IMAGE_PAD)

    def __call__(self, text: str, condition_slots=()) -> tuple[np.ndarray, np.ndarray]:
        ids = prompt_lib.tokenize_prompts(self.tokenizer, [text], condition_slots)["input_ids"][0]
        length, field = (
            (self.max_edit_tokens, "data.edit_prompt_tokens")
            if condition_slots and self.max_edit_tokens
            else (self.max_tokens, "data.max_prompt_tokens")
        )
        if len(ids) > length:
            raise PromptTooLongError(
                f"prompt {text[:60]!r} takes {len(ids)} tokens with the template and {sum(condition_slots)} image "
                f"slots; {field} is {length}"
            )
        input_ids = np.full(length, self.tokenizer.pad_token_id, np.int32)
        input_ids[: len(ids)] = ids
        mask = np.zeros(length, np.int32)
        mask[: len(ids)] = 1
        return input_ids, mask


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Record -> fixed-shape example of numpy arrays; images stay uint8 pixels (`EncodeImages` makes the latents)."""

    task: str
    prompts: PromptEncoder
    codec: Any
    image_size: int
    condition_sizes: tuple[tuple[int, int], ...] = ()  # edits: the condition images' sizes; () = one square source

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        category = np.int32(CATEGORIES[self.task].index(record["category"]))
        if self.task == "edit" and self.condition_sizes:
            out = self._edit_with_layout(record)
        else:
            out = self._example(record)
        if "prompt_states" in record:
            out.update(self._stored_states(record, out["attention_mask"]))
        return {**out, "category": category}

    def _stored_states(self, record: dict, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """The record's precomputed states (`data.text_states`) padded to the prompt's length after its prefix."""
        length = len(attention_mask) - self.prompts.drop_idx
        valid = int(attention_mask[self.prompts.drop_idx :].sum())
        if len(record["prompt_states"]) != valid:
            raise ConfigError(
                f"record {record.get('id')!r}: its stored text states hold {len(record['prompt_states'])} tokens, "
                f"its prompt {valid}: the text-state store was made with another tokenizer or template"
            )
        padded = (
            *text_states_lib.pad(record["prompt_states"], length),
            *text_states_lib.pad(record["negative_states"], length),
        )
        return dict(zip(text_states_lib.FIELDS, padded))

    def _example(self, record: dict) -> dict[str, np.ndarray]:
        if self.task == "t2i":
            input_ids, mask = self.prompts(record["caption"])
            out = {"target_pixels": self._pixels(record["image"])}
        else:
            source = self._pixels(record["source"])
            h, w, _ = self.codec.latent_shape(*source.shape[:2])
            input_ids, mask = self.prompts(record["instruction"], [h * w // 4])  # one slot per 2x2 latent patch
            target = record["target"] if record["target"] is not None else record["source"]
            out = {"source_pixels": source, "target_pixels": self._pixels(target)}
        return {**out, "input_ids": input_ids, "attention_mask": mask}

    def _edit_with_layout(self, record: dict) -> dict[str, np.ndarray]:
        """The record's condition images fitted to `condition_sizes` (`source_pixels_<k>`), the target to the size
        the last one gives the output."""
        sources = record["source"]
        sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        if len(sources) != len(self.condition_sizes):
            raise ValueError(
                f"edit record {record.get('id')!r} has {len(sources)} condition images; its layout takes "
                f"{len(self.condition_sizes)}"
            )
        out = {
            f"source_pixels_{k}": edit_images.fit(image, *size)
            for k, (image, size) in enumerate(zip(sources, self.condition_sizes))
        }
        slots = [h * w // 4 for h, w, _ in (self.codec.latent_shape(*size) for size in self.condition_sizes)]
        input_ids, mask = self.prompts(record["instruction"], slots)
        target = record["target"] if record["target"] is not None else sources[-1]
        out["target_pixels"] = edit_images.fit(target, *edit_images.output_size(self.image_size, self.condition_sizes))
        return {**out, "input_ids": input_ids, "attention_mask": mask}

    def _pixels(self, image) -> np.ndarray:
        if image is None:  # prompt-only records (real T2I prompt sets): DMD needs no target image; a black one
            return np.zeros((self.image_size, self.image_size, 3), np.uint8)
        return np.asarray(image)


@dataclasses.dataclass
class EncodeImages:
    """Batch of pixels -> batch of packed latents: `target_pixels` -> `target_latents`, an edit's `source_pixels`
    -> `condition_latents` (and `condition_pixels` too where the text encoder's vision tower reads them). Several
    condition images (`source_pixels_<k>`) give their latents one after the other and their pixels flattened
    (B, sum of H_k*W_k, 3), as `diffusion.conditioning` reads them.

    One codec call per batch, in the consumer's thread (see the module docstring). A batch that is all black (the
    prompt-only T2I sets) reuses one black image's latents instead of a VAE pass per step.
    """

    codec: Any
    condition_pixels: bool = False
    _black: dict = dataclasses.field(default_factory=dict, repr=False)  # image shape -> one black image's latents

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        if "target_pixels" in out:  # (precomputing text states reads the condition images only)
            out["target_latents"] = self._latents(out.pop("target_pixels"))
        if "source_pixels" in out:
            source = out.pop("source_pixels")
            out["condition_latents"] = self._latents(source)
            if self.condition_pixels:
                out["condition_pixels"] = np.asarray(source, np.uint8)
        images = [out.pop(f"source_pixels_{k}") for k in range(sum(key.startswith("source_pixels_") for key in out))]
        if images:
            out["condition_latents"] = edit_images.pack_condition_latents(self.codec, images)
            if self.condition_pixels:
                flat = [np.asarray(x, np.uint8).reshape(x.shape[0], -1, x.shape[-1]) for x in images]
                out["condition_pixels"] = np.concatenate(flat, axis=1)
        return out

    def _latents(self, pixels: np.ndarray) -> np.ndarray:
        if not pixels.any():
            return np.repeat(self._black_latents(pixels.shape[1:])[None], len(pixels), axis=0)
        return self._latents_of(pixels)

    def _black_latents(self, image_shape: tuple[int, ...]) -> np.ndarray:
        if image_shape not in self._black:
            self._black[image_shape] = self._latents_of(np.zeros((1,) + image_shape, np.uint8))[0]
        return self._black[image_shape]

    def _latents_of(self, pixels):
        return np.asarray(self.codec.pack(self.codec.encode(pixels)), np.float32)


@dataclasses.dataclass(frozen=True)
class _Tag:
    """Marks a batch with the key of its `TaskSpec` (an edit layout's `edit_layouts.task_key`)."""

    key: str

    def __call__(self, batch: dict) -> dict:
        return {**batch, "task": self.key}


def task_stream(
    task: str,
    sources: dict,
    weights: dict[str, float],
    *,
    batch_size: int,
    preprocess: Preprocess,
    encode: EncodeImages,
    seed: int,
    process_index: int,
    process_count: int,
    text_states=None,
    layouts: tuple[edit_layouts.Layout, ...] = (),
    skip_unmatched: bool = False,
) -> grain.IterDataset:
    """One task's batches: per-category shuffled repeats mixed by weight, this process's shard, batched, encoded.
    `text_states`: a store of the records' precomputed text states (`data.text_states`), which the batches carry.
    `layouts` (edits): one such stream per layout, of the records it takes, mixed batch by batch; a record no layout
    takes is a ConfigError, or is left out with `skip_unmatched`."""
    weights = mixing.normalise_weights(weights, CATEGORIES[task], f"{task} category")
    missing = [c for c in weights if c not in sources or len(sources[c]) == 0]
    if missing:
        raise ConfigError(f"{task} categories {missing} have weight > 0 but no data")
    names = sorted(weights, key=CATEGORIES[task].index)
    if not layouts:
        parts = {c: (sources[c], states_folder(text_states, task, c)) for c in names}
        return _stream(
            {c: (p, weights[c]) for c, p in parts.items()},
            preprocess,
            encode,
            batch_size,
            seed,
            task,
            process_index,
            process_count,
        )
    splits = layout_splits(sources, names, layouts, skip_unmatched)
    streams, stream_weights = {}, {}
    for index, layout in enumerate(layouts):
        # A category keeps its weight: it is spread over the layouts in proportion to the records each takes.
        parts = {
            c: (
                (edit_layouts.Subset(sources[c], splits[c].indices[index]), states_folder(text_states, task, c, index)),
                weights[c] * splits[c].counts()[index] / sum(splits[c].counts()),
            )
            for c in names
            if splits[c].counts()[index]
        }
        if not parts:
            continue
        key = edit_layouts.task_key(index)
        layout_preprocess = dataclasses.replace(preprocess, condition_sizes=layout)
        stream = _stream(
            parts, layout_preprocess, encode, batch_size, seed + 104729 * index, task, process_index, process_count
        )
        streams[key], stream_weights[key] = stream.map(_Tag(key)), sum(w for _, w in parts.values())
    if len(streams) == 1:
        return next(iter(streams.values()))
    # Deterministic: every process draws its batches' layouts in the same order, so a global batch has one layout.
    return grain.IterDataset.mix(streams, stream_weights)


def _stream(parts, preprocess, encode, batch_size, seed, task, process_index, process_count) -> grain.IterDataset:
    """parts: category -> ((record source, its text-state folder or None), weight)."""

    def source(category, records, folder):
        if folder is None:
            return records
        if not text_states_lib.is_complete(folder):
            raise ConfigError(f"the text-state store has no {task}/{category} states ({folder})")
        try:
            return text_states_lib.WithTextStates(records, text_states_lib.CategoryStates(folder))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    names = list(parts)
    datasets = [
        grain.MapDataset.source(source(c, *parts[c][0])).shuffle(seed=seed + 7919 * CATEGORIES[task].index(c)).repeat()
        for c in names
    ]
    mixed = grain.MapDataset.mix(datasets, [parts[c][1] for c in names]) if len(datasets) > 1 else datasets[0]
    local = mixed[process_index::process_count]
    return local.map(preprocess).to_iter_dataset().batch(batch_size, drop_remainder=True).map(encode)


def states_folder(text_states, task: str, category: str, layout: int | None = None) -> pathlib.Path | None:
    """Where a category's stored text states are (per layout for edits in layouts); None without a store."""
    if text_states is None:
        return None
    folder = pathlib.Path(text_states) / task / category
    return folder if layout is None else folder / f"layout{layout}"


def layout_splits(sources: dict, categories, layouts, skip_unmatched: bool) -> dict[str, edit_layouts.Split]:
    """Per edit category, its records' layouts (`edit_layouts.split`); records no layout takes are a ConfigError
    unless `skip_unmatched`."""
    splits = {c: edit_layouts.split(sources[c], layouts) for c in categories}
    unmatched = {c: s.unmatched for c, s in splits.items() if s.unmatched}
    if unmatched and not skip_unmatched:
        counts = sorted({len(layout) for layout in layouts})

        def some(n, what):
            return f"{n} {what}{'s' if n != 1 else ''}"

        found = ", ".join(
            f"{c} {some(n, 'record')} of {some(k, 'image')}" for c, u in unmatched.items() for k, n in sorted(u.items())
        )
        raise ConfigError(
            f"edit records with a number of condition images no layout of data.edit_layouts takes (layouts of "
            f"{counts} images): {found} (data.on_bad_record='skip' leaves them out)"
        )
    return splits


def check_data_config(data_config) -> None:
    """Validates the ratio and category weights up front (a job calls this before any expensive work)."""
    ratio = mixing.parse_ratio(data_config.task_ratio)
    for task, share in zip(mixing.TASKS, ratio):
        if share:
            mixing.normalise_weights(dict(data_config[f"{task}_weights"]), CATEGORIES[task], f"{task} category")
    edit_layouts.from_config(data_config)


def build_pipeline(
    data_config,
    sources: dict,
    tokenizer,
    codec,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    condition_pixels: bool = False,
    slot_batches: int = 1,
    text_states=None,
) -> grain.IterDataset:
    """The interleaved T2I/edit batch stream of this process (per-process batch = global batch / processes).
    `condition_pixels`: edit examples also carry the condition image (for a text encoder with a vision tower).
    `slot_batches`: consecutive batches per task slot (`mixing.TaskInterleaveIterDataset`). `text_states`: the
    folder of the records' precomputed text states; the batches then carry them (`data.text_states.FIELDS`)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    ratio = mixing.parse_ratio(data_config.task_ratio)
    if data_config.batch_size % process_count:
        raise ConfigError(f"data.batch_size={data_config.batch_size} must divide over {process_count} processes")
    prompts = PromptEncoder.from_config(tokenizer, data_config)
    streams = {}
    for task, share in zip(mixing.TASKS, ratio):
        if share == 0:
            continue
        weights = dict(data_config[f"{task}_weights"])
        preprocess = Preprocess(task, prompts, codec, int(data_config.image_size))
        streams[task] = task_stream(
            task,
            sources.get(task, {}),
            weights,
            batch_size=data_config.batch_size // process_count,
            preprocess=preprocess,
            encode=EncodeImages(codec, condition_pixels),
            seed=int(data_config.seed),
            process_index=process_index,
            process_count=process_count,
            text_states=text_states,
            layouts=edit_layouts.from_config(data_config) if task == "edit" else (),
            skip_unmatched=data_config.get("on_bad_record", "error") == "skip",
        )
    return mixing.TaskInterleaveIterDataset(streams, ratio, slot_batches)


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """Process-local numpy batch -> global jax arrays sharded along the batch axis (non-array fields pass)."""
    return {
        k: (jax.make_array_from_process_local_data(sharding, v) if isinstance(v, np.ndarray) else v)
        for k, v in batch.items()
    }
