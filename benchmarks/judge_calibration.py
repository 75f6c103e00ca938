"""Calibration of the toy judge: real > mildly degraded > heavily degraded > noise, wrong spec < real (T2I), and
target > degraded target > source returned as output, noise near 1 (edits). Prints one table per task.

    python benchmarks/judge_calibration.py [--cache /tmp/toy_judge_cache] [--n 100] [--seed 0] [--size 32]

The judge is trained on first use (~50-80 s on 2 CPU cores) and cached in --cache; exit status 1 if an
ordering is violated.
"""

from __future__ import annotations

import argparse
import time

from qwen_flash_jax.eval.judge import load_or_train_judge
from qwen_flash_jax.eval.judge_calib import calibration_tables, format_tables


def check_order(tables: dict) -> list[str]:
    """Violations of the expected orderings (empty = calibrated)."""
    bad = []
    for cat in tables["t2i"]["real"]:
        if cat.startswith("fd"):
            continue
        t = {cond: row[cat] for cond, row in tables["t2i"].items()}
        if not t["real"] > t["mild"] > t["heavy"] > t["noise"]:
            bad.append(
                f"t2i {cat}: real {t['real']:.2f} > mild {t['mild']:.2f} > heavy {t['heavy']:.2f} > "
                f"noise {t['noise']:.2f} fails"
            )
        if not t["wrong_spec"] < t["real"]:
            bad.append(f"t2i {cat}: wrong_spec {t['wrong_spec']:.2f} < real {t['real']:.2f} fails")
    for cat in tables["edit"]["target"]:
        e = {cond: row[cat] for cond, row in tables["edit"].items()}
        if not e["target"] > e["mild"] > e["source"]:
            bad.append(f"edit {cat}: target {e['target']:.2f} > mild {e['mild']:.2f} > source {e['source']:.2f} fails")
        if e["noise"] > 1.5:
            bad.append(f"edit {cat}: noise {e['noise']:.2f} not near 1")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/toy_judge_cache", help="judge cache directory (trained if missing)")
    ap.add_argument("--n", type=int, default=100, help="samples per category and condition")
    ap.add_argument("--seed", type=int, default=0, help="judge seed")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--eval-seed", type=int, default=1, help="seed of the calibration samples")
    args = ap.parse_args()

    t0 = time.perf_counter()
    judge = load_or_train_judge(args.cache, size=args.size, seed=args.seed)
    print(f"judge ready in {time.perf_counter() - t0:.1f}s (training took {judge.train_seconds:.1f}s)")
    print("held-out accuracy per attribute:")
    for key, acc in judge.accuracy.items():
        print(f"  {key:<24}{acc:.3f}")
    t0 = time.perf_counter()
    tables = calibration_tables(judge, n_per_category=args.n, seed=args.eval_seed)
    print(f"scored in {time.perf_counter() - t0:.1f}s\n")
    print(format_tables(tables))
    bad = check_order(tables)
    print("\nordering: " + ("OK" if not bad else "VIOLATED\n  " + "\n  ".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
