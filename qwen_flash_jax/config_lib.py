"""Loading experiment configs (ml_collections `.py` files with `get_config(arg)`) and deriving typed pieces.

Configs live in the repository's `configs/`; variants derive from the base `configs/5to5.py` with `derive`.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from qwen_flash_jax import sharding
from qwen_flash_jax.models.config import ConfigError, TransformerConfig


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/7to3.py:toy' -> the ConfigDict that file's get_config('toy') returns."""
    path, _, arg = str(spec).partition(":")
    return _load_file(pathlib.Path(path), arg or None)


def derive(variant_file: str, base_name: str = "5to5.py", arg=None) -> ml_collections.ConfigDict:
    """The base config next to `variant_file` (call as `derive(__file__, arg=arg)` from a variant)."""
    return _load_file(pathlib.Path(variant_file).with_name(base_name), arg)


def split_arg(arg, choices, what: str, default: str | None = None) -> tuple[str, str]:
    """'toy,E3' -> ('toy', 'E3') for variant configs whose argument names the variant and one choice."""
    variant, _, choice = (arg or "full").partition(",")
    choice = choice or default
    if choice not in choices:
        raise ValueError(f"{what} must be one of {sorted(choices)}, got {choice!r}")
    return variant, choice


def _load_file(path: pathlib.Path, arg):
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_qf_config_{path.stem.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} has no get_config(arg)")
    try:
        return module.get_config(arg)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def transformer_config(config) -> TransformerConfig:
    return TransformerConfig(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.model.items()})


def make_mesh(config) -> sharding.Mesh:
    """The device mesh of `config.mesh.axes`: every job, teacher load and sharded encoder builds it here."""
    return sharding.make_mesh(tuple(tuple(a) for a in config.mesh.axes))


def mesh_rules(config) -> sharding.Rules:
    """`config.mesh.rules`, the logical-axis rules, as tuples."""
    return sharding.normalise_rules(config.mesh.rules)


def teacher_run_config(config, name: str) -> ml_collections.ConfigDict:
    """The config of a teacher-training run: the base config with the teacher's `train` data fields applied."""
    if name not in config.teachers:
        raise ConfigError(f"unknown teacher {name!r}; the config defines {sorted(config.teachers.keys())}")
    run = ml_collections.ConfigDict(config.to_dict())
    train = config.teachers[name].train
    run.job, run.teacher_name = "teacher", name
    for field in ("task_ratio", "t2i_weights", "edit_weights", "batch_size"):
        run.data[field] = train[field]
    return run


# Seeds a distillation replicate (`train.seed`) adds, scaled so that replicates never reuse a neighbour's streams.
REPLICATE_STRIDE = 100_003


def distill_seed(config) -> int:
    """The base of a distillation run's RNG seeds: `seed`, offset by the replicate `train.seed`.

    `seed` and `data.seed` are part of the toy teachers' cache key, so changing them retrains the teachers;
    `train.seed` stays out of that key, so replicates of one distillation share their teachers. 0 reproduces runs
    made before the field existed."""
    return int(config.seed) + REPLICATE_STRIDE * int(config.train.get("seed", 0))


def distill_data_config(config, offset: int = 0) -> ml_collections.ConfigDict:
    """`config.data` with the shuffle seed of this replicate (+ `offset` for a second, independent stream); the
    toy world itself stays the one `data.seed` made."""
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.seed = int(data.seed) + REPLICATE_STRIDE * int(config.train.get("seed", 0)) + offset
    return data
