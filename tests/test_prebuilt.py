"""The toy networks that ship with the package (train/prebuilt.py): keyed like the toy default's own cache entries,
intact, copied into a cache whole and only where it lacks them, and used instead of training."""

import json
import shutil

import numpy as np
import pytest

from qwen_flash_jax import cache, config_lib
from qwen_flash_jax.train import assets as assets_lib
from qwen_flash_jax.train import prebuilt, teacher


def _toy(cache, **overrides):
    config = config_lib.load_config("configs/5to5.py:toy")
    config.cache_dir = str(cache)
    config.update(overrides)
    return config


def test_the_shipped_entries_are_the_ones_the_main_job_looks_up(tmp_path):
    """A change to the toy default that moves a key fails here: re-export (the module's docstring) or drop them."""
    shipped = {
        str(p.relative_to(tmp_path))
        for p in prebuilt.entries_for(_toy(tmp_path), tmp_path)
        if p.parent.name != "eval_images"
    }
    assert shipped == {
        "teachers/" + teacher.cache_dir(_toy(tmp_path, prebuilt_cache=False), name).name for name in ("base", "text")
    } | {"text_encoder/" + assets_lib.toy_text_encoder_key(_toy(tmp_path)), "judge/toy_judge_v1_size32_seed0"}
    for entry in shipped:
        assert (cache.SHIPPED_ROOT / entry).is_dir(), entry
    assert len(list((cache.SHIPPED_ROOT / "eval_images").glob("*.npz"))) == 4  # base teacher: 40, 4, 4 at the student's
    # times; the step-0 probe


def test_the_shipped_files_match_the_manifest():
    manifest = json.loads((cache.SHIPPED_ROOT / cache.MANIFEST).read_text())
    assert manifest["files"] == cache.file_digests()


def test_seeding_copies_missing_entries_whole_and_keeps_present_ones(tmp_path, monkeypatch):
    root = tmp_path / "shipped"
    (root / "things" / "a").mkdir(parents=True)
    (root / "things" / "a" / "x.txt").write_text("shipped a")
    (root / "things" / "b.npz").write_text("shipped b")
    target = tmp_path / "cache" / "things"
    target.mkdir(parents=True)
    (target / "b.npz").write_text("made here")
    lines = []
    assert cache.seed("things", target, root, log=lines.append) == ["a"]
    assert (target / "a" / "x.txt").read_text() == "shipped a" and (target / "b.npz").read_text() == "made here"
    assert len(lines) == 1 and "things a" in lines[0]
    assert cache.seed("things", target, root) == [] and cache.seed("absent", target, root) == []

    # A copy that fails half-way leaves neither the entry nor its temporary behind.
    shutil.rmtree(target / "a")

    def fail(src, dst, *args, **kwargs):
        dst.mkdir()
        (dst / "x.txt").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", fail)
    with pytest.raises(OSError, match="disk full"):
        cache.seed("things", target, root)
    assert sorted(p.name for p in target.iterdir()) == ["b.npz"]


@pytest.mark.job
def test_a_toy_run_reads_the_shipped_networks_instead_of_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the package ships it")

    monkeypatch.setattr(teacher, "train_teacher", no_training)
    monkeypatch.setattr(assets_lib.text_encoder, "pretrain_text_encoder", no_training)
    config = _toy(tmp_path / "cache")
    tokenizer, te_params = assets_lib._toy_text_encoder(config, log=lambda *_: None)
    assert te_params.config.feature_layers == (0, -1) and tokenizer.encode("a red house")
    params = teacher.ensure_teacher(config, "text", log=lambda *_: None)  # init_from base: both from the package
    shipped_dir = cache.SHIPPED_ROOT / "teachers" / teacher.cache_dir(config, "text").name
    shipped = teacher._restore_standalone(config, shipped_dir)
    assert all(np.array_equal(a, b) for a, b in zip(jax_leaves(params), jax_leaves(shipped)))
    assert sorted(p.name for p in (tmp_path / "cache" / "teachers").iterdir()) == sorted(
        p.name for p in (cache.SHIPPED_ROOT / "teachers").iterdir()
    )

    # Switched off, the same lookups train.
    config = _toy(tmp_path / "other", prebuilt_cache=False)
    with pytest.raises(AssertionError, match="trained although"):
        teacher.ensure_teacher(config, "base", log=lambda *_: None)
    with pytest.raises(AssertionError, match="trained although"):
        assets_lib._toy_text_encoder(config, log=lambda *_: None)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
