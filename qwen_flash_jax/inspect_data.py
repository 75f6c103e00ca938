"""Shows what the input pipeline feeds a run: task and category counts per batch, and a contact sheet.

python -m qwen_flash_jax.inspect_data --config=configs/7to3.py:toy --batches=20 [--out=batch0.png]
"""

from __future__ import annotations

import collections
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from qwen_flash_jax.data import pipeline
from qwen_flash_jax.data.world import contact_sheet, save_png, side_by_side
from qwen_flash_jax.train.assets import build_assets
from qwen_flash_jax.train.jobs import USER_ERRORS

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/5to5.py:toy", lock_config=True)
_BATCHES = flags.DEFINE_integer("batches", 10, "How many batches to read.")
_OUT = flags.DEFINE_string("out", "inspect_batch0.png", "Where to write the first batch's contact sheet (PNG).")
flags.mark_flags_as_required(["config"])


def inspect(config, batches: int, out: str, log=print) -> dict:
    if batches < 1:
        raise ValueError("--batches must be at least 1")
    assets = build_assets(config, log=lambda *_: None)
    iterator = iter(
        pipeline.build_pipeline(
            config.data,
            assets.sources,
            assets.tokenizer,
            assets.codec,
            condition_pixels=assets.condition_pixels,
            process_index=0,
            process_count=1,
        )
    )
    totals = collections.Counter()
    log(f"ratio {config.data.task_ratio}, global batch {config.data.batch_size}")
    for i in range(batches):
        batch = next(iterator)
        key = batch["task"]  # the task, or an edit layout's key (data.edit_layouts)
        task = assets.tasks[key].task
        names = pipeline.CATEGORIES[task]
        counts = collections.Counter(names[c] for c in batch["category"].tolist())
        totals.update({task: 1, **({key: 1} if key != task else {})})
        totals.update({f"{task}/{k}": v for k, v in counts.items()})
        log(f"batch {i:4d}  {key:6s}  " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        if i == 0:
            save_png(contact_sheet(_images(batch, assets), cols=8, scale=3), out)
    layouts = "".join(f" {k}={v}" for k, v in sorted(totals.items()) if k.startswith("edit:"))
    log(f"batches: t2i={totals['t2i']} edit={totals['edit']}" + (f" (of which{layouts})" if layouts else ""))
    for key in sorted(k for k in totals if "/" in k):
        log(f"  {key}: {totals[key]} examples")
    log(f"contact sheet of batch 0 -> {out}")
    return dict(totals)


def _images(batch, assets):
    """Per example its target, or for an edit its condition images and its target side by side."""
    codec, spec = assets.codec, assets.tasks[batch["task"]]

    def decode(tokens, hw):
        return codec.to_uint8(codec.decode(codec.unpack(tokens, *hw)))

    targets = decode(batch["target_latents"], spec.latent_hw)
    if spec.task != "edit":
        return list(targets)
    conditions, start = [], 0
    for h, w in spec.condition_shapes:  # their latents one after the other (several with data.edit_layouts)
        conditions.append(decode(batch["condition_latents"][:, start : start + h * w], (h, w)))
        start += h * w
    return [side_by_side(*_top_aligned([c[i] for c in conditions] + [targets[i]])) for i in range(len(targets))]


def _top_aligned(images):
    """The images padded with white at the bottom to the tallest one's height."""
    height = max(im.shape[0] for im in images)
    return [np.pad(im, ((0, height - im.shape[0]), (0, 0), (0, 0)), constant_values=255) for im in images]


def main(argv):
    del argv
    try:
        inspect(_CONFIG.value, _BATCHES.value, _OUT.value)
    except USER_ERRORS + (ValueError,) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
