"""Tests of the procedural world (qwen_flash_jax.data.world): schema, determinism, rendering, captions, edits."""

import json
import re

import numpy as np
import pytest

from qwen_flash_jax.data import world
from qwen_flash_jax.data.world import (
    EDIT_CATEGORIES,
    EDIT_OPS,
    T2I_ATTRIBUTES,
    T2I_CATEGORIES,
    EditSample,
    T2ISample,
    attribute_labels,
    caption,
    contact_sheet,
    landscape,
    portrait,
    render,
    sample_edit,
    sample_t2i,
    styles,
    text,
)

SIZES = (16, 32, 64)


def _specs(category, n, seed=0):
    rng = np.random.default_rng(seed)
    return [world.sample_spec(rng, category) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- schema / API
def test_schema():
    assert T2I_CATEGORIES == ("landscape", "portrait", "text")
    assert set(T2I_ATTRIBUTES) == set(T2I_CATEGORIES)
    for cat, attrs in T2I_ATTRIBUTES.items():
        assert attrs, cat
        for attr, values in attrs.items():
            assert isinstance(values, tuple) and len(values) >= 2, (cat, attr)
            assert len(set(values)) == len(values) and all(isinstance(v, str) for v in values)
    assert EDIT_CATEGORIES == ("scene", "enhance", "object", "text_edit", "identity", "style")
    assert set(EDIT_OPS) == set(EDIT_CATEGORIES) and all(EDIT_OPS[c] for c in EDIT_CATEGORIES)
    vocab = T2I_ATTRIBUTES["text"]["word"]
    assert len(vocab) == 16 and all(re.fullmatch(r"[A-Z]{3,4}", w) for w in vocab)


@pytest.mark.parametrize("fn", [sample_t2i, sample_edit])
def test_unknown_category_raises(fn):
    valid = T2I_CATEGORIES if fn is sample_t2i else EDIT_CATEGORIES
    with pytest.raises(ValueError) as exc:
        fn(np.random.default_rng(0), "cityscape")
    assert all(v in str(exc.value) for v in valid)


def test_bad_spec_and_size_raise():
    spec = _specs("portrait", 1)[0]
    with pytest.raises(ValueError, match="landscape"):
        render(dict(spec, category="cityscape"))
    with pytest.raises(ValueError, match="hair_colour"):
        render(dict(spec, hair_colour="purple"))
    with pytest.raises(ValueError):
        render(spec, size=8)
    with pytest.raises(ValueError):
        attribute_labels({"category": "nope"})


# ----------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("category", T2I_CATEGORIES)
def test_t2i_determinism(category):
    a = [sample_t2i(np.random.default_rng(7), category) for _ in range(2)]
    assert a[0].spec == a[1].spec and a[0].caption == a[1].caption
    np.testing.assert_array_equal(a[0].image, a[1].image)
    r1, r2 = np.random.default_rng(1), np.random.default_rng(2)
    s1 = [sample_t2i(r1, category) for _ in range(5)]
    s2 = [sample_t2i(r2, category) for _ in range(5)]
    assert [s.spec for s in s1] != [s.spec for s in s2]
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(s1, s2))
    # consecutive draws from one generator differ too
    assert len({json.dumps(s.spec, sort_keys=True) for s in s1}) == 5


@pytest.mark.parametrize("category", EDIT_CATEGORIES)
def test_edit_determinism(category):
    a, b = (sample_edit(np.random.default_rng(3), category) for _ in range(2))
    assert a.spec == b.spec and a.instruction == b.instruction
    np.testing.assert_array_equal(a.source, b.source)
    np.testing.assert_array_equal(a.target, b.target)
    c = sample_edit(np.random.default_rng(4), category)
    assert c.spec != a.spec


# ----------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("category", T2I_CATEGORIES)
def test_render_shapes_and_purity(category, size):
    rng = np.random.default_rng(size)
    for _ in range(10):
        s = sample_t2i(rng, category, size=size)
        assert isinstance(s, T2ISample) and s.category == category == s.spec["category"]
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        spec_copy = json.loads(json.dumps(s.spec))  # JSON-serialisable ground truth
        again = render(spec_copy, size)
        np.testing.assert_array_equal(again, s.image)
        assert spec_copy == s.spec  # render does not mutate the spec
        assert s.image.std() > 5  # not a blank image


@pytest.mark.parametrize("size", (48, 80, 96, 112, 128))
def test_other_sizes_render(size):
    for cat in T2I_CATEGORIES:
        assert render(_specs(cat, 1, size)[0], size).shape == (size, size, 3)
    e = sample_edit(np.random.default_rng(size), "style", size)
    assert e.source.shape == e.target.shape == (size, size, 3)


@pytest.mark.parametrize("category", T2I_CATEGORIES)
def test_every_attribute_value_is_visible(category):
    """Changing one attribute to any other value changes a clearly visible set of pixels (at 32x32)."""
    for spec in _specs(category, 12, seed=11):
        for attr, values in T2I_ATTRIBUTES[category].items():
            imgs = {v: render(dict(spec, **{attr: v})).astype(int) for v in values}
            for i, v in enumerate(values):
                for w in values[i + 1 :]:
                    changed = (np.abs(imgs[v] - imgs[w]).max(axis=-1) > 25).sum()
                    assert changed >= 4, (spec, attr, v, w, changed)


def test_sampled_text_colours_have_contrast():
    for spec in _specs("text", 300):
        assert (spec["text_colour"], spec["sign_colour"]) not in text.FORBIDDEN_PAIRS


@pytest.mark.parametrize("size", range(16, 129, 16))
def test_every_word_fits(size):
    masks = text.word_masks(size)
    assert set(masks) == set(text.VOCABULARY)
    for w, m in masks.items():
        assert m.shape[1] <= text.MAX_TEXT_W * size, (w, m.shape)
        assert m.shape[0] < text.PLATE_H * size, (w, m.shape)
        assert m.max() > 0.5
    for surface in ("sign", "poster"):
        for placement in ("top", "middle", "bottom"):
            spec = dict(_specs("text", 1)[0], surface=surface, placement=placement, word="OPEN")
            assert render(spec, size).shape == (size, size, 3)


def test_text_is_rendered_in_text_colour():
    for spec in _specs("text", 20):
        img = render(spec)
        colour = np.asarray(text.TEXT_RGB[spec["text_colour"]])
        assert (np.abs(img.astype(int) - colour).max(axis=-1) < 3).sum() >= 15, spec


# ----------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("category", T2I_CATEGORIES)
def test_attribute_labels_roundtrip(category):
    for spec in _specs(category, 50):
        labels = attribute_labels(spec)
        assert list(labels) == list(T2I_ATTRIBUTES[category])
        for attr, idx in labels.items():
            assert isinstance(idx, int) and T2I_ATTRIBUTES[category][attr][idx] == spec[attr]
        assert world.labels_to_values(category, labels) == {a: spec[a] for a in labels}


def test_all_values_get_sampled():
    for cat in T2I_CATEGORIES:
        specs = _specs(cat, 400)
        for attr, values in T2I_ATTRIBUTES[cat].items():
            assert {s[attr] for s in specs} == set(values), (cat, attr)


# ----------------------------------------------------------------------------------------------- captions
_KEYWORDS = {  # hand-written: a caption must contain one of these for the spec's value
    ("landscape", "time_of_day"): {"day": ("day",), "sunset": ("sunset", "dusk"), "night": ("night",)},
    ("landscape", "season"): {"summer": ("summer",), "autumn": ("autumn", "fall"), "winter": ("winter",)},
    ("landscape", "celestial"): {"sun": ("sun",), "moon": ("moon",), "none": ("no sun", "neither sun")},
    ("landscape", "water"): {"none": ("no lake", "no water", "without any water"), "lake": ("lake",)},
    ("landscape", "trees"): {
        "none": ("no trees", "without any trees", "not a single tree"),
        "few": ("few", "some", "three"),
        "many": ("many", "lots", "crowd", "plenty"),
    },
    ("landscape", "mountains"): {
        "none": ("no mountains", "without any mountains"),
        "one": ("single", "one", "lone"),
        "range": ("range", "row of", "several"),
    },
    ("portrait", "skin"): {
        "light": ("light", "fair", "pale"),
        "medium": ("medium", "tan", "olive"),
        "dark": ("dark skin", "dark complexion", "deep dark"),
    },
    ("portrait", "hair_length"): {"short": ("short",), "long": ("long",)},
    ("text", "placement"): {"top": ("top", "high"), "middle": ("middle", "centre"), "bottom": ("bottom", "low")},
    ("portrait", "glasses"): {
        "yes": ("wears glasses", "with a pair", "dark-rimmed"),
        "no": ("without", "no glasses", "not wearing"),
    },
}


@pytest.mark.parametrize("category", T2I_CATEGORIES)
def test_captions_mention_values(category):
    rng = np.random.default_rng(5)
    for _ in range(60):
        s = sample_t2i(rng, category)
        cap = s.caption.lower()
        assert s.caption[0].isupper() and s.caption.endswith(".")
        for (cat, attr), table in _KEYWORDS.items():
            if cat == category:
                assert any(k in cap for k in table[s.spec[attr]]), (attr, s.spec[attr], s.caption)
        if category == "portrait":
            assert re.search(rf"{s.spec['hair_colour']} hair", cap), s.caption
            assert f"{s.spec['eye_colour']} eyes" in cap or f"eyes are {s.spec['eye_colour']}" in cap, s.caption
            assert f"{s.spec['background']} back" in cap, s.caption
        if category == "text":
            assert f'"{s.spec["word"]}"' in s.caption
            assert s.spec["sign_colour"] in cap and s.spec["text_colour"] in cap
            assert ("poster" if s.spec["surface"] == "poster" else "sign") in cap


@pytest.mark.parametrize("module", [landscape, portrait])
def test_caption_phrases_are_unambiguous(module):
    """No phrase of one value appears in a caption whose spec has another value of that attribute."""
    rng = np.random.default_rng(9)
    for _ in range(100):
        s = sample_t2i(rng, module.NAME)
        for attr, table in module.PHRASES.items():
            hits = {v for v, phrases in table.items() if any(p in s.caption for p in phrases)}
            assert hits == {s.spec[attr]}, (attr, hits, s.caption)


@pytest.mark.parametrize("category", T2I_CATEGORIES)
def test_captions_vary(category):
    spec = _specs(category, 1)[0]
    caps = {caption(spec, np.random.default_rng(i)) for i in range(30)}
    assert len(caps) >= 10
    openers = {c.split()[0:2][-1] for c in caps}
    assert len(openers) >= 2  # different templates, not just different synonyms


# ----------------------------------------------------------------------------------------------- edits
def _differing_keys(a: dict, b: dict) -> set:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def _op_keys(op: dict) -> set:
    return {op["attribute"]} if "attribute" in op else set(op) & {"style", "degradation"}


@pytest.mark.parametrize("category", EDIT_CATEGORIES)
def test_edit_pairs_consistent(category):
    rng = np.random.default_rng(21)
    instructions = set()
    for _ in range(40):
        e = sample_edit(rng, category)
        assert isinstance(e, EditSample) and e.category == category == e.spec["category"]
        assert e.source.shape == e.target.shape == (32, 32, 3) and e.source.dtype == e.target.dtype == np.uint8
        assert not np.array_equal(e.source, e.target)
        src, tgt, op = e.spec["source"], e.spec["target"], e.spec["op"]
        assert _differing_keys(src, tgt) == _op_keys(op), e.spec
        np.testing.assert_array_equal(render(src), e.source)
        np.testing.assert_array_equal(render(tgt), e.target)
        base_attrs = set(T2I_ATTRIBUTES[src["category"]])
        assert set(e.spec["preserve"]) == base_attrs - _op_keys(op)
        key = {"attribute": op["attribute"]} if "attribute" in op else op
        templates = [t for t in EDIT_OPS[category] if t["base"] == src["category"]]
        assert any(all(t.get(k) == v for k, v in key.items()) for t in templates)
        if "attribute" in op:
            assert src[op["attribute"]] == op["from"] != op["to"] == tgt[op["attribute"]]
        json.dumps(e.spec)
        assert e.instruction and e.instruction[0].isupper()
        instructions.add(e.instruction)
    assert len(instructions) >= 10


def test_enhancement_target_is_clean_render():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(40):
        e = sample_edit(rng, "enhance")
        deg = e.spec["source"]["degradation"]
        kinds.add(deg["type"])
        clean = {k: v for k, v in e.spec["source"].items() if k != "degradation"}
        assert e.spec["target"] == clean
        np.testing.assert_array_equal(e.target, render(clean))
        np.testing.assert_array_equal(e.source, styles.apply_degradation(e.target, deg))
        assert np.abs(e.source.astype(int) - e.target).mean() > 2  # the degradation is visible
    assert kinds == set(styles.DEGRADATIONS)


def test_text_edit_changes_word_only():
    rng = np.random.default_rng(0)
    for _ in range(30):
        e = sample_edit(rng, "text_edit")
        src, tgt = e.spec["source"], e.spec["target"]
        assert src["word"] != tgt["word"] and e.spec["op"] == {
            "attribute": "word",
            "from": src["word"],
            "to": tgt["word"],
            "action": "change",
        }
        assert {k: v for k, v in src.items() if k != "word"} == {k: v for k, v in tgt.items() if k != "word"}
        assert tgt["word"] in e.instruction


def test_style_target_is_transform_of_source():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        e = sample_edit(rng, "style")
        style = e.spec["op"]["style"]
        seen.add(style)
        assert e.spec["target"]["style"] == style and "style" not in e.spec["source"]
        np.testing.assert_array_equal(e.target, styles.apply_style(e.source, style))
    assert seen == set(styles.STYLES)
    g = styles.apply_style(render(_specs("landscape", 1)[0]), "grayscale")
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()


def test_identity_edits_preserve_identity():
    rng = np.random.default_rng(0)
    for _ in range(30):
        e = sample_edit(rng, "identity")
        for keep in ("skin", "eye_colour", "background"):
            assert e.spec["source"][keep] == e.spec["target"][keep]
            assert keep in e.spec["preserve"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("category", ["object", "text_edit", "identity"])
def test_local_edits_leave_outside_pixels_unchanged(category, size):
    rng = np.random.default_rng(100 + size)
    for _ in range(40):
        e = sample_edit(rng, category, size)
        region = e.spec["region"]
        assert region is not None and len(region) == 4
        x0, y0, x1, y1 = region
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        outside = np.ones((size, size), bool)
        outside[
            max(0, int(np.floor(y0 * size)) - 1) : int(np.ceil(y1 * size)) + 1,
            max(0, int(np.floor(x0 * size)) - 1) : int(np.ceil(x1 * size)) + 1,
        ] = False
        diff = (e.source != e.target).any(axis=-1)
        assert not (diff & outside).any(), (e.spec["op"], region, np.argwhere(diff & outside)[:5])
        assert diff.any()


def test_global_edits_have_no_region():
    rng = np.random.default_rng(0)
    for cat in ("scene", "enhance", "style"):
        for _ in range(10):
            assert sample_edit(rng, cat).spec["region"] is None


def test_object_ops_cover_actions():
    rng = np.random.default_rng(0)
    ops = [sample_edit(rng, "object").spec["op"] for _ in range(300)]
    actions = {(op["attribute"], op["action"]) for op in ops}
    for need in [
        ("celestial", "add"),
        ("celestial", "remove"),
        ("celestial", "replace"),
        ("water", "add"),
        ("water", "remove"),
        ("trees", "add"),
        ("trees", "remove"),
        ("sign_colour", "recolour"),
    ]:
        assert need in actions
    for _ in range(100):
        e = sample_edit(rng, "object")
        t = e.spec["target"]
        if t["category"] == "text":
            assert (t["text_colour"], t["sign_colour"]) not in text.FORBIDDEN_PAIRS


# ----------------------------------------------------------------------------------------------- contact sheet
def test_contact_sheet():
    a = np.zeros((32, 32, 3), np.uint8)
    b = np.full((32, 65, 3), 7, np.uint8)
    sheet = contact_sheet([a, b, a], cols=2, scale=3, pad=2)
    assert sheet.dtype == np.uint8
    assert sheet.shape == (3 * (2 + 2 * (32 + 2)), 3 * (2 + 2 * (65 + 2)), 3)
    assert (sheet[6:9, 6:9] == 0).all()  # first image, top-left, upscaled
    assert (sheet[3 * 2 : 3 * 34, 3 * (2 + 67) : 3 * (2 + 67 + 65)] == 7).all()
    demo = world.demo_sheet(seed=0, t2i_per_category=2, edits_per_category=1, scale=1)
    assert demo.ndim == 3 and demo.shape[2] == 3
