"""What the input pipeline feeds a run: task, layout and category counts per batch, and a contact sheet of the
first batch (`python -m qwen_flash_jax.inspect_data` is its command line)."""

from __future__ import annotations

import collections

import numpy as np

from qwen_flash_jax.data import pipeline
from qwen_flash_jax.data.world import contact_sheet, save_png, side_by_side
from qwen_flash_jax.train.assets import build_assets


def inspect(config, batches: int, out: str, log=print) -> dict:
    if batches < 1:
        raise ValueError("--batches must be at least 1")
    if not str(out).lower().endswith(".png"):
        raise ValueError(f"--out {out}: the contact sheet is a PNG; give a path ending in .png")
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
            try:
                save_png(contact_sheet(_images(batch, assets), cols=8, scale=3), out)
            except OSError as e:
                raise ValueError(f"--out {out}: cannot write there: {e.strerror or e}") from None
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
