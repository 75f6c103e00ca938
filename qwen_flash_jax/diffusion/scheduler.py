"""The sampling schedule of a diffusers Qwen-Image pipeline, read from its folder (pure numpy / jax).

`FlowMatchScheduler` holds the fields of diffusers' `FlowMatchEulerDiscreteScheduler` that Qwen-Image uses and
computes what its `set_timesteps` and `step` compute, as `QwenImage21Pipeline` calls them:

  * base sigmas: the call's `sigmas`, else `model_index.json`'s `sample_sigmas`, else linspace(1, 1/N, N);
  * mu from the *target's* image token count (condition images do not count), linear between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift);
  * the time shift: dynamic (exponential or linear in mu) when `use_dynamic_shifting`, else the static `shift`;
  * the terminal stretch to `shift_terminal`, then a trailing 0;
  * the step: Euler, or with `stochastic_sampling` the x0 prediction re-noised with fresh noise.

The host math runs in float64 and rounds once to float32 (diffusers rounds the given sigmas to float32 first and
shifts in float32; the two agree to ~1e-7, tests/test_scheduler.py). The toy world uses the same functions with
its own constants (`dynamic`, which reproduces `flow.sampling_sigmas` bit for bit).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from qwen_flash_jax import flow
from qwen_flash_jax.models.config import ConfigError, read_json_object

SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
MODEL_INDEX = "model_index.json"
TIME_SHIFT_TYPES = ("exponential", "linear")
# Options of FlowMatchEulerDiscreteScheduler that Qwen-Image pipelines leave off; a config that turns one on is
# refused rather than sampled differently.
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


@dataclasses.dataclass(frozen=True)
class FlowMatchScheduler:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False
    sample_sigmas: tuple[float, ...] | None = None  # model_index.json's default grid (without the trailing 0)

    def __post_init__(self):
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ConfigError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {self.time_shift_type!r}")
        if self.shift_terminal is not None and not 0.0 <= self.shift_terminal < 1.0:
            raise ConfigError(f"shift_terminal must lie in [0, 1), got {self.shift_terminal}")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise ConfigError("base_image_seq_len and max_image_seq_len must differ (they anchor the shift line)")
        if self.sample_sigmas is not None:
            _check_grid(self.sample_sigmas, "sample_sigmas")

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def dynamic(cls, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> "FlowMatchScheduler":
        """Dynamic exponential shift without a terminal stretch: the toy's schedule (configs' `sampling` block)."""
        return cls(
            use_dynamic_shifting=True,
            base_shift=float(base_shift),
            max_shift=float(max_shift),
            base_image_seq_len=int(base_seq_len),
            max_image_seq_len=int(max_seq_len),
        )

    @classmethod
    def from_config(cls, config: dict, sample_sigmas=None) -> "FlowMatchScheduler":
        """From the dict of a diffusers `scheduler_config.json` (unknown keys ignored, as diffusers does)."""
        if not isinstance(config, dict):
            raise ConfigError("the scheduler config is not a JSON object")
        on = [k for k in _UNSUPPORTED if config.get(k)]
        if on:
            raise ConfigError(f"scheduler options {', '.join(on)} are not supported")
        fields = {f.name for f in dataclasses.fields(cls)} - {"sample_sigmas"}
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        try:
            for k in ("num_train_timesteps", "base_image_seq_len", "max_image_seq_len"):
                if k in values:
                    values[k] = int(values[k])
            for k in ("shift", "base_shift", "max_shift", "shift_terminal"):
                if k in values:
                    values[k] = float(values[k])
            for k in ("use_dynamic_shifting", "stochastic_sampling"):
                if k in values:
                    values[k] = bool(values[k])
            if values.get("shift_terminal") == 0.0:  # diffusers tests truthiness: 0 means no stretch
                values["shift_terminal"] = None
            grid = None if sample_sigmas is None else tuple(float(s) for s in sample_sigmas)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"the scheduler config has an invalid value: {e}") from None
        return cls(**values, sample_sigmas=grid)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "FlowMatchScheduler":
        """From a diffusers pipeline folder: `scheduler/scheduler_config.json` and `model_index.json`'s
        `sample_sigmas` (if any)."""
        path = Path(path)
        config = _read_json(path / SCHEDULER_CONFIG)
        index = _read_json(path / MODEL_INDEX) if (path / MODEL_INDEX).is_file() else {}
        try:
            return cls.from_config(config, index.get("sample_sigmas"))
        except ConfigError as e:
            raise ConfigError(f"{path / SCHEDULER_CONFIG}: {e}") from None

    def to_config(self) -> dict:
        """The `scheduler_config.json` dict diffusers' FlowMatchEulerDiscreteScheduler reads back the same."""
        d = dataclasses.asdict(self)
        d.pop("sample_sigmas")
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **d}

    # --- schedule ----------------------------------------------------------------------------------------------
    def mu(self, image_seq_len: int) -> float:
        """The dynamic shift for a target of `image_seq_len` latent tokens (diffusers' `calculate_shift`)."""
        return flow.dynamic_shift_mu(
            image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
        )

    def sigmas(
        self, num_steps: int | None = None, image_seq_len: int | None = None, sigmas=None, mu: float | None = None
    ) -> np.ndarray:
        """The N + 1 float32 sigmas `QwenImage21Pipeline` samples with: the call's `sigmas`, else `sample_sigmas`,
        else linspace(1, 1/N, N); shifted for a target of `image_seq_len` tokens (or by `mu` itself); stretched;
        a trailing 0."""
        if sigmas is None:
            sigmas = self.sample_sigmas
        if sigmas is None:
            if num_steps is None or int(num_steps) < 1:
                raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
            sigmas = np.linspace(1.0, 1.0 / num_steps, int(num_steps))
        else:
            _check_grid(sigmas, "sigmas")
        if self.use_dynamic_shifting and mu is None:
            if image_seq_len is None:
                raise ValueError("a dynamically shifted schedule needs the target's image_seq_len")
            mu = self.mu(image_seq_len)
        return self.set_timesteps(sigmas=sigmas, mu=mu)

    def set_timesteps(self, num_steps: int | None = None, sigmas=None, mu: float | None = None) -> np.ndarray:
        """What `FlowMatchEulerDiscreteScheduler.set_timesteps` leaves in `.sigmas` (N + 1 float32 values)."""
        if sigmas is None:
            # The scheduler's own grid: linspace between its sigma_max and sigma_min in train-timestep units.
            t = np.linspace(self.num_train_timesteps, 1.0, self.num_train_timesteps, dtype=np.float32)
            train = (t / self.num_train_timesteps).astype(np.float32)
            if not self.use_dynamic_shifting:
                train = (self.shift * train / (1 + (self.shift - 1) * train)).astype(np.float32)
            hi, lo = float(train[0]), float(train[-1])
            n = self.num_train_timesteps
            base = np.linspace(hi * n, lo * n, int(num_steps)) / n
        else:
            base = np.asarray(sigmas, np.float64)
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("mu must be given when use_dynamic_shifting is on")
            shifted = flow.time_shift_sigmas(base, mu, self.time_shift_type)
        else:
            shifted = self.shift * base / (1.0 + (self.shift - 1.0) * base)
        if self.shift_terminal:
            shifted = flow.stretch_to_terminal(shifted, self.shift_terminal)
        return np.append(shifted, 0.0).astype(np.float32)

    def timesteps(self, sigmas) -> np.ndarray:
        """The transformer's `timestep` input for each step's sigma: diffusers' `sigma * 1000 / 1000`, float32."""
        n = np.float32(self.num_train_timesteps)
        return (np.asarray(sigmas, np.float32)[:-1] * n) / n

    # --- step -----------------------------------------------------------------------------------------------------
    def step(self, velocity, sigma, sigma_next, sample, noise=None):
        """One sampler step in float32 (jittable): Euler, or with `stochastic_sampling` the x0 prediction
        re-noised to `sigma_next` with `noise` (fresh standard normal noise of `sample`'s shape)."""
        sample = jnp.asarray(sample, jnp.float32)
        velocity = jnp.asarray(velocity)
        if self.stochastic_sampling:
            if noise is None:
                raise ValueError("stochastic sampling needs fresh noise for every step")
            x0 = sample - sigma * velocity
            out = (1.0 - sigma_next) * x0 + sigma_next * jnp.asarray(noise, jnp.float32)
        else:
            out = sample + (sigma_next - sigma) * velocity
        return out.astype(velocity.dtype)


def _check_grid(sigmas, name: str):
    s = np.asarray(sigmas, np.float64)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)) or s.max() > 1.0 or s.min() <= 0.0:
        raise ConfigError(f"{name} must be a non-empty list of values in (0, 1], got {list(np.ravel(s))}")


def _read_json(path: Path) -> dict:
    return read_json_object(path, f"{path}: not found")
