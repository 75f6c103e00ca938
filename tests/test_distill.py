"""The distillation job end to end on a tiny toy world: it trains, resumes exactly, and stops on NaNs."""

import pytest

from qwen_flash_jax.distill import trainer
from tests.test_teacher import tiny_config


def tiny_distill_config(cache_dir):
    config = tiny_config(cache_dir)
    config.job = "distill"
    config.teachers.text.train.update(steps=4, batch_size=8, warmup_steps=1)
    config.data.update(batch_size=8, task_ratio="1:1")
    config.train.update(steps=6, log_every=1, checkpoint_every=2)
    config.fake_score.updates_per_student = 1
    config.eval.update(prompts_per_category=2, edits_per_category=2)
    return config


@pytest.fixture
def cache(toy_cache):
    return toy_cache


def test_resumed_distillation_reproduces_the_uninterrupted_losses_exactly(cache, tmp_path):
    config = tiny_distill_config(cache)
    quiet = dict(log=lambda *_: None, evaluate=False)
    straight = []
    trainer.distill(config, tmp_path / "a", history=straight, **quiet)
    assert len(straight) == 6 and all(m["skipped"] == 0 for _, m in straight)
    interrupted, resumed = [], []
    trainer.distill(config, tmp_path / "b", history=interrupted, stop_at=3, **quiet)
    trainer.distill(config, tmp_path / "b", history=resumed, **quiet)
    assert resumed[0][0] == 3  # the last complete checkpoint was step 2
    assert [m for s, m in straight if s > 2] == [m for _, m in resumed]


def test_a_run_of_nonfinite_steps_stops_with_the_last_good_checkpoint(cache, tmp_path):
    config = tiny_distill_config(cache)
    config.student.learning_rate = 1e30  # the first update blows the student up; every later step is non-finite
    config.nonfinite_limit = 3
    config.data.task_ratio = "1:0"  # one task is enough here: half the compilations
    with pytest.raises(trainer.NonFiniteError, match="Last good checkpoint"):
        trainer.distill(config, tmp_path / "nan", log=lambda *_: None, evaluate=False)
