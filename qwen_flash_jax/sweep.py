"""The paper's comparison tables, from one distillation run per row.

    python -m qwen_flash_jax.sweep --suite=ratio --workdir=/tmp/qf_ratio                 # toy, Tables 3-4
    python -m qwen_flash_jax.sweep --suite=composition --workdir=/tmp/qf_e --set=train.steps=150

Suites: `composition` (Table 1: E1-E5, T2I-only students, base teacher), `guidance` (Section 4: one text
specialist against step-wise multi-teacher guidance) and `ratio` (Tables 3-4: T2I-only, 9:1, 7:3, 5:5).
Each row is the main job of one config, run into WORKDIR/<row>; a row whose results.json exists is not rerun, so a
killed sweep resumes where it stopped. All rows share the cache (toy teachers are trained once). `--set` overrides
a field of every row's config (`section.field=value`, the value parsed by the field's type as
`--config.section.field=value` is).

Writes WORKDIR/table.md and table.json: each row's 4-NFE student beside the base teacher at 40 and 4 steps (taken
from the first row: every row distils the same cached teacher and is scored on the same prompts and seeds).
"""

from __future__ import annotations

import ast
import functools
import json
import pathlib
import time

import ml_collections
from absl import app, flags
from ml_collections.config_flags import config_path, tuple_parser

from qwen_flash_jax import config_lib
from qwen_flash_jax.data.world import EDIT_CATEGORIES, T2I_CATEGORIES
from qwen_flash_jax.eval import report
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train import jobs

SUITES = {
    "composition": tuple((e, f"configs/composition.py:{{variant}},{e}") for e in ("E1", "E2", "E3", "E4", "E5")),
    "guidance": (
        ("single", "configs/guidance.py:{variant},single"),
        ("stepwise", "configs/guidance.py:{variant},stepwise"),
    ),
    "ratio": (
        ("T2I only", "configs/t2i_only.py:{variant}"),
        ("9:1", "configs/9to1.py:{variant}"),
        ("7:3", "configs/7to3.py:{variant}"),
        ("5:5", "configs/5to5.py:{variant}"),
    ),
}

_SUITE = flags.DEFINE_enum("suite", None, sorted(SUITES), "Which table to produce.")
_WORKDIR = flags.DEFINE_string("workdir", None, "One subdirectory per row, plus table.md and table.json.")
_VARIANT = flags.DEFINE_string("variant", "toy", "Config argument of every row: toy or full.")
_SET = flags.DEFINE_multi_string("set", [], "Override for every row, e.g. --set=train.steps=150.")
flags.mark_flags_as_required(["suite", "workdir"])


def row_configs(suite: str, variant: str, overrides=()) -> list[tuple[str, object]]:
    """(label, config) per row, overrides applied; every config is validated before any row runs."""
    rows = []
    for label, spec in SUITES[suite]:
        config = config_lib.load_config(spec.format(variant=variant))
        for override in overrides:
            apply_override(config, override)
        jobs.validate(config)
        rows.append((label, config))
    return rows


# What `--config.section.field=value` parses a value with (ml_collections' config flags), by the field's type; any
# other type takes a Python literal.
_FIELD_PARSERS = {
    bool: flags.BooleanParser(),
    int: flags.IntegerParser(),
    float: flags.FloatParser(),
    str: flags.ArgumentParser(),
    tuple: tuple_parser.TupleParser(),
}


def apply_override(config, override: str) -> None:
    """'train.steps=150' -> config.train.steps = 150: the value parsed as `--config.train.steps=150` would be (by
    the field's type), set with ml_collections' type checks; mistakes are ConfigErrors."""
    path, sep, text = override.partition("=")
    if not sep or not path:
        raise ConfigError(f"--set must look like section.field=value, got {override!r}")
    try:
        field_type = config_path.get_type(path, config)
    except (KeyError, AttributeError, IndexError, ValueError):
        raise ConfigError(f"--set {override!r}: the config has no field {path!r}") from None
    if isinstance(field_type, type) and issubclass(field_type, ml_collections.ConfigDict):
        raise ConfigError(f"--set {override!r}: {path!r} is a section; set its fields one by one")
    try:
        parser = _FIELD_PARSERS.get(field_type)
        value = parser.parse(text) if parser else _literal(text)
        config_path.set_value(path, config, value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--set {override!r}: {e}") from None


def _literal(text: str):
    """A Python literal, or the text itself (a bare string), for fields whose type says nothing (None defaults)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def row_dirname(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def combine(rows: list[tuple[str, dict]]) -> dict:
    """One results dict: the base teacher's rows (from the first row's results, most steps first) and one student
    row per label, categories in the world's order."""
    if not rows:
        raise ValueError("no results to combine")
    first = rows[0][1]
    teachers = sorted((name for name in first if name.startswith("teacher ")), key=lambda n: -first[n]["nfe"])
    combined = {name: first[name] for name in teachers}
    for label, results in rows:
        students = [name for name in results if name.startswith("student")]
        if len(students) != 1:
            raise ValueError(f"row {label!r}: expected one student in its results, found {students}")
        combined[f"student, {label}"] = results[students[0]]
    return {name: _in_world_order(r) for name, r in combined.items()}


def _in_world_order(result: dict) -> dict:
    out = dict(result)
    for key, order in (("t2i", T2I_CATEGORIES), ("edit", EDIT_CATEGORIES)):
        for field in (key, f"{key}_scores", f"{key}_fd"):
            if field in out:
                out[field] = {c: out[field][c] for c in order if c in out[field]}
    return out


def run_suite(
    suite: str, workdir, variant: str = "toy", overrides=(), log=print, library_logs_to_file: bool = False
) -> dict:
    workdir = pathlib.Path(workdir)
    rows = row_configs(suite, variant, overrides)
    if library_logs_to_file:  # after the rows' configs are checked: a bad one leaves no directory behind
        jobs.send_library_logs_to_file(workdir / "logs")
    done = []
    for i, (label, config) in enumerate(rows):
        row_dir = workdir / row_dirname(label)
        results_file = row_dir / "results.json"
        if results_file.exists():
            log(f"sweep {suite}: row {i + 1}/{len(rows)} {label!r} already done ({row_dir})")
        else:
            log(f"sweep {suite}: row {i + 1}/{len(rows)} {label!r} -> {row_dir}")
            started = time.perf_counter()
            jobs.run(config, row_dir)
            log(f"sweep {suite}: row {label!r} finished in {time.perf_counter() - started:.0f}s")
        done.append((label, json.loads(results_file.read_text())))
    combined = combine(done)
    teachers = [name for name in combined if name.startswith("teacher ")]
    report.write_results(
        workdir,
        combined,
        title=f"{suite} sweep ({variant})",
        stem="table",
        reference=teachers[-1] if teachers else None,  # fewest steps: the teacher's few-step sampling
        notes=f"One distillation per student row ({', '.join(label for label, _ in rows)}); "
        f"overrides: {list(overrides) or 'none'}. Per-row details in the row directories.",
    )
    log((workdir / "table.md").read_text())
    return combined


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    jobs.exit_on_failure(
        functools.partial(run_suite, library_logs_to_file=True),
        _SUITE.value,
        _WORKDIR.value,
        _VARIANT.value,
        tuple(_SET.value),
    )


if __name__ == "__main__":
    app.run(main)
