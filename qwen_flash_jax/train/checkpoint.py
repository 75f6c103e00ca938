"""Resuming a training run: its state placed on the mesh and restored, with its data iterator, from the last
complete checkpoint (`training_loop.Checkpointer`, which the training loop saves through)."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from qwen_flash_jax.training_loop import Checkpointer

__all__ = ["Checkpointer", "abstract_like", "open_and_resume", "place_on_mesh"]


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a concrete pytree: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def place_on_mesh(tree, mesh):
    """Commits every leaf to `mesh`: leaves already laid out on it keep their sharding, the rest (step counters,
    RNG keys, optimizer counts) are replicated. Restores then land on the same devices as a fresh start."""

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
