"""Generation for evaluation and sample grids: T2I and edits with any transformer parameters and step count.

`Generator.t2i(params, captions, ...)` / `.edit(params, sources, instructions, ...)` return uint8 images. Batches
are padded to a fixed size so each (task, steps, cfg) pair compiles once. The same code serves a teacher sampled
with N Euler steps (CFG with the empty prompt, prefix KV cache) and, with `student_steps`, the few-step student
(x0 predictions re-noised between steps, no CFG: the guidance is distilled into it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import flow
from qwen_flash_jax.data.world import save_png
from qwen_flash_jax.diffusion import conditioning, sampling
from qwen_flash_jax.diffusion.scheduler import FlowMatchScheduler
from qwen_flash_jax.distill import dmd


@dataclasses.dataclass(eq=False)
class Generator:
    model: object  # TransformerModel
    assets: object  # train.assets.Assets
    mu: float
    batch_size: int = 16
    use_kv_cache: bool = True
    student_timesteps: tuple[float, ...] | None = None  # the student's input times; None: the shifted Euler list
    student_renoise: str = "fresh"  # how the student re-noises between steps (distill.dmd.renoise)
    # The teacher's pipeline scheduler (train.teacher.target_scheduler): its shift, terminal stretch and step rule
    # at `mu`. None: the config's constants (`flow.sampling_sigmas`, Euler steps), as the toy samples.
    scheduler: FlowMatchScheduler | None = None

    def t2i(
        self,
        params,
        captions,
        *,
        num_steps: int,
        cfg_scale: float = 1.0,
        seed: int = 0,
        student: bool = False,
        timesteps=None,
    ) -> np.ndarray:
        return self._run(params, "t2i", captions, None, num_steps, cfg_scale, seed, student, timesteps)

    def edit(
        self,
        params,
        sources: np.ndarray,
        instructions,
        *,
        num_steps: int,
        cfg_scale: float = 1.0,
        seed: int = 0,
        student: bool = False,
        timesteps=None,
    ) -> np.ndarray:
        return self._run(params, "edit", instructions, sources, num_steps, cfg_scale, seed, student, timesteps)

    def _run(self, params, task, texts, sources, num_steps, cfg_scale, seed, student, timesteps=None):
        """`timesteps`: the input times of a teacher's Euler steps (decreasing; 0 is appended); None = the shifted
        schedule of `num_steps` steps."""
        spec = self.assets.eval_tasks[task]
        codec = self.assets.codec
        h, w = spec.latent_hw
        outputs = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            n = len(chunk)
            chunk += [""] * (self.batch_size - n)
            slots = [h * w // 4] if task == "edit" else []
            ids, mask = zip(*(self.assets.prompts(t, slots) for t in chunk))
            images = {}
            if task == "edit":
                src = np.asarray(sources[start : start + self.batch_size])
                src = np.concatenate([src, np.repeat(src[:1], self.batch_size - n, axis=0)])
                images["condition_latents"] = jnp.asarray(codec.pack(codec.encode(src)), jnp.float32)
                if self.assets.condition_pixels:
                    images["condition_pixels"] = jnp.asarray(src, jnp.uint8)
            key = jax.random.fold_in(jax.random.key(seed), start)
            noise = jax.random.normal(key, (self.batch_size, h * w, self.model.config.in_channels))
            z = self._sample(
                params,
                self.assets.text_encoder,
                jnp.asarray(np.stack(ids)),
                jnp.asarray(np.stack(mask)),
                images,
                noise,
                key,
                spec=spec,
                sigmas=self._sigmas(num_steps, student, timesteps),
                cfg_scale=float(cfg_scale),
                student=student,
            )
            images = codec.to_uint8(codec.decode(codec.unpack(np.asarray(z), h, w)))
            outputs.append(images[:n])
        return np.concatenate(outputs)

    def teacher_latents(
        self, params, spec, input_ids, attention_mask, images: dict, noise, *, num_steps: int, cfg_scale: float
    ):
        """A teacher's Euler sample as packed latents (on device) from given tokens and noise: the sampler of `t2i`
        and `edit` without tokenising, padding or decoding (the regression bank, distill/pairs.py). `images`: the
        edit's `conditioning.IMAGE_INPUTS` fields ({} for T2I)."""
        return self._sample(
            params,
            self.assets.text_encoder,
            input_ids,
            attention_mask,
            images,
            noise,
            jax.random.key(0),
            spec=spec,
            sigmas=self._sigmas(num_steps, False),
            cfg_scale=float(cfg_scale),
            student=False,
        )

    def _sigmas(self, num_steps: int, student: bool, timesteps=None) -> tuple[float, ...]:
        if timesteps is not None and not student:
            if len(timesteps) != num_steps:
                raise ValueError(f"{len(timesteps)} timesteps given for {num_steps} steps")
            return (*(float(t) for t in timesteps), 0.0)
        if student and self.student_timesteps is not None:
            if len(self.student_timesteps) != num_steps:
                raise ValueError(f"the student has {len(self.student_timesteps)} timesteps, asked for {num_steps}")
            return (*(float(t) for t in self.student_timesteps), 0.0)
        if self.scheduler is not None:
            return tuple(self.scheduler.sigmas(num_steps, mu=self.mu).tolist())
        return tuple(flow.sampling_sigmas(num_steps, self.mu).tolist())

    @functools.cached_property
    def _sample(self):
        def sample(params, te_params, ids, mask, images, noise, key, *, spec, sigmas, cfg_scale, student):
            cond = conditioning.encode(te_params, spec, ids, mask, **images)
            if student:
                return dmd.generate(
                    self.model, params, cond, noise, sigmas[:-1], jax.random.fold_in(key, 1), self.student_renoise
                )
            neg_ids, neg_mask = conditioning.empty_prompt(spec, ids.shape[0])
            neg = conditioning.encode(te_params, spec, neg_ids, neg_mask, **images)
            return sampling.euler_sample(
                self.model,
                params,
                noise,
                cond,
                np.asarray(sigmas),
                neg_cond=neg,
                cfg_scale=cfg_scale,
                use_kv_cache=self.use_kv_cache,
                scheduler=self.scheduler,
                key=jax.random.fold_in(key, 2),
            )

        return jax.jit(sample, static_argnames=("spec", "sigmas", "cfg_scale", "student"))


@dataclasses.dataclass(frozen=True)
class GridSection:
    """One block of a labelled grid: a band of column labels (the prompts or edit instructions) over rows of
    images, each row named on its left (the model and its NFE, or "real", "source", "target"). `title` (e.g. the
    benchmark category) sits in the corner above the row names; "" for none."""

    title: str
    columns: Sequence[str]
    rows: Sequence[tuple[str, np.ndarray]]  # (row name, (N, H, W, 3) uint8 with N <= len(columns))


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Where `grid_image` put things, (top, left, height, width) boxes in pixels: for the tests and for tools that
    crop a grid."""

    tile: int  # side of one upscaled image cell
    scale: int  # integer nearest-neighbour upscale of every image
    tiles: dict  # (section, row, column) -> box of that image's cell
    row_labels: dict  # (section, row) -> box of the row's name
    column_labels: dict  # (section, column) -> box of the column's label


GRID_BACKGROUND = 255
_GAP = 4  # pixels between cells
_SECTION_GAP = 12  # extra pixels above every section but the first
_MAX_COLUMN_LINES = 4  # a longer prompt is cut with an ellipsis
_ELLIPSIS = "..."  # ASCII: Pillow's bitmap fallback font has no U+2026


def grid_font(size: int):
    """Pillow's built-in font at `size` px; its fixed-size bitmap font where the sized one needs FreeType (or a
    Pillow older than 10.1). No font file is read."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return right - left


def fit_text(text: str, font, width: int, max_lines: int) -> list[str]:
    """`text` word-wrapped into lines no wider than `width` px, a new line at each "\\n"; past `max_lines` it is
    cut and the last line ends with an ellipsis. A word wider than a line is broken between characters."""
    lines = []
    for paragraph in text.split("\n"):
        words, line = paragraph.split(), ""
        while words:
            candidate = f"{line} {words[0]}" if line else words[0]
            if _text_width(font, candidate) <= width:
                line, words = candidate, words[1:]
            elif line:
                lines.append(line)
                line = ""
            else:  # one word wider than a line: break it
                word = words[0]
                cut = next((k for k in range(len(word) - 1, 0, -1) if _text_width(font, word[:k]) <= width), 1)
                lines.append(word[:cut])
                words = [word[cut:]] + words[1:]
        if line:
            lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _text_width(font, last + _ELLIPSIS) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + _ELLIPSIS]
    return lines


def grid_image(sections: Sequence[GridSection], min_tile: int = 96) -> tuple[np.ndarray, GridLayout]:
    """A labelled grid (H, W, 3) uint8 and its layout: every image upscaled by one integer factor (nearest
    neighbour, so each pixel stays a sharp block) to at least `min_tile` px, its row named on the left, its column
    labelled above. Images of other sizes sit top-left in a cell of the largest."""
    from PIL import Image, ImageDraw

    images = [np.asarray(im) for s in sections for _, row in s.rows for im in row]
    if not images or any(im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8 for im in images):
        raise ValueError("a grid needs at least one image, each (H, W, 3) uint8")
    for s in sections:
        for name, row in s.rows:
            if len(row) > len(s.columns):
                raise ValueError(f"row {name!r} has {len(row)} images for {len(s.columns)} column labels")
    side = max(max(im.shape[:2]) for im in images)
    scale = max(1, -(-min_tile // side))
    tile = side * scale
    font = grid_font(int(np.clip(tile // 8, 12, 20)))
    line_height = font.getbbox("Ag")[3] + 3
    label_width = _text_width(font, "x" * 26)  # about 24 characters a line: a model name in two or three lines
    columns = max(len(s.columns) for s in sections)
    column_lines = [[fit_text(t, font, tile - 4, _MAX_COLUMN_LINES) for t in s.columns] for s in sections]
    band_heights = [max([len(lines) for lines in c] + [1]) * line_height + _GAP for c in column_lines]

    height = sum(b + len(s.rows) * (tile + _GAP) for b, s in zip(band_heights, sections))
    height += _GAP + _SECTION_GAP * (len(sections) - 1)
    width = _GAP + label_width + columns * (tile + _GAP)
    canvas = Image.new("RGB", (width, height), (GRID_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(canvas)
    tiles, row_labels, column_labels = {}, {}, {}
    y = _GAP
    for i, (s, lines, band) in enumerate(zip(sections, column_lines, band_heights)):
        if i:  # a rule between sections: each category's prompts differ
            draw.line([(0, y + _SECTION_GAP // 2 - 1), (width, y + _SECTION_GAP // 2 - 1)], fill=(170, 170, 170))
            y += _SECTION_GAP
        title = "\n".join(fit_text(s.title, font, label_width - _GAP, max(1, band // line_height)))
        for dx in (0, 1):  # drawn twice, one pixel apart: bold without a bold font file
            draw.multiline_text((_GAP + dx, y), title, fill=(0, 0, 0), font=font, spacing=3)
        for j, text in enumerate(lines):
            x = _GAP + label_width + j * (tile + _GAP)
            draw.multiline_text((x + 2, y), "\n".join(text), fill=(40, 40, 40), font=font, spacing=3)
            column_labels[i, j] = (y, x, band, tile)
        y += band
        for r, (name, row) in enumerate(s.rows):
            text = fit_text(name, font, label_width - 2 * _GAP, max(1, tile // line_height))
            draw.multiline_text((_GAP, y + 2), "\n".join(text), fill=(0, 0, 0), font=font, spacing=3)
            row_labels[i, r] = (y, _GAP, tile, label_width - _GAP)
            for j, im in enumerate(row):
                x = _GAP + label_width + j * (tile + _GAP)
                up = Image.fromarray(np.repeat(np.repeat(np.asarray(im), scale, axis=0), scale, axis=1))
                canvas.paste(up, (x, y))
                tiles[i, r, j] = (y, x, im.shape[0] * scale, im.shape[1] * scale)
            y += tile + _GAP
    return np.asarray(canvas), GridLayout(tile, scale, tiles, row_labels, column_labels)


def save_grid(path, sections: Sequence[GridSection], min_tile: int = 96) -> None:
    """Writes `grid_image(sections, min_tile)` as a PNG (for people: no score depends on it)."""
    save_png(grid_image(sections, min_tile)[0], str(path))
