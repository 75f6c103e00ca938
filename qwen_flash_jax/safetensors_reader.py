"""A minimal, validating reader of the safetensors format that reads one tensor at a time.

Format: 8-byte little-endian header length N, N bytes of JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets relative to the
data buffer), then the data buffer.

We do not use `safetensors.safe_open` here because the converter must (a) validate a whole sharded checkpoint
from its headers alone, before reading any data, and (b) report every defect as a `CheckpointError` naming the
file and tensor, which the CLI turns into one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from qwen_flash_jax.errors import CheckpointError

__all__ = ["CheckpointError", "TensorInfo", "SafetensorsFile", "SafetensorsCheckpoint", "INDEX_FILE", "INDEX_FILES"]

INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
# The shard indices a directory may hold: diffusers' name, then transformers' (a text encoder saved by it).
INDEX_FILES = (INDEX_FILE, "model.safetensors.index.json")

# safetensors dtype name -> numpy dtype (explicitly little-endian: that is the on-disk byte order).
DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}

# A header is JSON describing tensors; anything this large is corruption, not a real header (the reference
# implementation uses the same 100 MB cap).
_MAX_HEADER_BYTES = 100 * 1024 * 1024

if sys.byteorder != "little":  # bfloat16 from ml_dtypes has no byte-swapped variant
    raise ImportError("safetensors_reader only supports little-endian hosts")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in `file`
    nbytes: int


class SafetensorsFile:
    """One `.safetensors` file: header parsed and validated on open, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb", buffering=0)  # raw I/O: readinto fills our buffer directly
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e.strerror or e}") from None
        try:
            self.metadata, self.tensors = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def _parse_header(self) -> tuple[dict, dict[str, TensorInfo]]:
        file_size = os.fstat(self._file.fileno()).st_size
        if file_size < 8:
            raise self._error(f"not a safetensors file: only {file_size} bytes")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > file_size - 8 or header_len > _MAX_HEADER_BYTES:
            raise self._error(
                f"corrupt header: header length {header_len} exceeds the file size {file_size} "
                "(not a safetensors file, or truncated)"
            )
        raw = self._file.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._error(f"corrupt header: invalid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._error("corrupt header: the JSON header is not an object")

        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        data_size = file_size - data_start
        tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            info, begin, end = self._parse_entry(name, entry, data_start)
            if end > data_size:
                raise self._error(
                    f"file truncated: tensor {name!r} ends at data byte {end} but the data section has only "
                    f"{data_size} bytes"
                )
            tensors[name] = info
            spans.append((begin, end, name))
        # Zero-size tensors occupy no bytes and cannot overlap anything.
        spans = sorted(s for s in spans if s[1] > s[0])
        for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
            if begin < prev_end:
                raise self._error(f"corrupt header: data of tensors {prev!r} and {name!r} overlap")
        return metadata, tensors

    def _parse_entry(self, name: str, entry, data_start: int) -> tuple[TensorInfo, int, int]:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise self._error(f"corrupt header: entry of tensor {name!r} lacks dtype/shape/data_offsets")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype_name not in DTYPES:
            raise self._error(
                f"tensor {name!r} has unsupported dtype {dtype_name!r} (supported: {', '.join(DTYPES)})"
            )
        if not (isinstance(shape, list) and all(_is_nonneg_int(d) for d in shape)):
            raise self._error(f"corrupt header: tensor {name!r} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_nonneg_int, offsets))):
            raise self._error(f"corrupt header: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * dtype.itemsize
        if end < begin or end - begin != expected:
            raise self._error(
                f"corrupt header: tensor {name!r} has data_offsets {offsets} ({end - begin} bytes) but "
                f"shape {shape} of {dtype_name} needs {expected} bytes"
            )
        info = TensorInfo(name, dtype, tuple(shape), self.path, data_start + begin, expected)
        return info, begin, end

    def read(self, name: str) -> np.ndarray:
        """Reads exactly one tensor's bytes into a fresh array (the rest of the file is never touched)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        array = np.empty(info.shape, info.dtype)
        view = memoryview(array.reshape(-1).view(np.uint8))
        self._file.seek(info.start)
        done = 0
        while done < info.nbytes:  # raw reads may return short counts
            n = self._file.readinto(view[done:])
            if not n:
                raise self._error(f"file truncated while reading tensor {name!r}")
            done += n
        return array

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsCheckpoint:
    """All tensors of a (possibly sharded) checkpoint, addressed by key.

    `path` is a single `.safetensors` file or a directory holding either an index (`INDEX_FILES`; its `weight_map` names
    each key's shard) or, without an index, one or more `*.safetensors` files. Every shard header is parsed and
    validated on open; a key found in two shards, or not in the shard the index names, is an error.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.files: list[SafetensorsFile] = []
        try:
            self._open(path)
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path):
        index_path = next((path / name for name in INDEX_FILES if (path / name).is_file()), path / INDEX_FILE)
        weight_map = None
        if path.is_file():
            shard_paths = [path]
        elif index_path.is_file():
            weight_map = _read_weight_map(index_path)
            shard_paths = [path / name for name in sorted(set(weight_map.values()))]
            for shard in shard_paths:
                if not shard.is_file():
                    raise CheckpointError(f"{index_path}: shard file {shard.name!r} does not exist")
        elif path.is_dir():
            shard_paths = sorted(path.glob("*.safetensors"))
            if not shard_paths:
                raise CheckpointError(f"{path}: no *.safetensors files (and no {' or '.join(INDEX_FILES)})")
        else:
            raise CheckpointError(f"{path}: no such file or directory")

        self.tensors: dict[str, TensorInfo] = {}
        self._owner: dict[str, SafetensorsFile] = {}
        for shard_path in shard_paths:
            shard = SafetensorsFile(shard_path)
            self.files.append(shard)
            for name, info in shard.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"tensor {name!r} is in two shards: {self.tensors[name].file.name} and {shard_path.name}"
                    )
                self.tensors[name] = info
                self._owner[name] = shard
        if weight_map is not None:
            for name, shard_name in weight_map.items():
                if name not in self.tensors:
                    raise CheckpointError(f"{index_path}: tensor {name!r} is not in its shard {shard_name!r}")
                if self.tensors[name].file.name != shard_name:
                    raise CheckpointError(
                        f"{index_path}: tensor {name!r} is mapped to {shard_name!r} but stored in "
                        f"{self.tensors[name].file.name!r}"
                    )

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        if name not in self._owner:
            raise CheckpointError(f"checkpoint has no tensor {name!r}")
        return self._owner[name].read(name)

    def read_nested(self, plan: dict, dtype, shardings: dict | None = None) -> dict:
        """{key: (path, transform)} -> a nested dict holding at each path the key's tensor, transformed (a numpy
        function: transpose, reshape ...) and cast to `dtype`, as a device array: on the default device, or laid
        out by the sharding at the same path of `shardings` (a nested dict), so no device ever holds the whole
        model. One tensor in host memory at a time, for checkpoints larger than a host's spare memory."""
        import jax

        nested: dict = {}
        for key, (path, transform) in plan.items():
            value = np.asarray(transform(self.read(key)), dtype=dtype)
            node, where = nested, shardings
            for part in path[:-1]:
                node = node.setdefault(part, {})
                where = None if where is None else where[part]
            node[path[-1]] = jax.device_put(value, None if where is None else where[path[-1]])
            del value
        return nested

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def close(self):
        for shard in self.files:
            shard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_weight_map(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: cannot read index: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: index has no valid 'weight_map'")
    for shard_name in set(weight_map.values()):
        # The index is data: it must not be able to point outside the checkpoint directory.
        if Path(shard_name).name != shard_name:
            raise CheckpointError(f"{index_path}: shard name {shard_name!r} is not a plain file name")
    return weight_map


def _is_nonneg_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
