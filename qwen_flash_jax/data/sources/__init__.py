"""Dataset sources: random-access record sources per task and category, for ``grain.MapDataset.source``.

    sources = merge_sources(toy_world_sources("data/"),                       # TFDS ArrayRecord, prepared once
                            jsonl_t2i_sources("prompts.jsonl", on_bad_record="skip"),
                            jsonl_edit_sources("pairs.jsonl"))
    sources["t2i"]["portrait"][0]   # {"id", "category", "caption", "image", "spec"}

``TaskSources`` is ``{"t2i": {category: source}, "edit": {category: source}}``; a source has ``__len__`` and
``__getitem__(int) -> record`` and pickles cheaply (files are reopened in each process). Records:

    T2I:  {"id": str, "category": str, "caption": str, "image": (H, W, 3) uint8 or None, "spec": str}
    Edit: {"id": str, "category": str, "instruction": str, "source": (H, W, 3) uint8,
           "target": (H, W, 3) uint8 or None, "spec": str}

``spec`` is the toy world's ground truth as JSON, "" for real data. Unusable files and records raise ``DataError``
(one line naming the file, line / record and problem); bad arguments raise ``ConfigError``. Modules: ``toy`` (TFDS
builders ``ToyWorldT2I`` / ``ToyWorldEdit``), ``jsonl`` (real data), ``_common`` (errors, merging).
"""

from ._common import TASKS, ConcatSource, DataError, RandomAccessSource, TaskSources, merge_sources
from .jsonl import JsonlSource, jsonl_edit_sources, jsonl_t2i_sources, load_image
from .toy import ToyWorldConfig, ToyWorldEdit, ToyWorldSource, ToyWorldT2I, toy_world_sources

__all__ = [
    "TASKS",
    "ConcatSource",
    "DataError",
    "JsonlSource",
    "RandomAccessSource",
    "TaskSources",
    "ToyWorldConfig",
    "ToyWorldEdit",
    "ToyWorldSource",
    "ToyWorldT2I",
    "jsonl_edit_sources",
    "jsonl_t2i_sources",
    "load_image",
    "merge_sources",
    "toy_world_sources",
]
