"""Exports the distilled student of a training workdir as a diffusers Qwen-Image 2.1 pipeline folder, or as a LoRA.

    python -m qwen_flash_jax.export --workdir RUN --base PIPELINE_DIR --dst DIR [--ema] [--lora RANK]
        [--config=configs/5to5.py --config.section.field=value ...]

`--config` (and its overrides) must be the training command's: a workdir keeps no copy of its config, and the
student's sampling schedule comes from it (default: the full-scale `configs/5to5.py`).

The pipeline folder (`QwenImage21Pipeline.from_pretrained(DIR)` loads it):
  * `transformer/`: the student (or its EMA with `--ema`) as safetensors shards with diffusers' keys (the inverse
    of `qwen_flash_jax.convert`'s mapping, models/hf_keys.py), plus the base's `config.json`;
  * `model_index.json`: the base's, with `sample_sigmas` = the student's K input times;
  * `scheduler/scheduler_config.json`: the base's with the time shift and terminal stretch off (`shift=1`,
    `use_dynamic_shifting=false`, no `shift_terminal`), so the pipeline samples exactly at `sample_sigmas`, and
    `stochastic_sampling` on when the student re-noises with fresh noise (DMD2, `student.renoise="fresh"`): then
    each step re-noises the x0 prediction with new noise, as the student was trained; off for "predicted", whose
    re-noising is an Euler step;
  * every other component of the base (`vae`, `text_encoder`, `processor`, `tokenizer`, ...) as a symbolic link
    to the base's folder (`--copy` copies them).

With `--lora RANK` DIR holds instead `pytorch_lora_weights.safetensors`, the student-minus-base difference as a
rank-RANK truncated SVD per Linear weight (qwen_flash_jax/lora.py), for `QwenImage21Pipeline.load_lora_weights`,
and `lora.json`: the rank, the reconstruction error it leaves, and the `sample_sigmas` and scheduler settings to
sample the merged student with.

Nothing is half-written: DIR is assembled beside itself and renamed into place when complete. Bad input (a
missing workdir or checkpoint, a base folder without a component, a base transformer of another class, `--ema` on
a run without EMA, a bad rank) is one `error: ...` line and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from qwen_flash_jax import atomic, distilled, lora
from qwen_flash_jax.convert import check_checkpoint, load_source_config, plan
from qwen_flash_jax.errors import CheckpointError, command_line_errors
from qwen_flash_jax.models.config import DIFFUSERS_CLASS_NAME, ConfigError, TransformerConfig, read_json_object
from qwen_flash_jax.safetensors_checkpoint import SafetensorsCheckpoint

MODEL_INDEX = "model_index.json"
TRANSFORMER = "transformer"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
WEIGHTS_NAME = "diffusion_pytorch_model"  # diffusers' file stem for a model's safetensors
DTYPES = ("float32", "bfloat16")
DEFAULT_CONFIG = "configs/5to5.py"
LORA_REPORT = "lora.json"


# --- the base pipeline folder --------------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict:
    return read_json_object(path, f"{what} has no {path.name} ({path})")


def check_base(base) -> tuple[dict, TransformerConfig]:
    """(the base's model_index.json, its transformer's config): every component the index names must be there,
    and the transformer must be a Qwen-Image 2.x one."""
    base = Path(base)
    if not base.is_dir():
        raise ConfigError(f"base pipeline folder {base} does not exist or is not a directory")
    index = read_json(base / MODEL_INDEX, f"base pipeline folder {base}")
    components = [name for name, value in index.items() if not name.startswith("_") and _is_component(value)]
    if TRANSFORMER not in components:
        raise ConfigError(f"{base / MODEL_INDEX} names no transformer component")
    if index[TRANSFORMER][1] != DIFFUSERS_CLASS_NAME:
        raise ConfigError(
            f"{base / MODEL_INDEX}: the transformer is a {index[TRANSFORMER][1]}, not a {DIFFUSERS_CLASS_NAME}"
        )
    missing = [name for name in components if not (base / name).is_dir()]
    if missing:
        raise ConfigError(f"base pipeline folder {base} lacks the component folder(s) {', '.join(missing)}")
    read_json(base / SCHEDULER_CONFIG, f"base pipeline folder {base}")
    config_json = read_json(base / TRANSFORMER / "config.json", f"the base's transformer folder {base / TRANSFORMER}")
    if config_json.get("_class_name") != DIFFUSERS_CLASS_NAME:
        raise ConfigError(
            f"{base / TRANSFORMER / 'config.json'} describes a {config_json.get('_class_name')}, "
            f"not a {DIFFUSERS_CLASS_NAME}"
        )
    return index, load_source_config(base / TRANSFORMER)


def _is_component(value) -> bool:
    """model_index.json lists a component as [library, class]; [null, null] marks one that is absent."""
    return isinstance(value, list) and len(value) == 2 and value[0] is not None and value[1] is not None


def student_scheduler_config(base_config: dict, schedule: distilled.StudentSchedule) -> dict:
    """The base's scheduler config, changed so that the pipeline samples at `sample_sigmas` exactly, re-noising
    as the student does."""
    out = dict(base_config)
    out.update(shift=1.0, use_dynamic_shifting=False, shift_terminal=None)
    out["stochastic_sampling"] = schedule.renoise == "fresh"
    return out


# --- writing -------------------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` (one tensor larger than that gets a shard of
    its own), named as diffusers names them, with the index file when there is more than one shard."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, int(max_bytes)
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # (temporary file name, its keys)
        self.total_bytes = 0

    def add(self, key: str, tensor: np.ndarray) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.max_bytes:
            self._flush()
        self.pending[key] = np.ascontiguousarray(tensor)
        self.pending_bytes += tensor.nbytes
        self.total_bytes += tensor.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.directory / name))
        _readable(self.directory / name)
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flushes, gives the shards their final names and writes the index; returns the file names."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            final = [f"{WEIGHTS_NAME}.safetensors"]
        else:
            final = [f"{WEIGHTS_NAME}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (temporary, keys), name in zip(self.files, final):
            os.replace(self.directory / temporary, self.directory / name)
            weight_map.update({key: name for key in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return final


def _readable(path: Path) -> None:
    """safetensors creates its files readable by their owner only; a model folder is for everyone the umask
    allows, as the JSON files beside it are."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def torch_layout(leaf: np.ndarray, spec) -> np.ndarray:
    """One diffusers tensor out of our (stacked, transposed) leaf: the inverse of the converter's placement."""
    tensor = leaf if spec.layer is None else leaf[spec.layer]
    return tensor.T if spec.transpose else tensor


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# --- export --------------------------------------------------------------------------------------------------------


def export(
    workdir,
    base,
    dst,
    *,
    config,
    ema: bool = False,
    lora_rank: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = 5 << 30,
    copy: bool = False,
    log=None,
) -> dict:
    """Writes the student of `workdir` into `dst` (see the module docstring); returns what it wrote: the step,
    the weights read, `sample_sigmas`, the scheduler's `stochastic_sampling`, and for a LoRA its rank and errors.

    `config`: the run's ConfigDict (`distilled.load_run_config`). Every input is checked before anything is
    written; bad input raises ConfigError / CheckpointError."""
    log = log or (lambda message: None)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if lora_rank is not None:
        lora_rank = lora.check_rank(lora_rank)
    base, dst = Path(base).absolute(), Path(dst).absolute()
    if dst.exists():
        raise ConfigError(f"destination {dst} already exists; remove it or choose another --dst")
    index, model_config = check_base(base)
    student = distilled.open_student(workdir, ema=ema)
    student.check_against(model_config, f"the base's transformer ({base / TRANSFORMER})")
    schedule = distilled.student_schedule(config)
    scheduler = student_scheduler_config(read_json(base / SCHEDULER_CONFIG, str(base)), schedule)
    try:  # last of the checks: it creates dst's parent
        atomic.check_publishable(dst)
    except OSError as e:
        raise ConfigError(f"--dst {dst}: cannot write there: {e.strerror or e}") from None
    report = dict(
        step=student.step,
        weights=student.which,
        sample_sigmas=list(schedule.timesteps),
        stochastic_sampling=scheduler["stochastic_sampling"],
    )
    log(
        f"{student.which} weights of step {student.step} in {workdir}; {len(schedule.timesteps)} steps at "
        f"{[round(t, 4) for t in schedule.timesteps]}, renoise {schedule.renoise!r}"
    )
    with atomic.publish(dst, if_exists="error") as tmp:
        tmp.mkdir()
        if lora_rank is None:
            _write_pipeline(tmp, base, index, schedule, scheduler, copy)
            _write_pipeline_leaves(tmp, model_config, student, _np_dtype(dtype), max_shard_bytes, log)
        else:
            tally = _write_lora(tmp, base, model_config, student, lora_rank, _np_dtype(dtype), log)
            report.update(rank=lora_rank, **tally.summary(), scheduler=scheduler)
            (tmp / LORA_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {dst}")
    return report


def _write_pipeline(tmp, base, index, schedule, scheduler, copy):
    """Everything but the transformer's weights: the index, the scheduler, the transformer's config, the base's
    other components."""
    for name, value in index.items():
        if name.startswith("_") or not _is_component(value) or name in (TRANSFORMER, "scheduler"):
            continue
        if copy:
            shutil.copytree(base / name, tmp / name, symlinks=True)
        else:
            os.symlink(base / name, tmp / name, target_is_directory=True)
    (tmp / "scheduler").mkdir()
    (tmp / SCHEDULER_CONFIG).write_text(json.dumps(scheduler, indent=2) + "\n")
    (tmp / MODEL_INDEX).write_text(json.dumps({**index, "sample_sigmas": list(schedule.timesteps)}, indent=2) + "\n")
    (tmp / TRANSFORMER).mkdir()
    shutil.copyfile(base / TRANSFORMER / "config.json", tmp / TRANSFORMER / "config.json")


def _write_pipeline_leaves(tmp, model_config, student, dtype, max_shard_bytes, log):
    """The student's weights, read one leaf at a time, as diffusers tensors in shards."""
    writer = ShardWriter(tmp / TRANSFORMER, max_shard_bytes)
    leaves = plan(model_config)
    start = time.monotonic()
    for i, (path, _, sources) in enumerate(leaves, 1):
        leaf = student.read_leaf(path)
        for key, spec in sources:
            writer.add(key, torch_layout(leaf, spec).astype(dtype))
        del leaf
        log(
            f"[{i}/{len(leaves)}] {'/'.join(path)}: {writer.total_bytes / 2**20:.1f} MiB, "
            f"{time.monotonic() - start:.1f}s"
        )
    files = writer.close()
    log(f"transformer: {len(files)} safetensors file(s), {writer.total_bytes / 2**20:.1f} MiB")


def _write_lora(tmp, base, model_config, student, rank, dtype, log) -> lora.ErrorTally:
    tally = lora.ErrorTally()
    tensors = {}
    leaves = plan(model_config)
    with SafetensorsCheckpoint(base / TRANSFORMER) as base_weights:
        check_checkpoint(base_weights, model_config)
        for i, (path, _, sources) in enumerate(leaves, 1):
            leaf = student.read_leaf(path)
            for key, spec in sources:
                delta = torch_layout(leaf, spec).astype(np.float64) - base_weights.read(key).astype(np.float64)
                if spec.transpose:  # a Linear weight (out, in)
                    lora_a, lora_b = lora.factorise(delta, rank)
                    tally.add_linear(key, delta, lora_a, lora_b)
                    name = lora.PREFIX + lora.module_name(key)
                    tensors[f"{name}.lora_A.weight"] = lora_a.astype(dtype)
                    tensors[f"{name}.lora_B.weight"] = lora_b.astype(dtype)
                else:
                    tally.add_uncovered(delta)
            log(f"[{i}/{len(leaves)}] {'/'.join(path)}: relative error so far {tally.relative_error:.4f}")
    from safetensors.numpy import save_file

    save_file(tensors, str(tmp / lora.LORA_FILE), metadata={"format": "pt"})
    _readable(tmp / lora.LORA_FILE)
    log(
        f"LoRA rank {rank}: relative error {tally.relative_error:.4g} of ||student - base|| "
        f"(norm scales, which a LoRA cannot hold: {tally.uncovered_share:.4g}; worst matrix {tally.worst_key} "
        f"{tally.worst:.4g})"
    )
    return tally


# --- CLI -----------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error, instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m qwen_flash_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the training run's --workdir")
    p.add_argument("--base", required=True, help="the teacher's diffusers pipeline folder (Qwen-Image 2.1)")
    p.add_argument("--dst", required=True, help="output folder; must not exist")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the run's --config (overrides: --config.a.b=value)")
    p.add_argument("--ema", action="store_true", help="export the student's EMA instead of its raw weights")
    p.add_argument("--lora", type=int, default=None, metavar="RANK", help="write a LoRA of this rank instead")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="stored dtype (default float32)")
    p.add_argument("--max_shard_mb", type=float, default=5 * 1024, help="largest safetensors shard, MiB")
    p.add_argument("--copy", action="store_true", help="copy the base's other components instead of linking them")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; exits with status 2 and one `error: ...` line on bad input, 1 on other I/O errors."""
    argv, overrides = distilled.split_config_args(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    with command_line_errors((CheckpointError, ConfigError)):
        if args.lora is not None:
            lora.check_rank(args.lora)
        if args.max_shard_mb <= 0:
            raise ConfigError(f"--max_shard_mb must be positive, got {args.max_shard_mb}")
        config = distilled.load_run_config(args.config, overrides)
        report = export(
            args.workdir,
            args.base,
            args.dst,
            config=config,
            ema=args.ema,
            lora_rank=args.lora,
            dtype=args.dtype,
            max_shard_bytes=int(args.max_shard_mb * 2**20),
            copy=args.copy,
            log=None if args.quiet else _log,
        )
        if "relative_error" in report:
            print(
                f"LoRA rank {report['rank']}: relative reconstruction error {report['relative_error']:.4g} "
                f"(||student - (base + LoRA)|| / ||student - base||)",
                flush=True,
            )


def _log(message: str):
    print(f"export: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
