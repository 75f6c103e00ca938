"""Peak host memory of the streaming converter on a synthetic multi-GB diffusers checkpoint.

    python benchmarks/convert_memory.py --gb 3 [--workdir /tmp] [--dtype bfloat16] [--shard-gb 0.5]

Writes a random bf16 checkpoint of about `--gb` GiB (Qwen-Image 2.x geometry: head_dim 128, 24 heads, the
layer count chosen to reach the size) as several safetensors shards, one tensor at a time so the generator
never holds more than one tensor; converts it in a subprocess; reports the converter's peak RSS next to the
checkpoint size and the largest output leaf. Everything it writes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen_flash_jax.models import hf_keys  # noqa: E402
from qwen_flash_jax.models.config import TransformerConfig  # noqa: E402

GIB = 2**30
BF16 = np.dtype(ml_dtypes.bfloat16)


def synthetic_config(gb: float) -> TransformerConfig:
    base = TransformerConfig(num_layers=1, num_attention_heads=24, context_in_dim=3072)
    per_layer = _nbytes(base, layered=True)
    layers = max(1, round((gb * GIB - _nbytes(base, layered=False)) / per_layer))
    return base.replace(num_layers=layers)


def _nbytes(config, layered: bool) -> int:
    return sum(
        math.prod(hf_keys.param_spec(k, config).torch_shape) * BF16.itemsize
        for k in hf_keys.expected_keys(config)
        if (hf_keys.param_spec(k, config).layer is not None) == layered
    )


def write_checkpoint(path: Path, config: TransformerConfig, shard_bytes: int) -> int:
    """Diffusers-style directory of bf16 shards; returns the total tensor bytes."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_diffusers_config()))
    shards, current, size = [], [], 0
    for key in hf_keys.expected_keys(config):
        shape = hf_keys.param_spec(key, config).torch_shape
        current.append((key, shape))
        size += math.prod(shape) * BF16.itemsize
        if size >= shard_bytes:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for key, shape in tensors:
            n = math.prod(shape) * BF16.itemsize
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[key] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
        with open(path / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for _key, shape in tensors:  # one tensor in memory at a time
                f.write((rng.standard_normal(shape, np.float32) * 0.02).astype(BF16).tobytes())
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return total


def run_measured(cmd: list[str]) -> tuple[int, float, float]:
    """Runs `cmd`; returns (exit status, peak RSS in bytes of that very child, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child only (RUSAGE_CHILDREN would be the max of all)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.monotonic() - start  # ru_maxrss is in KiB on Linux


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=3.0, help="checkpoint size in GiB (bf16)")
    p.add_argument("--workdir", default=None, help="where to write (default: system temp dir)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--shard-gb", type=float, default=0.5, help="target shard size in GiB")
    args = p.parse_args()

    config = synthetic_config(args.gb)
    out_itemsize = np.dtype(ml_dtypes.bfloat16 if args.dtype == "bfloat16" else args.dtype).itemsize
    largest = max(math.prod(s) for s in hf_keys.param_shapes(config).values()) * out_itemsize
    work = Path(tempfile.mkdtemp(prefix="convert_memory-", dir=args.workdir))
    try:
        t = time.monotonic()
        src_bytes = write_checkpoint(work / "src", config, int(args.shard_gb * GIB))
        print(
            f"wrote {src_bytes / GIB:.2f} GiB checkpoint (num_layers={config.num_layers}, "
            f"inner_dim={config.inner_dim}, {len(list((work / 'src').glob('*.safetensors')))} shards) "
            f"in {time.monotonic() - t:.0f}s",
            flush=True,
        )
        # Fixed cost of the interpreter + jax + orbax imports, to read the peak against.
        code, base_rss, _ = run_measured(
            [
                sys.executable,
                "-c",
                "import jax, orbax.checkpoint.experimental.v1; import qwen_flash_jax.convert; jax.devices()",
            ]
        )
        code, peak, seconds = run_measured(
            [
                sys.executable,
                "-m",
                "qwen_flash_jax.convert",
                "--src",
                str(work / "src"),
                "--dst",
                str(work / "dst"),
                "--dtype",
                args.dtype,
                "--quiet",
            ]
        )
        if code != 0:
            raise SystemExit(f"converter failed with status {code}")
        print(f"converted in {seconds:.1f}s; output {du(work / 'dst') / GIB:.2f} GiB on disk ({args.dtype})")
        print(f"checkpoint size          {src_bytes / GIB:7.3f} GiB")
        print(f"largest output leaf      {largest / GIB:7.3f} GiB  (blocks/mlp/*, {args.dtype})")
        print(f"converter peak RSS       {peak / GIB:7.3f} GiB")
        print(f"  import baseline RSS    {base_rss / GIB:7.3f} GiB")
        print(f"peak RSS / checkpoint    {peak / src_bytes:7.3f}")
        print(f"peak RSS / largest leaf  {peak / largest:7.3f}")
        print(f"(peak - baseline) / largest leaf {(peak - base_rss) / largest:7.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
