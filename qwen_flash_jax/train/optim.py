"""Optimisers from config: AdamW with global-norm clipping and linear warmup + cosine decay."""

from __future__ import annotations

import optax


def adamw(
    learning_rate: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    final_fraction: float = 0.1,
):
    warmup_steps = min(int(warmup_steps), max(int(total_steps) - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(int(total_steps), warmup_steps + 1),
        end_value=learning_rate * final_fraction,
    )
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


def from_config(optim, total_steps: int, learning_rate: float | None = None):
    return adamw(
        learning_rate if learning_rate is not None else optim.learning_rate,
        total_steps,
        warmup_steps=optim.warmup_steps,
        b1=optim.b1,
        b2=optim.b2,
        weight_decay=optim.weight_decay,
        clip_norm=optim.clip_norm,
    )
