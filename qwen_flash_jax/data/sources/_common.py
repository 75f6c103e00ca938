"""Shared pieces of the dataset sources: the error type, the TaskSources shape, index checks, merging."""

from __future__ import annotations

import bisect
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from qwen_flash_jax.models.config import ConfigError

TASKS = ("t2i", "edit")
ON_BAD_RECORD = ("error", "skip")


class DataError(ValueError):
    """A dataset file or record is unusable; the message is one line naming the file, line / record and problem."""


class RandomAccessSource(Protocol):
    """What grain's ``MapDataset.source`` needs: a length and records by integer index (and it must pickle)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


TaskSources = dict[str, dict[str, RandomAccessSource]]


def one_line(text: object) -> str:
    """Collapses whitespace (an exception text may span lines) so an error message stays one line."""
    return " ".join(str(text).split())


def check_on_bad_record(value: object) -> str:
    if value not in ON_BAD_RECORD:
        raise DataError(f"on_bad_record must be one of {list(ON_BAD_RECORD)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_index(index: object, length: int) -> int:
    """A valid position in ``range(length)``; negative indices count from the end like a list's."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"source indices must be integers, got {type(index).__name__}")
    i = int(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {int(index)} out of range for a source of {length} records")
    return i


class ConcatSource:
    """Records of several sources one after the other (what ``merge_sources`` makes of a repeated category)."""

    def __init__(self, parts: Sequence[RandomAccessSource]):
        flat: list[RandomAccessSource] = []
        for part in parts:
            flat.extend(part.parts if isinstance(part, ConcatSource) else [part])
        self.parts = tuple(p for p in flat if len(p) > 0)
        self._ends = np.cumsum([len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(index, len(self))
        k = bisect.bisect_right(self._ends, i)
        return self.parts[k][i - (self._ends[k - 1] if k else 0)]

    def __repr__(self) -> str:
        return f"ConcatSource({len(self)} records from {len(self.parts)} sources)"


def merge_sources(*parts: Mapping[str, Mapping[str, RandomAccessSource]]) -> TaskSources:
    """Union of TaskSources; a task+category present in several parts becomes their concatenation, in argument
    order. Tasks come out in ``TASKS`` order and categories in first-seen order; an empty part is fine."""
    collected: dict[str, dict[str, list[RandomAccessSource]]] = {}
    for n, part in enumerate(parts):
        if not isinstance(part, Mapping):
            raise ConfigError(
                f"merge_sources argument {n} must be a {{task: {{category: source}}}} dict, got {type(part).__name__}"
            )
        for task, categories in part.items():
            if task not in TASKS:
                raise ConfigError(f"merge_sources argument {n} has unknown task {task!r}; valid: {list(TASKS)}")
            for category, source in categories.items():
                collected.setdefault(task, {}).setdefault(category, []).append(source)
    return {
        task: {c: s[0] if len(s) == 1 else ConcatSource(s) for c, s in collected[task].items()}
        for task in TASKS
        if task in collected
    }
