"""Everything a job needs besides the transformers: data sources, tokenizer + frozen text encoder, latent codec.

Toy assets are built on first use and cached (`qwen_flash_jax.cache`), keyed by
a hash of the config fields they depend on, so many runs (E1-E5, the ratio sweep ...) share one dataset and one
text encoder. Full-scale assets come from local Hugging Face directories given by path: the Qwen3-VL text encoder
(`text_encoder.kind="qwen3_vl"`, its tokenizer beside it or in the pipeline's `tokenizer/` folder) and the VAE
(`codec.kind="vae"`). Both are frozen and stored in the transformer's compute dtype.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable

import numpy as np
import transformers

from qwen_flash_jax import config_lib
from qwen_flash_jax.cache import cache_category, cache_root, config_hash
from qwen_flash_jax.data import edit_layouts, world
from qwen_flash_jax.data import pipeline as pipeline_lib
from qwen_flash_jax.data import sources as sources_lib
from qwen_flash_jax.diffusion.conditioning import TaskSpec, edit_spec, task_specs
from qwen_flash_jax.models.codec import SpaceToDepthCodec
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.models.vae_io import VAECodec, load_vae
from qwen_flash_jax.text import encoder as text_encoder
from qwen_flash_jax.text import prompts as prompt_lib
from qwen_flash_jax.text import qwen3_vl
from qwen_flash_jax.text.prompts import IMAGE_PAD, special_token_id
from qwen_flash_jax.text.tokenizer import train_tokenizer


@dataclasses.dataclass
class Assets:
    sources: dict
    tokenizer: Any
    text_encoder: Any  # TextEncoderParams (toy), or qwen3_vl.Qwen3VLParams
    codec: Any
    prompts: pipeline_lib.PromptEncoder
    # What the training batches hold, by their key: "t2i", "edit", and with `data.edit_layouts` one edit per layout
    # (`edit_layouts.task_key`: "edit" is the first layout).
    tasks: dict[str, TaskSpec]
    # What sampling and evaluation build from one square source image per edit (`eval.generate.Generator`).
    eval_tasks: dict[str, TaskSpec] | None = None

    def __post_init__(self):
        self.eval_tasks = self.eval_tasks or self.tasks

    @property
    def condition_pixels(self) -> bool:
        """Whether edit batches carry the condition image's pixels (the Qwen3-VL vision tower reads them)."""
        return getattr(self.text_encoder, "vision", None) is not None


TEXT_ENCODER_KINDS = ("toy", "qwen3_vl")
CODEC_KINDS = ("space_to_depth", "vae")
VAE_SCALE_FACTOR = 16  # pixels per latent side of Qwen-Image 2.x's VAE (the pipeline's `vae_scale_factor`)


def build_assets(config, log: Callable[[str], None] = print) -> Assets:
    check_text_encoder(config)
    codec = _codec(config, log)
    try:
        channels = codec.latent_shape(config.data.image_size, config.data.image_size)[2]
    except ValueError as e:
        raise ConfigError(f"data.image_size={config.data.image_size}: {e}") from None
    if channels != config.model.in_channels:
        raise ConfigError(f"codec gives {channels} latent channels but model.in_channels={config.model.in_channels}")
    sources = _sources(config, log)
    tokenizer, te_params = load_text_encoder(config, log)
    prompts = pipeline_lib.PromptEncoder.from_config(tokenizer, config.data)
    vision = getattr(te_params, "vision", None)
    try:
        eval_tasks = task_specs(prompts, codec, int(config.data.image_size), vision and vision.config)
    except ValueError as e:
        raise ConfigError(f"data.image_size={config.data.image_size}: {e}") from None
    layouts = edit_layouts.from_config(config.data)
    tasks = dict(eval_tasks) if layouts else eval_tasks
    for index, layout in enumerate(layouts):
        try:
            spec = edit_spec(prompts, codec, int(config.data.image_size), layout, vision and vision.config)
        except ValueError as e:
            raise ConfigError(f"data.edit_layouts, layout {[list(s) for s in layout]}: {e}") from None
        tasks[edit_layouts.task_key(index)] = spec
    return Assets(sources, tokenizer, te_params, codec, prompts, tasks, eval_tasks)


def load_text_encoder(config, log: Callable[[str], None] = print):
    """(tokenizer, frozen text encoder parameters) of the config's encoder (the toy one built on first use)."""
    if config.text_encoder.kind == "toy":
        return _toy_text_encoder(config, log)
    return _qwen3_vl_text_encoder(config, log)


def _sources(config, log):
    d = config.data
    if d.source == "toy_world" and edit_layouts.from_config(d):
        raise ConfigError("data.edit_layouts needs data.source='jsonl' (the toy world has one source per edit)")
    if d.source == "toy_world":
        log(f"toy world data: {d.examples_per_category} records per category at {d.image_size}px")
        return sources_lib.toy_world_sources(
            cache_root(config) / "tfds",
            size=int(d.image_size),
            examples_per_category=int(d.examples_per_category),
            seed=int(d.seed),
        )
    if d.source == "jsonl":
        parts = []
        kw = dict(size=int(d.image_size), on_bad_record=d.on_bad_record, image_root=d.image_root or None)
        if d.t2i_jsonl:
            parts.append(sources_lib.jsonl_t2i_sources(d.t2i_jsonl, **kw))
        if d.edit_jsonl:
            # Edits of a given layout read their images at their own sizes: the input pipeline fits each one.
            layout = bool(edit_layouts.from_config(d))
            parts.append(sources_lib.jsonl_edit_sources(d.edit_jsonl, **(kw | dict(size=None) if layout else kw)))
        if not parts:
            raise ConfigError("data.source='jsonl' needs data.t2i_jsonl and/or data.edit_jsonl")
        return sources_lib.merge_sources(*parts)
    raise ConfigError(f"data.source must be 'toy_world' or 'jsonl', got {d.source!r}")


def latent_scale(config) -> int:
    """Pixels per latent token side, from the config alone (the VAE's is checked against it when it is loaded)."""
    return int(config.codec.patch) if config.codec.kind == "space_to_depth" else VAE_SCALE_FACTOR


def check_text_encoder(config) -> None:
    """Kinds, paths, and the toy encoder's feature layers and width against the model, from the config alone
    (before any work)."""
    te = config.text_encoder
    if te.kind not in TEXT_ENCODER_KINDS:
        raise ConfigError(f"text_encoder.kind must be one of {TEXT_ENCODER_KINDS}, got {te.kind!r}")
    if config.codec.kind not in CODEC_KINDS:
        raise ConfigError(f"codec.kind must be one of {CODEC_KINDS}, got {config.codec.kind!r}")
    for section, kind in (("text_encoder", "qwen3_vl"), ("codec", "vae")):
        if config[section].kind == kind and not os.path.isdir(config[section].path or ""):
            what = " is not set" if not config[section].path else f"={config[section].path!r} is not a directory"
            raise ConfigError(f"{section}.kind={kind!r} needs a local checkpoint directory: {section}.path{what}")
    if te.kind != "toy":
        return
    layers = tuple(int(i) for i in te.get("feature_layers", (-1,)))
    depth = int(te.num_layers)
    if not layers or any(not -depth - 1 <= i <= depth for i in layers):
        raise ConfigError(
            f"text_encoder.feature_layers must be a non-empty list of indices in [{-depth - 1}, "
            f"{depth}], got {list(layers)}"
        )
    width = int(te.hidden_size) * len(layers)
    if width != int(config.model.context_in_dim):
        raise ConfigError(
            f"text encoder output width {width} (hidden_size {te.hidden_size} x {len(layers)} feature "
            f"layers) != model.context_in_dim {config.model.context_in_dim}"
        )


def _codec(config, log):
    if config.codec.kind == "space_to_depth":
        return SpaceToDepthCodec(patch=int(config.codec.patch))
    log(f"loading the VAE from {config.codec.path}")
    codec = VAECodec(load_vae(config.codec.path, dtype=config_lib.frozen_dtype(config)))
    if codec.scale_factor != VAE_SCALE_FACTOR:
        raise ConfigError(
            f"{config.codec.path}: the VAE downsamples by {codec.scale_factor}, Qwen-Image 2.x's by {VAE_SCALE_FACTOR}"
        )
    return codec


def _qwen3_vl_text_encoder(config, log):
    path = pathlib.Path(config.text_encoder.path)
    # What config.json and the tokenizer say is checked before the minutes it takes to read an 8B checkpoint.
    te_config = qwen3_vl.read_config(path)
    if te_config.output_size != int(config.model.context_in_dim):
        raise ConfigError(
            f"{path}: the text encoder's hidden size {te_config.output_size} != model.context_in_dim "
            f"{config.model.context_in_dim}"
        )
    tokenizer = hf_tokenizer(path)
    if te_config.image_pad_id not in (None, special_token_id(tokenizer, IMAGE_PAD)):
        raise ConfigError(
            f"{path}: the tokenizer's {IMAGE_PAD} id {special_token_id(tokenizer, IMAGE_PAD)} is not "
            f"the model's image_token_id {te_config.image_pad_id}"
        )
    log(f"loading the Qwen3-VL text encoder from {path}")
    # Sharded like the transformer (its logical axes, the config's rules): a replicated 8B encoder would not fit
    # beside the models on a 16 GiB chip.
    mesh = config_lib.make_mesh(config)
    params = qwen3_vl.load_qwen3_vl(path, dtype=config_lib.frozen_dtype(config), mesh=mesh, rules=config.mesh.rules)
    if params.vision is None and pipeline_lib.mixing.parse_ratio(config.data.task_ratio)[1]:
        raise ConfigError(
            f"{path}: the checkpoint has no vision tower (model.visual.*), which edits need; "
            "use the full Qwen3-VL checkpoint or data.task_ratio='1:0'"
        )
    return tokenizer, params


def hf_tokenizer(text_encoder_path: pathlib.Path):
    """The tokenizer beside the text encoder, or in the diffusers pipeline's `tokenizer/` or `processor/` folder."""
    for candidate in (
        text_encoder_path,
        text_encoder_path.parent / "tokenizer",
        text_encoder_path.parent / "processor",
    ):
        if (candidate / "tokenizer_config.json").exists() or (candidate / "tokenizer.json").exists():
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(candidate), local_files_only=True)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{candidate}: cannot load the tokenizer: {' '.join(str(e).split())}") from None
            try:
                special_token_id(tokenizer, IMAGE_PAD)
                prompt_lib.system_prefix_len(tokenizer)
            except ValueError as e:
                raise ConfigError(f"{candidate}: not a Qwen tokenizer: {e}") from None
            if tokenizer.pad_token_id is None:
                raise ConfigError(f"{candidate}: the tokenizer has no pad token")
            return tokenizer
    raise ConfigError(
        f"no tokenizer beside {text_encoder_path} (tokenizer.json / tokenizer_config.json there, or "
        "in the pipeline's tokenizer/ or processor/ folder)"
    )


def toy_text_encoder_config(config, tokenizer, **overrides) -> text_encoder.TextEncoderConfig:
    """The toy text encoder's architecture from `config.text_encoder`, sized for `tokenizer`."""
    te = config.text_encoder
    return text_encoder.TextEncoderConfig.for_tokenizer(
        tokenizer,
        hidden_size=te.hidden_size,
        num_layers=te.num_layers,
        num_heads=te.num_heads,
        num_kv_heads=te.num_kv_heads,
        head_dim=te.head_dim,
        mlp_dim=te.mlp_dim,
        condition_channels=int(config.model.in_channels),
        **overrides,
    )


def _toy_text_encoder(config, log):
    te = config.text_encoder
    feature_layers = tuple(int(i) for i in te.get("feature_layers", (-1,)))
    path = cache_category(config, "text_encoder", log) / toy_text_encoder_key(config)
    if path.exists():
        return _load_encoder(path, feature_layers)
    log(f"training the toy tokenizer and text encoder ({te.pretrain_steps} steps) -> {path}")
    texts = world_texts(int(config.data.image_size), per_category=300, seed=12345)
    tokenizer = train_tokenizer(texts, vocab_size=int(te.vocab_size))
    te_config = toy_text_encoder_config(config, tokenizer)
    params = text_encoder.pretrain_text_encoder(tokenizer, texts, te_config, steps=int(te.pretrain_steps), seed=0)
    text_encoder.save(path, params, tokenizer)
    return _load_encoder(path, feature_layers)


def toy_text_encoder_key(config) -> str:
    """The toy text encoder's cache key: which layers make the features does not change the pretrained weights, so
    one entry serves every choice."""
    weights_fields = {k: v for k, v in config.text_encoder.to_dict().items() if k != "feature_layers"}
    return config_hash(weights_fields, config.data.image_size, "v1")


def _load_encoder(path, feature_layers):
    params, tokenizer = text_encoder.load(path)
    te_config = dataclasses.replace(params.config, feature_layers=feature_layers)  # checked by check_text_encoder
    return tokenizer, text_encoder.TextEncoderParams(te_config, params.state)


def world_texts(size: int, per_category: int, seed: int) -> list[str]:
    """Captions and edit instructions of the toy world: the tokenizer's and the encoder's training text."""
    rng = np.random.default_rng(seed)
    texts = [world.sample_t2i(rng, c, size).caption for c in world.T2I_CATEGORIES for _ in range(per_category)]
    texts += [
        world.sample_edit(rng, c, size).instruction for c in world.EDIT_CATEGORIES for _ in range(per_category // 2)
    ]
    return texts
