"""Exact task ratios and category weights.

Batches are homogeneous in task: a T2I batch and an edit batch have different token layouts (an edit carries
condition-image tokens), hence different shapes, and each compiles its own step once. The T2I:Edit ratio a:b is
enforced over batches: every aligned window of a+b consecutive batches holds exactly a T2I and b edit batches, laid
out by a fixed, evenly spread pattern (the same on every process, which must all run the same step function at
the same step). Category weights mix examples *within* a task's batches.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import grain

from qwen_flash_jax.models.config import ConfigError

TASKS = ("t2i", "edit")


def parse_ratio(text: str) -> tuple[int, int]:
    """'7:3' -> (7, 3), reduced by their gcd; '1:0' is T2I only, '0:1' edit only."""
    parts = str(text).replace(" ", "").split(":")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"task ratio must look like 'T2I:Edit' with integers, e.g. '7:3'; got {text!r}") from None
    if a < 0 or b < 0 or a + b == 0:
        raise ConfigError(f"task ratio {text!r} needs non-negative parts that are not both zero")
    g = math.gcd(a, b)
    return a // g, b // g


def task_pattern(ratio: tuple[int, int]) -> tuple[str, ...]:
    """One window of the batch schedule: a T2I and b edit slots, edits spread as evenly as possible.

    Edit slot j of b sits at floor((j + 0.5) * (a + b) / b), so 7:3 gives T T T E T T E T T E ... no two edits
    adjacent while a >= b, and the pattern is a pure function of the ratio.
    """
    a, b = ratio
    window = a + b
    edits = {math.floor((j + 0.5) * window / b) for j in range(b)} if b else set()
    return tuple("edit" if i in edits else "t2i" for i in range(window))


def normalise_weights(weights: Mapping[str, float], valid: tuple[str, ...], what: str) -> dict[str, float]:
    """Validates a category -> weight mapping; zero-weight categories are dropped, the rest sum to 1."""
    unknown = sorted(set(weights) - set(valid))
    if unknown:
        raise ConfigError(f"unknown {what} categories {unknown}; valid ones are {list(valid)}")
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or w < 0 or math.isnan(w) or math.isinf(w):
            raise ConfigError(f"{what} weight for {name!r} must be a finite number >= 0, got {w!r}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ConfigError(f"{what} weights {dict(weights)} are all zero; give at least one category a weight > 0")
    return {k: float(w) / total for k, w in weights.items() if w > 0}


class TaskInterleaveIterDataset(grain.IterDataset):
    """Interleaves per-task batch streams by `task_pattern`, tagging each batch with its task (unless its stream
    tagged it with the key of its edit layout).

    Each pattern slot yields `slot_batches` consecutive batches of its task: a consumer that takes that many batches
    per step (the distillation's critic updates and generator update) then sees the exact ratio in every role,
    where one batch per slot would alias with its step (at 1:1 and 4 batches per step the 4th is always an edit).
    Only the tasks that occur in the pattern are iterated; the iterator state is the batch position plus each
    child iterator's state, so a restored pipeline yields the identical stream.
    """

    def __init__(self, streams: Mapping[str, grain.IterDataset], ratio: tuple[int, int], slot_batches: int = 1):
        if slot_batches < 1:
            raise ConfigError(f"slot_batches must be >= 1, got {slot_batches}")
        self._slot_batches = int(slot_batches)
        self._pattern = task_pattern(ratio)
        self._tasks = tuple(t for t in TASKS if t in self._pattern)
        missing = [t for t in self._tasks if t not in streams]
        if missing:
            raise ConfigError(f"task ratio {ratio} needs data for {missing}")
        super().__init__([streams[t] for t in self._tasks])
        self._streams = {t: streams[t] for t in self._tasks}

    def __iter__(self) -> "_TaskInterleaveIterator":
        return _TaskInterleaveIterator(
            {t: iter(ds) for t, ds in self._streams.items()}, self._pattern, self._slot_batches
        )

    def __str__(self) -> str:
        return f"TaskInterleaveIterDataset(pattern={''.join(t[0].upper() for t in self._pattern)})"


class _TaskInterleaveIterator(grain.DatasetIterator):
    def __init__(self, iterators: dict[str, grain.DatasetIterator], pattern: tuple[str, ...], slot_batches: int):
        super().__init__(list(iterators.values()))
        self._iterators = iterators
        self._pattern = pattern
        self._slot_batches = slot_batches
        self._position = 0  # batches produced so far

    def __next__(self) -> dict[str, Any]:
        task = self._pattern[(self._position // self._slot_batches) % len(self._pattern)]
        batch = next(self._iterators[task])
        self._position += 1
        return {"task": task, **batch}  # a stream's own tag wins: an edit layout's key (`data.edit_layouts`)

    def get_state(self) -> dict[str, Any]:
        return {"position": self._position, **{t: it.get_state() for t, it in self._iterators.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._position = int(state["position"])
        for task, it in self._iterators.items():
            it.set_state(state[task])
