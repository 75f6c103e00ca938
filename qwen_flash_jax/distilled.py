"""The distilled student of a training workdir: its weights, read from the run's orbax checkpoint, and its own
sampling schedule, from the config the run was trained with.

A workdir holds no copy of its config, so the commands that read one (`export`, `generate`) take the training
command's `--config` and `--config.section.field=value` overrides again. Only the student's (or its EMA's) leaves
are read, one leaf at a time (orbax partial restore), as host numpy arrays: the fake score and the optimiser
state, several times the student's size, stay on disk.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import numpy as np
import orbax.checkpoint as ocp

from qwen_flash_jax import config_lib
from qwen_flash_jax.errors import CheckpointError
from qwen_flash_jax.models import hf_keys
from qwen_flash_jax.models.config import ConfigError, TransformerConfig
from qwen_flash_jax.train import components, teacher

CHECKPOINTS = "checkpoints"
STATE_ITEM = "state"
WEIGHTS = ("student", "ema")


# --- the run's config ----------------------------------------------------------------------------------------------


def load_run_config(spec: str, overrides=()):
    """The ConfigDict of `--config=spec` with `section.field=value` overrides applied (values parsed as Python
    literals, else taken as strings), as `python -m qwen_flash_jax.main` built it for the run."""
    config = config_lib.load_config(spec)
    for override in overrides:
        path, sep, text = override.partition("=")
        if not sep or not path:
            raise ConfigError(f"a config override must look like --config.section.field=value, got {override!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, field = path.split(".")
        node = config
        try:
            for name in parents:
                node = node[name]
            if field not in node:
                raise KeyError(field)
            node[field] = value
        except KeyError:
            raise ConfigError(f"--config.{path}: the config has no field {path!r}") from None
        except TypeError as e:
            raise ConfigError(f"--config.{path}: {' '.join(str(e).split())}") from None
    return config


def split_config_args(argv) -> tuple[list[str], list[str]]:
    """(other arguments, the `section.field=value` texts of `--config.section.field=value` arguments)."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg.removeprefix("--config."))
        else:
            rest.append(arg)
    return rest, overrides


@dataclasses.dataclass(frozen=True)
class StudentSchedule:
    """How the student samples: its K input times (decreasing, without the trailing 0) and its re-noising
    between steps ("fresh" Gaussian noise, or "predicted": the noise its velocity implies, i.e. Euler steps)."""

    timesteps: tuple[float, ...]
    renoise: str


def student_schedule(config) -> StudentSchedule:
    """The schedule the run trained its student on, computed by the very code the training builds it with."""
    setup = components.distill_setup(config, None, teacher.target_mu(config))
    return StudentSchedule(tuple(float(t) for t in setup.timesteps), setup.renoise)


# --- the checkpoint ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StudentCheckpoint:
    """The latest complete checkpoint of a training workdir, and which of its weight trees to read (the student's,
    its EMA's, or the fake score's: all three are transformers of the run's config)."""

    state_dir: pathlib.Path
    step: int
    which: str  # "student", "ema" or "fake" (the fake score)
    leaves: dict  # our param path -> (shape, dtype) of that leaf

    def read_leaf(self, path: tuple[str, ...]) -> np.ndarray:
        """One leaf of the weights, restored alone."""
        shape, dtype = self.leaves[path]
        item = hf_keys.unflatten({(self.which, *path): np.zeros((), dtype)})
        args = hf_keys.unflatten({(self.which, *path): ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)})
        restored = _checkpointer().restore(
            self.state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
        )
        node = restored[self.which]
        for part in path:
            node = node[part]
        return np.asarray(node)

    def read_params(self) -> dict:
        """The whole weight tree (nested dict of numpy arrays, our layout)."""
        return hf_keys.unflatten({path: self.read_leaf(path) for path in self.leaves})

    def check_against(self, config: TransformerConfig, what: str) -> None:
        """The weights must have exactly the leaves and shapes of `config`'s transformer."""
        expected = hf_keys.param_shapes(config)
        if set(expected) != set(self.leaves):
            missing = sorted("/".join(p) for p in set(expected) - set(self.leaves))
            extra = sorted("/".join(p) for p in set(self.leaves) - set(expected))
            raise CheckpointError(
                f"the {self.which} weights in {self.state_dir} do not fit {what}: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for path, shape in expected.items():
            if tuple(self.leaves[path][0]) != tuple(shape):
                raise CheckpointError(
                    f"the {self.which} weights in {self.state_dir} do not fit {what}: {'/'.join(path)} has shape "
                    f"{tuple(self.leaves[path][0])}, expected {tuple(shape)}"
                )


def open_student(workdir, *, ema: bool | None = False) -> StudentCheckpoint:
    """The student weights of the latest complete checkpoint in `workdir`. `ema`: True reads the EMA (an error
    when the run kept none), False the raw student, None the weights the run evaluates (the EMA if any)."""
    state_dir, step, tree = _latest_state(workdir)
    has_ema = bool(_flatten(tree.get("ema")))
    if ema and not has_ema:
        raise CheckpointError(f"the run in {workdir} kept no EMA of the student (student.ema_decay was 0)")
    which = "ema" if (ema or (ema is None and has_ema)) else "student"
    return _weights(state_dir, step, tree, which)


def open_fake_score(workdir) -> StudentCheckpoint:
    """The fake score's weights in the latest complete checkpoint of `workdir` (the network DMD compares with
    the teachers; the same transformer as the student's)."""
    return _weights(*_latest_state(workdir), "fake")


def _latest_state(workdir) -> tuple[pathlib.Path, int, dict]:
    """(state directory, step, metadata tree) of the latest complete distillation checkpoint in `workdir`."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise CheckpointError(f"workdir {workdir} does not exist or is not a directory")
    directory = workdir / CHECKPOINTS
    # Orbax names a finished step by its number; a save in progress lives in a temporary directory beside it.
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    steps = [s for s in steps if (directory / str(s) / STATE_ITEM).is_dir()]
    if not steps:
        raise CheckpointError(f"workdir {workdir} has no complete training checkpoint in {directory}")
    state_dir = directory / str(steps[-1]) / STATE_ITEM
    try:
        tree = _checkpointer().metadata(state_dir).item_metadata
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_dir}: cannot read the checkpoint: {' '.join(str(e).split())}") from None
    if "student" not in tree:
        raise CheckpointError(f"{state_dir} is not a distillation checkpoint (it holds no student)")
    return state_dir, steps[-1], tree


def _weights(state_dir, step: int, tree, which: str) -> StudentCheckpoint:
    leaves = {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in _flatten(tree[which]).items()}
    return StudentCheckpoint(state_dir, step, which, leaves)


def _flatten(tree, prefix=()) -> dict:
    if tree is None:
        return {}
    if hasattr(tree, "items"):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, (*prefix, str(key))))
        return out
    return {prefix: tree}


def _checkpointer():
    return ocp.PyTreeCheckpointer()
