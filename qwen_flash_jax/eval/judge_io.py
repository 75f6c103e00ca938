"""Saving, loading and caching toy judges: a directory with ``judge.json`` (config, thresholds, accuracies) and
``arrays.npz`` (parameters and reference statistics, loaded without pickle). Writes go to a temporary sibling
directory that is renamed into place (`atomic.publish`), so a reader never sees a half-written judge. Local paths only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from qwen_flash_jax import atomic
from qwen_flash_jax.eval import judge as judge_lib
from qwen_flash_jax.eval.judge_net import JUDGE_VERSION, JudgeConfig

_FORMAT = "qwen_flash_jax.toy_judge"
_JSON, _ARRAYS = "judge.json", "arrays.npz"


def _local_path(path) -> Path:
    text = os.fspath(path)
    if "://" in str(text):
        raise ValueError(f"toy judges are stored on the local file system only; got {text!r}")
    return Path(text)


def save_judge(judge, path, overwrite: bool = True) -> Path:
    """Write ``judge`` to the directory ``path`` atomically; with ``overwrite=False`` an existing judge is kept."""
    path = _local_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": _FORMAT,
        "version": JUDGE_VERSION,
        "config": judge.config.to_json(),
        "thresholds": {k: float(v) for k, v in judge.thresholds.items()},
        "accuracy": {k: float(v) for k, v in judge.accuracy.items()},
        "train_seconds": float(judge.train_seconds),
    }
    arrays = {f"params/{k}": np.asarray(v) for k, v in judge.params.items()}
    arrays.update({f"reference/{k}": np.asarray(v) for k, v in judge.reference.items()})
    with atomic.publish(path, if_exists="replace" if overwrite else "keep") as tmp:
        tmp.mkdir()
        with open(tmp / _ARRAYS, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / _JSON, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    return path


def load_judge(path):
    """Read a judge written by :func:`save_judge`; ValueError if it is missing, corrupt or of another version."""
    path = _local_path(path)
    if not (path / _JSON).is_file() or not (path / _ARRAYS).is_file():
        raise ValueError(f"no toy judge at {path} (expected {_JSON} and {_ARRAYS})")
    try:
        meta = json.loads((path / _JSON).read_text())
        with np.load(path / _ARRAYS, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt toy judge at {path}: {e}") from e
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a toy judge (format {meta.get('format')!r})")
    if meta.get("version") != JUDGE_VERSION:
        raise ValueError(f"toy judge at {path} has version {meta.get('version')}, this code needs {JUDGE_VERSION}")
    config = JudgeConfig.from_json(meta["config"])
    params = {k[len("params/") :]: v for k, v in arrays.items() if k.startswith("params/")}
    reference = {k[len("reference/") :]: v for k, v in arrays.items() if k.startswith("reference/")}
    judge = judge_lib.ToyJudge(
        config,
        params,
        reference,
        dict(meta["thresholds"]),
        dict(meta["accuracy"]),
        float(meta.get("train_seconds", 0.0)),
    )
    judge._forward(np.zeros((1, config.size, config.size, 3), np.uint8))  # checks parameter names and shapes
    return judge


def cache_name(size: int, seed: int, overrides: dict | None = None) -> str:
    name = f"toy_judge_v{JUDGE_VERSION}_size{size}_seed{seed}"
    if overrides:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name += f"_{digest}"
    return name


def load_or_train_judge(cache_dir, size: int = 32, seed: int = 0, log=print, **train_overrides):
    """The judge for (size, seed) from ``cache_dir``, trained and cached there first if missing or unreadable."""
    path = _local_path(cache_dir) / cache_name(size, seed, train_overrides)
    stale = False
    if path.exists():
        try:
            return load_judge(path)
        except ValueError as e:
            stale = True
            if log is not None:
                log(f"retraining the toy judge: {e}")
    judge = judge_lib.train_judge(size=size, seed=seed, log=log, **train_overrides)
    # A concurrent trainer of the same (deterministic) judge may have saved it meanwhile: keep theirs then.
    save_judge(judge, path, overwrite=stale)
    return judge
