"""Labelled PNG grids (eval.generate.grid_image): rows named, columns labelled with shortened prompts, images
upscaled pixel-exactly; and the grids the evaluation writes."""

import numpy as np
import pytest
from PIL import Image

from qwen_flash_jax.eval import report
from qwen_flash_jax.eval.generate import GRID_BACKGROUND, GridSection, fit_text, grid_font, grid_image

LONG_PROMPT = (
    "A simple picture of a nature scene with a lake, under a dark starry night sky, in snowy winter, "
    "with three trees, with a bright sun and with a mountain range."
)


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def _box(image, box):
    top, left, height, width = box
    return image[top : top + height, left : left + width]


def test_the_grid_grows_by_one_cell_per_row_and_per_column():
    def grid(rows, cols):
        return grid_image([GridSection("cat", ["a"] * cols, [(f"m{r}", _images(cols, seed=r)) for r in range(rows)])])

    base, layout = grid(2, 3)
    assert layout.scale == 6 and layout.tile == 96  # 16 px toy images upscaled to a legible size
    wider, taller = grid(2, 4)[0], grid(3, 3)[0]
    step = wider.shape[1] - base.shape[1]
    assert wider.shape[0] == base.shape[0] and taller.shape[1] == base.shape[1]
    assert taller.shape[0] - base.shape[0] == step and layout.tile < step < layout.tile + 16
    one, two = (grid_image([GridSection("cat", ["a"] * 3, [("m", _images(3))])] * n)[0] for n in (1, 2))
    assert two.shape[1] == one.shape[1] == base.shape[1]
    assert two.shape[0] > 2 * one.shape[0]  # a section repeats its label band, set apart from the one above


def test_every_row_and_column_carries_its_label():
    sections = [
        GridSection(
            "portrait",
            ["Remove the glasses", "Make the hair long"],
            [("source", _images(2)), ("student (4 steps), 4 NFE", _images(2, seed=1))],
        ),
        GridSection(
            "scene",
            ["Make it night", "Make it summer", "Add a lake"],
            [("source", _images(3, seed=2)), ("teacher base (40 steps), 80 NFE", _images(3, seed=3))],
        ),
    ]
    image, layout = grid_image(sections)
    assert set(layout.row_labels) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert set(layout.column_labels) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)}
    for box in [*layout.row_labels.values(), *layout.column_labels.values()]:
        assert (_box(image, box) != GRID_BACKGROUND).any(), box
    for (s, r, c), box in layout.tiles.items():  # labels sit beside the images, never over them
        for label in (layout.row_labels[s, r], layout.column_labels[s, c]):
            top, left, height, width = label
            assert top + height <= box[0] or left + width <= box[1], (label, box)


def test_a_long_prompt_is_shortened_to_its_column():
    font = grid_font(12)
    lines = fit_text(LONG_PROMPT, font, 92, 4)
    assert len(lines) == 4 and lines[-1].endswith("...")
    assert len(" ".join(lines)) < len(LONG_PROMPT) and LONG_PROMPT.startswith(" ".join(lines)[:-3].rstrip())
    assert all(font.getbbox(line)[2] - font.getbbox(line)[0] <= 92 for line in lines)
    assert fit_text("Deblur this image", font, 92, 4) == ["Deblur this", "image"]  # short: whole
    assert fit_text("student (4 steps)\n4 NFE", font, 150, 4) == ["student (4 steps)", "4 NFE"]
    broken = fit_text("x" * 60, font, 92, 4)  # one word wider than a line is broken, not overflowing
    assert all(font.getbbox(line)[2] <= 92 for line in broken) and len(broken) > 1

    # In a grid the cut label stays inside its column: the next column's (empty) label band stays blank.
    image, layout = grid_image([GridSection("", [LONG_PROMPT, ""], [("m", _images(2))])])
    assert (_box(image, layout.column_labels[0, 0]) != GRID_BACKGROUND).any()
    assert (_box(image, layout.column_labels[0, 1]) == GRID_BACKGROUND).all()


def test_tiles_are_the_images_upscaled_by_nearest_neighbour():
    rows = [("real", _images(3, size=32)), ("student", _images(2, size=32, seed=1))]
    image, layout = grid_image([GridSection("t2i", ["a", "b", "c"], rows)])
    assert layout.scale == 3 and len(layout.tiles) == 5
    for r, (_, images) in enumerate(rows):
        for c, im in enumerate(images):
            expected = np.repeat(np.repeat(im, 3, axis=0), 3, axis=1)
            np.testing.assert_array_equal(_box(image, layout.tiles[0, r, c]), expected)
    big = _images(1, size=128)  # images already large (full scale) are not upscaled
    image, layout = grid_image([GridSection("", ["a"], [("m", big)])])
    assert layout.scale == 1
    np.testing.assert_array_equal(_box(image, layout.tiles[0, 0, 0]), big[0])


def test_without_freetype_the_bitmap_font_still_labels_the_grid(monkeypatch):
    from PIL import ImageFont

    if not hasattr(ImageFont, "load_default_imagefont"):
        pytest.skip("Pillow < 10.1: load_default() is the bitmap font already")
    bitmap = ImageFont.load_default_imagefont()

    def no_freetype(size=None):  # what Pillow does where FreeType is missing
        if size is not None:
            raise ImportError("The _imagingft C module is not installed")
        return bitmap

    monkeypatch.setattr(ImageFont, "load_default", no_freetype)
    assert grid_font(12) is bitmap
    image, layout = grid_image(
        [
            GridSection(
                "edit",
                [LONG_PROMPT, "Remove the glasses"],
                [("source", _images(2)), ("student (4 steps), 4 NFE", _images(2))],
            )
        ]
    )
    for box in [*layout.row_labels.values(), *layout.column_labels.values()]:
        assert (_box(image, box) != GRID_BACKGROUND).any(), box


def test_unscored_grids_name_each_model_and_leave_its_images_unchanged(tmp_path):
    captions = ["a red square", LONG_PROMPT, "a green sign"]
    sources = _images(3, seed=5)
    outputs = _images(3, seed=6)
    outputs.flags.writeable = False  # the grid only reads the images it is given

    def contender(name, nfe):
        return report.Contender(name, nfe, lambda c: outputs[: len(c)], lambda s, i: outputs[: len(i)])

    contenders = [contender("teacher base (3 steps)", 6), contender("student (4 steps)", 4)]
    report.sample_unjudged(
        tmp_path, contenders, captions, list(zip(sources, ["make it night"] * 3)), title="t", log=lambda *_: None
    )
    t2i = np.asarray(Image.open(tmp_path / "grid_t2i.png").convert("RGB"))
    edit = np.asarray(Image.open(tmp_path / "grid_edit.png").convert("RGB"))
    # One row per model, named with its NFE; the edit grid's first row holds the sources.
    names = ["teacher base (3 steps)\n6 NFE", "student (4 steps)\n4 NFE"]
    np.testing.assert_array_equal(t2i, grid_image([GridSection("T2I", captions, [(n, outputs) for n in names])])[0])
    expected, layout = grid_image(
        [GridSection("edit", ["make it night"] * 3, [("source", sources)] + [(n, outputs) for n in names])]
    )
    np.testing.assert_array_equal(edit, expected)
    assert t2i.shape[1] == edit.shape[1]
    np.testing.assert_array_equal(_box(edit, layout.tiles[0, 0, 2]), np.repeat(np.repeat(sources[2], 6, 0), 6, 1))


def test_a_row_longer_than_its_column_labels_is_a_clear_error():
    with pytest.raises(ValueError, match="row 'm' has 3 images for 2 column labels"):
        grid_image([GridSection("", ["a", "b"], [("m", _images(3))])])
