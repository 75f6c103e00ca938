"""The score-field inspection of notebooks/score_fields.ipynb and notebooks/pipeline.ipynb, on the tiny toy world
(tests/test_notebooks.py executes the notebooks themselves)."""

import jax
import numpy as np
import pytest

from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train import score_fields, teacher
from tests import qwen_image_folder as folder_lib
from tests.helpers import tiny_distill_config

pytestmark = pytest.mark.job  # on the toy assets


@pytest.fixture(scope="module")
def tiny(toy_cache):
    return tiny_distill_config(toy_cache)


def test_score_fields_decode_every_teacher_and_every_step(tiny):
    fields = score_fields.score_fields(tiny, category="text", n=2, t=0.6, log=lambda *_: None)
    expected = {"x", "x_t", "x0/base", "x0/text"} | {f"blend/k{k}" for k in range(4)}
    assert set(fields) == expected
    for image in fields.values():
        assert image.shape == (2, 16, 16, 3) and image.dtype == np.uint8
    # Step-wise guidance: early steps are the base teacher alone, later steps blend in the text specialist.
    np.testing.assert_array_equal(fields["blend/k0"], fields["x0/base"])
    assert not np.array_equal(fields["blend/k3"], fields["x0/base"])


def test_dmd_fields_vanish_where_the_fake_score_is_the_real_one(toy_cache):
    """With CFG off and the base teacher as the fake score, the step-0 real x0 (the base teacher alone) is the fake
    one: the field is zero there, at every noise level, and not at the last step, where the text teacher joins."""
    tiny = tiny_distill_config(toy_cache)
    tiny.guidance.cfg_scale = 1.0
    base = jax.device_get(teacher.ensure_teacher(tiny, "base", log=lambda *_: None))
    student = folder_lib.perturbed(base, 1, 0.01)
    fields = score_fields.dmd_fields(
        tiny, student, base, "a bright landscape with a red sun", category="text", noise_levels=(0.3, 0.7)
    )
    assert fields.samples.shape == (4, 16, 16, 3) and fields.samples.dtype == np.uint8
    assert fields.magnitude.shape == (4, 2, 4, 4) and fields.rms.shape == fields.gradient_rms.shape == (4, 2)
    assert len(fields.timesteps) == 4 and fields.timesteps[0] == 1.0
    assert np.all(fields.rms[0] < 1e-3 * fields.rms[3]), fields.rms
    assert np.all(fields.gradient_rms[3] > 0)
    with pytest.raises(ConfigError, match="T2I categories"):
        score_fields.dmd_fields(tiny, student, base, "a red sun", category="scene")
