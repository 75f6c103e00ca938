"""TensorFlow loads only when a run writes TensorBoard events or builds a TFDS dataset.

Importing it costs seconds (clu's metric writers pull it in), so the command-line tools and the step builders import
without it: `generate`, `export` and `aot` start faster, every test subprocess too, and a machine without TensorFlow
(a GPU box, say) can build and run the DMD steps.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parent.parent

# Records where `tensorflow` is first looked for (the import chain that asked), without changing what is imported.
_PROBE = textwrap.dedent(
    """
    import sys, traceback

    class Recorder:
        stack = None

        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" and Recorder.stack is None:
                Recorder.stack = "".join(traceback.format_stack(limit=25))
            return None

    sys.meta_path.insert(0, Recorder())
    import qwen_flash_jax.aot, qwen_flash_jax.export, qwen_flash_jax.generate, qwen_flash_jax.train.components
    if "tensorflow" in sys.modules:
        sys.exit("tensorflow was imported from:\\n" + (Recorder.stack or "?"))
    """
)


def test_the_tools_and_the_step_builders_import_without_tensorflow():
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
