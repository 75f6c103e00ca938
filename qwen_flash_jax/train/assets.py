"""Everything a job needs besides the transformers: data sources, tokenizer + frozen text encoder, latent codec.

Toy assets are built on first use and cached under `config.cache_dir` (default ~/.cache/qwen_flash_jax), keyed by
a hash of the config fields they depend on, so many runs (E1-E5, the ratio sweep ...) share one dataset and one
text encoder. Full-scale assets come from converted checkpoints given by path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Callable

import numpy as np

from qwen_flash_jax.data import pipeline as pipeline_lib
from qwen_flash_jax.data import world
from qwen_flash_jax.models.codec import SpaceToDepthCodec
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.text import encoder as text_encoder
from qwen_flash_jax.text.tokenizer import train_tokenizer
from qwen_flash_jax.train.conditioning import TaskSpec, task_specs


@dataclasses.dataclass
class Assets:
    sources: dict
    tokenizer: Any
    text_encoder: Any  # TextEncoderParams
    codec: Any
    prompts: pipeline_lib.PromptEncoder
    tasks: dict[str, TaskSpec]


def cache_root(config) -> pathlib.Path:
    root = config.get("cache_dir") or os.path.join(os.path.expanduser("~"), ".cache", "qwen_flash_jax")
    return pathlib.Path(root)


def config_hash(*parts) -> str:
    text = json.dumps([p.to_dict() if hasattr(p, "to_dict") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_assets(config, log: Callable[[str], None] = print) -> Assets:
    if config.text_encoder.kind != "toy" or config.codec.kind != "space_to_depth":
        raise ConfigError("the Qwen3-VL text encoder and the VAE are not ported yet: full-scale runs need "
                          "text_encoder.kind='toy' and codec.kind='space_to_depth' for now")
    codec = SpaceToDepthCodec(patch=int(config.codec.patch))
    channels = codec.latent_shape(config.data.image_size, config.data.image_size)[2]
    if channels != config.model.in_channels:
        raise ConfigError(f"codec gives {channels} latent channels but model.in_channels={config.model.in_channels}")
    check_text_encoder(config)
    sources = _sources(config, log)
    tokenizer, te_params = _toy_text_encoder(config, log)
    prompts = pipeline_lib.PromptEncoder(tokenizer, int(config.data.max_prompt_tokens))
    return Assets(sources, tokenizer, te_params, codec, prompts,
                  task_specs(prompts, codec, int(config.data.image_size)))


def _sources(config, log):
    from qwen_flash_jax.data import sources as sources_lib

    d = config.data
    if d.source == "toy_world":
        log(f"toy world data: {d.examples_per_category} records per category at {d.image_size}px")
        return sources_lib.toy_world_sources(cache_root(config) / "tfds", size=int(d.image_size),
                                             examples_per_category=int(d.examples_per_category), seed=int(d.seed))
    if d.source == "jsonl":
        parts = []
        kw = dict(size=int(d.image_size), on_bad_record=d.on_bad_record, image_root=d.image_root or None)
        if d.t2i_jsonl:
            parts.append(sources_lib.jsonl_t2i_sources(d.t2i_jsonl, **kw))
        if d.edit_jsonl:
            parts.append(sources_lib.jsonl_edit_sources(d.edit_jsonl, **kw))
        if not parts:
            raise ConfigError("data.source='jsonl' needs data.t2i_jsonl and/or data.edit_jsonl")
        return sources_lib.merge_sources(*parts)
    raise ConfigError(f"data.source must be 'toy_world' or 'jsonl', got {d.source!r}")


def check_text_encoder(config) -> None:
    """The toy encoder's feature layers and width against the model, from the config alone (before any work)."""
    te = config.text_encoder
    if te.kind != "toy":
        return
    layers = tuple(int(i) for i in te.get("feature_layers", (-1,)))
    depth = int(te.num_layers)
    if not layers or any(not -depth - 1 <= i <= depth for i in layers):
        raise ConfigError(f"text_encoder.feature_layers must be a non-empty list of indices in [{-depth - 1}, "
                          f"{depth}], got {list(layers)}")
    width = int(te.hidden_size) * len(layers)
    if width != int(config.model.context_in_dim):
        raise ConfigError(f"text encoder output width {width} (hidden_size {te.hidden_size} x {len(layers)} feature "
                          f"layers) != model.context_in_dim {config.model.context_in_dim}")


def _toy_text_encoder(config, log):
    te = config.text_encoder
    # Which layers make the features does not change the pretrained weights: one cache entry serves every choice.
    feature_layers = tuple(int(i) for i in te.get("feature_layers", (-1,)))
    weights_fields = {k: v for k, v in te.to_dict().items() if k != "feature_layers"}
    key = config_hash(weights_fields, config.data.image_size, "v1")
    path = cache_root(config) / "text_encoder" / key
    if path.exists():
        return _load_encoder(path, feature_layers)
    log(f"training the toy tokenizer and text encoder ({te.pretrain_steps} steps) -> {path}")
    texts = world_texts(int(config.data.image_size), per_category=300, seed=12345)
    tokenizer = train_tokenizer(texts, vocab_size=int(te.vocab_size))
    te_config = text_encoder.TextEncoderConfig.for_tokenizer(
        tokenizer, hidden_size=te.hidden_size, num_layers=te.num_layers, num_heads=te.num_heads,
        num_kv_heads=te.num_kv_heads, head_dim=te.head_dim, mlp_dim=te.mlp_dim,
        condition_channels=int(config.model.in_channels))
    params = text_encoder.pretrain_text_encoder(tokenizer, texts, te_config, steps=int(te.pretrain_steps), seed=0)
    text_encoder.save(path, params, tokenizer)
    return _load_encoder(path, feature_layers)


def _load_encoder(path, feature_layers):
    params, tokenizer = text_encoder.load(path)
    te_config = dataclasses.replace(params.config, feature_layers=feature_layers)  # checked by check_text_encoder
    return tokenizer, text_encoder.TextEncoderParams(te_config, params.state)


def world_texts(size: int, per_category: int, seed: int) -> list[str]:
    """Captions and edit instructions of the toy world: the tokenizer's and the encoder's training text."""
    rng = np.random.default_rng(seed)
    texts = [world.sample_t2i(rng, c, size).caption for c in world.T2I_CATEGORIES for _ in range(per_category)]
    texts += [world.sample_edit(rng, c, size).instruction for c in world.EDIT_CATEGORIES
              for _ in range(per_category // 2)]
    return texts
