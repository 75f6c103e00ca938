"""Reads checkpoints written by `qwen_flash_jax.convert`: `<path>/config.json` + `<path>/params/` (orbax).

Restoring goes through `orbax.checkpoint.experimental.v1.load`, which reads each array straight into the
requested sharding and dtype (every device reads only the chunks of its shard), so a sharded model never has
to fit on one host.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwen_flash_jax.errors import CheckpointError
from qwen_flash_jax.models.config import TransformerConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def read_config(path: str | os.PathLike) -> TransformerConfig:
    """The `TransformerConfig` stored with a converted checkpoint (`param_dtype` = the stored dtype)."""
    config_path = _check_layout(path) / CONFIG_FILE
    try:
        return TransformerConfig.from_json(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:  # ValueError covers JSON and ConfigError
        raise CheckpointError(f"{config_path}: not a valid model config: {e}") from None


def restore_params(path: str | os.PathLike, target=None):
    """Restores the nested parameter dict of a converted checkpoint.

    `target`: optional pytree (same structure as the checkpoint) of `jax.ShapeDtypeStruct`s. Each leaf is
    restored as a `jax.Array` with that leaf's shape, dtype (cast on read) and `sharding`; a leaf without a
    sharding goes to the default device. Without `target`, leaves come back as host numpy arrays in the stored
    dtype.
    """
    import jax
    import orbax.checkpoint.experimental.v1 as ocp

    params_dir = _check_layout(path) / PARAMS_DIR
    if target is None:
        return ocp.load(params_dir)
    stored = ocp.metadata(params_dir).metadata
    _check_target(stored, target)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def with_sharding(leaf):
        return leaf if leaf.sharding is not None else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default)

    target = jax.tree.map(with_sharding, target)
    return ocp.load(params_dir, target)


def _check_layout(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist or is not a directory")
    for name in (CONFIG_FILE, PARAMS_DIR):
        if not (path / name).exists():
            raise CheckpointError(
                f"{path} is not a converted checkpoint: it has no {name} "
                "(create one with `python -m qwen_flash_jax.convert`)"
            )
    return path


def _check_target(stored, target) -> None:
    """Clear errors for a target that does not fit the checkpoint (orbax's own are long and tree-shaped)."""
    import jax

    def flat(tree):
        return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    stored, target = flat(stored), flat(target)
    missing, extra = sorted(set(target) - set(stored)), sorted(set(stored) - set(target))
    if missing or extra:
        raise CheckpointError(
            f"restore target does not match the checkpoint: not in checkpoint {missing[:5]}, not in target {extra[:5]}"
        )
    for key, leaf in target.items():
        if tuple(leaf.shape) != tuple(stored[key].shape):
            raise CheckpointError(
                f"restore target {key} has shape {tuple(leaf.shape)}, the checkpoint has {tuple(stored[key].shape)}"
            )


__all__ = ["CheckpointError", "read_config", "restore_params"]
