"""A procedural world of small RGB images with ground truth, for CPU-checkable distillation.

T2I categories (the paper's T2I-Bench splits): "landscape", "portrait", "text". Each sample is a structured spec
(plain JSON-serialisable dict: the ground truth), an image rendered from it by a pure function, and a caption
with varied wording. Edit pairs cover Editing-Bench's six categories (``EDIT_CATEGORIES``, ops in ``EDIT_OPS``).

    rng = np.random.default_rng(0)
    s = sample_t2i(rng, "portrait")          # s.image (32, 32, 3) uint8, s.caption, s.spec
    e = sample_edit(rng, "identity")         # e.source, e.instruction, e.target, e.spec["op"]
    attribute_labels(s.spec)                 # {"skin": 2, "hair_colour": 0, ...} per T2I_ATTRIBUTES

Modules: ``landscape`` / ``portrait`` / ``text`` (per-category layout, renderer, captions), ``styles`` (style and
degradation transforms), ``core`` (T2I API), ``edits`` (edit pairs), ``sheet`` (contact sheets).
``python -m qwen_flash_jax.data.world [out.png]`` writes a demo contact sheet.
"""

from .core import (
    T2I_ATTRIBUTES,
    T2I_CATEGORIES,
    T2ISample,
    attribute_labels,
    caption,
    labels_to_values,
    render,
    sample_spec,
    sample_t2i,
)
from .edits import EDIT_CATEGORIES, EDIT_OPS, EditSample, sample_edit
from .sheet import contact_sheet, demo_sheet, save_png, side_by_side
from .styles import DEGRADATIONS, STYLES, apply_degradation, apply_style
from .text import FORBIDDEN_PAIRS, VOCABULARY

__all__ = [
    "DEGRADATIONS",
    "EDIT_CATEGORIES",
    "EDIT_OPS",
    "EditSample",
    "FORBIDDEN_PAIRS",
    "STYLES",
    "T2I_ATTRIBUTES",
    "T2I_CATEGORIES",
    "T2ISample",
    "VOCABULARY",
    "apply_degradation",
    "apply_style",
    "attribute_labels",
    "caption",
    "contact_sheet",
    "demo_sheet",
    "labels_to_values",
    "render",
    "sample_edit",
    "sample_spec",
    "sample_t2i",
    "save_png",
    "side_by_side",
]
