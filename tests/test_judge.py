"""Tests of the toy judge (qwen_flash_jax.eval.judge): calibration orderings, determinism, persistence, input checks.

The calibration, persistence and input tests use the judge that ships with the package (the one the toy main job
scores with). Training a judge to its accuracy takes ~90 s on 2 CPU cores: that run is in the `job` tier, trained
with fewer steps than the default, so its accuracy threshold is weaker than the full judge's (>= 0.99 on every
attribute, see the README / benchmark); the unit tier trains a few steps for determinism only.
"""

import json
import os

import numpy as np
import pytest

from qwen_flash_jax import cache
from qwen_flash_jax.data.world import EDIT_CATEGORIES, T2I_CATEGORIES, render, sample_edit, sample_t2i
from qwen_flash_jax.eval import judge as judge_mod
from qwen_flash_jax.eval import judge_calib
from qwen_flash_jax.eval import judge_metrics as jm
from qwen_flash_jax.eval.judge import ToyJudge, train_judge
from qwen_flash_jax.eval.judge_io import load_judge, load_or_train_judge, save_judge

N_PER_CATEGORY = 60
TEST_TRAIN = dict(steps=550, n_reference=400, n_eval=300)


SHIPPED_JUDGE = cache.SHIPPED_ROOT / "judge" / "toy_judge_v1_size32_seed0"


@pytest.fixture(scope="module")
def judge() -> ToyJudge:
    return load_judge(SHIPPED_JUDGE)


@pytest.fixture(scope="module")
def t2i_sets():
    return judge_calib.t2i_sets(N_PER_CATEGORY, 32, seed=1)


@pytest.fixture(scope="module")
def edit_sets():
    return judge_calib.edit_sets(N_PER_CATEGORY, 32, seed=1)


@pytest.fixture(scope="module")
def t2i_results(judge, t2i_sets):
    return {cond: judge.score_t2i(images, specs) for cond, (images, specs) in t2i_sets.items()}


@pytest.fixture(scope="module")
def edit_results(judge, edit_sets):
    sources, specs, outputs = edit_sets
    return {cond: judge.score_edit(sources, outs, specs) for cond, outs in outputs.items()}


# ----------------------------------------------------------------------------------------------- classifier
def _check_heldout_accuracy(judge):
    expected = {f"{c}/category" for c in T2I_CATEGORIES} | {
        f"{c}/{a}" for c in T2I_CATEGORIES for a in judge_mod.T2I_ATTRIBUTES[c]
    }
    assert set(judge.accuracy) == expected
    low = {k: v for k, v in judge.accuracy.items() if v < 0.93}
    assert not low, f"weak attribute heads: {low}"
    assert np.mean(list(judge.accuracy.values())) >= 0.98


def test_heldout_accuracy(judge):
    """The shipped judge's held-out accuracy, measured when it was trained (stored in its judge.json)."""
    _check_heldout_accuracy(judge)


@pytest.mark.job
def test_training_reaches_the_heldout_accuracy():
    """A whole (shortened) training run of the judge: every attribute head learns."""
    _check_heldout_accuracy(train_judge(size=32, seed=0, log=None, **TEST_TRAIN))


def test_param_count_and_logical_axes(judge):
    n = sum(v.size for v in judge.params.values())
    assert 50_000 <= n <= 200_000, n
    from flax import nnx

    from qwen_flash_jax.eval.judge_net import JudgeNet

    model = nnx.eval_shape(lambda: JudgeNet(judge.config, rngs=nnx.Rngs(0)))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape)


# ----------------------------------------------------------------------------------------------- calibration
def test_t2i_ordering(t2i_results):
    for cat in T2I_CATEGORIES:
        s = {cond: r["per_category"][cat] for cond, r in t2i_results.items()}
        assert s["real"] > s["mild"] > s["heavy"] > s["noise"], (cat, s)
        assert s["real"] >= 4.5 and s["noise"] <= 1.3, (cat, s)
        assert s["wrong_spec"] < s["real"] - 1.5, (cat, s)
        assert s["real"] - s["mild"] >= 0.5 and s["mild"] - s["heavy"] >= 0.5, (cat, s)


def test_t2i_fidelity_fd(t2i_results):
    for cat in T2I_CATEGORIES:
        fd = {cond: t2i_results[cond]["fidelity_fd"][cat] for cond in ("real", "mild", "heavy", "noise")}
        assert fd["real"] < fd["heavy"] < fd["noise"], (cat, fd)
        fd_low = {cond: t2i_results[cond]["fidelity_fd_low"][cat] for cond in ("real", "mild", "heavy", "noise")}
        assert fd_low["real"] < fd_low["mild"] < fd_low["heavy"] < fd_low["noise"], (cat, fd_low)


def test_edit_ordering(edit_results):
    for cat in EDIT_CATEGORIES:
        s = {cond: r["per_category"][cat] for cond, r in edit_results.items()}
        assert s["target"] > s["mild"] > s["heavy"] > s["source"], (cat, s)
        assert s["target"] >= 4.5 and s["source"] <= 1.3 and s["noise"] <= 1.3, (cat, s)


def test_scores_in_range_and_rounded(t2i_results, edit_results):
    for r in list(t2i_results.values()) + list(edit_results.values()):
        x = r["per_sample"]
        assert x.ndim == 1 and np.all(x >= 1.0) and np.all(x <= 5.0)
        assert np.allclose(x, np.round(x, 2), atol=1e-5)
        assert r["mean"] == pytest.approx(float(np.mean(x)), abs=1e-6)
        assert all(1.0 <= v <= 5.0 for v in r["per_category"].values())
    n = 3 * N_PER_CATEGORY
    assert t2i_results["real"]["per_sample"].shape == (n,)
    assert edit_results["target"]["per_sample"].shape == (6 * N_PER_CATEGORY,)


def test_wrong_attribute_edit_is_capped(judge):
    """An edit to the wrong value (hair dyed red instead of blonde, a different word) scores low, not 'partial'."""
    rng = np.random.default_rng(3)
    sources, outputs, specs, right = [], [], [], []
    for cat in ("identity", "text_edit", "scene"):
        for _ in range(20):
            e = sample_edit(rng, cat)
            op = e.spec["op"]
            if "attribute" not in op:
                continue
            values = judge_mod.T2I_ATTRIBUTES[e.spec["target"]["category"]][op["attribute"]]
            wrong = [v for v in values if v not in (op["from"], op["to"])]
            if not wrong or (op["attribute"] == "sign_colour"):
                continue
            sources.append(e.source)
            outputs.append(render(dict(e.spec["target"], **{op["attribute"]: wrong[0]})))
            right.append(e.target)
            specs.append(e.spec)
    sources, outputs = np.stack(sources), np.stack(outputs)
    bad = judge.score_edit(sources, outputs, specs)
    good = judge.score_edit(sources, np.stack(right), specs)
    assert len(specs) >= 20
    assert np.mean(bad["per_sample"]) <= 2.0 and np.mean(good["per_sample"]) >= 4.5, (bad["mean"], good["mean"])


def test_text_word_dominates_text_compliance(judge):
    rng = np.random.default_rng(4)
    samples = [sample_t2i(rng, "text") for _ in range(30)]
    images = np.stack([s.image for s in samples])
    specs = [s.spec for s in samples]
    vocab = judge_mod.T2I_ATTRIBUTES["text"]["word"]
    wrong_word = [dict(s, word=vocab[(vocab.index(s["word"]) + 5) % len(vocab)]) for s in specs]
    wrong_place = [
        dict(s, placement={"top": "bottom", "middle": "top", "bottom": "middle"}[s["placement"]]) for s in specs
    ]
    right, word, place = (judge.score_t2i(images, sp)["mean"] for sp in (specs, wrong_word, wrong_place))
    assert right >= 4.5 and word < place < right and word <= right - 1.5, (right, word, place)


# ----------------------------------------------------------------------------------------------- determinism / io
def test_scoring_is_deterministic(judge, t2i_sets):
    images, specs = t2i_sets["mild"]
    a, b = judge.score_t2i(images, specs), judge.score_t2i(images, specs)
    np.testing.assert_array_equal(a["per_sample"], b["per_sample"])
    assert a["fidelity_fd"] == b["fidelity_fd"]
    # a sample's score does not depend on the batch it is scored in
    one = judge.score_t2i(images[5:6], specs[5:6])["per_sample"]
    assert one[0] == pytest.approx(a["per_sample"][5], abs=0.011)


def test_training_is_deterministic():
    kw = dict(size=32, seed=7, steps=3, n_reference=40, n_eval=20, log=None)
    a, b = train_judge(**kw), train_judge(**kw)
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    for k in a.reference:
        np.testing.assert_array_equal(a.reference[k], b.reference[k], err_msg=k)
    assert a.thresholds == b.thresholds and a.accuracy == b.accuracy
    c = train_judge(**dict(kw, seed=8))
    assert any(not np.array_equal(a.params[k], c.params[k]) for k in a.params)


def test_save_load_roundtrip(judge, t2i_sets, edit_sets, tmp_path):
    path = save_judge(judge, tmp_path / "j")
    assert sorted(os.listdir(tmp_path)) == ["j"]  # no temporary directories left behind
    loaded = load_judge(path)
    assert loaded.config == judge.config and loaded.thresholds == judge.thresholds
    assert loaded.accuracy == judge.accuracy
    images, specs = t2i_sets["mild"]
    a, b = judge.score_t2i(images, specs), loaded.score_t2i(images, specs)
    np.testing.assert_array_equal(a["per_sample"], b["per_sample"])
    assert a["fidelity_fd"] == b["fidelity_fd"]
    sources, especs, outputs = edit_sets
    np.testing.assert_array_equal(
        judge.score_edit(sources, outputs["mild"], especs)["per_sample"],
        loaded.score_edit(sources, outputs["mild"], especs)["per_sample"],
    )
    # overwrite replaces atomically; overwrite=False keeps the existing judge
    save_judge(loaded, path)
    assert sorted(os.listdir(tmp_path)) == ["j"]
    meta = json.loads((path / "judge.json").read_text())
    meta["thresholds"]["text/z"] = 123.0
    (path / "judge.json").write_text(json.dumps(meta))
    save_judge(judge, path, overwrite=False)
    assert load_judge(path).thresholds["text/z"] == 123.0


def test_load_errors(judge, tmp_path):
    with pytest.raises(ValueError, match="no toy judge"):
        load_judge(tmp_path / "missing")
    with pytest.raises(ValueError, match="local file system"):
        load_judge("gs://bucket/judge")
    path = save_judge(judge, tmp_path / "j")
    (path / "arrays.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="corrupt"):
        load_judge(path)
    path = save_judge(judge, tmp_path / "k")
    meta = json.loads((path / "judge.json").read_text())
    (path / "judge.json").write_text(json.dumps(dict(meta, version=-1)))
    with pytest.raises(ValueError, match="version"):
        load_judge(path)


def test_load_or_train_caches(judge, tmp_path, monkeypatch):
    calls = []

    def fake_train(**kw):
        calls.append(kw)
        return judge

    monkeypatch.setattr(judge_mod, "train_judge", fake_train)
    a = load_or_train_judge(tmp_path, size=32, seed=0, log=None)
    b = load_or_train_judge(tmp_path, size=32, seed=0, log=None)
    assert len(calls) == 1 and calls[0]["size"] == 32 and calls[0]["seed"] == 0
    assert a is judge and isinstance(b, ToyJudge) and b.thresholds == judge.thresholds
    load_or_train_judge(tmp_path, size=32, seed=1, log=None)  # another seed is another cache entry
    assert len(calls) == 2 and len(os.listdir(tmp_path)) == 2
    # an unreadable cache entry is retrained and replaced
    entry = next(p for p in tmp_path.iterdir() if "seed0" in p.name)
    (entry / "arrays.npz").write_bytes(b"junk")
    load_or_train_judge(tmp_path, size=32, seed=0, log=None)
    assert len(calls) == 3 and isinstance(load_judge(entry), ToyJudge)


# ----------------------------------------------------------------------------------------------- input checks
def test_bad_inputs_raise(judge, t2i_sets, edit_sets):
    images, specs = t2i_sets["real"]
    sources, especs, outputs = edit_sets
    bad_images = {
        "3-d": images[:, :, :, 0],
        "wrong size": np.zeros((2, 16, 16, 3), np.uint8),
        "float": images.astype(np.float32),
        "empty": images[:0],
        "4 channels": np.zeros((2, 32, 32, 4), np.uint8),
    }
    for x in bad_images.values():
        with pytest.raises(ValueError, match=r"uint8 array of shape \(N, 32, 32, 3\)"):
            judge.score_t2i(x, specs[: len(x)] if len(x) else [])
    with pytest.raises(ValueError, match="one spec dict per image"):
        judge.score_t2i(images, specs[:-1])
    with pytest.raises(ValueError, match="T2I spec"):
        judge.score_t2i(images[:1], [dict(specs[0], category="cityscape")])
    with pytest.raises(ValueError, match="not in"):
        judge.score_t2i(
            images[:1], [dict(specs[0], **{next(iter(judge_mod.T2I_ATTRIBUTES[specs[0]["category"]])): "purple"})]
        )
    with pytest.raises(ValueError, match="same shape"):
        judge.score_edit(sources, outputs["target"][:-1], especs)
    with pytest.raises(ValueError, match="sources must be"):
        judge.score_edit(sources[..., :2], outputs["target"], especs)
    with pytest.raises(ValueError, match="edit spec"):
        judge.score_edit(sources[:1], outputs["target"][:1], [specs[0]])


# ----------------------------------------------------------------------------------------------- probes
def test_probes_and_distances():
    rng = np.random.default_rng(0)
    flat = np.full((4, 32, 32, 3), 120, np.uint8)
    noisy = np.clip(flat + rng.normal(0, 10, flat.shape), 0, 255).astype(np.uint8)
    assert np.all(jm.noise_sigma(flat) == 0) and np.allclose(jm.noise_sigma(noisy), 10, atol=2)
    step = np.zeros((1, 32, 32, 3), np.uint8)
    step[:, :, 13:] = 200
    assert jm.sharpness(step)[0] == pytest.approx(1.0)
    blurred = judge_calib._blur(step[0], 1.5)[None]
    assert jm.sharpness(blurred)[0] < 0.6
    real = sample_t2i(rng, "landscape").image
    assert jm.blockiness(judge_calib._pixelate(real, 4)[None])[0] > 0.9
    assert jm.psnr(real[None], real[None])[0] == 60.0
    x = rng.normal(size=(500, 4))
    m, c = jm.mean_cov(x)
    assert jm.frechet_distance(m, c, m, c) == pytest.approx(0.0, abs=1e-6)
    assert jm.frechet_distance(m + np.array([3.0, 0, 0, 0]), c, m, c) == pytest.approx(9.0, rel=1e-6)
    assert jm.frechet_distance(np.zeros(2), np.eye(2) * 4, np.zeros(2), np.eye(2)) == pytest.approx(2.0)
    assert jm.region_mask([0.25, 0.5, 0.5, 1.0], 8).sum() == 2 * 4


def test_paired_differences_measure_the_shift_and_its_uncertainty():
    from qwen_flash_jax.eval import report

    rng = np.random.default_rng(0)
    ref = {c: rng.uniform(1, 5, 40).tolist() for c in ("a", "b")}
    shifted = {c: (np.asarray(v) + 0.5).tolist() for c, v in ref.items()}
    noisy = {c: (np.asarray(v) + 0.2 + rng.normal(0, 1.0, 40)).tolist() for c, v in ref.items()}
    results = {
        "ref": {"t2i_scores": ref},
        "shifted": {"t2i_scores": shifted},
        "noisy": {"t2i_scores": noisy},
        "old": {},
    }
    mean, low, high = report.paired_difference(results, "shifted", "ref", "t2i")
    assert mean == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)
    mean, low, high = report.paired_difference(results, "noisy", "ref", "t2i")
    assert low < mean < high and 0.2 < high - low < 0.8  # ~ 2 x 1.96 x 1.0 / sqrt(80)
    assert report.paired_difference(results, "old", "ref", "t2i") is None


def test_evaluate_reuses_the_cached_images_of_keyed_contenders(judge, tmp_path):
    from qwen_flash_jax.eval import report

    calls = []

    def contender(name, key, shade):
        def t2i(captions):
            calls.append(name)
            return np.full((len(captions), 32, 32, 3), shade, np.uint8)

        def edit(sources, instructions):
            calls.append(name)
            return np.clip(sources.astype(int) + shade // 4, 0, 255).astype(np.uint8)

        return report.Contender(name, 1, t2i, edit, cache_key=key)

    cache = tmp_path / "cache"
    kw = dict(size=32, prompts_per_category=2, edits_per_category=1, seed=3, image_cache=cache, log=lambda *_: None)
    per_contender = len(T2I_CATEGORIES) + len(EDIT_CATEGORIES)
    first = report.evaluate([contender("keyed", "k1", 100), contender("plain", None, 60)], judge, **kw)
    assert len(calls) == 2 * per_contender and len(list(cache.glob("*.npz"))) == 1
    calls.clear()
    assert report.evaluate([contender("keyed", "k1", 100), contender("plain", None, 60)], judge, **kw) == first
    assert calls == ["plain"] * per_contender  # the keyed contender's images came from the cache

    # Another key or other benchmark settings make another entry; an unreadable entry is generated again.
    for key, seed in (("k2", 3), ("k1", 4)):
        calls.clear()
        report.evaluate([contender("keyed", key, 100)], judge, **{**kw, "seed": seed})
        assert calls == ["keyed"] * per_contender
    for path in cache.glob("*.npz"):
        path.write_bytes(b"not an npz")
    calls.clear()
    assert report.evaluate([contender("keyed", "k1", 100)], judge, **kw)["keyed"] == first["keyed"]
    assert calls == ["keyed"] * per_contender
    assert not list(cache.glob(".*.tmp-*"))


def test_the_image_cache_key_follows_the_weights():
    from qwen_flash_jax.cache import params_fingerprint
    from qwen_flash_jax.train import distill_job

    tree = {"w": np.ones(3, np.float32), "b": {"c": np.zeros(2, np.float32)}}
    same = {"w": np.ones(3, np.float32), "b": {"c": np.zeros(2, np.float32)}}
    assert params_fingerprint(tree) == params_fingerprint(same)
    assert params_fingerprint(tree) != params_fingerprint({**tree, "w": np.array([1, 1, 2], np.float32)})
    assert params_fingerprint(tree) != params_fingerprint({**tree, "w": np.ones(3, np.float64)})
    assert distill_job._images_key(None, None, None) is None  # no digest (weights sharded over hosts): not cached
