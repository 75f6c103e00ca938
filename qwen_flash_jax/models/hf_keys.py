"""The one mapping between diffusers' state-dict keys and this port's parameter tree.

Conversion (`qwen_flash_jax.convert`) and the parity tests both go through `param_spec`, so there is exactly one
place that knows how a torch `Linear.weight` becomes a Flax kernel.

Layout of the parameter tree (nested dicts, leaves are arrays):
  * torch `nn.Linear.weight` is `(out, in)`; our `kernel` is `(in, out)`, i.e. transposed.
  * the per-layer tensors of `transformer_blocks.{i}.*` are stacked on a leading `layers` axis under `blocks/`, so
    the blocks can run under `jax.lax.scan`.
  * norm weights keep their checkpoint values (the zero-centred text norm stores `scale - 1`, as diffusers does).
"""

from __future__ import annotations

import dataclasses
import re

from qwen_flash_jax.models.config import TransformerConfig

# diffusers key (without the `transformer_blocks.{i}.` prefix) -> (our path, is a Linear weight).
_TOP_LEVEL = {
    "img_in.weight": (("img_in", "kernel"), True),
    "txt_in.text_norm.weight": (("txt_in", "text_norm", "scale"), False),
    "txt_in.in_layer.weight": (("txt_in", "in_layer", "kernel"), True),
    "txt_in.out_layer.weight": (("txt_in", "out_layer", "kernel"), True),
    "time_text_embed.timestep_embedder.linear_1.weight": (("time_embed", "linear_1", "kernel"), True),
    "time_text_embed.timestep_embedder.linear_2.weight": (("time_embed", "linear_2", "kernel"), True),
    "modulation.1.weight": (("modulation", "kernel"), True),
    "norm_out.linear.weight": (("norm_out", "linear", "kernel"), True),
    "proj_out.weight": (("proj_out", "kernel"), True),
}
_PER_LAYER = {
    "attn.to_q.weight": (("blocks", "attn", "to_q", "kernel"), True),
    "attn.to_k.weight": (("blocks", "attn", "to_k", "kernel"), True),
    "attn.to_v.weight": (("blocks", "attn", "to_v", "kernel"), True),
    "attn.to_out.0.weight": (("blocks", "attn", "to_out", "kernel"), True),
    "attn.norm_q.weight": (("blocks", "attn", "norm_q", "scale"), False),
    "attn.norm_k.weight": (("blocks", "attn", "norm_k", "scale"), False),
    "img_mlp.proj.weight": (("blocks", "mlp", "proj", "kernel"), True),
    "img_mlp.gate_layer.weight": (("blocks", "mlp", "gate_layer", "kernel"), True),
    "img_mlp.out.weight": (("blocks", "mlp", "out", "kernel"), True),
}
_LAYER_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Where one diffusers tensor goes."""

    path: tuple[str, ...]  # path in our parameter tree
    layer: int | None  # index on the stacked `layers` axis, None for top-level tensors
    transpose: bool  # torch Linear (out, in) -> kernel (in, out)
    torch_shape: tuple[int, ...]  # shape the diffusers tensor must have


def param_spec(key: str, config: TransformerConfig) -> ParamSpec | None:
    """Maps a diffusers key to its place in our tree; None for a key the model does not have."""
    shapes = _torch_shapes(config)
    if key in _TOP_LEVEL:
        path, transpose = _TOP_LEVEL[key]
        return ParamSpec(path, None, transpose, shapes[key])
    match = _LAYER_KEY.match(key)
    if match and match.group(2) in _PER_LAYER:
        layer = int(match.group(1))
        if layer >= config.num_layers:
            return None
        path, transpose = _PER_LAYER[match.group(2)]
        return ParamSpec(path, layer, transpose, shapes[match.group(2)])
    return None


def expected_keys(config: TransformerConfig) -> list[str]:
    """Every key a complete diffusers checkpoint of this config has."""
    keys = list(_TOP_LEVEL)
    for i in range(config.num_layers):
        keys += [f"transformer_blocks.{i}.{k}" for k in _PER_LAYER]
    return keys


def param_shapes(config: TransformerConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every leaf of our parameter tree (stacked blocks included), keyed by path."""
    shapes = _torch_shapes(config)
    out = {}
    for key, (path, transpose) in _TOP_LEVEL.items():
        out[path] = tuple(reversed(shapes[key])) if transpose else shapes[key]
    for key, (path, transpose) in _PER_LAYER.items():
        shape = tuple(reversed(shapes[key])) if transpose else shapes[key]
        out[path] = (config.num_layers, *shape)
    return out


def _torch_shapes(c: TransformerConfig) -> dict[str, tuple[int, ...]]:
    d, hd = c.inner_dim, c.attention_head_dim
    patch = c.patch_size * c.patch_size
    return {
        "img_in.weight": (d, c.in_channels * patch),
        "txt_in.text_norm.weight": (c.context_in_dim,),
        "txt_in.in_layer.weight": (d, c.context_in_dim),
        "txt_in.out_layer.weight": (d, d),
        "time_text_embed.timestep_embedder.linear_1.weight": (d, 256),
        "time_text_embed.timestep_embedder.linear_2.weight": (d, d),
        "modulation.1.weight": (4 * d, d),
        "norm_out.linear.weight": (d, d),
        "proj_out.weight": (patch * c.resolved_out_channels, d),
        "attn.to_q.weight": (d, d),
        "attn.to_k.weight": (d, d),
        "attn.to_v.weight": (d, d),
        "attn.to_out.0.weight": (d, d),
        "attn.norm_q.weight": (hd,),
        "attn.norm_k.weight": (hd,),
        "img_mlp.proj.weight": (c.mlp_dim, d),
        "img_mlp.gate_layer.weight": (c.mlp_dim, d),
        "img_mlp.out.weight": (d, c.mlp_dim),
    }


def state_dict_to_params(state_dict, config: TransformerConfig, dtype=None) -> dict:
    """In-memory conversion of a full diffusers state dict (numpy-convertible values) to our nested params.

    For tests and small models; the CLI converter streams instead.
    """
    import numpy as np

    shapes = param_shapes(config)
    stacked: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state_dict.items():
        spec = param_spec(key, config)
        if spec is None:
            raise KeyError(f"unexpected key {key!r}")
        array = np.asarray(value)
        if tuple(array.shape) != spec.torch_shape:
            raise ValueError(f"{key}: shape {tuple(array.shape)} != expected {spec.torch_shape}")
        if spec.transpose:
            array = array.T
        if dtype is not None:
            array = array.astype(dtype)
        if spec.layer is None:
            stacked[spec.path] = array
        else:
            if spec.path not in stacked:
                stacked[spec.path] = np.zeros(shapes[spec.path], array.dtype)
            stacked[spec.path][spec.layer] = array
    missing = set(expected_keys(config)) - set(state_dict)
    if missing:
        raise KeyError(f"missing keys: {sorted(missing)[:5]} ...")
    return unflatten(stacked)


def unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree
