"""The table sweeps: rows are the paper's configs, overrides are checked, finished rows are not rerun."""

import json
import subprocess
import sys

import pytest

from qwen_flash_jax import sweep
from qwen_flash_jax.models.config import ConfigError


def test_rows_are_the_papers_configs():
    ratio = dict(sweep.row_configs("ratio", "toy"))
    assert {label: c.data.task_ratio for label, c in ratio.items()} == {
        "T2I only": "1:0",
        "9:1": "9:1",
        "7:3": "7:3",
        "5:5": "5:5",
    }
    composition = dict(sweep.row_configs("composition", "toy"))
    assert dict(composition["E3"].data.t2i_weights) == {"text": 1.0}
    assert set(composition["E5"].data.t2i_weights) == {"landscape", "portrait", "text"}
    guidance = dict(sweep.row_configs("guidance", "toy"))
    assert tuple(guidance["single"].guidance.teachers) == ("text",)
    assert tuple(guidance["stepwise"].guidance.teachers) == ("base", "text")


def test_the_paper_suite_runs_every_finding_s_rows_at_two_seeds():
    rows = dict(sweep.row_configs("paper", "toy"))
    labels = [label for label, *_ in sweep.PAPER_ROWS]
    assert list(rows) == labels + [f"{label}, seed 1" for label in labels]  # every first seed before any second
    assert {rows[label].train.seed for label in labels} == {0}
    assert {rows[f"{label}, seed 1"].train.seed for label in labels} == {1}
    # F3's step-wise row is the T2I-only row: the same config as the guidance suite's step-wise row.
    stepwise = dict(sweep.row_configs("guidance", "toy"))["stepwise"]
    assert rows["T2I only"].to_dict() == stepwise.to_dict()
    # F5: the single specialist with DP-DMD's first-step regulariser, and nothing else changed.
    single, regularised = rows["single"].to_dict(), rows["single + first-step FM"].to_dict()
    assert regularised["student"].pop("first_step_fm_weight") == sweep.PAPER_FIRST_STEP_FM_WEIGHT > 0
    assert single["student"].pop("first_step_fm_weight") == 0.0 and regularised == single
    assert [label for label, _ in sweep.row_configs("paper", "toy", seeds=1)] == labels
    with pytest.raises(ConfigError, match="--seeds must be at least 1"):
        sweep.row_configs("paper", "toy", seeds=0)


def test_overrides_set_nested_fields_and_reject_mistakes():
    (_, config), *_ = sweep.row_configs("ratio", "toy", ("train.steps=7", "data.task_ratio=3:1"))
    assert config.train.steps == 7 and config.data.task_ratio == "3:1"
    for bad, message in (
        ("train.nosuch=1", "no field"),
        ("train.steps=abc", "steps"),
        ("steps", "look like"),
        ("data.task_ratio=3-7", "task ratio"),
    ):
        with pytest.raises(ConfigError, match=message):
            sweep.row_configs("ratio", "toy", (bad,))


def test_override_values_parse_by_the_fields_type_as_config_flags_do():
    config = sweep.row_configs("ratio", "toy")[0][1]
    for override in ("guidance.teachers=base", "student.ema_decay=0", "data.task_ratio=5", "train.steps=3"):
        sweep.apply_override(config, override)
    assert config.guidance.teachers == ("base",)
    assert config.student.ema_decay == 0.0 and isinstance(config.student.ema_decay, float)
    assert config.data.task_ratio == "5" and config.train.steps == 3
    with pytest.raises(ConfigError, match=r"^--set 'student=1': 'student' is a section"):
        sweep.apply_override(config, "student=1")
    with pytest.raises(ConfigError, match=r"^--set 'student.gan_weight=x': could not convert"):
        sweep.apply_override(config, "student.gan_weight=x")


def _results(student_t2i):
    def entry(nfe, t2i):
        return {"nfe": nfe, "t2i": {"landscape": t2i}, "t2i_average": t2i, "edit": {"scene": 1.0}, "edit_average": 1.0}

    return {
        "teacher base (40 steps)": entry(80, 2.0),
        "teacher base (4 steps)": entry(8, 1.5),
        "student (4 steps)": entry(4, student_t2i),
    }


def test_run_suite_reruns_only_unfinished_rows_and_writes_the_table(tmp_path, monkeypatch):
    from qwen_flash_jax.train import jobs

    ran = []

    def fake_run(config, workdir):
        ran.append(workdir.name)
        workdir.mkdir(parents=True)
        (workdir / "results.json").write_text(json.dumps(_results(1.0 + 0.1 * len(ran))))

    monkeypatch.setattr(jobs, "run", fake_run)
    done = tmp_path / "5_5"
    done.mkdir()
    (done / "results.json").write_text(json.dumps(_results(1.9), sort_keys=True))  # any key order
    table = sweep.run_suite("ratio", tmp_path, log=lambda *_: None)
    assert ran == ["T2I_only", "9_1", "7_3"]  # 5:5 had finished before
    assert list(table) == [
        "teacher base (40 steps)",
        "teacher base (4 steps)",
        "student, T2I only",
        "student, 9:1",
        "student, 7:3",
        "student, 5:5",
    ]
    assert table["student, 5:5"]["t2i_average"] == 1.9
    text = (tmp_path / "table.md").read_text()
    assert "| student, 5:5 | 4 | 1.90 | 1.90 | 2 |" in text
    assert "Paired differences against teacher base (4 steps)" in text
    assert json.loads((tmp_path / "table.json").read_text()) == table


@pytest.mark.job  # the sweep command, in a subprocess
def test_cli_rejects_a_bad_override_with_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "qwen_flash_jax.sweep", "--suite=ratio", f"--workdir={workdir}", "--set=train.nosuch=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no field 'train.nosuch'" in errors[0], result.stderr[-2000:]
    assert not workdir.exists()


def test_full_scale_rows_unscored_make_a_table_of_their_grids(tmp_path, monkeypatch):
    """Full-scale rows (results.json of eval.judge='none': models and grids, no scores) once crashed the table."""
    from qwen_flash_jax.train import jobs

    models = [{"name": "teacher base (40 steps)", "nfe": 80}, {"name": "student (4 steps)", "nfe": 4}]

    def fake_run(config, workdir):
        workdir.mkdir(parents=True)
        (workdir / "grid_t2i.png").write_bytes(b"png")
        results = {"scored": False, "models": models, "t2i_prompts": ["p"], "edit_instructions": []}
        (workdir / "results.json").write_text(json.dumps(results))

    monkeypatch.setattr(jobs, "run", fake_run)
    monkeypatch.setattr(
        sweep, "row_configs", lambda suite, variant, overrides, seeds: [("T2I only", None), ("5:5", None)]
    )
    table = sweep.run_suite("ratio", tmp_path, "full", log=lambda *_: None)
    assert table == {
        "rows": [
            {"label": "T2I only", "dir": "T2I_only", "models": models, "grids": ["T2I_only/grid_t2i.png"]},
            {"label": "5:5", "dir": "5_5", "models": models, "grids": ["5_5/grid_t2i.png"]},
        ]
    }
    assert json.loads((tmp_path / "table.json").read_text()) == table
    md = (tmp_path / "table.md").read_text()
    assert (
        "Not scored" in md
        and "| 5:5 | 5_5 | teacher base (40 steps) (80); student (4 steps) (4) | 5_5/grid_t2i.png |" in md
    )
