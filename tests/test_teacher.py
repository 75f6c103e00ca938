"""Teacher training end to end on a tiny toy world: the loss goes down, a resumed run repeats the same losses."""

import json

import jax
import numpy as np
import pytest

from qwen_flash_jax.train import teacher
from tests.helpers import tiny_config

pytestmark = pytest.mark.job  # whole teacher trainings


@pytest.fixture
def cache(toy_cache):
    return toy_cache


@pytest.fixture(scope="module")
def straight_run(toy_cache, tmp_path_factory):
    """(workdir, per-step metrics) of one uninterrupted tiny teacher training: the artifacts the loss test checks
    and the reference the resumed run must repeat (the sample grids are written after the last step)."""
    workdir, history = tmp_path_factory.mktemp("straight") / "run", []
    teacher.train_teacher(tiny_config(toy_cache), "base", workdir, history=history, log=lambda *_: None)
    return workdir, history


def test_teacher_loss_decreases_and_writes_artifacts(straight_run):
    run, history = straight_run
    losses = [m.get("loss_t2i", m.get("loss_edit")) for _, m in history]
    assert len(history) == 12
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    assert teacher.is_trained(run)
    assert json.loads((run / teacher.MARKER).read_text())["steps"] == 12
    assert (run / "samples_base_2steps.png").exists()
    assert (run / "samples_base_4steps.png").exists()


def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(cache, straight_run, tmp_path):
    config = tiny_config(cache)
    _, straight = straight_run
    quiet = dict(log=lambda *_: None, write_samples=False)
    interrupted = []
    teacher.train_teacher(config, "base", tmp_path / "b", history=interrupted, stop_at=6, **quiet)
    resumed = []
    teacher.train_teacher(config, "base", tmp_path / "b", history=resumed, **quiet)
    assert resumed[0][0] == 5  # restarted after the last complete checkpoint (step 4)
    assert dict(straight)[12] == dict(resumed)[12]
    assert [m for s, m in straight if s > 4] == [m for _, m in resumed]


def test_feature_layers_share_one_encoder_cache_entry_and_must_match_the_model(cache):
    from qwen_flash_jax.models.config import ConfigError
    from qwen_flash_jax.train import assets as assets_lib

    config = tiny_config(cache)
    assert tuple(config.text_encoder.feature_layers) == (0, -1) and config.model.context_in_dim == 128
    both = assets_lib.build_assets(config, log=lambda *_: None)
    config.text_encoder.feature_layers = (-1,)
    config.model.context_in_dim = 64
    last = assets_lib.build_assets(config, log=lambda *_: None)
    assert both.text_encoder.config.feature_layers == (0, -1) and last.text_encoder.config.feature_layers == (-1,)
    for a, b in zip(jax.tree.leaves(both.text_encoder.state), jax.tree.leaves(last.text_encoder.state)):
        np.testing.assert_array_equal(a, b)  # the same pretrained weights, read from one cache entry
    config.model.context_in_dim = 128
    with pytest.raises(ConfigError, match="1 feature layers"):
        assets_lib.build_assets(config, log=lambda *_: None)
    config.text_encoder.feature_layers = (0, 5)
    with pytest.raises(ConfigError, match="feature_layers"):
        assets_lib.build_assets(config, log=lambda *_: None)
