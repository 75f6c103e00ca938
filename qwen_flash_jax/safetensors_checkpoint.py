"""Reads diffusers' and transformers' safetensors checkpoints with `safetensors.safe_open`, one tensor at a time.

`safe_open`'s header parser already rejects truncated files, overlapping or miscounted data and bad JSON; this module
adds the sharded-directory logic (the index, a key in two shards), the float-dtype check, the one-line
`CheckpointError`s naming the file, and the streaming. Files are read with `pread`, not `mmap`: a memory map keeps
every page already read resident, so host memory grows to the checkpoint's size instead of one tensor
(`benchmarks/convert_memory.py --gb 1`: converter peak RSS 0.8 GiB with pread, 1.9 GiB with mmap). Arrays come back
as host numpy arrays (bfloat16 from ml_dtypes): `framework="flax"` would first place every whole tensor on the
default device, and turn float64 into float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from qwen_flash_jax.errors import CheckpointError

__all__ = ["INDEX_FILES", "CheckpointError", "SafetensorsCheckpoint", "TensorInfo"]

# The shard indices a directory may hold: diffusers' name, then transformers' (a text encoder saved by it).
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
# A weight is a float tensor; an integer or boolean tensor where one belongs means a wrong file, not a cast to make.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
# Target layouts a sharded read takes block by block (`get_slice`): a device's block of the transpose is the
# transpose of the source block at the reversed index. Other layouts are callables applied to the whole tensor.
SLICED_LAYOUTS = {"copy": np.asarray, "transpose": np.transpose}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a shard's header says of one tensor."""

    shape: tuple[int, ...]
    dtype: str  # the safetensors name: "BF16", "F32" ...
    file: Path


class SafetensorsCheckpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint, addressed by key.

    `path` is a single `.safetensors` file or a directory holding either an index (`INDEX_FILES`; its `weight_map`
    names each key's shard) or, without an index, one or more `*.safetensors` files. Every shard header is parsed
    and validated on open (`tensors`: key -> `TensorInfo`), before any data is read; a key found in two shards, or
    not in the shard the index names, is an error. Every defect is a one-line `CheckpointError` naming the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self._shards: dict[Path, safe_open] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self):
        path = self.path
        index_path = next((path / name for name in INDEX_FILES if (path / name).is_file()), None)
        weight_map = None
        if path.is_file():
            shard_paths = [path]
        elif index_path is not None:
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

        for shard_path in shard_paths:
            shard = self._shards[shard_path] = _open_shard(shard_path)
            for name in shard.keys():  # noqa: SIM118 -- a safe_open handle is not iterable
                header = shard.get_slice(name)  # reads nothing: shape and dtype come from the parsed header
                if header.get_dtype() not in FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{shard_path}: tensor {name!r} has unsupported dtype {header.get_dtype()!r} "
                        f"(supported: {', '.join(FLOAT_DTYPES)})"
                    )
                if name in self.tensors:
                    raise CheckpointError(
                        f"tensor {name!r} is in two shards: {self.tensors[name].file.name} and {shard_path.name}"
                    )
                self.tensors[name] = TensorInfo(tuple(header.get_shape()), header.get_dtype(), shard_path)
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
        """Reads exactly one tensor into a fresh host array (the rest of the file is not touched)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"checkpoint has no tensor {name!r}")
        try:
            return self._shards[info.file].get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from None

    def read_nested(self, plan: dict, dtype, shardings: dict | None = None) -> dict:
        """{key: (path, layout)} -> a nested dict holding at each path the key's tensor in our layout, cast to
        `dtype`, as a device array: on the default device, or laid out by the sharding at the same path of
        `shardings` (a nested dict), so no device ever holds the whole model.

        `layout` is "copy", "transpose" (torch's (out, in) -> our (in, out)), or a numpy function of the whole
        tensor. With a sharding, a "copy" or "transpose" tensor is read block by block, each device's block alone
        (`get_slice`), so a host reads only what its devices hold; otherwise one whole tensor is in host memory at
        a time.
        """
        nested: dict = {}
        for key, (path, layout) in plan.items():
            node, where = nested, shardings
            for part in path[:-1]:
                node = node.setdefault(part, {})
                where = None if where is None else where[part]
            sharding = None if where is None else where[path[-1]]
            node[path[-1]] = self._place(key, layout, np.dtype(dtype), sharding)
        return nested

    def _place(self, key: str, layout, dtype: np.dtype, sharding) -> jax.Array:
        if key not in self.tensors:
            raise CheckpointError(f"checkpoint has no tensor {key!r}")
        info = self.tensors[key]
        if sharding is None or callable(layout) or math.prod(info.shape) == 0:  # a 0-size tensor has no blocks
            transform = layout if callable(layout) else SLICED_LAYOUTS[layout]
            return jax.device_put(np.asarray(transform(self.read(key)), dtype=dtype), sharding)
        transpose = layout == "transpose"
        source = self._shards[info.file].get_slice(key)
        blocks: dict = {}  # a replicated tensor's devices all ask for the same block: read it once

        def read_block(index: tuple[slice, ...]) -> np.ndarray:
            index = tuple(index)[::-1] if transpose else tuple(index)
            seen = tuple((s.start, s.stop, s.step) for s in index)  # slices are not hashable before Python 3.12
            if seen not in blocks:
                try:
                    block = source[index]
                except SafetensorError as e:
                    raise CheckpointError(f"{info.file}: cannot read tensor {key!r}: {e}") from None
                blocks[seen] = np.asarray(block.T if transpose else block, dtype=dtype)
            return blocks[seen]

        shape = info.shape[::-1] if transpose else info.shape
        return jax.make_array_from_callback(shape, sharding, read_block)

    def close(self):
        for shard in self._shards.values():
            shard.__exit__(None, None, None)
        self._shards = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_shard(path: Path) -> safe_open:
    try:
        return safe_open(path, framework="numpy", backend="pread")
    except SafetensorError as e:  # the header parser's own words: truncated, overlapping, bad JSON ...
        raise CheckpointError(f"{path}: not a valid safetensors file (corrupt or truncated): {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from None


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
