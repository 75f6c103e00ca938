"""Encoding every training record's prompt once, before training (`data.precompute_text=True`).

The store (`data.text_states` describes its files) sits in `cache_dir/text_states/<key>`, the key naming what the
states depend on: the text encoder (the toy encoder's weights; a checkpoint by its path), the codec, the data and
the prompt lengths. One category at a time (with `data.edit_layouts`, one edit category's layout at a time) is
encoded and published whole, so a killed precompute resumes at the part it was on, and runs of other category
weights or task ratios share one store.

Each record is encoded as the steps would encode it (`conditioning.batch_conditioning`, the same `Preprocess` and
`EncodeImages` as the input pipeline), its images included, and so is CFG's negative (the empty prompt with the
record's images; one for all of T2I). A multi-process job needs its store made beforehand, on one host:

    python -m qwen_flash_jax.precompute_text --config=configs/5to5.py [--config.x=y ...]

and then present in every host's cache_dir (or one shared file system).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import time
from typing import Callable

import jax
import numpy as np

from qwen_flash_jax import atomic, cache
from qwen_flash_jax.data import edit_layouts, mixing
from qwen_flash_jax.data import pipeline as pipeline_lib
from qwen_flash_jax.data import text_states as store_lib
from qwen_flash_jax.diffusion import conditioning
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train import assets as assets_lib

CATEGORY = "text_states"  # the cache category


def enabled(config) -> bool:
    value = config.data.get("precompute_text", False)
    if not isinstance(value, bool):
        raise ConfigError(f"data.precompute_text must be True or False, got {value!r}")
    return value


def needed(config) -> list[tuple[str, str]]:
    """(task, category) of every category the run trains on: weight > 0 in a task of share > 0."""
    ratio = mixing.parse_ratio(config.data.task_ratio)
    return [
        (task, category)
        for task, share in zip(mixing.TASKS, ratio)
        if share
        for category, weight in dict(config.data[f"{task}_weights"]).items()
        if weight > 0
    ]


def store_folder(config, text_encoder) -> pathlib.Path:
    d = config.data
    # The toy encoder by its weights (small); a checkpoint by its path (reading 8B weights to hash them is minutes).
    encoder = cache.params_fingerprint(text_encoder) if config.text_encoder.kind == "toy" else config.text_encoder.path
    key = cache.config_hash(
        encoder,
        config.text_encoder,
        config.codec,
        [d.source, d.t2i_jsonl, d.edit_jsonl, d.image_root, d.on_bad_record, d.image_size, d.examples_per_category],
        [d.seed, d.max_prompt_tokens, d.get("edit_prompt_tokens", 0), edit_layouts.from_config(d)],
        store_lib.FORMAT,
    )
    return cache.cache_root(config) / CATEGORY / key


def ensure_store(config, assets, log: Callable[[str], None] = print) -> pathlib.Path:
    """The run's store, encoding the categories it lacks (the single-process case: see the module docstring)."""
    folder = store_folder(config, assets.text_encoder)
    missing = [part for part in _parts(config, assets) if not store_lib.is_complete(part.folder(folder))]
    if missing and jax.process_count() > 1:
        raise ConfigError(
            f"data.precompute_text: {folder} lacks {[part.name for part in missing]}; make the store first on one "
            "host (python -m qwen_flash_jax.precompute_text --config=...) and give every host its copy"
        )
    for part in missing:
        encode_part(config, assets, part, part.folder(folder), log)
    return folder


@dataclasses.dataclass(frozen=True)
class Part:
    """What one store folder holds: a category's records, or (edits in layouts) those of one layout."""

    task: str
    category: str
    records: object  # a record source
    layout: int | None = None  # index into data.edit_layouts

    @property
    def name(self) -> str:
        return f"{self.task}/{self.category}" + ("" if self.layout is None else f"/layout{self.layout}")

    def folder(self, store: pathlib.Path) -> pathlib.Path:
        return pipeline_lib.states_folder(store, self.task, self.category, self.layout)


def _parts(config, assets) -> list[Part]:
    """The store's parts the run reads, each with the records the input pipeline reads from its folder."""
    layouts = edit_layouts.from_config(config.data)
    skip = config.data.get("on_bad_record", "error") == "skip"
    parts = []
    for task, category in needed(config):
        source = assets.sources.get(task, {}).get(category)
        if source is None or len(source) == 0:
            raise ConfigError(f"{task} category {category!r} has weight > 0 but no data")
        if task != "edit" or not layouts:
            parts.append(Part(task, category, source))
            continue
        split = pipeline_lib.layout_splits({category: source}, [category], layouts, skip)[category]
        parts += [
            Part(task, category, edit_layouts.Subset(source, indices), index)
            for index, indices in enumerate(split.indices)
            if len(indices)
        ]
    return parts


@functools.partial(jax.jit, static_argnames=("spec", "negative"))
def _encode(te_params, batch, spec, negative):
    cond = conditioning.batch_conditioning(te_params, spec, batch, negative=negative)
    return cond.encoder_hidden_states, cond.encoder_hidden_states_mask


def encode_part(config, assets, part: Part, dest: pathlib.Path, log=print) -> None:
    """Encodes one part's records in index order, `data.batch_size` at a time, and publishes its folder."""
    task, source = part.task, part.records
    layouts = edit_layouts.from_config(config.data)
    sizes = layouts[part.layout] if part.layout is not None else ()
    preprocess = pipeline_lib.Preprocess(task, assets.prompts, assets.codec, int(config.data.image_size), sizes)
    images = pipeline_lib.EncodeImages(assets.codec, assets.condition_pixels)
    key = task if part.layout is None else edit_layouts.task_key(part.layout)
    spec, n, batch_size = assets.tasks[key], len(source), int(config.data.batch_size)
    started = last_log = time.perf_counter()
    with atomic.publish(dest, if_exists="keep") as tmp:
        writer = None
        for start in range(0, n, batch_size):
            rows = [min(i, n - 1) for i in range(start, start + batch_size)]  # the last batch repeats its last record
            examples = [preprocess(source[i]) for i in rows]
            fields = ("input_ids", "attention_mask", *(k for k in examples[0] if k.startswith("source_pixels")))
            batch = images({k: np.stack([e[k] for e in examples]) for k in fields})
            states, mask = (np.asarray(x) for x in _encode(assets.text_encoder, batch, spec=spec, negative=False))
            negatives = None
            if task == "edit" or writer is None:  # T2I's negative is the same for every record: encoded once
                negatives, negative_mask = (
                    np.asarray(x) for x in _encode(assets.text_encoder, batch, spec=spec, negative=True)
                )
            if writer is None:
                dtype = str(states.dtype)
                writer = store_lib.CategoryWriter(tmp, states.shape[-1], dtype, shared_negative=task == "t2i")
                if task == "t2i":
                    writer.add_negative(negatives[0][negative_mask[0]])
            for j in range(min(batch_size, n - start)):
                writer.add(states[j][mask[j]], negatives[j][negative_mask[j]] if task == "edit" else None)
            if time.perf_counter() - last_log > 30 or start + batch_size >= n:
                last_log = time.perf_counter()
                done = min(start + batch_size, n)
                log(f"text states {part.name}: {done}/{n} records ({last_log - started:.0f} s)")
        writer.close()


def release_encoder(assets) -> None:
    """Drops the job's reference to the text encoder (its device memory goes with the last one) while the steps
    read stored states; `encoder_for_sampling` brings it back."""
    assets.text_encoder = None


@contextlib.contextmanager
def encoder_for_sampling(config, assets, log=print):
    """The text encoder loaded again for the duration (probes and the evaluation sample from prompts), and released
    after; a no-op while the job holds it."""
    if assets.text_encoder is not None:
        yield
        return
    _, assets.text_encoder = assets_lib.load_text_encoder(config, log)
    try:
        yield
    finally:
        assets.text_encoder = None
