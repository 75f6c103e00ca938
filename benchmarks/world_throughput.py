"""Throughput of the procedural world (qwen_flash_jax.data.world): T2I samples/s and edit pairs/s.

    python benchmarks/world_throughput.py [--size 32] [--seconds 2]

Targets on a 2-core CPU at 32x32: >= 2000 T2I samples/s and >= 800 edit pairs/s (single process).
"""

import argparse
import time

import numpy as np

from qwen_flash_jax.data.world import EDIT_CATEGORIES, T2I_CATEGORIES, sample_edit, sample_t2i


def _rate(fn, categories, size: int, seconds: float) -> tuple[float, dict[str, float]]:
    rng = np.random.default_rng(0)
    for cat in categories:  # warm caches (fonts, coordinate rows)
        fn(rng, cat, size)
    per_cat = {}
    for cat in categories:
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds / len(categories):
            for _ in range(50):
                fn(rng, cat, size)
            n += 50
        per_cat[cat] = n / dt
    overall = len(per_cat) / sum(1.0 / r for r in per_cat.values())  # uniform category mix
    return overall, per_cat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per task type")
    args = ap.parse_args()
    for name, fn, cats, target in (
        ("t2i", sample_t2i, T2I_CATEGORIES, 2000),
        ("edit", sample_edit, EDIT_CATEGORIES, 800),
    ):
        overall, per_cat = _rate(fn, cats, args.size, args.seconds)
        detail = ", ".join(f"{c} {r:.0f}" for c, r in per_cat.items())
        flag = "" if args.size != 32 else ("  (target >= %d: %s)" % (target, "ok" if overall >= target else "BELOW"))
        print(f"{name:5s} size={args.size}: {overall:8.0f} samples/s{flag}  [{detail}]")


if __name__ == "__main__":
    main()
