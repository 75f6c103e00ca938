"""Orbax checkpoints of a training run: train state (pytree), data-iterator state and metadata, saved together.

`CheckpointManager` writes each step into a temporary directory and renames it when every item is complete
(atomic commit), asynchronously; a job killed mid-save leaves only a temporary directory that is ignored and
cleaned up, so the rerun resumes from the last complete step.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from qwen_flash_jax.models.config import ConfigError


class Checkpointer:
    def __init__(self, directory, *, keep: int = 2, every: int = 100, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.every = int(every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def maybe_save(self, step: int, state, iterator, meta: dict, *, force: bool = False) -> bool:
        """Saves at every `every`-th step (or when forced); the iterator's state is read only when saving."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if self._manager.latest_step() == step:
            return False
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(iterator.get_state()),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        return True

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, meta) of `step` (default: the latest complete one), or None if there is none."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            return None
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except ValueError as e:
            if "do not match" not in str(e) and "mismatch" not in str(e):
                raise
            # A workdir from another version of the code (or another config): resuming it would be wrong.
            raise ConfigError(
                f"the checkpoint at step {step} in {self.directory} holds a different train state than this run "
                "builds (written by another version of the code or a different config); use a new --workdir, "
                "or delete that directory to start over"
            ) from None
        return restored["state"], restored["data"], restored["meta"]

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a concrete pytree: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def place_on_mesh(tree, mesh):
    """Commits every leaf to `mesh`: leaves already laid out on it keep their sharding, the rest (step counters,
    RNG keys, optimizer counts) are replicated. Restores then land on the same devices as a fresh start."""
    from jax.sharding import NamedSharding, PartitionSpec

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(place, tree)


def open_and_resume(directory, train_config, state, iterator, *, label: str, log=print):
    """A Checkpointer for a run, with `state` and the data iterator restored from its last complete step if any.

    Returns (checkpointer, state); the iterator is restored in place.
    """
    ckpt = Checkpointer(directory, keep=int(train_config.keep_checkpoints), every=int(train_config.checkpoint_every))
    restored = ckpt.restore(abstract_like(state))
    if restored is not None:
        state, data_state, _ = restored
        iterator.set_state(data_state)
        log(f"{label}: resumed from step {int(state.step)} in {ckpt.directory}")
    return ckpt, state
