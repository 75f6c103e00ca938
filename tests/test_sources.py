"""Dataset sources: toy-world TFDS builders (ArrayRecord), JSONL real data, bad-record handling, merging."""

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time

import grain
import numpy as np
import pytest
from PIL import Image

from qwen_flash_jax.data import world
from qwen_flash_jax.data.sources import (
    ConcatSource,
    DataError,
    jsonl_edit_sources,
    jsonl_t2i_sources,
    merge_sources,
    toy,
    toy_world_sources,
)
from qwen_flash_jax.models.config import ConfigError

N = 12  # toy examples per category: small keeps every preparation well under a second


def _records(sources):
    return {(t, c): [src[i] for i in range(len(src))] for t, cats in sources.items() for c, src in cats.items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray) or isinstance(b[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(scope="module")
def toy_sources(toy_dir):
    return toy_world_sources(toy_dir, size=16, examples_per_category=N, seed=3)


# ------------------------------------------------------------------------------------------------ toy world
def test_toy_splits_fields_and_shapes(toy_sources):
    assert set(toy_sources) == {"t2i", "edit"}
    assert tuple(toy_sources["t2i"]) == world.T2I_CATEGORIES
    assert tuple(toy_sources["edit"]) == world.EDIT_CATEGORIES
    for task, cats in toy_sources.items():
        for category, src in cats.items():
            assert len(src) == N
            records = [src[i] for i in range(N)]
            assert len({r["id"] for r in records}) == N
            for r in records:
                keys = ("caption", "image") if task == "t2i" else ("instruction", "source", "target")
                assert set(r) == {"id", "category", "spec", *keys}
                assert r["category"] == category and isinstance(r["id"], str)
                assert isinstance(r[keys[0]], str) and r[keys[0]]
                for k in keys[1:]:
                    assert r[k].dtype == np.uint8 and r[k].shape == (16, 16, 3) and r[k].flags.writeable
                assert json.loads(r["spec"])["category"] == category
            assert src[-1]["id"] == records[-1]["id"]
            with pytest.raises(IndexError):
                src[N]


def test_toy_record_is_the_world_example_named_by_its_id(toy_sources):
    """Example i of category c is sample_*(default_rng([seed, c_index, i])), whatever its position in the file."""
    for r in (toy_sources["t2i"]["text"][0], toy_sources["t2i"]["landscape"][5]):
        i = int(r["id"].rsplit("/", 1)[1])
        rng = np.random.default_rng([3, world.T2I_CATEGORIES.index(r["category"]), i])
        s = world.sample_t2i(rng, r["category"], 16)
        assert r["caption"] == s.caption and json.loads(r["spec"]) == s.spec
        np.testing.assert_array_equal(r["image"], s.image)
    r = toy_sources["edit"]["style"][2]
    i = int(r["id"].rsplit("/", 1)[1])
    e = world.sample_edit(np.random.default_rng([3, world.EDIT_CATEGORIES.index("style"), i]), "style", 16)
    assert r["instruction"] == e.instruction
    np.testing.assert_array_equal(r["source"], e.source)
    np.testing.assert_array_equal(r["target"], e.target)


def test_toy_deterministic_for_a_seed_and_different_across_seeds(toy_sources, tmp_path):
    again = _records(toy_world_sources(tmp_path / "a", size=16, examples_per_category=N, seed=3))
    for key, records in _records(toy_sources).items():
        for a, b in zip(records, again[key]):
            _same(a, b)
    other = toy_world_sources(tmp_path / "a", size=16, examples_per_category=N, seed=4, tasks=("t2i",))
    assert set(other) == {"t2i"}
    a, b = toy_sources["t2i"]["portrait"][0], other["t2i"]["portrait"][0]
    assert a["caption"] != b["caption"] or not np.array_equal(a["image"], b["image"])
    # different settings live side by side in one data_dir
    assert sorted(os.listdir(tmp_path / "a" / "toy_world_t2i")) == ["s16_n12_seed3", "s16_n12_seed4"]


def test_toy_second_call_reuses_prepared_data(toy_sources, toy_dir, monkeypatch):
    info = toy_dir / "toy_world_edit" / "s16_n12_seed3" / "1.0.0" / "dataset_info.json"
    mtime = info.stat().st_mtime_ns

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(toy._ToyWorldBuilder, "_generate_examples", no_generation)
    t0 = time.perf_counter()
    again = toy_world_sources(toy_dir, size=16, examples_per_category=N, seed=3)
    assert time.perf_counter() - t0 < 2.0
    assert info.stat().st_mtime_ns == mtime
    _same(again["edit"]["scene"][4], toy_sources["edit"]["scene"][4])


def test_toy_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    had_env = "TFDS_DATA_DIR" in os.environ
    out = toy_world_sources(tmp_path, size=16, examples_per_category=2, seed=0)
    assert len(out["edit"]["enhance"]) == 2
    assert ("TFDS_DATA_DIR" in os.environ) == had_env


def test_toy_interrupted_preparation_does_not_look_prepared(tmp_path, monkeypatch):
    original, calls = toy.ToyWorldT2I.example, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2 * N + 3:  # in the middle of the third split
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(toy.ToyWorldT2I, "example", staticmethod(flaky))
    with pytest.raises(KeyboardInterrupt):
        toy_world_sources(tmp_path, size=16, examples_per_category=N, seed=3, tasks=("t2i",))
    config_dir = tmp_path / "toy_world_t2i" / "s16_n12_seed3"
    assert not (config_dir / "1.0.0").exists()
    assert not toy._builder("t2i", str(tmp_path), 16, N, 3).is_prepared()
    monkeypatch.setattr(toy.ToyWorldT2I, "example", staticmethod(original))
    out = toy_world_sources(tmp_path, size=16, examples_per_category=N, seed=3, tasks=("t2i",))
    assert all(len(s) == N for s in out["t2i"].values())


def test_toy_killed_preparation_is_redone(tmp_path):
    """A process SIGKILLed mid-preparation leaves only an incomplete.* folder; the next call prepares afresh."""
    script = textwrap.dedent(f"""
        import time
        from qwen_flash_jax.data.sources import toy
        original = toy.ToyWorldT2I.example
        def slow(*args):
            time.sleep(0.05)
            return original(*args)
        toy.ToyWorldT2I.example = staticmethod(slow)
        toy.toy_world_sources({str(tmp_path)!r}, size=16, examples_per_category=200, seed=0, tasks=("t2i",))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config_dir = tmp_path / "toy_world_t2i" / "s16_n200_seed0"
    deadline = time.monotonic() + 30
    while not (config_dir.exists() and any(p.name.startswith("incomplete") for p in config_dir.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "preparation never started"
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (config_dir / "1.0.0").exists()
    out = toy_world_sources(tmp_path, size=16, examples_per_category=200, seed=0, tasks=("t2i",))
    assert len(out["t2i"]["text"]) == 200 and (config_dir / "1.0.0" / "dataset_info.json").exists()


def test_toy_stale_data_is_detected(toy_dir, monkeypatch):
    original = toy.sample_t2i

    def changed_world(rng, category, size):
        s = original(rng, category, size)
        return world.T2ISample(image=s.image, caption=s.caption + " (v2)", category=s.category, spec=s.spec)

    monkeypatch.setattr(toy, "sample_t2i", changed_world)
    with pytest.raises(DataError, match="differs from what the toy world generates now"):
        toy_world_sources(toy_dir, size=16, examples_per_category=N, seed=3, tasks=("t2i",))


def test_toy_grain_and_pickle(toy_sources):
    for src in (toy_sources["t2i"]["portrait"], toy_sources["edit"]["identity"]):
        ds = grain.MapDataset.source(src).shuffle(seed=1)
        got = {ds[i]["id"] for i in range(len(ds))}
        assert got == {src[i]["id"] for i in range(len(src))}
        blob = pickle.dumps(src)
        assert len(blob) < 2000  # settings only, no file handles or records
        copy = pickle.loads(blob)
        _same(copy[3], src[3])
        assert grain.MapDataset.source(copy)[len(src) + 3]["id"] == src[3]["id"]  # grain wraps indices


@pytest.mark.parametrize(
    "kwargs", [dict(size=8), dict(examples_per_category=0), dict(seed=-1), dict(tasks=("video",)), dict(size=True)]
)
def test_toy_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        toy_world_sources(tmp_path, **kwargs)


# ----------------------------------------------------------------------------------------------------- JSONL
def _png(path, w=40, h=24, colour=(200, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)
    return path


def _jsonl(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_jsonl_t2i_round_trip(tmp_path):
    _png(tmp_path / "img" / "a.png", 64, 48)
    path = _jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "a red square", "category": "portrait", "image": "img/a.png"},
            "",  # blank lines are ignored
            {"prompt": "a lake at dawn", "category": "landscape"},
            {"prompt": "a sign reading OPEN", "category": "text", "id": "sign-1", "extra": 1},
            {"prompt": "a second face", "category": "portrait", "image": str(tmp_path / "img" / "a.png")},
        ],
    )
    out = jsonl_t2i_sources(path, size=16)
    assert set(out) == {"t2i"} and list(out["t2i"]) == ["landscape", "portrait", "text"]
    r = out["t2i"]["portrait"][0]
    assert r["id"] == "prompts.jsonl:1" and r["caption"] == "a red square" and r["spec"] == ""
    assert r["category"] == "portrait" and r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8
    assert tuple(r["image"][8, 8]) == (200, 30, 60)
    assert out["t2i"]["portrait"][1]["image"].shape == (16, 16, 3)  # absolute path
    assert out["t2i"]["landscape"][0] == {
        "id": "prompts.jsonl:3",
        "category": "landscape",
        "caption": "a lake at dawn",
        "image": None,
        "spec": "",
    }
    assert out["t2i"]["text"][0]["id"] == "sign-1"


def test_jsonl_edit_round_trip_and_image_root(tmp_path):
    root = tmp_path / "images"
    _png(root / "src.png", 32, 32, (10, 20, 30))
    _png(root / "tgt.jpg", 50, 50, (250, 250, 250))
    lines = [
        {"instruction": "make it white", "category": "style", "source": "src.png", "target": "tgt.jpg"},
        {"instruction": "fix the noise", "category": "enhance", "source": "src.png"},
    ]
    path = _jsonl(tmp_path / "meta" / "pairs.jsonl", lines)
    with pytest.raises(DataError, match=r"pairs.jsonl:1: .*source image file not found"):
        jsonl_edit_sources(path)  # relative to the JSONL's folder by default
    out = jsonl_edit_sources(path, size=32, image_root=root)
    r = out["edit"]["style"][0]
    assert set(r) == {"id", "category", "instruction", "source", "target", "spec"}
    assert r["instruction"] == "make it white" and tuple(r["source"][0, 0]) == (10, 20, 30)
    assert r["target"].shape == (32, 32, 3) and r["target"].min() > 240
    assert out["edit"]["enhance"][0]["target"] is None
    with pytest.raises(DataError, match="image_root"):
        jsonl_edit_sources(path, image_root=tmp_path / "nope")


T2I_BAD = [
    ('{"prompt": "a", "category": ', "invalid_json", "invalid JSON"),
    ('[1, 2]', "invalid_json", "expected a JSON object"),
    ({"category": "portrait"}, "missing_field", "missing field 'prompt'"),
    ({"prompt": 3, "category": "portrait"}, "invalid_field", "field 'prompt' must be a string"),
    ({"prompt": "   ", "category": "portrait"}, "empty_prompt", "empty prompt"),
    (
        {"prompt": "x", "category": "cats"},
        "unknown_category",
        "unknown category 'cats'; valid t2i categories: landscape, portrait, text",
    ),
    ({"prompt": "x", "category": "text", "image": "gone.png"}, "missing_file", "image image file not found"),
]
EDIT_BAD = [
    ({"instruction": "x", "category": "style"}, "missing_field", "missing field 'source'"),
    ({"instruction": "", "category": "style", "source": "ok.png"}, "empty_instruction", "empty instruction"),
    (
        {"instruction": "x", "category": "portrait", "source": "ok.png"},
        "unknown_category",
        "valid edit categories: scene, enhance, object, text_edit, identity, style",
    ),
    (
        {"instruction": "x", "category": "style", "source": "ok.png", "target": "gone.png"},
        "missing_file",
        "target image file not found",
    ),
]


@pytest.mark.parametrize("task,line,reason,message", [("t2i", *b) for b in T2I_BAD] + [("edit", *b) for b in EDIT_BAD])
def test_jsonl_bad_records(tmp_path, caplog, task, line, reason, message):
    _png(tmp_path / "ok.png")
    if task == "t2i":
        opener, good = jsonl_t2i_sources, {"prompt": "fine", "category": "portrait", "image": "ok.png"}
    else:
        opener, good = jsonl_edit_sources, {"instruction": "fine", "category": "identity", "source": "ok.png"}
    path = _jsonl(tmp_path / "data.jsonl", [good, line, good])
    with pytest.raises(DataError) as err:
        opener(path)
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text
    with caplog.at_level(logging.WARNING, logger="qwen_flash_jax.data.sources"):
        out = opener(path, on_bad_record="skip")
    src = next(iter(out[task].values()))
    assert len(src) == 2 and src.skipped == {reason: 1}
    warnings = [r for r in caplog.records if r.name.startswith("qwen_flash_jax.data.sources")]
    assert len(warnings) == 1 and "skipped 1 bad records" in warnings[0].getMessage()


def test_jsonl_corrupt_image_found_on_access(tmp_path):
    _png(tmp_path / "a.png", colour=(1, 2, 3))
    _png(tmp_path / "c.png", colour=(7, 8, 9))
    (tmp_path / "bad.png").write_bytes(b"this is not a png at all")
    lines = [
        {"prompt": p, "category": "portrait", "image": img}
        for p, img in (("first", "a.png"), ("broken", "bad.png"), ("third", "c.png"))
    ]
    path = _jsonl(tmp_path / "p.jsonl", lines)
    src = jsonl_t2i_sources(path, size=16)["t2i"]["portrait"]  # opens fine: the file exists
    assert src[0]["caption"] == "first"
    with pytest.raises(DataError, match=r"p.jsonl:2: record 'p.jsonl:2': cannot read image image .*bad.png"):
        src[1]
    src = jsonl_t2i_sources(path, size=16, on_bad_record="skip")["t2i"]["portrait"]
    assert src[1]["caption"] == "third" and src[1]["caption"] == "third"  # the next good record, every time
    assert src.skipped == {"unreadable_image": 1}
    all_bad = _jsonl(tmp_path / "bad.jsonl", [lines[1]])
    with pytest.raises(DataError, match="no t2i record of category 'portrait' has readable images"):
        jsonl_t2i_sources(all_bad, on_bad_record="skip")["t2i"]["portrait"][0]


def test_jsonl_skip_wraps_around(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    _png(tmp_path / "a.png")
    path = _jsonl(
        tmp_path / "e.jsonl",
        [
            {"instruction": "one", "category": "scene", "source": "a.png"},
            {"instruction": "two", "category": "scene", "source": "a.png", "target": "bad.png"},
        ],
    )
    src = jsonl_edit_sources(path, on_bad_record="skip")["edit"]["scene"]
    assert src[1]["instruction"] == "one" and src.skipped == {"unreadable_image": 1}


def test_jsonl_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="on_bad_record must be one of"):
        jsonl_t2i_sources(tmp_path / "x.jsonl", on_bad_record="ignore")
    with pytest.raises(DataError, match="cannot open"):
        jsonl_t2i_sources(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no usable t2i records"):
        jsonl_t2i_sources(_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(ConfigError):
        jsonl_t2i_sources(_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "category": "text"}]), size=0)
    path = _jsonl(tmp_path / "grow.jsonl", [{"prompt": "p", "category": "text"}])
    src = jsonl_t2i_sources(path)["t2i"]["text"]
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "q", "category": "text"}) + "\n")
    with pytest.raises(DataError, match="changed since"):
        src[0]


def test_jsonl_large_file_is_compact_and_pickles(tmp_path):
    cats = world.T2I_CATEGORIES
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(30_000):
            f.write(json.dumps({"prompt": f"prompt number {i} " + "word " * 20, "category": cats[i % 3]}) + "\n")
    out = jsonl_t2i_sources(path)
    src = out["t2i"]["text"]
    assert len(src) == 10_000 and src[7]["caption"].startswith("prompt number 23 ")
    blob = pickle.dumps(out)
    assert len(blob) < 30_000 * 24  # offsets, lengths and line numbers: no text held
    copy = pickle.loads(blob)
    assert copy["t2i"]["text"][7] == src[7]
    assert grain.MapDataset.source(copy["t2i"]["landscape"]).shuffle(seed=0)[0]["category"] == "landscape"


# ----------------------------------------------------------------------------------------------------- merge
def test_merge_sources(toy_sources, tmp_path):
    _png(tmp_path / "a.png")
    t2i = jsonl_t2i_sources(
        _jsonl(
            tmp_path / "p.jsonl",
            [{"prompt": "real face", "category": "portrait"}, {"prompt": "real words", "category": "text"}],
        )
    )
    edit_line = {"instruction": "x", "category": "scene", "source": "a.png"}
    edit = jsonl_edit_sources(_jsonl(tmp_path / "e.jsonl", [edit_line]))
    merged = merge_sources(toy_sources, t2i, edit, {})
    assert list(merged) == ["t2i", "edit"]
    assert set(merged["t2i"]) == set(world.T2I_CATEGORIES) and set(merged["edit"]) == set(world.EDIT_CATEGORIES)
    assert merged["t2i"]["landscape"] is toy_sources["t2i"]["landscape"]  # only one part: not wrapped
    portrait = merged["t2i"]["portrait"]
    assert isinstance(portrait, ConcatSource) and len(portrait) == N + 1
    assert portrait[N - 1]["id"] == toy_sources["t2i"]["portrait"][N - 1]["id"]
    assert portrait[N]["caption"] == "real face" and portrait[-1]["caption"] == "real face"
    assert merged["edit"]["scene"][N]["instruction"] == "x"
    nested = merge_sources(merged, t2i)
    assert len(nested["t2i"]["portrait"]) == N + 2 and len(nested["t2i"]["portrait"].parts) == 3
    copy = pickle.loads(pickle.dumps(portrait))
    assert grain.MapDataset.source(copy)[N]["caption"] == "real face"
    with pytest.raises(IndexError):
        portrait[N + 1]
    with pytest.raises(ConfigError, match="unknown task 'video'"):
        merge_sources({"video": {}})
