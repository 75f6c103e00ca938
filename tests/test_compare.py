"""Paired comparison of two runs' results.json (qwen_flash_jax.eval.compare)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from qwen_flash_jax.eval import compare


def _results(rng, shift, per_category=40):
    """A results.json: per-sample scores of one student on 2 T2I and 2 edit categories."""
    row = {"nfe": 4}
    for task, cats in (("t2i", ("landscape", "text")), ("edit", ("scene", "style"))):
        scores = {c: list(np.clip(rng.normal(2.5, 0.6, per_category) + shift[task], 1, 5)) for c in cats}
        row[task] = {c: float(np.mean(s)) for c, s in scores.items()}
        row[f"{task}_scores"] = scores
        row[f"{task}_average"] = float(np.mean(list(row[task].values())))
    return {"student (4 steps)": row}


def test_the_paired_difference_finds_a_shift_the_spread_would_hide(tmp_path):
    rng = np.random.default_rng(0)
    base = _results(rng, {"t2i": 0.0, "edit": 0.0})
    better = json.loads(json.dumps(base))  # the same samples, T2I moved up by 0.05 each, edits unchanged
    for scores in better["student (4 steps)"]["t2i_scores"].values():
        scores[:] = [s + 0.05 for s in scores]
    diffs = compare.compare(better, base)
    mean, low, high = diffs["t2i"]
    assert mean == pytest.approx(0.05, abs=1e-9) and low == pytest.approx(0.05) and high == pytest.approx(0.05)
    assert diffs["edit"] == (0.0, 0.0, 0.0)
    # Independent noise on the same prompts: the interval holds the truth and excludes 0 for a clear shift.
    noisy = _results(np.random.default_rng(1), {"t2i": 0.4, "edit": 0.0})
    mean, low, high = compare.compare(noisy, base)["t2i"]
    assert low < mean < high and low > 0.1


def test_the_command_prints_a_table_row_and_refuses_runs_on_different_benchmarks(tmp_path, capsys):
    """`main` in this process for the table row and each refusal; one real command for what only the process shows:
    exit status 2 and a one-line `error:`, no traceback."""
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(_results(rng, {"t2i": 0.0, "edit": 0.0})))
    (tmp_path / "b.json").write_text(json.dumps(_results(rng, {"t2i": 0.0, "edit": 0.0})))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "small.json").write_text(json.dumps(_results(rng, {"t2i": 0.0, "edit": 0.0}, per_category=20)))

    def run(*args, **flag_values):
        """`main` as absl's app.run calls it: the positional arguments in argv, the flags set (and restored after)."""
        parsed = flags.FLAGS.is_parsed()
        flags.FLAGS.mark_as_parsed()  # not FLAGS(argv): that would validate every flag of every imported module
        try:
            with flagsaver.flagsaver(**flag_values):
                compare.main(["compare", *args])
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            if not parsed:
                flags.FLAGS.unparse_flags()
        out = capsys.readouterr()
        return code, out.out, out.err

    code, stdout, stderr = run(str(tmp_path / "a"), str(tmp_path / "b.json"))
    assert code == 0, stderr
    assert stdout.splitlines()[-1].startswith(f"| {tmp_path / 'a'} | ") and stdout.count("[") == 2
    for args, flag_values, message in (
        ((str(tmp_path / "a"), str(tmp_path / "small.json")), {}, "different t2i benchmarks"),
        ((str(tmp_path / "a"), str(tmp_path / "none")), {}, "no results.json"),
        ((str(tmp_path / "a"), str(tmp_path / "list.json")), {}, "not a results.json"),
        ((str(tmp_path / "a"), str(tmp_path / "b.json")), {"model": "teacher"}, "no model 'teacher'"),
    ):
        code, _, stderr = run(*args, **flag_values)
        assert code == 2 and stderr.startswith("error: ") and message in stderr, (args, stderr)

    # The real command, its flag parsed from the command line.
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_flash_jax.eval.compare",
            str(tmp_path / "a"),
            str(tmp_path / "b.json"),
            "--model=teacher",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no model 'teacher'" in errors[0], bad.stderr
