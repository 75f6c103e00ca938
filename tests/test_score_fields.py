"""The score-field inspection behind notebooks/score_fields.ipynb."""

import numpy as np
import pytest

from qwen_flash_jax.train.score_fields import score_fields
from tests.helpers import tiny_distill_config

pytestmark = pytest.mark.job  # on the toy assets, and the notebook


def test_score_fields_decode_every_teacher_and_every_step(toy_cache):
    config = tiny_distill_config(toy_cache)
    fields = score_fields(config, category="text", n=2, log=lambda *_: None, fake_params=None)
    expected = {"x", "x_t", "x0/base", "x0/text"} | {f"blend/k{k}" for k in range(4)}
    assert set(fields) == expected
    for image in fields.values():
        assert image.shape == (2, 16, 16, 3) and image.dtype == np.uint8
    # Step-wise guidance: early steps are the base teacher alone, later steps blend in the text specialist.
    np.testing.assert_array_equal(fields["blend/k0"], fields["x0/base"])
    assert not np.array_equal(fields["blend/k3"], fields["x0/base"])


def test_the_notebook_runs_against_the_library(toy_cache, monkeypatch):
    """Executes the notebook's code cells (display replaced) on the tiny config, so it cannot rot."""
    import json
    import sys
    import types

    from qwen_flash_jax import config_lib

    tiny = tiny_distill_config(toy_cache)
    monkeypatch.setattr(config_lib, "load_config", lambda spec: tiny)
    shown = []
    monkeypatch.setitem(sys.modules, "IPython.display", types.SimpleNamespace(display=shown.append))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(display=sys.modules["IPython.display"]))
    cells = json.load(open("notebooks/score_fields.ipynb"))["cells"]
    namespace = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"]).replace("n=6", "n=2")
            exec(compile(source, "score_fields.ipynb", "exec"), namespace)
    assert len(shown) == 1 and shown[0].size[0] > 0
