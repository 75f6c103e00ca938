"""Throughput of the dataset sources (qwen_flash_jax.data.sources) read through grain, in random (shuffled) order.

    python benchmarks/source_throughput.py [--data-dir DIR] [--n 1000] [--size 32] [--seconds 2] [--jsonl]

Prepares the toy T2I and edit datasets (timed; a second call is timed too, it must only reuse), then reads each
task's categories, concatenated and shuffled, through ``grain.MapDataset.source(...).shuffle(...)``: once by plain
random access in this thread and once through ``to_iter_dataset`` with grain's read threads. ``--jsonl`` also
measures a JSONL edit source over PNG files (decode + resize), the cost real data adds.
"""

import argparse
import json
import os
import tempfile
import time

import grain
import numpy as np
from PIL import Image

from qwen_flash_jax.data.sources import ConcatSource, jsonl_edit_sources, toy_world_sources


def _random_access(source, seconds: float) -> float:
    ds = grain.MapDataset.source(source).shuffle(seed=0)
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        for i in range(n, n + 200):
            ds[i]  # indices past len(ds) wrap around: epoch after epoch, each reshuffled
        n += 200
    return n / dt


def _threaded(source, seconds: float, threads: int) -> float:
    ds = grain.MapDataset.source(source).shuffle(seed=0).repeat()
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads))
    it = iter(ds)
    for _ in range(200):  # warm-up: start the read threads
        next(it)
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        for _ in range(200):
            next(it)
        n += 200
    return n / dt


def _jsonl_fixture(folder: str, n: int, image_size: int) -> str:
    rng = np.random.default_rng(0)
    for k in range(16):
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(f"{folder}/{k}.png")
    path = os.path.join(folder, "pairs.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "instruction": f"edit {i}",
                        "category": "style",
                        "source": f"{i % 16}.png",
                        "target": f"{(i + 1) % 16}.png",
                    }
                )
                + "\n"
            )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="where to prepare the toy datasets (default: a fresh temporary folder)")
    ap.add_argument("--n", type=int, default=1000, help="examples per category")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per reading mode and task")
    ap.add_argument("--threads", type=int, default=4, help="grain read threads for the iterator measurement")
    ap.add_argument("--jsonl", action="store_true", help="also read a JSONL edit source over 256x256 PNG files")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        t0 = time.perf_counter()
        sources = toy_world_sources(data_dir, size=args.size, examples_per_category=args.n)
        t1 = time.perf_counter()
        toy_world_sources(data_dir, size=args.size, examples_per_category=args.n)
        t2 = time.perf_counter()
        total = sum(len(s) for cats in sources.values() for s in cats.values())
        print(
            f"prepare {total} examples (n={args.n}/category, {args.size}px) into {data_dir}: {t1 - t0:.2f} s "
            f"(0 s if already prepared); reuse: {t2 - t1:.3f} s"
        )
        for task, cats in sources.items():
            source = ConcatSource(list(cats.values()))
            ra = _random_access(source, args.seconds)
            th = _threaded(source, args.seconds, args.threads)
            print(
                f"{task:4s} ({len(cats)} categories, {len(source)} records): random access {ra:8.0f} records/s, "
                f"grain iterator with {args.threads} read threads {th:8.0f} records/s"
            )
        if args.jsonl:
            path = _jsonl_fixture(tmp, 2000, 256)
            source = jsonl_edit_sources(path, size=args.size)["edit"]["style"]
            ra, th = _random_access(source, args.seconds), _threaded(source, args.seconds, args.threads)
            print(
                f"jsonl edit (256px PNG pairs -> {args.size}px): random access {ra:6.0f} records/s, "
                f"grain iterator with {args.threads} read threads {th:6.0f} records/s"
            )


if __name__ == "__main__":
    main()
