"""Paired comparison of one model across two runs (or two models of one run) on the same toy benchmark.

    python -m qwen_flash_jax.eval.compare RUN_A RUN_B [--model=student] [--against=student]

RUN_A and RUN_B are workdirs (or their results.json). Prints `model of A - against of B` per task: the mean
per-sample score difference and its 95% bootstrap interval (report.paired_difference: the samples are paired by
prompt and seed, so the interval excludes most of the prompt-to-prompt variance). Both runs must have scored the
same benchmark (the same eval section of the config), which is checked as far as results.json allows: the same
categories with the same number of samples.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

from qwen_flash_jax.eval.report import paired_difference

TASKS = ("t2i", "edit")


class CompareError(ValueError):
    pass


def load_results(run) -> dict:
    path = pathlib.Path(run)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise CompareError(f"{run}: no results.json (give a finished run's workdir or its results.json)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: not a results.json ({e})") from None
    # A results.json maps each model's row name to its scores (report.write_results).
    if not (
        isinstance(results, dict)
        and results
        and all(isinstance(row, dict) and "t2i_average" in row for row in results.values())
    ):
        raise CompareError(f"{path}: not a results.json (expected model rows with their scores)")
    return results


def resolve(results: dict, name: str, label: str = "first") -> str:
    """The row called `name`, or the one row whose name starts with it ("student" -> "student (4 steps)")."""
    if name in results:
        return name
    matches = [row for row in results if row.startswith(name)]
    if len(matches) != 1:
        raise CompareError(
            f"the {label} run has {'no' if not matches else 'more than one'} model {name!r}; it has {list(results)}"
        )
    return matches[0]


def compare(a: dict, b: dict, model: str = "student", against: str | None = None) -> dict:
    """{task: (mean, low, high)} for `a[model] - b[against or model]`, paired per sample."""
    model, against = resolve(a, model, "first"), resolve(b, against or model, "second")
    out = {}
    for task in TASKS:
        scores_a, scores_b = a[model].get(f"{task}_scores"), b[against].get(f"{task}_scores")
        if scores_a is None or scores_b is None:
            raise CompareError(f"no per-sample {task} scores in one of the runs (results.json from an older version)")
        shape = lambda s: {c: len(v) for c, v in s.items()}  # noqa: E731
        if shape(scores_a) != shape(scores_b):
            raise CompareError(
                f"the runs scored different {task} benchmarks (samples per category "
                f"{shape(scores_a)} against {shape(scores_b)}): a paired comparison needs the same "
                f"eval settings"
            )
        out[task] = paired_difference({"a": a[model], "b": b[against]}, "a", "b", task)
    return out


def format_row(label: str, a: dict, model: str, diffs: dict) -> str:
    cells = [f"{a[model][f'{task}_average']:.3f} | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" for task, d in diffs.items()]
    return f"| {label} | " + " | ".join(cells) + " |"


_MODEL = flags.DEFINE_string(
    "model",
    "student",
    "The first run's model: a results.json row, or the start of its name (the default takes the student row).",
)
_AGAINST = flags.DEFINE_string("against", None, "The second run's model; default: the same as --model.")


def main(argv):
    if len(argv) != 3:
        raise app.UsageError("usage: python -m qwen_flash_jax.eval.compare RUN_A RUN_B [--model=..] [--against=..]")
    try:
        a, b = load_results(argv[1]), load_results(argv[2])
        model, against = resolve(a, _MODEL.value, "first"), resolve(b, _AGAINST.value or _MODEL.value, "second")
        diffs = compare(a, b, model, against)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{model} of {argv[1]} - {against} of {argv[2]} (paired, 95% bootstrap)")
    print("| run | T2I | T2I difference | Edit | Edit difference |")
    print("| --- | --- | --- | --- | --- |")
    print(format_row(argv[1], a, model, diffs))


if __name__ == "__main__":
    app.run(main)
