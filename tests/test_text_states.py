"""Precomputed text states (`data.precompute_text`): the store holds what the steps' text encoder gives (a
distillation that reads it is compared with one that encodes in its steps in tests/test_distill.py)."""

import numpy as np
import pytest

from qwen_flash_jax.data import text_states as store_lib
from qwen_flash_jax.diffusion import conditioning
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train import assets as assets_lib
from qwen_flash_jax.train import distill_job, text_states
from tests.helpers import tiny_distill_config


def _config(cache):
    config = tiny_distill_config(cache)
    config.data.precompute_text = True
    return config


def test_the_store_holds_each_records_states_and_negative_as_the_step_encodes_them(toy_cache):
    config = _config(toy_cache)
    assets = assets_lib.build_assets(config, log=lambda *_: None)
    folder = text_states.ensure_store(config, assets, log=lambda *_: None)
    assert sorted(f"{t}/{c}" for t, c in text_states.needed(config)) == sorted(
        str(p.relative_to(folder)) for p in folder.glob("*/*") if store_lib.is_complete(p)
    )
    for task, category in (("t2i", "text"), ("edit", "object")):
        source = assets.sources[task][category]
        stored = store_lib.CategoryStates(folder / task / category)
        assert len(stored) == len(source)
        rows = [0, 5, len(source) - 1]
        preprocess = text_states.pipeline_lib.Preprocess(task, assets.prompts, assets.codec, 16)
        examples = [preprocess(source[i]) for i in rows]
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        batch = text_states.pipeline_lib.EncodeImages(assets.codec)(batch)
        spec = assets.tasks[task]
        for negative, read in ((False, stored.states), (True, stored.negative)):
            cond = conditioning.batch_conditioning(assets.text_encoder, spec, batch, negative=negative)
            hidden, mask = np.asarray(cond.encoder_hidden_states), np.asarray(cond.encoder_hidden_states_mask)
            for j, i in enumerate(rows):
                np.testing.assert_allclose(read(i), hidden[j][mask[j]], rtol=0, atol=1e-5)
        # Prompts differ in length, so the stored rows do too; T2I shares one negative, edits have their own.
        assert len({len(stored.states(i)) for i in range(len(source))}) > 1
    assert store_lib.CategoryStates(folder / "t2i" / "text").shared_negative
    edit = store_lib.CategoryStates(folder / "edit" / "object")
    assert not edit.shared_negative and not np.array_equal(edit.negative(0), edit.negative(1))
    # A second call finds the store complete and encodes nothing.
    logged = []
    assert text_states.ensure_store(config, assets, log=logged.append) == folder and not logged


def test_precomputed_states_do_not_combine_with_the_regression_term(toy_cache):
    config = _config(toy_cache)
    config.student.update(regression_weight=0.5, renoise="predicted")
    with pytest.raises(ConfigError, match="precompute_text"):
        distill_job.check_config(config)
