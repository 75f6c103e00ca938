"""Checkpoints from another version of the train state fail with one clear line, not an orbax traceback."""

import jax.numpy as jnp
import pytest

from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train.checkpoint import Checkpointer, abstract_like


class _Iterator:
    def get_state(self):
        return {"position": 3}


def test_a_checkpoint_with_another_state_structure_is_refused_clearly(tmp_path):
    old = {"student": jnp.ones((2,)), "step": jnp.zeros((), jnp.int32)}
    ckpt = Checkpointer(tmp_path / "ckpt", every=1)
    assert ckpt.maybe_save(1, old, _Iterator(), {"step": 1})
    ckpt.close()

    same = Checkpointer(tmp_path / "ckpt")
    state, data, meta = same.restore(abstract_like(old))
    assert float(state["student"][0]) == 1.0 and data == {"position": 3} and meta == {"step": 1}
    new = {**old, "disc": jnp.zeros((3,))}  # e.g. a field added by a later version
    with pytest.raises(ConfigError, match="different train state.*new --workdir"):
        same.restore(abstract_like(new))
    same.close()
