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

At full scale (`--variant=full`) there is no toy judge. Rows are unscored (`eval.judge='none'`, the default): the table
lists each row's models and sample grids. With the VLM judges (`--set=eval.judge=vlm --set=eval.vlm_judges=...`)
the table is the paper's per bench: the base teacher's rows from the first row, then each row's student, per judge,
from the rows' VLM scores (eval/vlm_table.py).
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

from qwen_flash_jax import atomic, config_lib
from qwen_flash_jax.data.world import EDIT_CATEGORIES, T2I_CATEGORIES
from qwen_flash_jax.eval import findings, report, vlm_judge, vlm_table
from qwen_flash_jax.eval.findings import row_dirname
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.train import jobs

# The weight of DP-DMD's first-step regulariser in the paper suite's F5 row. Its loss is a per-element mean of the
# squared velocity difference, the DMD loss a per-sample sum over the latent's elements (3,072 in the toy): at 1000
# the two pull on the student's first step at a comparable scale.
PAPER_FIRST_STEP_FM_WEIGHT = 1000.0

# Rows of the paper-findings suite (docs/experiments/paper_findings.md): (label, config, overrides). Each row runs
# once per distillation seed (`--seeds`); F3's step-wise row is the T2I-only row (the same config).
PAPER_ROWS = (
    ("5:5", "configs/5to5.py:{variant}", ()),  # F1 (Table 2) and F4
    ("T2I only", "configs/t2i_only.py:{variant}", ()),  # F4's zero-shot row, F3's step-wise guidance
    ("single", "configs/guidance.py:{variant},single", ()),  # F3: the text specialist alone
    (
        "single + first-step FM",
        "configs/guidance.py:{variant},single",
        (f"student.first_step_fm_weight={PAPER_FIRST_STEP_FM_WEIGHT}",),
    ),  # F5
    ("9:1", "configs/9to1.py:{variant}", ()),
    ("7:3", "configs/7to3.py:{variant}", ()),
    *((e, f"configs/composition.py:{{variant}},{e}", ()) for e in ("E1", "E2", "E3", "E4", "E5")),  # F2
)

SUITES = {
    "composition": tuple((e, f"configs/composition.py:{{variant}},{e}", ()) for e in ("E1", "E2", "E3", "E4", "E5")),
    "guidance": (
        ("single", "configs/guidance.py:{variant},single", ()),
        ("stepwise", "configs/guidance.py:{variant},stepwise", ()),
    ),
    "paper": PAPER_ROWS,
    "ratio": (
        ("T2I only", "configs/t2i_only.py:{variant}", ()),
        ("9:1", "configs/9to1.py:{variant}", ()),
        ("7:3", "configs/7to3.py:{variant}", ()),
        ("5:5", "configs/5to5.py:{variant}", ()),
    ),
}
# Distillation seeds per row when --seeds is not given: the paper suite's findings rest on paired differences of
# hundredths, so every row runs twice.
DEFAULT_SEEDS = {"paper": 2}

_SUITE = flags.DEFINE_enum("suite", None, sorted(SUITES), "Which table to produce.")
_WORKDIR = flags.DEFINE_string("workdir", None, "One subdirectory per row, plus table.md and table.json.")
_VARIANT = flags.DEFINE_string("variant", "toy", "Config argument of every row: toy or full.")
_SET = flags.DEFINE_multi_string("set", [], "Override for every row, e.g. --set=train.steps=150.")
_SEEDS = flags.DEFINE_integer(
    "seeds", None, "Distillation seeds per row (train.seed 0..N-1; seeds after the first run after every row's first)."
)
flags.mark_flags_as_required(["suite", "workdir"])


def row_configs(suite: str, variant: str, overrides=(), seeds: int | None = None) -> list[tuple[str, object]]:
    """(label, config) per row and seed, overrides applied; every config is validated before any row runs. Seed s > 0
    of a row is labelled '<row>, seed s' and sets train.seed = s; all rows' first seed come before any second."""
    seeds = DEFAULT_SEEDS.get(suite, 1) if seeds is None else seeds
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    rows = []
    for seed in range(seeds):
        for label, spec, row_overrides in SUITES[suite]:
            config = config_lib.load_config(spec.format(variant=variant))
            for override in (*row_overrides, *overrides):
                apply_override(config, override)
            if seed:
                config.train.seed = config.train.seed + seed
                label = f"{label}, seed {seed}"
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
    suite: str,
    workdir,
    variant: str = "toy",
    overrides=(),
    log=print,
    library_logs_to_file: bool = False,
    seeds: int | None = None,
) -> dict:
    workdir = pathlib.Path(workdir)
    rows = row_configs(suite, variant, overrides, seeds)
    if library_logs_to_file:  # after the rows' configs are checked: a bad one leaves no directory behind
        jobs.make_workdir(workdir)
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
    if all("models" in results for _, results in done):  # full scale: unscored, or VLM-judged
        combined = combine_full_scale(workdir, done)
        write_full_scale_table(
            workdir, combined, title=f"{suite} sweep ({variant})", notes=_notes([label for label, _ in rows], overrides)
        )
    else:
        combined = combine(done)
        teachers = [name for name in combined if name.startswith("teacher ")]
        report.write_results(
            workdir,
            combined,
            title=f"{suite} sweep ({variant})",
            stem="table",
            reference=teachers[-1] if teachers else None,  # fewest steps: the teacher's few-step sampling
            notes=_notes([label for label, _ in rows], overrides),
        )
        if suite == "paper":  # the findings document and its plots, from every row's results and probe curves
            doc = findings.write_findings(
                workdir,
                labels=[label for label, _, _ in SUITES[suite]],
                seeds=DEFAULT_SEEDS.get(suite, 1) if seeds is None else seeds,
            )
            log(f"sweep {suite}: findings in {doc}")
    log((workdir / "table.md").read_text())
    return combined


def _notes(labels: list[str], overrides) -> str:
    return (
        f"One distillation per student row ({', '.join(labels)}); overrides: {list(overrides) or 'none'}. "
        "Per-row details in the row directories."
    )


def combine_full_scale(workdir, rows: list[tuple[str, dict]]) -> dict:
    """The table of full-scale rows (results.json of `eval.judge` 'none' or 'vlm'): per row its directory, models
    and sample grids; with the VLM judges' scores in every row, per bench the paper's table of the base teacher's
    rows (from the first row) and each row's student, per judge."""
    workdir = pathlib.Path(workdir)
    table = {"rows": []}
    for label, results in rows:
        row_dir = row_dirname(label)
        grids = [
            f"{row_dir}/{name}" for name in ("grid_t2i.png", "grid_edit.png") if (workdir / row_dir / name).exists()
        ]
        table["rows"].append({"label": label, "dir": row_dir, "models": results["models"], "grids": grids})
    judged = [results.get("vlm") for _, results in rows]
    if all(judged):
        table["vlm"] = {bench: _combine_vlm(workdir, rows, bench) for bench in judged[0]}
    elif any(judged):
        unjudged = [label for label, results in rows if not results.get("vlm")]
        raise ConfigError(f"rows {unjudged} have no VLM judges' scores while other rows do: rerun them")
    return table


def _combine_vlm(workdir, rows: list[tuple[str, dict]], bench: str) -> dict:
    """One VLM table for `bench`: the first row's teachers and every row's student (renamed 'student, <label>'),
    per judge, from the rows' scores.jsonl."""
    records, models = [], []
    judges = rows[0][1]["vlm"][bench]["table"]["judges"]
    for i, (label, results) in enumerate(rows):
        entry = results["vlm"][bench]
        row_models = entry["table"]["models"]
        students = [m for m in row_models if m.startswith("student")]
        if len(students) != 1:
            raise ValueError(f"row {label!r}: expected one student in its VLM table, found {students}")
        names = {students[0]: f"student, {label}"}
        if i == 0:  # every row distils the same teacher on the same bench: its rows are taken once
            names = {**{m: m for m in row_models if m not in students}, **names}
        scores = vlm_judge.load_scores(pathlib.Path(workdir) / row_dirname(label) / entry["scores_jsonl"])
        for (_, model, judge), record in scores.items():
            if model in names and judge in judges:
                records.append({**record, "model": names[model]})
        models += [name for name in names.values() if name not in models]
    teachers = [m for m in models if not m.startswith("student, ")]
    return vlm_table.build_table(bench, records, teachers + [m for m in models if m not in teachers], list(judges))


def write_full_scale_table(workdir, table: dict, *, title: str, notes: str) -> None:
    """WORKDIR/table.json and table.md of `combine_full_scale`'s table, each whole or not at all."""
    workdir = pathlib.Path(workdir)
    lines = [f"# {title}", ""]
    if "vlm" in table:
        lines += ["VLM judges' scores, 1-5, higher is better; failures are counted, never scored.", ""]
        for bench, vlm in table["vlm"].items():
            lines += [f"## {report.BENCH_TITLES[bench]}", "", vlm_table.markdown(vlm)]
    else:
        lines += ["Not scored (`eval.judge='none'`): each row's sample grids, one grid row per model.", ""]
    lines += ["## Rows", "", "| row | directory | models (NFE) | sample grids |", "|---|---|---|---|"]
    for row in table["rows"]:
        models = "; ".join(f"{m['name']} ({m['nfe']})" for m in row["models"])
        lines.append(f"| {row['label']} | {row['dir']} | {models} | {', '.join(row['grids']) or '-'} |")
    lines += ["", notes, ""]
    with atomic.publish(workdir / "table.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic.publish(workdir / "table.json") as tmp:
        tmp.write_text(json.dumps(table, indent=2))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    jobs.exit_on_failure(
        functools.partial(run_suite, library_logs_to_file=True, seeds=_SEEDS.value),
        _SUITE.value,
        _WORKDIR.value,
        _VARIANT.value,
        tuple(_SET.value),
    )


if __name__ == "__main__":
    app.run(main)
