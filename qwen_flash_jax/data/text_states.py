"""Precomputed text-encoder states on disk, and the data source that hands them to the input pipeline.

With `data.precompute_text=True` every training record's prompt is encoded once before training
(`train.text_states`), and the DMD steps read the states from the batch instead of running the frozen text encoder:
its weights and activations leave the step programs (docs/experiments/aot.md measures what that saves).

A store is one folder with one sub-folder per task and category, each written whole or not at all:

    <task>/<category>/meta.json                   records, rows, width, dtype, whether the negative is shared
    <task>/<category>/states.bin, offsets.npy     every record's valid states (the prompt after its system prefix),
                                                  one after another; record i is rows offsets[i]:offsets[i + 1]
    <task>/<category>/negative_states.bin, ...    CFG's negative, the empty prompt: one per record for edits (it
                                                  holds the record's images), one shared entry for T2I

Only the valid tokens are stored (the batch right-pads them), as raw little-endian rows read through a memory map:
a 1024² Qwen-Image 2.x edit holds ~1.1k tokens of 4096 bfloat16 values for its prompt and again for its negative
(about 18 MB a record), a T2I prompt ~0.1k tokens (about 0.8 MB).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

META = "meta.json"
FORMAT = "text-states-v1"
# Batch fields of precomputed states (diffusers' names): (B, L, D) states and their (B, L) int32 masks.
FIELDS = ("prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask")


def numpy_dtype(name: str) -> np.dtype:
    """A dtype name as numpy holds it (bfloat16 through ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class CategoryWriter:
    """Appends records' states to a category folder being written (`atomic.publish` gives the folder)."""

    def __init__(self, folder: pathlib.Path, width: int, dtype: str, shared_negative: bool):
        folder.mkdir(parents=True)
        self.folder, self.width, self.dtype, self.shared_negative = folder, width, dtype, shared_negative
        self._files = {name: open(folder / f"{name}.bin", "wb") for name in ("states", "negative_states")}
        self._offsets = {"states": [0], "negative_states": [0]}

    def _append(self, name: str, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, numpy_dtype(self.dtype))
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"states of shape {rows.shape}, expected (tokens, {self.width})")
        self._files[name].write(rows.tobytes())
        self._offsets[name].append(self._offsets[name][-1] + len(rows))

    def add(self, states: np.ndarray, negative: np.ndarray | None = None) -> None:
        """One record's valid states, and its negative's unless the negative is shared (`add_negative`)."""
        self._append("states", states)
        if negative is not None:
            self._append("negative_states", negative)

    def add_negative(self, negative: np.ndarray) -> None:
        """The shared negative (T2I: the empty prompt, the same for every record), once."""
        self._append("negative_states", negative)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        records = len(self._offsets["states"]) - 1
        negatives = len(self._offsets["negative_states"]) - 1
        if negatives != (1 if self.shared_negative else records):
            raise ValueError(f"{negatives} negatives for {records} records (shared: {self.shared_negative})")
        for name, offsets in self._offsets.items():
            np.save(self.folder / f"{name.replace('states', 'offsets')}.npy", np.asarray(offsets, np.int64))
        meta = dict(
            format=FORMAT, records=records, width=self.width, dtype=self.dtype, shared_negative=self.shared_negative
        )
        (self.folder / META).write_text(json.dumps(meta, indent=1))


@dataclasses.dataclass
class CategoryStates:
    """One category's stored states, read lazily through memory maps (opened on first use in each process)."""

    folder: pathlib.Path
    _maps: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        meta = json.loads((self.folder / META).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.folder}: not a text-state store of format {FORMAT}")
        self.records, self.width = int(meta["records"]), int(meta["width"])
        self.dtype, self.shared_negative = meta["dtype"], bool(meta["shared_negative"])

    def __len__(self) -> int:
        return self.records

    def __getstate__(self):  # a pickled copy (a grain worker process) opens its own maps
        return {"folder": self.folder, "_maps": {}}

    def __setstate__(self, state):
        self.__init__(**state)

    def _rows(self, name: str, i: int) -> np.ndarray:
        if name not in self._maps:
            offsets = np.load(self.folder / f"{name.replace('states', 'offsets')}.npy")
            path = self.folder / f"{name}.bin"
            rows = np.memmap(path, numpy_dtype(self.dtype), "r", shape=(int(offsets[-1]), self.width))
            self._maps[name] = (offsets, rows)
        offsets, rows = self._maps[name]
        return np.array(rows[offsets[i] : offsets[i + 1]])

    def states(self, i: int) -> np.ndarray:
        return self._rows("states", i)

    def negative(self, i: int) -> np.ndarray:
        return self._rows("negative_states", 0 if self.shared_negative else i)


def is_complete(folder: pathlib.Path) -> bool:
    return (folder / META).is_file()


@dataclasses.dataclass
class WithTextStates:
    """A record source whose records also carry their stored states: `prompt_states` and `negative_states`, (n, D)
    arrays of the valid tokens (`data.pipeline.Preprocess` pads them into the batch)."""

    source: Any
    states: CategoryStates

    def __post_init__(self):
        if len(self.source) != len(self.states):
            raise ValueError(
                f"{self.states.folder} holds {len(self.states)} records, the data source {len(self.source)}: "
                "the store was made for other data"
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index) % len(self)
        record = dict(self.source[i])
        record["prompt_states"] = self.states.states(i)
        record["negative_states"] = self.states.negative(i)
        return record


def pad(states: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) valid states -> ((length, D) right-padded with zeros, (length,) int32 mask)."""
    out = np.zeros((length, states.shape[1]), states.dtype)
    out[: len(states)] = states
    mask = np.zeros(length, np.int32)
    mask[: len(states)] = 1
    return out, mask
