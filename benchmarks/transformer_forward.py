"""Flax forward vs diffusers' PyTorch forward: same weights, same CPU, one run; prints the time ratio.

    PYTHONPATH=. python benchmarks/transformer_forward.py [--layers 4 --width 1024 --image-tokens 1024
        --text-tokens 128] [--threads N] [--xla-flags FLAGS]

Target: the jitted Flax forward takes at most 0.8x PyTorch's time (ratio = flax / torch). Both run float32 with
the same thread budget; timings interleave the two frameworks so machine noise hits both alike, and the ratio of
medians is reported. `--threads 1` runs both single-threaded (on a loaded machine that compares the kernels
rather than how each thread pool copes with contention); `--xla-flags` tries an XLA:CPU option without changing
the model (e.g. `--xla_cpu_use_xnnpack=true`). docs/experiments/performance.md has the measured ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024, help="inner dim = heads * 128")
    parser.add_argument("--image-tokens", type=int, default=1024, help="target image tokens (a square grid)")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--condition", action="store_true", help="add one condition image of the same size (edit)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for both frameworks (torch.set_num_threads; XLA's intra-op pool); 0 = each one's default",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="instead of the forward, time one block's op classes at the same sizes (matmuls, attention, RoPE)",
    )
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax starts (e.g. a backend flag)")
    args = parser.parse_args()

    # XLA reads its flags once, when the CPU client starts: set them before jax is imported.
    xla_flags = [os.environ.get("XLA_FLAGS", ""), args.xla_flags]
    if args.threads == 1:
        xla_flags.append("--xla_cpu_multi_thread_eigen=false")
    if args.threads:
        xla_flags.append(f"intra_op_parallelism_threads={args.threads}")
    os.environ["XLA_FLAGS"] = " ".join(f for f in xla_flags if f)

    import jax
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    if args.parts:
        time_parts(args, seq=args.image_tokens + args.text_tokens)
        return

    from qwen_flash_jax.loading import from_params
    from qwen_flash_jax.models import TransformerConfig
    from qwen_flash_jax.models.hf_keys import state_dict_to_params
    from tests.torch_reference import make_inputs, random_diffusers_transformer, state_dict_numpy, torch_forward

    side = int(round(args.image_tokens**0.5))
    heads = args.width // 128
    arch = dict(
        num_layers=args.layers,
        attention_head_dim=128,
        num_attention_heads=heads,
        in_channels=64,
        out_channels=64,
        context_in_dim=args.width,
        axes_dims_rope=(16, 56, 56),
    )
    reference = random_diffusers_transformer(0, std=0.02, **arch)
    config = TransformerConfig(**arch)
    model = from_params(config, state_dict_to_params(state_dict_numpy(reference), config))
    conditions = [(1, side, side)] if args.condition else []
    text_runs = [args.text_tokens // 2, args.text_tokens // 2] if args.condition else [args.text_tokens]
    inputs = make_inputs(
        np.random.default_rng(0),
        batch=args.batch,
        conditions=conditions,
        target=(1, side, side),
        text_runs=text_runs,
        in_channels=64,
        context_in_dim=args.width,
    )

    def run_flax():
        return jax.block_until_ready(model.apply(model.params, **inputs))

    def run_torch():
        return torch_forward(reference, inputs)

    out_flax, out_torch = np.asarray(run_flax(), np.float32), run_torch()  # compile / warm up
    err = float(np.abs(out_flax - out_torch).max() / np.abs(out_torch).max())
    flax_times, torch_times = [], []
    for _ in range(args.repeats):
        for fn, times in ((run_flax, flax_times), (run_torch, torch_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    seq = model_seq_len(inputs)
    f, t = statistics.median(flax_times), statistics.median(torch_times)
    print(
        f"config: layers={args.layers} width={args.width} heads={heads} image_tokens={side * side} "
        f"text_tokens={args.text_tokens} condition={args.condition} batch={args.batch} joint_seq={seq}"
    )
    print(f"threads: torch={torch.get_num_threads()} cpu_count={os.cpu_count()} jax={jax.devices()[0].platform}")
    print(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    print(f"flax  median {f * 1e3:8.1f} ms  (min {min(flax_times) * 1e3:.1f})")
    print(f"torch median {t * 1e3:8.1f} ms  (min {min(torch_times) * 1e3:.1f})")
    print(f"max |flax - torch| / max |torch| = {err:.2e}")
    print(f"ratio flax/torch = {f / t:.2f}  (target <= 0.80)")


def time_parts(args, seq):
    """One block's op classes in each framework, interleaved: Flax's own functions (jitted) against what diffusers
    calls (F.linear, scaled_dot_product_attention, a complex-multiply RoPE)."""
    import math

    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from qwen_flash_jax.models.attention import dense_attention
    from qwen_flash_jax.models.transformer import apply_rope

    width, heads, head_dim = args.width, args.width // 128, 128
    mlp = 3 * width  # TransformerConfig's default mlp_ratio
    rng = np.random.default_rng(0)
    x = rng.standard_normal((seq, width), np.float32)
    w_sq, w_up = (rng.standard_normal((width, n), np.float32) * 0.02 for n in (width, mlp))
    q, k, v = (rng.standard_normal((1, seq, heads, head_dim), np.float32) for _ in range(3))
    angles = rng.standard_normal((seq, head_dim // 2), np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)

    def jitted(fn, *arrays):
        fn, arrays = jax.jit(fn), [jnp.asarray(a) for a in arrays]
        return lambda: jax.block_until_ready(fn(*arrays))

    t = {name: torch.tensor(a) for name, a in dict(x=x, q=q, k=k, v=v, probs=probs).items()}
    t_sq, t_up = torch.tensor(w_sq.T.copy()), torch.tensor(w_up.T.copy())  # nn.Linear's (out, in) weight
    tq, tk, tv = (t[n].transpose(1, 2) for n in "qkv")  # SDPA's (B, H, S, D)
    rotation = torch.complex(torch.tensor(cos), torch.tensor(sin))[None, :, None, :]
    scale = 1.0 / math.sqrt(head_dim)
    cases = [
        (f"projection {seq}x{width}x{width} (4 a block)", jitted(jnp.dot, x, w_sq), lambda: F.linear(t["x"], t_sq)),
        (f"MLP matmul {seq}x{width}x{mlp} (3 a block)", jitted(jnp.dot, x, w_up), lambda: F.linear(t["x"], t_up)),
        (
            "attention (whole)",
            jitted(lambda q, k, v: dense_attention(q, k, v, None), q, k, v),
            lambda: F.scaled_dot_product_attention(tq, tk, tv),
        ),
        (
            "  q k^T",
            jitted(lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, q, k),
            lambda: (tq @ tk.transpose(-1, -2)) * scale,
        ),
        ("  softmax", jitted(lambda a: jax.nn.softmax(a, axis=-1), logits), lambda: torch.softmax(t["probs"], -1)),
        (
            "  probs v",
            jitted(lambda p, v: jnp.einsum("bhqk,bkhd->bqhd", p, v), probs, v),
            lambda: (t["probs"] @ tv).transpose(1, 2),
        ),
        (
            "RoPE on q",
            jitted(lambda q, c, s: apply_rope(q, (c, s)), q, cos, sin),
            lambda: torch.view_as_real(torch.view_as_complex(t["q"].reshape(1, seq, heads, -1, 2)) * rotation),
        ),
    ]
    print(f"op classes at seq={seq} width={width} heads={heads}; threads: torch={torch.get_num_threads()}")
    with torch.no_grad():
        for name, run_flax, run_torch in cases:
            run_flax(), run_torch()
            flax_times, torch_times = [], []
            for _ in range(args.repeats):
                for fn, times in ((run_flax, flax_times), (run_torch, torch_times)):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
            f, t_ = statistics.median(flax_times), statistics.median(torch_times)
            print(f"{name:42s} flax {f * 1e3:8.1f} ms  torch {t_ * 1e3:8.1f} ms  ratio {f / t_:.2f}")


def model_seq_len(inputs):
    mask = inputs["img_mask"][0]
    return int(np.where(mask, 4, 1).sum())


if __name__ == "__main__":
    main()
