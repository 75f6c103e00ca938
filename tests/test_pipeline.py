"""The grain pipeline: exact task ratios, category weights, process sharding, checkpointable state."""

import json
import threading

import jax
import numpy as np
import pytest

from qwen_flash_jax.data import pipeline
from qwen_flash_jax.data.mixing import parse_ratio, task_pattern
from qwen_flash_jax.models.codec import SpaceToDepthCodec
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.text.tokenizer import train_tokenizer
from tests.helpers import SIZE, pipeline_config, world_records


@pytest.fixture(scope="module")
def sources():
    return {task: {c: world_records(task, c, 12, 0) for c in cats} for task, cats in pipeline.CATEGORIES.items()}


@pytest.fixture(scope="module")
def tokenizer(sources):
    texts = [r["caption"] for recs in sources["t2i"].values() for r in recs]
    texts += [r["instruction"] for recs in sources["edit"].values() for r in recs]
    return train_tokenizer(texts, vocab_size=1024)


def _build(sources, tokenizer, **kwargs):
    config = pipeline_config(**{k: v for k, v in kwargs.items() if k not in ("process_index", "process_count")})
    return pipeline.build_pipeline(
        config,
        sources,
        tokenizer,
        SpaceToDepthCodec(patch=4),
        process_index=kwargs.get("process_index", 0),
        process_count=kwargs.get("process_count", 1),
    )


@pytest.mark.parametrize("ratio", ["9:1", "7:3", "5:5", "1:0", "0:1", "3:7"])
def test_every_window_of_batches_matches_the_ratio_exactly(sources, tokenizer, ratio):
    a, b = parse_ratio(ratio)
    it = iter(_build(sources, tokenizer, task_ratio=ratio))
    tasks = [next(it)["task"] for _ in range(3 * (a + b))]
    for start in range(0, len(tasks), a + b):
        window = tasks[start : start + a + b]
        assert window.count("t2i") == a and window.count("edit") == b


def test_slot_batches_give_every_position_of_a_step_the_exact_ratio(sources, tokenizer):
    """A consumer taking 4 batches per step (3 critic updates, then the generator) at 1:1: with one batch per slot
    its 4th batch would always be an edit; with 4 per slot each step is one task and the steps follow the pattern,
    also after a restore mid-slot."""
    config = pipeline_config(task_ratio="1:1")

    def build():
        return pipeline.build_pipeline(
            config,
            sources,
            tokenizer,
            SpaceToDepthCodec(patch=4),
            process_index=0,
            process_count=1,
            slot_batches=4,
        )

    it = iter(build())
    tasks = [next(it)["task"] for _ in range(16)]
    assert "".join(t[0] for t in tasks) == "tttteeeetttteeee"
    it = iter(build())
    for _ in range(6):
        next(it)
    state, rest = it.get_state(), [next(it)["task"] for _ in range(10)]
    restored = iter(build())
    restored.set_state(state)
    assert [next(restored)["task"] for _ in range(10)] == rest == tasks[6:]


def test_ratio_pattern_spreads_edits():
    assert "".join(t[0] for t in task_pattern((7, 3))) == "tetttettet"
    assert parse_ratio("5:5") == (1, 1)


def test_batches_have_fixed_shapes(sources, tokenizer):
    it = iter(_build(sources, tokenizer, task_ratio="1:1"))
    t2i, edit = next(it), next(it)
    tokens, channels = (SIZE // 4) ** 2, 48
    assert t2i["task"] == "t2i" and edit["task"] == "edit"
    assert t2i["target_latents"].shape == (4, tokens, channels)
    assert t2i["input_ids"].shape == t2i["attention_mask"].shape == (4, 160)
    assert edit["condition_latents"].shape == edit["target_latents"].shape == (4, tokens, channels)
    # Each edit prompt carries one image slot per 2x2 latent tokens of its condition image.
    pad_id = pipeline.PromptEncoder(tokenizer, 160).image_pad_id
    assert ((edit["input_ids"] == pad_id).sum(axis=1) == tokens // 4).all()
    # Right padding: valid tokens first.
    m = t2i["attention_mask"]
    assert (np.diff(m, axis=1) <= 0).all()


def test_edit_prompts_get_their_own_length_and_can_carry_the_condition_pixels(sources, tokenizer):
    config = pipeline_config(task_ratio="1:1", edit_prompt_tokens=192)
    it = iter(
        pipeline.build_pipeline(
            config,
            sources,
            tokenizer,
            SpaceToDepthCodec(patch=4),
            process_index=0,
            process_count=1,
            condition_pixels=True,
        )
    )
    t2i, edit = next(it), next(it)
    assert t2i["input_ids"].shape == (4, 160) and edit["input_ids"].shape == edit["attention_mask"].shape == (4, 192)
    assert "condition_pixels" not in t2i and edit["condition_pixels"].dtype == np.uint8
    assert edit["condition_pixels"].shape == (4, SIZE, SIZE, 3)
    # The pixels are the source image whose latents are the condition latents.
    latents = SpaceToDepthCodec(patch=4).encode(edit["condition_pixels"])
    np.testing.assert_array_equal(latents.reshape(4, -1, 48), edit["condition_latents"])
    with pytest.raises(pipeline.PromptTooLongError, match="data.edit_prompt_tokens is 20"):
        next(iter(_build(sources, tokenizer, task_ratio="0:1", edit_prompt_tokens=20)))


class _CountingCodec(SpaceToDepthCodec):
    """Records the thread and batch size of every encode call."""

    def __init__(self):
        super().__init__(patch=4)
        self.calls = []

    def encode(self, images):
        self.calls.append((threading.get_ident(), len(images)))
        return super().encode(images)


def test_images_are_encoded_a_batch_at_a_time_in_the_consumers_thread(sources, tokenizer):
    """grain's prefetch threads only prepare pixels; the codec (a jitted VAE at full scale) runs once per batch in
    the thread that draws it. Prompt-only T2I records get a black image's latents from one cached encode."""
    codec = _CountingCodec()
    it = iter(
        pipeline.build_pipeline(
            pipeline_config(task_ratio="1:1"), sources, tokenizer, codec, process_index=0, process_count=1
        )
    )
    next(it), next(it)
    assert codec.calls == [(threading.get_ident(), 4)] * 3  # T2I targets; edit sources and targets
    prompt_only = {"t2i": {c: [dict(r, image=None) for r in recs] for c, recs in sources["t2i"].items()}}
    codec = _CountingCodec()
    batches = iter(
        pipeline.build_pipeline(
            pipeline_config(task_ratio="1:0"), prompt_only, tokenizer, codec, process_index=0, process_count=1
        )
    )
    first, second = next(batches), next(batches)
    black = codec.pack(SpaceToDepthCodec(patch=4).encode(np.zeros((1, SIZE, SIZE, 3), np.uint8)))[0]
    for batch in (first, second):
        np.testing.assert_array_equal(batch["target_latents"], np.broadcast_to(black, (4,) + black.shape))
    assert codec.calls == [(threading.get_ident(), 1)]


def test_category_weights_select_categories(sources, tokenizer):
    it = iter(_build(sources, tokenizer, task_ratio="1:0", t2i_weights=dict(portrait=1.0)))
    cats = np.concatenate([next(it)["category"] for _ in range(5)])
    assert set(cats.tolist()) == {pipeline.CATEGORIES["t2i"].index("portrait")}
    it = iter(_build(sources, tokenizer, task_ratio="1:0", t2i_weights=dict(landscape=3.0, text=1.0)))
    cats = np.concatenate([next(it)["category"] for _ in range(25)])
    share = float(np.mean(cats == 0))
    assert set(cats.tolist()) == {0, 2} and abs(share - 0.75) < 0.05


def test_restored_iterator_yields_the_identical_stream(sources, tokenizer):
    it = iter(_build(sources, tokenizer))
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    restored = iter(_build(sources, tokenizer))
    restored.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    for want in expected:
        got = next(restored)
        assert got["task"] == want["task"]
        for key in want:
            if key != "task":
                np.testing.assert_array_equal(got[key], want[key])


def test_processes_read_disjoint_shards_of_one_stream(sources, tokenizer):
    single = iter(_build(sources, tokenizer, task_ratio="1:0", batch_size=4))
    shards = [
        iter(_build(sources, tokenizer, task_ratio="1:0", batch_size=4, process_index=i, process_count=2))
        for i in range(2)
    ]
    whole = np.concatenate([next(single)["target_latents"] for _ in range(2)])
    for i, shard in enumerate(shards):
        local = np.concatenate([next(shard)["target_latents"] for _ in range(2)])  # per-process batch = 4 / 2
        np.testing.assert_array_equal(local, whole[i::2])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(task_ratio="7-3"), "T2I:Edit"),
        (dict(task_ratio="0:0"), "not both zero"),
        (dict(t2i_weights=dict(landscape=-1.0)), "finite number >= 0"),
        (dict(t2i_weights=dict(beach=1.0)), "unknown t2i category"),
        (dict(t2i_weights=dict(landscape=0.0)), "all zero"),
        (dict(batch_size=3), None),
    ],
)
def test_invalid_config_is_a_clear_error(sources, tokenizer, overrides, match):
    if match is None:  # batch not divisible over processes
        with pytest.raises(ConfigError, match="divide"):
            _build(sources, tokenizer, process_count=2, **overrides)
        return
    with pytest.raises(ConfigError, match=match):
        _build(sources, tokenizer, **overrides)


def test_prompt_too_long_names_the_prompt(sources, tokenizer):
    it = iter(_build(sources, tokenizer, max_prompt_tokens=8))
    with pytest.raises(pipeline.PromptTooLongError, match="max_prompt_tokens"):
        next(it)


@pytest.mark.sharded
def test_global_arrays_are_sharded_over_the_batch(sources, tokenizer):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qwen_flash_jax.sharding import make_mesh

    mesh = make_mesh([("data", 2), ("fsdp", 4)])
    batch = next(iter(_build(sources, tokenizer, batch_size=8)))
    out = pipeline.to_global(batch, NamedSharding(mesh, P(("data", "fsdp"))))
    assert isinstance(out["target_latents"], jax.Array) and out["task"] == batch["task"]
    assert out["target_latents"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out["input_ids"]), batch["input_ids"])
