"""Tiny random diffusers reference models and matching inputs for parity tests."""

from __future__ import annotations

import numpy as np

TINY = dict(
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    in_channels=8,
    out_channels=8,
    context_in_dim=24,
    axes_dims_rope=(4, 6, 6),
)


def random_diffusers_transformer(seed: int = 0, std: float = 0.2, **overrides):
    """A diffusers QwenImage21Transformer2DModel with every parameter random, the zero-centred norms included."""
    import torch
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(seed)
    model = QwenImage21Transformer2DModel(**(TINY | overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def make_inputs(
    rng: np.random.Generator,
    *,
    batch: int,
    conditions,
    target,
    text_runs,
    padding=None,
    in_channels: int = 8,
    context_in_dim: int = 24,
):
    """diffusers-style inputs for one shared layout.

    `text_runs` gives the text lengths around the condition images: len(text_runs) == len(conditions) + 1, the
    prompt being text_runs[0], cond 0's slots, text_runs[1], ..., then the target's slots. `padding[b]` right-pads
    sample b's prompt by that many masked positions.
    """
    assert len(text_runs) == len(conditions) + 1
    slots: list[bool] = []
    for i, run in enumerate(text_runs):
        slots += [False] * run
        if i < len(conditions):
            slots += [True] * (conditions[i][1] * conditions[i][2] // 4)
    text_len = len(slots)
    slots += [True] * (target[1] * target[2] // 4)
    shapes = list(conditions) + [target]
    n_img = sum(h * w for _, h, w in shapes)
    enc_mask = np.ones((batch, text_len), bool)
    for b, pad in enumerate(padding or []):
        if pad:
            enc_mask[b, text_len - pad :] = False
    return dict(
        hidden_states=rng.standard_normal((batch, n_img, in_channels)).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_len, context_in_dim)).astype(np.float32),
        timestep=rng.uniform(0.05, 0.95, size=(batch,)).astype(np.float32),
        img_shapes=[shapes] * batch,
        img_mask=np.array([slots] * batch),
        encoder_hidden_states_mask=enc_mask,
    )


def torch_forward(model, inputs, dtype=None, **kwargs):
    import torch

    dtype = dtype or torch.float32
    with torch.no_grad():
        out = model(
            hidden_states=torch.tensor(inputs["hidden_states"]).to(dtype),
            encoder_hidden_states=torch.tensor(inputs["encoder_hidden_states"]).to(dtype),
            timestep=torch.tensor(inputs["timestep"]).to(dtype),
            img_shapes=inputs["img_shapes"],
            img_mask=torch.tensor(inputs["img_mask"]),
            encoder_hidden_states_mask=torch.tensor(inputs["encoder_hidden_states_mask"]),
            **kwargs,
        ).sample
    return out.float().numpy()
