"""Toy tokenizer, Qwen-Image prompt conventions and the toy text encoder.

The prompt conventions are checked against diffusers' `QwenImage21Pipeline` itself: the pipeline is built with a
stub processor (our tokenizer, expanding `<|image_pad|>` as the toy world does) and a stub text encoder (our JAX
encoder), and its `_get_qwen_prompt_embeds` must agree with `encode_prompts`.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from qwen_flash_jax.models.codec import SpaceToDepthCodec
from qwen_flash_jax.models.layout import make_layout
from qwen_flash_jax.text import encoder as enc
from qwen_flash_jax.text import prompts as P
from qwen_flash_jax.text.prompts import IMAGE_PAD, special_token_id
from qwen_flash_jax.text.tokenizer import PAD, SPECIAL_TOKENS, train_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "ring"]
PLACES = ["top left corner", "top right corner", "bottom left corner", "bottom right corner", "centre"]


def make_captions(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} in the {rng.choice(PLACES)} on a {rng.choice(COLOURS)} "
        "background"
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def captions():
    return make_captions(300)


@pytest.fixture(scope="module")
def tokenizer(captions):
    return train_tokenizer(captions, vocab_size=400)


@pytest.fixture(scope="module")
def params(tokenizer):
    return enc.init_params(enc.TextEncoderConfig.for_tokenizer(tokenizer), seed=0)


# --- tokenizer ------------------------------------------------------------------------------------------------------


def test_special_tokens_are_single_ids_and_text_round_trips(tokenizer):
    ids = [special_token_id(tokenizer, t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert tokenizer.pad_token == PAD and tokenizer.pad_token_id == ids[0]
    assert tokenizer.padding_side == "left"
    text = P.build_prompt("a red circle, ünïcode ✓ and <|image_pad|>-like text", 2)
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(encoded) == text
    assert encoded.count(special_token_id(tokenizer, IMAGE_PAD)) == 3


def test_tokenizer_save_load_and_determinism(tokenizer, captions, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    text = P.build_prompt("a green star", 1)
    for cls in (transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer):
        loaded = cls.from_pretrained(str(tmp_path))
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.padding_side == "left" and loaded.pad_token == PAD
    again = train_tokenizer(captions, vocab_size=400)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.encode(text) == tokenizer.encode(text)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(captions, vocab_size=100)


# --- prompt conventions -----------------------------------------------------------------------------------------------


class _StubProcessor:
    """Qwen3-VL processor stand-in: our tokenizer, `<|image_pad|>` expanded to one pad per 2x2 latent tokens."""

    def __init__(self, tokenizer, codec):
        self.tokenizer, self.codec = tokenizer, codec
        self.texts = []

    def apply_chat_template(self, messages, tokenize, return_dict):
        assert tokenize and not return_dict
        (message,) = messages
        text = f"<|im_start|>{message['role']}\n{message['content'][0]['text']}<|im_end|>\n"
        return [self.tokenizer.encode(text)]

    def __call__(self, text, images=None, padding=True, padding_side="left", return_tensors="pt"):
        import torch

        assert padding and padding_side == "left" and return_tensors == "pt"
        self.texts.extend(text)
        pad = special_token_id(self.tokenizer, IMAGE_PAD)
        latents, shapes = [], []
        for image in images or []:
            lat = self.codec.encode(np.asarray(image)[None])
            latents.append(self.codec.pack(lat))
            shapes.append(lat.shape[1:3])
        rows, k = [], 0
        for t in text:
            row = []
            for i in self.tokenizer.encode(t):
                if i == pad:
                    h, w = shapes[k]
                    row += [pad] * (h * w // 4)
                    k += 1
                else:
                    row.append(i)
            rows.append(row)
        length = max(map(len, rows))
        ids = [[self.tokenizer.pad_token_id] * (length - len(r)) + r for r in rows]
        mask = [[0] * (length - len(r)) + [1] * len(r) for r in rows]
        data = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if images:
            data["pixel_values"] = [torch.from_numpy(np.asarray(x)) for x in latents]
            data["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in shapes])
        return transformers.BatchFeature(data)


def _stub_text_encoder(params, num_prompts):
    import torch

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.norm = torch.nn.Identity()

        def forward(self, input_ids, attention_mask, output_hidden_states, pixel_values=None, image_grid_thw=None):
            assert output_hidden_states
            latents = shapes = None
            if pixel_values is not None:  # one set of images per prompt, in placeholder order: take the first set
                n = len(pixel_values) // num_prompts
                latents = [jnp.asarray(x.numpy()) for x in pixel_values[:n]]
                shapes = [tuple(int(v) for v in g[1:]) for g in image_grid_thw[:n]]
            hidden = enc.encode(params, input_ids.numpy(), attention_mask.numpy(), latents, shapes)
            return transformers.modeling_outputs.BaseModelOutput(hidden_states=(torch.from_numpy(np.array(hidden)),))

    return Stub()


def _pipeline(tokenizer, params, codec, num_prompts):
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline

    processor = _StubProcessor(tokenizer, codec)
    pipe = QwenImage21Pipeline(
        scheduler=None,
        vae=None,
        text_encoder=_stub_text_encoder(params, num_prompts),
        processor=processor,
        transformer=None,
    )
    return pipe, processor


@pytest.mark.parity
def test_templates_match_diffusers(tokenizer, params):
    pipe, _ = _pipeline(tokenizer, params, SpaceToDepthCodec(), 1)
    assert P.PROMPT_TEMPLATE_T2I == pipe.prompt_template_t2i
    assert P.PROMPT_TEMPLATE_TI2I == pipe.prompt_template_ti2i
    assert P.SYSTEM_PROMPT == pipe.sys_prompt
    assert P.system_prefix_len(tokenizer) == pipe._drop_idx
    assert special_token_id(tokenizer, IMAGE_PAD) == pipe._img_token_id
    assert P.build_prompt("", 0) == pipe.prompt_template_t2i.format(" ")


@pytest.mark.parity
@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_pipeline_parity(tokenizer, params, num_images):
    """The diffusers pipeline's prompt path, run with our tokenizer and encoder, equals encode_prompts."""
    import torch

    codec = SpaceToDepthCodec(patch=4)
    rng = np.random.default_rng(num_images)
    sizes = [(16, 24), (32, 16), (8, 8)][:num_images]  # pixels -> (4, 6), (8, 4), (2, 2) latent tokens
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    prompts = ["a red circle in the centre", "", "a blue star on a white background with a ring"]
    pipe, processor = _pipeline(tokenizer, params, codec, len(prompts))

    with torch.no_grad():
        ref_embeds, ref_mask, ref_slots = pipe._get_qwen_prompt_embeds(prompts, images or None, torch.device("cpu"))
    assert processor.texts == [P.build_prompt(p, num_images) for p in prompts]

    lat = [codec.encode(im[None]) for im in images]
    embeds, mask, slots = enc.encode_prompts(
        params, tokenizer, prompts, [codec.pack(x) for x in lat] or None, [x.shape[1:3] for x in lat] or None
    )
    np.testing.assert_allclose(embeds, ref_embeds.numpy(), atol=1e-6)
    np.testing.assert_array_equal(mask, ref_mask.numpy().astype(bool))
    np.testing.assert_array_equal(slots, ref_slots.numpy())
    expected_slots = sum(h * w // 16 // 4 for h, w in sizes)
    assert (slots.sum(axis=1) == expected_slots).all()

    # With the target's slots appended, the layout the transformer builds accepts it.
    target_shape = (1, 4, 4)
    img_mask = P.append_target_slots(slots, 16)
    layout = make_layout([(1, x.shape[1], x.shape[2]) for x in lat] + [target_shape], img_mask)
    assert layout.text_len == embeds.shape[1]


def test_left_padding_and_extraction(tokenizer):
    prompts = ["a red circle", "a purple triangle in the bottom right corner on a black background"]
    slots = [4, 6]
    batch = P.tokenize_prompts(tokenizer, prompts, slots)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad_id, image_pad = tokenizer.pad_token_id, batch["image_pad_id"]
    for b, prompt in enumerate(prompts):
        single = P.tokenize_prompts(tokenizer, [prompt], slots)["input_ids"][0]
        n = len(single)
        assert mask[b].sum() == n and (mask[b, -n:] == 1).all() and (mask[b, :-n] == 0).all()  # left padded
        np.testing.assert_array_equal(ids[b, -n:], single)
        assert (ids[b, :-n] == pad_id).all()
        assert (single == image_pad).sum() == sum(slots)
    # Runs of pads: 4 for the first image, then 6 for the second.
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, (ids[0] == image_pad).astype(int), 0])))[::2]
    assert runs.tolist() == slots

    drop = batch["drop_idx"]
    hidden = np.random.default_rng(0).normal(size=ids.shape + (5,)).astype(np.float32)
    embeds, pmask, smask = P.extract_prompt_embeds(hidden, ids, mask, drop, image_pad)
    lengths = mask.sum(axis=1) - drop
    assert embeds.shape == (2, lengths.max(), 5)
    for b in range(2):
        valid_rows = hidden[b][mask[b].astype(bool)]
        np.testing.assert_array_equal(embeds[b, : lengths[b]], valid_rows[drop:])  # system prefix dropped
        assert (embeds[b, lengths[b] :] == 0).all()  # right padded
        assert pmask[b, : lengths[b]].all() and not pmask[b, lengths[b] :].any()
        assert smask[b].sum() == sum(slots) and not smask[b, lengths[b] :].any()
        kept_ids = ids[b][mask[b].astype(bool)][drop:]
        assert tokenizer.convert_ids_to_tokens(int(kept_ids[0])) == "<|im_start|>"  # the user turn starts
    np.testing.assert_array_equal(P.append_target_slots(smask, 8)[:, -2:], True)
    with pytest.raises(ValueError, match="2x2 slots"):
        P.append_target_slots(smask, 6)
    with pytest.raises(ValueError, match="placeholders"):
        P.tokenize_prompts(tokenizer, ["sneaky <|image_pad|>"], [4])


# --- encoder ---------------------------------------------------------------------------------------------------------


def test_params_have_logical_axes(params):
    flat = list(nnx.to_flat_state(params.state))
    assert flat
    for path, variable in flat:
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.ndim, path


def test_encoder_is_causal(tokenizer, params):
    batch = P.tokenize_prompts(tokenizer, ["a red circle in the centre", "a red circle in the centre"])
    ids = batch["input_ids"].copy()
    ids[1, -6] = tokenizer.convert_tokens_to_ids("Ġgreen")  # the caption's last word, before the closing template
    assert (ids[0] != ids[1]).sum() == 1
    hidden = np.asarray(enc.encode(params, ids, batch["attention_mask"]))
    assert hidden.dtype == np.float32 and hidden.shape == ids.shape + (params.config.hidden_size,)
    np.testing.assert_array_equal(hidden[0, :-6], hidden[1, :-6])
    assert (np.abs(hidden[0, -6:] - hidden[1, -6:]).max(axis=-1) > 1e-4).all()


def test_encoder_left_padding_invariance(tokenizer, params):
    short = "a red circle"
    alone = P.tokenize_prompts(tokenizer, [short])
    batch = P.tokenize_prompts(tokenizer, [short, "a purple triangle in the bottom right corner on a black background"])
    n = alone["input_ids"].shape[1]
    assert batch["input_ids"].shape[1] > n
    h_alone = np.asarray(enc.encode(params, alone["input_ids"], alone["attention_mask"]))[0]
    h_batch = np.asarray(enc.encode(params, batch["input_ids"], batch["attention_mask"]))[0, -n:]
    np.testing.assert_allclose(h_batch, h_alone, atol=1e-5)
    assert np.isfinite(np.asarray(enc.encode(params, batch["input_ids"], batch["attention_mask"]))).all()


def test_condition_images_reach_the_slots(tokenizer, params):
    rng = np.random.default_rng(0)
    shapes = [(4, 6), (2, 2)]
    latents = [rng.normal(size=(1, h * w, 48)).astype(np.float32) for h, w in shapes]
    batch = P.tokenize_prompts(tokenizer, ["a red circle"], P.condition_slots_for(shapes))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    base = np.asarray(enc.encode(params, ids, mask, latents, shapes))[0]
    # Change 2x2 group (0, 1) of the first image's 2x3 grid of groups: its slot (the 2nd) and everything after change.
    changed = [latents[0].copy(), latents[1]]
    grid = changed[0].reshape(4, 6, 48)
    grid[0:2, 2:4] += 1.0  # group (0, 1)
    other = np.asarray(enc.encode(params, ids, mask, changed, shapes))[0]
    slot_positions = np.flatnonzero(ids[0] == batch["image_pad_id"])
    first_changed = slot_positions[1]
    np.testing.assert_array_equal(base[:first_changed], other[:first_changed])
    assert np.abs(base[first_changed] - other[first_changed]).max() > 1e-3
    assert np.abs(base[-1] - other[-1]).max() > 1e-4
    with pytest.raises(ValueError, match="slots"):
        enc.encode(params, ids, mask, latents[:1], shapes[:1])


def test_pretraining_lowers_the_loss_and_save_load(tokenizer, captions, tmp_path):
    config = enc.TextEncoderConfig.for_tokenizer(tokenizer)
    held_out = P.tokenize_prompts(tokenizer, make_captions(64, seed=1))
    before = float(enc.lm_loss(enc.init_params(config, seed=0), held_out["input_ids"], held_out["attention_mask"]))
    trained = enc.pretrain_text_encoder(tokenizer, captions, config, steps=150, seed=0)
    after = float(enc.lm_loss(trained, held_out["input_ids"], held_out["attention_mask"]))
    assert after < 0.25 * before, (before, after)

    path = tmp_path / "text_encoder"
    enc.save(path, trained, tokenizer)
    enc.save(path, trained, tokenizer)  # overwrites atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text_encoder"]
    loaded, loaded_tok = enc.load(path)
    assert loaded.config == trained.config
    batch = P.tokenize_prompts(loaded_tok, ["a white ring in the centre"])
    np.testing.assert_array_equal(
        np.asarray(enc.encode(loaded, batch["input_ids"], batch["attention_mask"])),
        np.asarray(enc.encode(trained, batch["input_ids"], batch["attention_mask"])),
    )


def test_feature_layers_concatenate_normalised_states(tokenizer, params):
    batch = P.tokenize_prompts(tokenizer, ["a red circle in the centre", "a blue star"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    last = np.asarray(enc.encode(params, ids, mask))
    model = enc._model(params)
    np.testing.assert_allclose(last, np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), rtol=1e-5, atol=1e-5)

    two = enc.TextEncoderParams(dataclasses.replace(params.config, feature_layers=(0, -1)), params.state)
    assert two.config.output_size == 2 * params.config.hidden_size
    features = np.asarray(enc.encode(two, ids, mask))
    assert features.shape == ids.shape + (two.config.output_size,)
    embeddings = np.asarray(params.state["embed"][...])[ids]

    def rms_normalise(x):
        return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + 1e-6)

    d = params.config.hidden_size
    np.testing.assert_allclose(features[..., :d], rms_normalise(embeddings), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features[..., d:], rms_normalise(last), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layers", [(), (3,), (-4,)])
def test_feature_layers_out_of_range_are_rejected(tokenizer, layers):
    with pytest.raises(ValueError, match="feature_layers"):
        enc.TextEncoderConfig.for_tokenizer(tokenizer, num_layers=2, feature_layers=layers)
