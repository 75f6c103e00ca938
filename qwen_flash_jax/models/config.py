"""Configuration of the Qwen-Image 2.x single-stream transformer.

The architecture fields mirror diffusers' `QwenImage21Transformer2DModel` config (so a `config.json` from a
diffusers transformer directory maps onto this dataclass one to one); the runtime fields (dtypes, remat) are
ours and never come from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

DIFFUSERS_CLASS_NAME = "QwenImage21Transformer2DModel"

# Fields of diffusers' config that describe the architecture; everything else in a diffusers config.json
# (`_class_name`, `_diffusers_version`, `_name_or_path`, ...) is bookkeeping.
ARCH_FIELDS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "context_in_dim",
    "mlp_ratio",
    "axes_dims_rope",
    "eps",
    "causal_condition",
)

# `jax.checkpoint` policies selectable from config, by name.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
# Attention implementations (models/attention.py); "auto" picks splash on TPU, cuDNN on GPU, dense on CPU.
ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "splash", "cudnn", "xla")


class ConfigError(ValueError):
    """A user-supplied configuration is invalid; the message is meant to be shown as is."""


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    # Architecture (diffusers names and defaults: the published Qwen-Image 2.x transformer).
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = 64
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    context_in_dim: int = 4096
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    eps: float = 1e-6
    causal_condition: bool = True
    # Runtime.
    param_dtype: str = "float32"
    dtype: str = "float32"  # activation / matmul dtype; norms, softmax and RoPE always run in float32
    remat_policy: str = "none"
    # Run the stacked blocks under `lax.scan` (compile time independent of depth) or as an unrolled Python loop over
    # layer slices. Same parameters, same function (up to float rounding); on a CPU the scanned backward spends much
    # of its time filling and copying stacked residual buffers, so a shallow model trains faster unrolled.
    scan_layers: bool = True
    attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS; the same function on every backend

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim={self.attention_head_dim}"
            )
        if any(a % 2 for a in self.axes_dims_rope):
            raise ConfigError(f"every entry of axes_dims_rope must be even, got {self.axes_dims_rope}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        for name in ("param_dtype", "dtype"):
            value = getattr(self, name)
            if value not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name} must be float32, bfloat16 or float16, got {value!r}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return self.inner_dim * self.mlp_ratio

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kwargs) -> "TransformerConfig":
        return dataclasses.replace(self, **kwargs)

    # --- diffusers config.json -------------------------------------------------------------------------------------

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **runtime) -> "TransformerConfig":
        """Builds a config from a diffusers `config.json` dict; rejects configs of other models."""
        class_name = config.get("_class_name")
        if class_name is not None and class_name != DIFFUSERS_CLASS_NAME:
            raise ConfigError(
                f"config.json describes a {class_name}, not a {DIFFUSERS_CLASS_NAME} (Qwen-Image 2.x transformer)"
            )
        unknown = sorted(k for k in config if not k.startswith("_") and k not in ARCH_FIELDS)
        if unknown:
            raise ConfigError(
                f"config.json has fields {unknown} that {DIFFUSERS_CLASS_NAME} does not know; "
                "is this the config of another model?"
            )
        kwargs = {k: config[k] for k in ARCH_FIELDS if k in config}
        return cls(**kwargs, **runtime)

    def to_diffusers_config(self) -> dict[str, Any]:
        out = {"_class_name": DIFFUSERS_CLASS_NAME}
        out.update({k: getattr(self, k) for k in ARCH_FIELDS})
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return out

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self) | {"axes_dims_rope": list(self.axes_dims_rope)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TransformerConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config has unknown fields {unknown}")
        return cls(**data)


def read_config_json(directory, what: str) -> tuple[dict, Any]:
    """(the dict in `directory`/config.json, its path) of a Hugging Face model directory; `what` names the
    directory in the one-line ConfigError a missing directory or file, or unreadable JSON, raises."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{what} {directory} does not exist or is not a directory")
    config_path = directory / "config.json"
    return read_json_object(config_path, f"{what} {directory} has no config.json"), config_path


def read_json_object(path, missing: str) -> dict:
    """The JSON object in `path`; a missing file raises ConfigError(`missing`), unreadable JSON or another type one
    line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return data
