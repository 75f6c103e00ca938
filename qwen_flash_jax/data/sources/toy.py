"""The procedural toy world as TFDS datasets: ArrayRecord files, one split per category, read by random access.

``toy_world_sources(data_dir)`` prepares ``toy_world_t2i`` / ``toy_world_edit`` into ``data_dir`` once (offline:
nothing is downloaded, GCS is never tried) and returns a ``ToyWorldSource`` per category. Layout on disk::

    data_dir/toy_world_t2i/s32_n1000_seed0/1.0.0/{dataset_info.json, features.json, *.array_record-00000-of-00001}

Example i of category c is ``sample_*(np.random.default_rng([seed, category_index, i]), c, size)``: a pure
function of (seed, c, i). TFDS stores a split's examples in an order given by a hash of their keys (deterministic),
so a record's ``id`` (``toy-s32_n1000_seed0/landscape/000042``) names its i, not its position.

Interrupted preparation is safe: TFDS writes into ``.../incomplete.XXXXXX_1.0.0`` and renames it to ``1.0.0``
when done; a dataset counts as prepared only when ``1.0.0/dataset_info.json`` exists. A killed run leaves its
``incomplete.*`` folder behind (harmless; delete at will) and the next call prepares from scratch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from qwen_flash_jax.data.world import EDIT_CATEGORIES, T2I_CATEGORIES, sample_edit, sample_t2i
from qwen_flash_jax.models.config import ConfigError

from ._common import TASKS, DataError, TaskSources, check_index, check_int, one_line

log = logging.getLogger(__name__)

VERSION = "1.0.0"
FILE_FORMAT = "array_record"
MIN_SIZE = 16  # the world's smallest image size


class ToyWorldConfig(tfds.core.BuilderConfig):
    """size / examples_per_category / seed, all encoded in the config name so settings never share a folder."""

    def __init__(self, *, size: int, examples_per_category: int, seed: int):
        super().__init__(
            name=config_name(size, examples_per_category, seed),
            version=VERSION,
            description=f"{size}x{size} images, {examples_per_category} per category, seed {seed}",
        )
        self.size, self.examples_per_category, self.seed = size, examples_per_category, seed


def config_name(size: int, examples_per_category: int, seed: int) -> str:
    return f"s{size}_n{examples_per_category}_seed{seed}"


class _ToyWorldBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common part of the two builders: splits = categories, offline, one-line logs instead of prints."""

    VERSION = tfds.core.Version(VERSION)
    CATEGORIES: tuple[str, ...] = ()
    # No code folder: TFDS would look next to the module for checksums / metadata files, and its module-path branch
    # needs the `importlib_resources` backport. Nothing here is downloaded, so there is nothing to look for.
    code_path = None

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        return {category: self._generate_examples(category) for category in self.CATEGORIES}

    def _generate_examples(self, category: str) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg = self.builder_config
        index = self.CATEGORIES.index(category)
        prefix = f"toy-{cfg.name}/{category}/"
        for i in range(cfg.examples_per_category):
            yield i, self.example(np.random.default_rng([cfg.seed, index, i]), category, cfg.size, f"{prefix}{i:06d}")

    @staticmethod
    def example(rng: np.random.Generator, category: str, size: int, id_: str) -> dict[str, Any]:
        raise NotImplementedError

    # TFDS prints these two to stdout with termcolor; a log line is enough here.
    def _log_download_bytes(self) -> None:
        log.info("preparing %s/%s into %s", self.name, self.builder_config.name, self.data_dir)

    def _log_download_done(self) -> None:
        pass


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    def initialize_from_bucket(self) -> None:
        """Never on GCS. (TFDS's version runs for every unprepared builder and leaks an empty temp folder.)"""


def _image_feature(size: int) -> tfds.features.Tensor:
    # Raw bytes: the default encoding stores each pixel as an int64 varint, ~3x slower to write and read.
    return tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)


class ToyWorldT2I(_ToyWorldBuilder):
    """T2I examples of the toy world: id, caption, image (size, size, 3) uint8, spec (JSON)."""

    name = "toy_world_t2i"
    CATEGORIES = T2I_CATEGORIES

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` would scan this package's folder for README / TAGS files.
        s = self.builder_config.size
        return _LocalDatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "caption": tfds.features.Text(),
                    "image": _image_feature(s),
                    "spec": tfds.features.Text(),
                }
            ),
        )

    @staticmethod
    def example(rng: np.random.Generator, category: str, size: int, id_: str) -> dict[str, Any]:
        s = sample_t2i(rng, category, size)
        return {"id": id_, "caption": s.caption, "image": s.image, "spec": json.dumps(s.spec)}


class ToyWorldEdit(_ToyWorldBuilder):
    """Edit pairs of the toy world: id, instruction, source and target (size, size, 3) uint8, spec (JSON)."""

    name = "toy_world_edit"
    CATEGORIES = EDIT_CATEGORIES

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.size
        image = _image_feature(s)
        return _LocalDatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "instruction": tfds.features.Text(),
                    "source": image,
                    "target": image,
                    "spec": tfds.features.Text(),
                }
            ),
        )

    @staticmethod
    def example(rng: np.random.Generator, category: str, size: int, id_: str) -> dict[str, Any]:
        e = sample_edit(rng, category, size)
        return {
            "id": id_,
            "instruction": e.instruction,
            "source": e.source,
            "target": e.target,
            "spec": json.dumps(e.spec),
        }


BUILDERS: dict[str, type[_ToyWorldBuilder]] = {"t2i": ToyWorldT2I, "edit": ToyWorldEdit}

# TFDS noise for what is normal here: every config is "custom", and a not-yet-prepared folder has no info file.
_NOISE = ("Using custom data configuration", "has no dataset_info.json")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in _NOISE)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Drops TFDS's expected warnings and its progress bars for the duration (both restored afterwards)."""
    absl_logger, noise = logging.getLogger("absl"), _DropNoise()
    bars_were_on = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    absl_logger.addFilter(noise)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(bars_were_on)
        absl_logger.removeFilter(noise)


def _builder(task: str, data_dir: str, size: int, n: int, seed: int) -> _ToyWorldBuilder:
    config = ToyWorldConfig(size=size, examples_per_category=n, seed=seed)
    with _quiet_tfds():
        return BUILDERS[task](data_dir=data_dir, config=config, file_format=FILE_FORMAT)


def _is_prepared(builder: _ToyWorldBuilder) -> bool:
    """True once the finished folder (with its dataset_info.json) is in place; never true for an incomplete.* one."""
    with _quiet_tfds():
        return builder.is_prepared()


def prepare(task: str, data_dir: str, size: int, n: int, seed: int) -> _ToyWorldBuilder:
    """The builder of a prepared dataset, generating it first unless a finished copy is already in data_dir."""
    builder = _builder(task, data_dir, size, n, seed)
    if _is_prepared(builder):
        return builder
    t0 = time.perf_counter()
    download_config = tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP
    )
    try:
        with _quiet_tfds():
            builder.download_and_prepare(download_config=download_config, file_format=FILE_FORMAT)
    except OSError:
        # Another process preparing the same config may have renamed its folder into place first.
        builder = _builder(task, data_dir, size, n, seed)
        if not _is_prepared(builder):
            raise
        log.info("%s/%s was prepared by another process meanwhile; using it", builder.name, builder.builder_config.name)
        return builder
    total = sum(s.num_examples for s in builder.info.splits.values())
    log.info(
        "prepared %s/%s: %d examples in %.1f s (%s)",
        builder.name,
        builder.builder_config.name,
        total,
        time.perf_counter() - t0,
        builder.data_dir,
    )
    return builder


class ToyWorldSource:
    """One category split of a prepared toy dataset, as record dicts.

    Pickles as its settings only; each process (re)opens the ArrayRecord files on first access.
    """

    def __init__(
        self,
        task: str,
        data_dir: str,
        size: int,
        examples_per_category: int,
        seed: int,
        category: str,
        length: int,
        reader: Any = None,
    ):
        self.task, self.data_dir, self.size = task, data_dir, size
        self.examples_per_category, self.seed, self.category = examples_per_category, seed, category
        self._length = length
        self._reader = reader
        self._lock = threading.Lock()

    def _open(self) -> Any:
        with self._lock:
            if self._reader is None:
                builder = _builder(self.task, self.data_dir, self.size, self.examples_per_category, self.seed)
                if not _is_prepared(builder):
                    raise DataError(
                        f"{builder.data_dir}: toy dataset is not prepared (was it deleted?); "
                        f"call toy_world_sources again"
                    )
                with _quiet_tfds():
                    self._reader = builder.as_data_source(split=self.category)
            return self._reader

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = (self._reader or self._open())[check_index(index, self._length)]
        # Images are copied: TFDS returns read-only views of the record bytes, JSONL sources writable arrays.
        if self.task == "t2i":
            return {
                "id": ex["id"].decode(),
                "category": self.category,
                "caption": ex["caption"].decode(),
                "image": np.array(ex["image"]),
                "spec": ex["spec"].decode(),
            }
        return {
            "id": ex["id"].decode(),
            "category": self.category,
            "instruction": ex["instruction"].decode(),
            "source": np.array(ex["source"]),
            "target": np.array(ex["target"]),
            "spec": ex["spec"].decode(),
        }

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_reader", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _reader=None, _lock=threading.Lock())

    def __repr__(self) -> str:
        return (
            f"ToyWorldSource({self.task}/{self.category}, {self._length} records, "
            f"{config_name(self.size, self.examples_per_category, self.seed)})"
        )


def _check_current(source: ToyWorldSource) -> None:
    """Regenerates the first stored record from its id and compares: catches data prepared by older world code."""
    record = source[0]
    i = int(record["id"].rsplit("/", 1)[1])
    cls = BUILDERS[source.task]
    fresh = cls.example(
        np.random.default_rng([source.seed, cls.CATEGORIES.index(source.category), i]),
        source.category,
        source.size,
        record["id"],
    )
    if any(not np.array_equal(record[k], v) if isinstance(v, np.ndarray) else record[k] != v for k, v in fresh.items()):
        name = config_name(source.size, source.examples_per_category, source.seed)
        folder = os.path.join(source.data_dir, cls.name, name)
        raise DataError(
            f"{folder}: record {record['id']!r} differs from what the toy world generates now (data "
            f"prepared by older code?); delete that folder to regenerate it"
        )


def toy_world_sources(
    data_dir: str | os.PathLike,
    *,
    size: int = 32,
    examples_per_category: int = 1000,
    seed: int = 0,
    tasks: tuple[str, ...] = TASKS,
) -> TaskSources:
    """{"t2i": {category: source}, "edit": {category: source}} over the toy world, prepared into data_dir once."""
    size = check_int("size", size, MIN_SIZE)
    n = check_int("examples_per_category", examples_per_category, 1)
    seed = check_int("seed", seed, 0)
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"tasks must be a non-empty subset of {list(TASKS)}, got {list(tasks)}")
    data_dir = os.fspath(data_dir)
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"{data_dir}: cannot create the data folder: {one_line(e)}") from None
    out: TaskSources = {}
    for task in TASKS:
        if task not in tasks:
            continue
        builder = prepare(task, data_dir, size, n, seed)
        with _quiet_tfds():
            readers = builder.as_data_source()
        out[task] = {}
        for category in builder.CATEGORIES:
            reader = readers[category]
            out[task][category] = ToyWorldSource(task, data_dir, size, n, seed, category, len(reader), reader)
            _check_current(out[task][category])
    return out
