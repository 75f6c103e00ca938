"""The on-disk cache of built toy networks and benchmark images, and the trained toy entries that ship with the
package.

Toy assets (the dataset, the text encoder, teachers, the judge, benchmark images) are built on first use and cached
under `config.cache_dir` (default ~/.cache/qwen_flash_jax), one folder per category, each entry keyed by a hash of
what it depends on (`config_hash`, `params_fingerprint`), so many runs share one dataset and one text encoder.

The toy default's entries ship in `qwen_flash_jax/prebuilt_cache/`, laid out like the cache itself;
`cache_category` copies them into the cache the first time a toy run needs that category (`train/prebuilt.py`
explains and exports them).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Callable

import jax
import numpy as np

from qwen_flash_jax import atomic

SHIPPED_ROOT = pathlib.Path(__file__).resolve().parent / "prebuilt_cache"
MANIFEST = "MANIFEST.json"


def cache_root(config) -> pathlib.Path:
    root = config.get("cache_dir") or os.path.join(os.path.expanduser("~"), ".cache", "qwen_flash_jax")
    return pathlib.Path(root)


def cache_category(config, category: str, log: Callable[[str], None] | None = None) -> pathlib.Path:
    """`cache_root(config) / category`, holding the package's shipped toy entries of that category for toy-world
    runs, unless `config.prebuilt_cache` is False."""
    path = cache_root(config) / category
    if config.get("prebuilt_cache", True) and config.text_encoder.kind == "toy":
        seed(category, path, log=log)
    return path


def config_hash(*parts) -> str:
    text = json.dumps([p.to_dict() if hasattr(p, "to_dict") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def params_fingerprint(tree) -> str | None:
    """A digest of a pytree's values (leaf paths, shapes, dtypes and bytes): equal digests, equal parameters.
    Reads every leaf to the host, so it is meant for the toy world's small networks; None when some leaf is not
    whole on this process (sharded over hosts)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not all(getattr(leaf, "is_fully_addressable", True) for _, leaf in leaves):
        return None
    digest = hashlib.sha256()
    for path, leaf in leaves:
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def seed(category: str, target: pathlib.Path, root: pathlib.Path = SHIPPED_ROOT, log=None) -> list[str]:
    """Copies each shipped entry of `category` (a directory or a file under `root/category`) that `target` lacks,
    whole or not at all (`atomic.publish`). Entries already there, or seeded meanwhile by a concurrent run, are
    kept."""
    source = root / category
    if not source.is_dir():
        return []
    copied = []
    for entry in sorted(source.iterdir()):
        dest = target / entry.name
        if dest.exists():
            continue
        with atomic.publish(dest, if_exists="keep") as tmp:
            if entry.is_dir():
                shutil.copytree(entry, tmp)
            else:
                shutil.copyfile(entry, tmp)
        copied.append(entry.name)
    if copied and log is not None:
        log(f"cache: copied the shipped toy {category} {', '.join(copied)} into {target}")
    return copied


def file_digests(root: pathlib.Path = SHIPPED_ROOT) -> dict[str, str]:
    """sha256 of every shipped file, by its path under `root` (the manifest's record)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
