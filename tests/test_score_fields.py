"""The score-field inspection behind notebooks/score_fields.ipynb."""

import json
import sys
import types

import numpy as np
import pytest

from qwen_flash_jax import config_lib
from tests.helpers import tiny_distill_config

pytestmark = pytest.mark.job  # on the toy assets, and the notebook


@pytest.fixture(scope="module")
def notebook_run(toy_cache):
    """The notebook's code cells executed (display replaced) on the tiny config: (its namespace, what it
    displayed). Its `score_fields(config, category="text", n=2, t=0.6)` call is also the library call the score
    fields are checked on."""
    tiny = tiny_distill_config(toy_cache)
    shown = []
    display = types.SimpleNamespace(display=shown.append)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config_lib, "load_config", lambda spec: tiny)
        patch.setitem(sys.modules, "IPython.display", display)
        patch.setitem(sys.modules, "IPython", types.SimpleNamespace(display=display))
        with open("notebooks/score_fields.ipynb") as f:
            cells = json.load(f)["cells"]
        namespace = {}
        for cell in cells:
            if cell["cell_type"] == "code":
                source = "".join(cell["source"]).replace("n=6", "n=2")
                exec(compile(source, "score_fields.ipynb", "exec"), namespace)
    return namespace, shown


def test_score_fields_decode_every_teacher_and_every_step(notebook_run):
    namespace, _ = notebook_run
    assert tuple(namespace["config"].guidance.teachers) == ("base", "text")  # the tiny config, as patched in
    fields = namespace["fields"]
    expected = {"x", "x_t", "x0/base", "x0/text"} | {f"blend/k{k}" for k in range(4)}
    assert set(fields) == expected
    for image in fields.values():
        assert image.shape == (2, 16, 16, 3) and image.dtype == np.uint8
    # Step-wise guidance: early steps are the base teacher alone, later steps blend in the text specialist.
    np.testing.assert_array_equal(fields["blend/k0"], fields["x0/base"])
    assert not np.array_equal(fields["blend/k3"], fields["x0/base"])


def test_the_notebook_runs_against_the_library(notebook_run):
    """Executes the notebook's code cells (display replaced) on the tiny config, so it cannot rot."""
    _, shown = notebook_run
    assert len(shown) == 1 and shown[0].size[0] > 0
