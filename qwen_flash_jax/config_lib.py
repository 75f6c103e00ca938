"""Loading experiment configs (ml_collections `.py` files with `get_config(arg)`) and deriving typed pieces.

Configs live in the repository's `configs/`; variants derive from the base `configs/5to5.py` with `derive`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any

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


def frozen_dtype(config) -> str:
    """The stored dtype of the frozen networks (guiding teachers, text encoder, VAE): the transformer's compute
    dtype. At full scale that is bfloat16, half the memory of float32 copies that would be cast down at every use."""
    return "bfloat16" if config.model.dtype == "bfloat16" else "float32"


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


# --- typed views of the distillation's sections -----------------------------------------------------------------------
# The distillation reads its sections through these frozen views, built in one place (`distill_view`) with the
# casts done once; `train.distill_job.check_config` validates a config and returns its view.


@dataclasses.dataclass(frozen=True)
class StudentView:
    init_from: str
    num_steps: int
    timesteps: tuple[float, ...]
    renoise: str
    learning_rate: float
    ema_decay: float
    first_step_fm_weight: float
    gan_weight: float
    gan_tasks: tuple[str, ...]
    regression_weight: float
    regression_batches: int


@dataclasses.dataclass(frozen=True)
class FakeScoreView:
    init_from: str
    learning_rate: float
    updates_per_student: int
    step_probs: tuple[float, ...]
    warmup_updates: int
    gan_weight: float
    gan_head_learning_rate: float


@dataclasses.dataclass(frozen=True)
class GuidanceView:
    teachers: tuple[str, ...]
    weights: Any  # ((condition, per-step {teacher: weight} dicts), ...): dmd.guidance_table's rules
    cfg_scale: float
    cfg_rescale: float
    schedule: str
    t_min: float
    t_max: float


@dataclasses.dataclass(frozen=True)
class TrainView:
    steps: int
    seed: int
    log_every: int
    checkpoint_every: int
    sample_every: int
    keep_checkpoints: int


@dataclasses.dataclass(frozen=True)
class DistillView:
    student: StudentView
    fake_score: FakeScoreView
    guidance: GuidanceView
    train: TrainView
    nonfinite_limit: int

    @property
    def critic_updates(self) -> int:
        """Critic updates over the run: `updates_per_student` per student update plus the warm-up."""
        return self.train.steps * self.fake_score.updates_per_student + self.fake_score.warmup_updates


@dataclasses.dataclass(frozen=True)
class TeacherTrainView:
    """How a toy teacher is trained (`teachers.<name>.train`; its data fields apply through `teacher_run_config`)."""

    steps: int
    learning_rate: float
    warmup_steps: int
    caption_dropout: float
    uniform_t_fraction: float
    ema_decay: float


def _read(config, section: str, view_type, **defaults):
    """`view_type` filled from `config.<section>` (a dotted path), each field cast to its annotated type (one
    ConfigError line when a value does not convert); `defaults` are for fields a config may lack."""
    node = config
    for name in section.split("."):
        node = node[name]
    values = {}
    for field in dataclasses.fields(view_type):
        raw = node.get(field.name, defaults.get(field.name)) if field.name in defaults else node[field.name]
        cast = _CASTS.get(field.type)
        try:
            values[field.name] = raw if cast is None else cast(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{section}.{field.name} must be {field.type}, got {raw!r}") from None
    return view_type(**values)


_CASTS = {
    "int": int,
    "float": float,
    "str": str,
    "tuple[str, ...]": lambda v: tuple(str(x) for x in v),
    "tuple[float, ...]": lambda v: tuple(float(x) for x in v),
}


def teacher_train_view(config, name: str) -> TeacherTrainView:
    """`teachers.<name>.train` as a typed, frozen view (validated by `train.teacher.check_source`)."""
    if name not in config.teachers:
        raise ConfigError(f"unknown teacher {name!r}; the config defines {sorted(config.teachers.keys())}")
    return _read(config, f"teachers.{name}.train", TeacherTrainView, uniform_t_fraction=0.0)


def distill_view(config) -> DistillView:
    """The distillation's sections of `config` as typed, frozen views (not yet validated: see
    `train.distill_job.check_config`)."""
    try:
        limit = int(config.nonfinite_limit)
    except (TypeError, ValueError):
        raise ConfigError(f"nonfinite_limit must be int, got {config.nonfinite_limit!r}") from None
    return DistillView(
        student=_read(config, "student", StudentView),
        fake_score=_read(config, "fake_score", FakeScoreView),
        guidance=_read(config, "guidance", GuidanceView),
        train=_read(config, "train", TrainView, seed=0),
        nonfinite_limit=limit,
    )
