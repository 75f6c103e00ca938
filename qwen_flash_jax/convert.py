"""Streaming converter: diffusers `QwenImage21Transformer2DModel` safetensors -> our orbax checkpoint.

    python -m qwen_flash_jax.convert --src <diffusers transformer dir> --dst <dir> [--dtype bfloat16]

Output (read it back with `qwen_flash_jax.checkpoint_io`):
    <dst>/config.json   TransformerConfig JSON, `param_dtype` set to the converted dtype
    <dst>/params/       orbax checkpoint of the nested param tree laid out as `hf_keys.param_shapes(config)`
    <dst>/scheduler/    the pipeline's `scheduler/scheduler_config.json`, when the source directory sits in a
                        diffusers pipeline folder that has one: a job whose teacher is `<dst>` then samples on the
                        pipeline's own schedule (`train.teacher.schedule_folder`), not on the config's `sampling`
                        constants
    <dst>/model_index.json  the pipeline's, beside its scheduler: its `sample_sigmas` (a distilled pipeline's fixed
                        grid, as Qwen-Image 2.1 Turbo ships) belong to the schedule, and a job refuses such a
                        checkpoint as a teacher rather than sample it on another grid

Memory: the model is never held whole. Output leaves are built one at a time: allocate the leaf in the target
dtype (for per-layer tensors the stacked `(num_layers, ...)` array), fill it reading one source tensor at a time
(transpose + cast happen in the assignment, so no extra full-size temporary), hand it to orbax, free it. Peak
host memory is about the jax/orbax import footprint (~0.5 GiB) + 2x the largest output leaf (the leaf plus
tensorstore's encoded copy of it, which it assembles before writing) + one source tensor; measured with
`benchmarks/convert_memory.py`. For the published 7B model in bfloat16 (largest leaf `blocks/mlp/*`,
32 x 4096 x 12288, 3 GiB) that extrapolates to ~6.5 GiB.

Writing uses orbax's partial saving (`orbax.checkpoint.experimental.v1.partial`): each `partial.save` call
writes one leaf into its own pending directory (an EMPTY snapshot: earlier leaves are neither re-read nor
copied), and `partial.finalize` merges the pending directories' metadata and OCDBT manifests without
rewriting array data, so I/O is linear in the model size. Two context options keep memory bounded:
`deepcopy_host_arrays=False` (the default deep-copies every numpy leaf before writing, +1 leaf of peak memory;
our leaves are private and `partial.save` blocks until they are written) and a `chunk_byte_size` of 64 MiB
(instead of one chunk per leaf up to 2 GiB: sharded restores read and decompress only the chunks of their
shard, in parallel).

The result restores with `orbax.checkpoint.experimental.v1.load(<dst>/params, abstract_tree)` where the
abstract leaves are `jax.ShapeDtypeStruct`s with shardings, or with no abstract tree as numpy arrays.

Atomicity: everything is written into a temporary sibling of `<dst>`, which is renamed to `<dst>` only after
the checkpoint is finalized; any failure, KeyboardInterrupt or SIGTERM included, removes it. The whole source
(config, key set, shapes, safetensors headers) is validated before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from qwen_flash_jax import atomic
from qwen_flash_jax.checkpoint_io import CONFIG_FILE, PARAMS_DIR
from qwen_flash_jax.diffusion.scheduler import MODEL_INDEX, SCHEDULER_CONFIG, FlowMatchScheduler
from qwen_flash_jax.errors import MAX_LISTED, CheckpointError, command_line_errors, some_of
from qwen_flash_jax.models import hf_keys
from qwen_flash_jax.models.config import ConfigError, TransformerConfig
from qwen_flash_jax.safetensors_checkpoint import SafetensorsCheckpoint

DTYPES = ("bfloat16", "float32", "float16")
CHUNK_BYTE_SIZE = 64 << 20


# --- validation (nothing is written until all of this passed) ------------------------------------------------------


def load_source_config(src: str | os.PathLike) -> TransformerConfig:
    """Reads a diffusers transformer directory's `config.json`; rejects other models' configs."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"source {src} does not exist or is not a directory")
    config_path = src / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"source {src} has no {CONFIG_FILE} (expected a diffusers transformer directory)")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: not a JSON object")
    try:
        return TransformerConfig.from_diffusers_config(data)
    except (TypeError, ValueError) as e:  # ConfigError included; TypeError: a field of the wrong type
        raise ConfigError(f"{config_path}: {e}") from None


def check_checkpoint(ckpt: SafetensorsCheckpoint, config: TransformerConfig) -> None:
    """The checkpoint must hold exactly the keys of `config`, each with its expected shape."""
    expected = hf_keys.expected_keys(config)
    present = set(ckpt.keys())
    missing = [k for k in expected if k not in present]
    unexpected = sorted(present - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} of {len(expected)} tensors: {some_of(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {some_of(unexpected)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match its config (num_layers={config.num_layers}): " + "; ".join(problems)
        )
    bad = []
    for key in expected:
        want, got = hf_keys.param_spec(key, config).torch_shape, ckpt.tensors[key].shape
        if got != want:
            bad.append(f"{key} has shape {got}, expected {want}")
    if bad:
        raise CheckpointError(f"{len(bad)} tensors have the wrong shape: " + "; ".join(bad[:MAX_LISTED]))


Plan = list[tuple[tuple[str, ...], tuple[int, ...], list[tuple[str, hf_keys.ParamSpec]]]]


def plan(config: TransformerConfig) -> Plan:
    """For each output leaf, in `param_shapes` order: (path, shape, the diffusers keys that fill it)."""
    sources: dict[tuple[str, ...], list] = {path: [] for path in hf_keys.param_shapes(config)}
    for key in hf_keys.expected_keys(config):
        spec = hf_keys.param_spec(key, config)
        sources[spec.path].append((key, spec))
    return [(path, shape, sources[path]) for path, shape in hf_keys.param_shapes(config).items()]


# --- conversion ----------------------------------------------------------------------------------------------------


def convert(
    src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "bfloat16", progress: bool = True
) -> TransformerConfig:
    """Converts the diffusers transformer in `src` into `dst` (which must not exist); returns the new config.

    Raises `CheckpointError` / `ConfigError` for bad inputs, before writing anything.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dst = Path(dst).absolute()
    config = load_source_config(src)
    if dst.exists():
        raise CheckpointError(f"destination {dst} already exists; remove it or choose another --dst")
    scheduler = pipeline_scheduler(src)
    with SafetensorsCheckpoint(src) as ckpt:  # parses and validates every shard header
        check_checkpoint(ckpt, config)
        config = config.replace(param_dtype=dtype)
        with atomic.publish(dst, if_exists="error") as tmp:
            tmp.mkdir()
            _write_params(ckpt, config, tmp / PARAMS_DIR, np.dtype(_np_dtype(dtype)), progress)
            (tmp / CONFIG_FILE).write_text(config.to_json())
            if scheduler is not None:
                (tmp / SCHEDULER_CONFIG).parent.mkdir()
                (tmp / SCHEDULER_CONFIG).write_bytes(scheduler.read_bytes())  # as diffusers wrote it
                index = scheduler.parents[1] / MODEL_INDEX
                if index.is_file():
                    (tmp / MODEL_INDEX).write_bytes(index.read_bytes())
            if dst.exists():  # appeared while we were converting; never replace it
                raise CheckpointError(f"destination {dst} appeared during conversion; not replacing it")
    if progress:
        _log(f"wrote {dst}" + (f" with the pipeline's {SCHEDULER_CONFIG}" if scheduler is not None else ""))
    return config


def pipeline_scheduler(src: str | os.PathLike) -> Path | None:
    """The scheduler config of the pipeline folder that holds the transformer directory `src` (None: `src` is not
    in one, or it has no scheduler), checked to be one this project can sample on before anything is written."""
    folder = Path(src).absolute().parent
    if not (folder / SCHEDULER_CONFIG).is_file():
        return None
    FlowMatchScheduler.from_pretrained(folder)  # ConfigError, naming the file, for a bad one
    return folder / SCHEDULER_CONFIG


def _write_params(
    ckpt: SafetensorsCheckpoint, config: TransformerConfig, params_dir: Path, dtype: np.dtype, progress: bool
):
    # Imported here so that input errors are reported without paying for orbax's import.
    import orbax.checkpoint.experimental.v1 as ocp
    from orbax.checkpoint.experimental.v1 import partial

    context = ocp.Context()
    context.memory.deepcopy_host_arrays = False
    context.array.saving.storage_options.chunk_byte_size = CHUNK_BYTE_SIZE
    leaves = plan(config)
    total = sum(int(np.prod(shape)) * dtype.itemsize for _, shape, _ in leaves)
    done, start = 0, time.monotonic()
    with context:
        for i, (path, shape, sources) in enumerate(leaves, 1):
            leaf = np.empty(shape, dtype)  # every element is written below: the key set was checked
            for key, spec in sources:
                tensor = ckpt.read(key)
                target = leaf if spec.layer is None else leaf[spec.layer]
                target[...] = tensor.T if spec.transpose else tensor  # transpose + cast in one pass
                del tensor
            partial.save(params_dir, hf_keys.unflatten({path: leaf}))
            done += leaf.nbytes
            del leaf
            if progress:
                _log(
                    f"[{i:>{len(str(len(leaves)))}}/{len(leaves)}] {'/'.join(path)} {shape} {dtype.name}: "
                    f"{_mib(done)}/{_mib(total)} MiB, {time.monotonic() - start:.1f}s"
                )
        partial.finalize(params_dir)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _log(message: str):
    print(f"convert: {message}", file=sys.stderr, flush=True)


# --- CLI -----------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error, instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m qwen_flash_jax.convert", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="diffusers transformer directory (config.json + safetensors)")
    p.add_argument("--dst", required=True, help="output directory; must not exist")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="parameter dtype to store (default bfloat16)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; exits with status 2 and one `error: ...` line on bad input, 1 on other I/O errors."""
    args = _parser().parse_args(argv)
    with command_line_errors((CheckpointError, ConfigError)):
        convert(args.src, args.dst, args.dtype, progress=not args.quiet)


if __name__ == "__main__":
    main()
