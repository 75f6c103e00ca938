"""Which layout of `data.edit_layouts` an edit record takes (by its image count, then its images' aspect ratios),
and the config's checks (tests/test_multi_image_edits.py trains on several layouts)."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from qwen_flash_jax.data import edit_layouts
from qwen_flash_jax.data.sources import jsonl_edit_sources
from qwen_flash_jax.models.config import ConfigError

SQUARE, WIDE, TALL = ((64, 64),), ((32, 96),), ((96, 32),)
PAIR = ((64, 64), (32, 96))


def test_a_record_takes_the_layout_of_its_image_count_and_nearest_aspect_ratios():
    layouts = (SQUARE, WIDE, TALL, PAIR)
    assert edit_layouts.assign([(500, 510)], layouts) == 0
    assert edit_layouts.assign([(300, 1000)], layouts) == 1  # 3.3:1 is nearer 3:1 than 1:1
    assert edit_layouts.assign([(900, 200)], layouts) == 2
    assert edit_layouts.assign([(10, 10), (10, 10)], layouts) == 3  # the only two-image layout, whatever its aspect
    assert edit_layouts.assign([(10, 10)] * 3, layouts) is None
    assert edit_layouts.assign([(100, 100)], (WIDE, TALL)) == 0  # a tie goes to the first listed
    assert edit_layouts.needs_sizes(layouts) and not edit_layouts.needs_sizes((SQUARE, PAIR))
    assert [edit_layouts.task_key(i) for i in range(3)] == ["edit", "edit:1", "edit:2"]


def test_a_jsonl_source_is_split_by_image_count_and_header_sizes(tmp_path):
    """Sizes come from the files' headers, EXIF orientation applied (a JPEG stored 96 wide, 32 high, turned by 90
    degrees, is read 32 wide); the split reads no pixels."""
    Image.new("RGB", (96, 32)).save(tmp_path / "wide.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "square.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when read
    Image.new("RGB", (96, 32)).save(tmp_path / "turned.jpg", exif=exif)
    lines = [
        {"instruction": "a", "category": "scene", "source": "wide.png"},
        {"instruction": "b", "category": "scene", "source": ["square.png"]},
        {"instruction": "c", "category": "scene", "source": "turned.jpg"},
        {"instruction": "d", "category": "scene", "source": ["square.png", "wide.png"]},
        {"instruction": "e", "category": "scene", "source": ["square.png"] * 3},
    ]
    (tmp_path / "edit.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = jsonl_edit_sources(tmp_path / "edit.jsonl", size=None)["edit"]["scene"]
    assert source[2]["source"].shape == (96, 32, 3)  # what the split predicts without decoding
    split = edit_layouts.split(source, (SQUARE, WIDE, TALL, PAIR))
    assert [list(i) for i in split.indices] == [[1], [0], [2], [3]] and split.unmatched == {3: 1}
    subset = edit_layouts.Subset(source, split.indices[3])
    assert len(subset) == 1 and subset[0]["instruction"] == "d"
    # Counts alone decide where no two layouts share one: no header is read then.
    by_count = edit_layouts.split(source, (SQUARE, PAIR))
    assert [list(i) for i in by_count.indices] == [[0, 1, 2], [3]]


@pytest.mark.parametrize(
    "value, message",
    [
        (((64, 64),), "must be a list of layouts"),
        ((((64, 64),), ()), "has an empty layout"),
        ((((64, -64),),), "positive sizes"),
        ((SQUARE, SQUARE), "lists a layout twice"),
    ],
)
def test_a_bad_layout_list_is_one_config_error(value, message):
    with pytest.raises(ConfigError, match=message) as error:
        edit_layouts.from_config(ml_collections.ConfigDict({"edit_layouts": value}))
    assert "\n" not in str(error.value)


def test_no_layouts_is_the_single_square_source():
    assert edit_layouts.from_config(ml_collections.ConfigDict({"edit_layouts": ()})) == ()
    assert edit_layouts.from_config(ml_collections.ConfigDict({})) == ()
    layouts = edit_layouts.from_config(ml_collections.ConfigDict({"edit_layouts": [[[64, 64]], [[64, 64], [32, 96]]]}))
    assert layouts == (SQUARE, PAIR) and isinstance(np.asarray(layouts[1]), np.ndarray)
