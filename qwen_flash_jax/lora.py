"""The student-minus-base difference as a LoRA: a truncated SVD per weight matrix, in diffusers' key format.

`QwenImage21Pipeline.load_lora_weights` (diffusers' `QwenImageLoraLoaderMixin`) reads a safetensors file of
`transformer.<module>.lora_A.weight` (rank, in) and `transformer.<module>.lora_B.weight` (out, rank) pairs, one per
`nn.Linear`, and with no `alpha` entries adds `lora_B @ lora_A` to the weight at scale 1. For each Linear weight
W (torch layout, (out, in)) the best rank-r approximation of D = W_student - W_base in the Frobenius norm is
U_r S_r V_r^T (Eckart-Young); the factors split the singular values evenly: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T.

A LoRA holds Linear weights only: the RMSNorm scales (`norm_q`, `norm_k`, `txt_in.text_norm`) keep the base's
values, and their part of the difference is part of the error reported.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen_flash_jax.models.config import ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(folder)` looks for
PREFIX = "transformer."


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ConfigError(f"the LoRA rank must be a positive integer, got {rank!r}")
    return int(rank)


def factorise(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A (r, in), lora_B (out, r)) of the rank-r truncated SVD of `delta` (out, in), r = min(rank, out, in);
    computed in float64, returned in float32."""
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    r = min(int(rank), s.size)
    root = np.sqrt(s[:r])
    return (root[:, None] * vt[:r]).astype(np.float32), (u[:, :r] * root[None]).astype(np.float32)


def module_name(diffusers_key: str) -> str:
    """'transformer_blocks.0.attn.to_q.weight' -> 'transformer_blocks.0.attn.to_q'."""
    return diffusers_key.removesuffix(".weight")


@dataclasses.dataclass
class ErrorTally:
    """The LoRA's reconstruction error, accumulated over weights: ||D - B A|| / ||D|| over every weight of the
    transformer (Frobenius norm of all differences together), plus the part the LoRA cannot hold (norm scales)."""

    residual_sq: float = 0.0  # sum of ||D - B A||^2 over Linear weights
    uncovered_sq: float = 0.0  # sum of ||D||^2 over the weights no LoRA can hold
    total_sq: float = 0.0  # sum of ||D||^2 over every weight
    worst: float = 0.0  # the largest relative error of one Linear weight
    worst_key: str = ""

    def add_linear(self, key: str, delta: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray) -> None:
        delta = np.asarray(delta, np.float64)
        residual = float(np.sum(np.square(delta - lora_b.astype(np.float64) @ lora_a.astype(np.float64))))
        norm = float(np.sum(np.square(delta)))
        self.residual_sq += residual
        self.total_sq += norm
        relative = np.sqrt(residual / norm) if norm > 0 else 0.0
        if relative > self.worst:
            self.worst, self.worst_key = float(relative), key

    def add_uncovered(self, delta: np.ndarray) -> None:
        norm = float(np.sum(np.square(np.asarray(delta, np.float64))))
        self.uncovered_sq += norm
        self.total_sq += norm

    @property
    def relative_error(self) -> float:
        """||student - (base + LoRA)|| / ||student - base|| over all weights (0 when the student is the base)."""
        return float(np.sqrt((self.residual_sq + self.uncovered_sq) / self.total_sq)) if self.total_sq else 0.0

    @property
    def uncovered_share(self) -> float:
        """The part of that error from the weights a LoRA cannot hold, as a share of ||student - base||."""
        return float(np.sqrt(self.uncovered_sq / self.total_sq)) if self.total_sq else 0.0

    def summary(self) -> dict:
        return dict(
            relative_error=self.relative_error,
            norm_scales_share=self.uncovered_share,
            worst_matrix=self.worst_key,
            worst_matrix_relative_error=self.worst,
            difference_norm=float(np.sqrt(self.total_sq)),
        )
