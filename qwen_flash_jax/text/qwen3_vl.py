"""The text path of Qwen-Image 2.x's real text encoder: a Hugging Face Qwen3-VL checkpoint -> `TextEncoderParams`.

    params = load_text_encoder("<dir with config.json and *.safetensors>")   # TextEncoderParams, float32
    hidden = encoder.encode(params, input_ids, attention_mask)                # (B, S, hidden_size)

Only the language model is read (`model.language_model.*` in a `Qwen3VLForConditionalGeneration` checkpoint);
the vision tower (`model.visual.*`) and the LM head (`lm_head.weight`) are ignored. The weights go into the same
decoder as the toy world's (`qwen_flash_jax.text.encoder`), with `condition_channels=0` and `image_pad_id=None`:
no toy condition projection, and no images at all, since those need the vision tower and deepstack (not ported).

Why the toy decoder is the real one, for text-only input (checked numerically by tests/test_qwen3_vl_text.py):
  * Layers: Qwen3VLTextDecoderLayer is the Qwen3 layer the toy implements: pre-norm RMSNorm, grouped-query
    attention with a per-head RMSNorm on q and k before the rotary embedding, scale head_dim**-0.5, no biases
    (`attention_bias` must be false), SwiGLU MLP (`hidden_act` must be silu).
  * Rotary embedding: Qwen3-VL's interleaved M-RoPE gives each frequency pair the position of one of three
    streams (temporal, height, width). Without images transformers feeds the same positions to all three streams,
    so every pair is rotated by (position x inv_freq) exactly as in 1-D RoPE with the same theta, in the same
    rotate-half layout. `mrope_section` then does not matter and is not read.
  * Positions under left padding: for text-only input transformers does NOT count positions from the mask; the
    language model gets arange(S) for every row, so a row with p padding tokens starts at position p. The toy
    encoder counts from the first real token (mask cumsum). Both see the same hidden states: RoPE makes every
    attention score depend on q_pos - k_pos only, a shift common to a row cancels, and padded keys are masked
    out. The difference is float rounding of the angles (about position x 6e-8 rad), far below bf16's.
    (With images, transformers' `get_rope_index` does count from the mask, as the toy does.)
  * Output: the pipeline's `hidden_states[-1]` must be the last decoder layer's output before the final RMSNorm.
    transformers 5.x returns the *normed* state there (it ties the last entry to `last_hidden_state`), which is
    why diffusers' `QwenImage21Pipeline` hooks the norm away; `encode` returns the pre-norm state directly.

Precision: `dtype="bfloat16"` stores the weights in bfloat16 (half the memory: ~16 GiB for the 8B model instead
of ~32 GiB); the decoder still computes in float32, casting each weight as it is used.

Errors (a missing directory, an unreadable or unsupported config, missing, unexpected or misshapen tensors,
a corrupt safetensors file) are `ConfigError`s with a one-line message naming the file and tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_flash_jax.errors import CheckpointError
from qwen_flash_jax.models.config import ConfigError, read_config_json
from qwen_flash_jax.safetensors_reader import SafetensorsCheckpoint
from qwen_flash_jax.text.encoder import TextEncoder, TextEncoderConfig, TextEncoderParams

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"  # transformers' shard index (SafetensorsCheckpoint reads it)
DTYPES = ("float32", "bfloat16")
# Where the language model sits, by the class that saved the checkpoint: Qwen3VLForConditionalGeneration,
# Qwen3VLModel, Qwen3VLTextModel. The first whose embedding is present wins.
LM_PREFIXES = ("model.language_model.", "language_model.", "")
_MAX_LISTED = 5

# Qwen3VLTextModel key (below the prefix) -> (our path below `layers/<i>/` or the root, is a torch Linear weight).
_TOP_LEVEL = {
    "embed_tokens.weight": (("embed",), False),
    "norm.weight": (("final_norm", "scale"), False),
}
_PER_LAYER = {
    "input_layernorm.weight": (("input_norm", "scale"), False),
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), True),
    "self_attn.q_norm.weight": (("attn", "q_norm", "scale"), False),
    "self_attn.k_norm.weight": (("attn", "k_norm", "scale"), False),
    "post_attention_layernorm.weight": (("post_attn_norm", "scale"), False),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
}

# Qwen3VLTextConfig's class defaults, for optional fields a config.json may leave out.
_DEFAULT_ROPE_THETA = 500000.0
_DEFAULT_HEAD_DIM = 128


# --- config ---------------------------------------------------------------------------------------------------------

def config_from_hf(hf_config: dict) -> TextEncoderConfig:
    """Maps a Qwen3-VL `config.json` (the full `qwen3_vl` config or its `qwen3_vl_text` part) to our config.

    Raises `ConfigError` for another model type, a missing size field, or a feature the decoder does not have
    (attention biases, another activation, a non-default rotary type such as YaRN scaling).
    """
    if not isinstance(hf_config, dict):
        raise ConfigError("the Qwen3-VL config is not a JSON object")
    model_type = hf_config.get("model_type")
    if model_type == "qwen3_vl":
        text = hf_config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("qwen3_vl config has no text_config object")
    elif model_type == "qwen3_vl_text":
        text = hf_config
    else:
        raise ConfigError(f"model_type {model_type!r} is not a Qwen3-VL model (expected 'qwen3_vl' or "
                          "'qwen3_vl_text'; MoE variants are not supported)")

    def required(name):
        value = text.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"text config field {name!r} must be a positive integer, got {value!r}")
        return value

    if text.get("attention_bias", False):
        raise ConfigError("text config has attention_bias=true; Qwen3-VL's language model has no attention "
                          "biases and the decoder does not implement them")
    if text.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"text config hidden_act must be 'silu' (SwiGLU), got {text.get('hidden_act')!r}")
    num_heads = required("num_attention_heads")
    kv_heads = text.get("num_key_value_heads")
    head_dim = text.get("head_dim")
    try:
        return TextEncoderConfig(
            vocab_size=required("vocab_size"),
            hidden_size=required("hidden_size"),
            num_layers=required("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_heads if kv_heads is None else int(kv_heads),
            head_dim=_DEFAULT_HEAD_DIM if head_dim is None else int(head_dim),
            mlp_dim=required("intermediate_size"),
            rope_theta=_rope_theta(text),
            eps=float(text.get("rms_norm_eps", 1e-6)),
            condition_channels=0,  # no toy condition projection: images need the vision tower
            image_pad_id=None,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"text config does not make a valid encoder: {e}") from None


def _rope_theta(text: dict) -> float:
    # transformers 5 writes `rope_parameters`; 4.x checkpoints have `rope_theta` and `rope_scaling` beside it.
    params = text.get("rope_parameters")
    if params is None:
        params = dict(text.get("rope_scaling") or {})
        if "rope_theta" in text:
            params["rope_theta"] = text["rope_theta"]
    if not isinstance(params, dict):
        raise ConfigError(f"text config rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope"):  # 'mrope' is what some 4.x configs call the default M-RoPE
        raise ConfigError(f"rotary type {rope_type!r} is not supported (only the default, unscaled M-RoPE)")
    theta = params.get("rope_theta", _DEFAULT_ROPE_THETA)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def read_config(path: str | os.PathLike) -> TextEncoderConfig:
    """The encoder config of the checkpoint directory `path` (its config.json)."""
    data, config_path = read_config_json(path, "Qwen3-VL checkpoint")
    try:
        return config_from_hf(data)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None


# --- key mapping ----------------------------------------------------------------------------------------------------

def key_map(config: TextEncoderConfig, prefix: str = LM_PREFIXES[0]) -> dict[str, tuple[tuple, bool, tuple]]:
    """Every checkpoint key the language model needs -> (path in our state, transpose, torch shape)."""
    d, hd, mlp = config.hidden_size, config.head_dim, config.mlp_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    torch_shapes = {
        "embed_tokens.weight": (config.vocab_size, d),
        "norm.weight": (d,),
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),  # torch Linear: (out, in)
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (mlp, d),
        "mlp.up_proj.weight": (mlp, d),
        "mlp.down_proj.weight": (d, mlp),
    }
    out = {}
    for name, (path, transpose) in _TOP_LEVEL.items():
        out[prefix + name] = (path, transpose, torch_shapes[name])
    for i in range(config.num_layers):
        for name, (path, transpose) in _PER_LAYER.items():
            out[f"{prefix}layers.{i}.{name}"] = (("layers", i) + path, transpose, torch_shapes[name])
    return out


# --- loading --------------------------------------------------------------------------------------------------------

def load_text_encoder(path: str | os.PathLike, dtype: str = "float32") -> TextEncoderParams:
    """Reads the language model of the Qwen3-VL checkpoint directory `path` into `TextEncoderParams`.

    The whole checkpoint is validated from config.json and the safetensors headers (key set, shapes) before any
    tensor data is read; then tensors are read one at a time (transposed and cast in one copy) and put on the
    default device. The parameters keep their logical axis names, for `qwen_flash_jax.sharding`.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = read_config(path)
    path = Path(path)
    target = np.dtype(jnp.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    try:
        checkpoint = SafetensorsCheckpoint(path)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    try:
        keys = _check_keys(path, checkpoint.tensors, config)
        _, abstract = nnx.split(nnx.eval_shape(lambda: TextEncoder(config, rngs=nnx.Rngs(0))))
        nested: dict = {}
        for key, (leaf_path, transpose, _) in keys.items():
            tensor = checkpoint.read(key)
            value = np.asarray(tensor.T if transpose else tensor, dtype=target)
            del tensor
            node = nested
            for part in leaf_path[:-1]:
                node = node.setdefault(part, {})
            node[leaf_path[-1]] = jnp.asarray(value)
            del value
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    finally:
        checkpoint.close()
    nnx.replace_by_pure_dict(abstract, nested)
    return TextEncoderParams(config, abstract)


def _check_keys(path: Path, tensors: dict, config: TextEncoderConfig) -> dict:
    """The key map for the checkpoint's layout; every language-model tensor in `tensors` (the checkpoint's
    {key: TensorInfo}) present, known and of its shape."""
    prefix = next((p for p in LM_PREFIXES if p + "embed_tokens.weight" in tensors), None)
    if prefix is None:
        raise ConfigError(f"{path}: no language-model embedding (looked for "
                          f"{', '.join(p + 'embed_tokens.weight' for p in LM_PREFIXES)}); is this a Qwen3-VL "
                          "checkpoint?")
    keys = key_map(config, prefix)
    missing = [k for k in keys if k not in tensors]
    # Anything else under the language model's prefix would be silently dropped (biases, extra layers...).
    if prefix:
        lm_names = {k for k in tensors if k.startswith(prefix)}
    else:  # a bare Qwen3VLTextModel: its own keys only
        lm_names = {k for k in tensors if k.split(".", 1)[0] in ("embed_tokens", "layers", "norm")}
    unexpected = sorted(lm_names - set(keys))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} of {len(keys)} language-model tensors: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected language-model tensors: {_some(unexpected)}")
    if problems:
        raise ConfigError(f"{path}: checkpoint does not match its config (num_hidden_layers={config.num_layers}): "
                          + "; ".join(problems))
    bad = [f"{k} has shape {tensors[k].shape}, expected {shape}"
           for k, (_, _, shape) in keys.items() if tuple(tensors[k].shape) != tuple(shape)]
    if bad:
        raise ConfigError(f"{path}: {len(bad)} tensors have the wrong shape: " + "; ".join(bad[:_MAX_LISTED]))
    return keys


def _some(keys: list[str]) -> str:
    listed = ", ".join(keys[:_MAX_LISTED])
    return listed + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")
