"""The toy world's trained networks, shipped with the package and copied into the cache when a run first needs them.

Training the toy teachers takes over an hour on a 2-core CPU; the main job should not. So the toy default's cache
entries ship in `qwen_flash_jax/prebuilt_cache/`, laid out like the cache itself: the base and text teachers' final
parameters, the toy text encoder with its tokenizer, the toy judge, and the base teacher's benchmark images. Each
keeps the key a run computes for it (a hash of the config fields it depends on, or for images a digest of the
weights, the sampler and the jax version), so a run whose config or jax differs misses them and trains or samples
anew, as it would with an empty cache. `--config.prebuilt_cache=False` ignores them.

Shipping the text encoder and the judge with the teachers matters: a teacher is only valid with the text encoder
it was trained against, and a retrained encoder could differ in its last bits on another machine.

Export from a cache that holds the toy default's entries (and only the main job's benchmark images):

    python -m qwen_flash_jax.train.prebuilt --config=configs/5to5.py:toy --from_cache=/tmp/qfcache5
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import jax

from qwen_flash_jax import atomic, config_lib
from qwen_flash_jax.cache import MANIFEST, SHIPPED_ROOT, file_digests
from qwen_flash_jax.eval.judge_io import cache_name
from qwen_flash_jax.train import assets as assets_lib
from qwen_flash_jax.train import teacher


def entries_for(config, cache: pathlib.Path) -> list[pathlib.Path]:
    """The cache entries the toy main job of `config` reads: its trained teachers, text encoder and judge, and every
    stored benchmark image set in `cache` (export from a cache that only the main job has used)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.cache_dir, config.prebuilt_cache = str(cache), False  # names only: nothing is copied here
    entries = [
        teacher.cache_dir(config, name) for name in sorted(config.teachers.keys()) if not config.teachers[name].path
    ]
    entries.append(cache / "text_encoder" / assets_lib.toy_text_encoder_key(config))
    entries.append(cache / "judge" / cache_name(int(config.data.image_size), 0))
    entries += sorted((cache / "eval_images").glob("*.npz"))
    return entries


def export(config, cache: pathlib.Path, root: pathlib.Path = SHIPPED_ROOT) -> dict:
    """Replaces `root` with the entries of `cache` that `config`'s toy main job reads (teachers: the final
    parameters and marker only, not the training checkpoints) and writes the manifest."""
    entries = entries_for(config, cache)
    missing = [str(e) for e in entries if not e.exists()]
    if missing:
        raise FileNotFoundError(
            f"not in {cache}: {', '.join(missing)}; run the toy main job with --config.cache_dir={cache} first"
        )
    with atomic.publish(root) as staging:  # a failed export leaves the shipped entries as they were
        staging.mkdir()
        for entry in entries:
            dest = staging / entry.relative_to(cache)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if entry.is_file():
                shutil.copyfile(entry, dest)
            elif entry.parent.name == "teachers":
                shutil.copytree(entry / "params", dest / "params")
                shutil.copyfile(entry / "teacher.json", dest / "teacher.json")
            else:
                shutil.copytree(entry, dest)
        manifest = {"jax": jax.__version__, "files": file_digests(staging)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/5to5.py:toy")
    parser.add_argument("--from_cache", required=True, type=pathlib.Path)
    args = parser.parse_args(argv)
    try:
        manifest = export(config_lib.load_config(args.config), args.from_cache)
    except (FileNotFoundError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    size = sum((SHIPPED_ROOT / name).stat().st_size for name in manifest["files"])
    print(f"wrote {len(manifest['files'])} files ({size / 2**20:.1f} MiB) to {SHIPPED_ROOT}")


if __name__ == "__main__":
    main()
