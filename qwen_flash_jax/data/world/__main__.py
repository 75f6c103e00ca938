"""Write a demo contact sheet: ``python -m qwen_flash_jax.data.world [out.png] [--size N] [--seed S]``."""

import argparse

from .sheet import demo_sheet, save_png

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("out", nargs="?", default="/tmp/world_sheet.png")
parser.add_argument("--size", type=int, default=32)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--scale", type=int, default=4)
args = parser.parse_args()
save_png(demo_sheet(seed=args.seed, size=args.size, scale=args.scale), args.out)
print(f"wrote {args.out}")
