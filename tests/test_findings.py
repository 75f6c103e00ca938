"""The paper-findings document: verdicts from synthetic sweeps built to reproduce, contradict or leave a claim open."""

from __future__ import annotations

import json
import pathlib
import re
import time

import numpy as np
import pytest
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from qwen_flash_jax import sweep
from qwen_flash_jax.eval import findings

PAPER_FILE = pathlib.Path("/work/shared/paper/qwen-image-flash.md")
T2I = ("landscape", "portrait", "text")
EDIT = ("scene", "enhance", "object", "text_edit", "identity", "style")
N = 8  # samples per category

# Per row, the student's score offsets (T2I, edit) above a shared per-sample base: E2 > E1 > E4 > E5 > E3 by wide
# margins (F2a reproduces); 9:1 above T2I only on edits (F4b does not reproduce); 7:3 and 5:5 equal on edits (F4a
# inconclusive, see _results' zero-mean jitter).
OFFSETS = {
    "5:5": (0.3, 0.4),
    "T2I only": (0.2, 0.1),
    "single": (0.0, 0.0),
    "single + first-step FM": (-0.2, 0.0),
    "9:1": (0.3, 0.2),
    "7:3": (0.3, 0.4),
    "E1": (0.3, 0.0),
    "E2": (0.5, 0.0),
    "E3": (-0.5, 0.0),
    "E4": (0.1, 0.0),
    "E5": (-0.2, 0.0),
}
# Probe T2I curves: the single specialist rises then falls (F3b reproduces); with the first-step regulariser it
# falls further (F5a does not reproduce).
CURVES = {
    "single": {0: 2.0, 100: 2.6, 200: 2.4, 300: 2.2},
    "single + first-step FM": {0: 2.0, 100: 2.6, 200: 2.2, 300: 1.9},
    "T2I only": {0: 2.0, 100: 2.4, 200: 2.5, 300: 2.6},
}


def _entry(nfe, t2i, edit) -> dict:
    entry = {"nfe": nfe, "t2i_scores": t2i, "edit_scores": edit}
    for task in ("t2i", "edit"):
        entry[task] = {c: float(np.mean(s)) for c, s in entry[f"{task}_scores"].items()}
        entry[f"{task}_average"] = float(np.mean(list(entry[task].values())))
    return entry


def _results(label: str, seed: int) -> dict:
    base = np.linspace(2.0, 3.0, N)
    # A zero-mean jitter that differs by row and seed: paired differences get a spread, not a point.
    jitter = 0.05 * np.resize([1, -1], N) * (1 + (findings.ROW_LABELS.index(label) + seed) % 3)
    t2i_offset, edit_offset = OFFSETS[label]
    student = _entry(
        4,
        {c: list(base + t2i_offset + jitter) for c in T2I},
        {c: list(base + edit_offset + jitter) for c in EDIT},
    )
    return {
        "teacher base (40 steps)": _entry(80, {c: list(base + 0.1) for c in T2I}, {c: list(base) for c in EDIT}),
        "teacher base (4 steps)": _entry(8, {c: list(base - 0.5) for c in T2I}, {c: list(base) for c in EDIT}),
        "student (4 steps)": student,
    }


def _write_events(logdir: pathlib.Path, curve: dict) -> None:
    """Probe scalars as the distillation job's clu writer stores them: rank-0 float tensors."""
    writer = EventFileWriter(str(logdir))
    started = time.time()
    for step, t2i in curve.items():
        values = [
            summary_pb2.Summary.Value(
                tag=tag,
                tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=np.float32(v).tobytes()),
            )
            for tag, v in (("probe/t2i_average", t2i), ("probe/edit_average", 2.0))
        ]
        writer.add_event(
            event_pb2.Event(step=step, wall_time=started + step, summary=summary_pb2.Summary(value=values))
        )
    writer.close()


def make_sweep(workdir: pathlib.Path, skip=()) -> pathlib.Path:
    """A finished paper sweep (two seeds per row) in `workdir`, less the row runs named in `skip`."""
    for label in findings.ROW_LABELS:
        for seed in range(2):
            name = findings.seed_label(label, seed)
            if name in skip:
                continue
            row = workdir / findings.row_dirname(name)
            (row / "logs").mkdir(parents=True)
            (row / "results.json").write_text(json.dumps(_results(label, seed)))
            for kind in ("t2i", "edit"):
                Image.new("RGB", (60, 40), (seed * 100, 50, 200)).save(row / f"grid_{kind}.png")
            _write_events(row / "logs", CURVES.get(label, {0: 2.0, 100: 2.5}))
    return workdir


def _verdicts(doc: pathlib.Path) -> dict:
    return json.loads((doc.parent / findings.PLOT_DIR / "verdicts.json").read_text())


def test_verdicts_of_a_finished_sweep_and_the_files_written(tmp_path):
    workdir = make_sweep(tmp_path / "sweep")
    doc = findings.write_findings(workdir, tmp_path / "out")
    assert doc == tmp_path / "out" / "paper_findings.md"
    verdicts = _verdicts(doc)
    assert verdicts["F1"] == "reproduces"
    assert verdicts["F2a"] == "reproduces"
    assert verdicts["F2b"] == "reproduces"  # E1 and E2 above E3 on the text category
    assert verdicts["F4a"] == "inconclusive"  # 5:5 and 7:3 tie on edits
    assert verdicts["F4b"] == "does not reproduce"  # 9:1 above T2I only on edits
    assert verdicts["F4c"] == "reproduces"
    assert verdicts["F3a"] == "reproduces"  # step-wise (T2I only) above single
    assert verdicts["F3b"] == "reproduces"  # single's curve drops 0.4, step-wise's not at all
    assert verdicts["F5a"] == "does not reproduce"  # the regulariser's curve drops more
    assert verdicts["F5b"] == "reproduces"
    text = doc.read_text()
    assert "Partial sweep" not in text
    assert re.search(r"\| F4b \| .* \| \*\*does not reproduce\*\* \|", text)
    assert "| E1 > E4 (T2I average) |" in text and "(not judged)" in text
    # Every embedded plot exists and is a valid PNG.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) >= 10
    for link in links:
        with Image.open(doc.parent / link) as image:
            assert image.format == "PNG"
            image.verify()
    # Nothing half-written is left behind (atomic.publish's temporaries).
    assert not [p for p in (tmp_path / "out").rglob(".*tmp*")]


def test_a_partial_sweep_reports_the_missing_rows_and_unmeasured_claims(tmp_path):
    skip = {findings.seed_label(label, s) for label in ("E1", "E2", "E3", "E4", "E5") for s in (0, 1)}
    skip |= {"9:1, seed 1"}
    workdir = make_sweep(tmp_path / "sweep", skip)
    (workdir / "E1").mkdir()  # a row that started and has not finished
    doc = findings.write_findings(workdir)
    assert doc.parent == workdir  # the default: beside the rows
    verdicts = _verdicts(doc)
    assert verdicts["F2a"] == verdicts["F2b"] == "not measured yet"
    assert verdicts["F4b"] == "does not reproduce"  # from 9:1's one finished seed
    text = doc.read_text()
    assert "**Partial sweep:** 11 of 22 row runs have no results yet" in text
    assert "| E1 | started, not finished | - |" in text
    assert "| E2, seed 1 | not run yet | - |" in text
    assert "Rows not run yet: E1, E2, E3, E4, E5." in text
    assert "| 9:1 > T2I only (T2I average) |" in text


@pytest.mark.parametrize(
    "pooled, per_seed, verdict",
    [
        ((0.1, 0.05, 0.15), {0: (0.1, 0, 0), 1: (0.08, 0, 0)}, "reproduces"),
        ((-0.1, -0.15, -0.05), {0: (-0.1, 0, 0), 1: (-0.09, 0, 0)}, "does not reproduce"),
        ((0.02, -0.01, 0.05), {0: (0.02, 0, 0), 1: (0.03, 0, 0)}, "inconclusive"),  # interval across 0
        ((0.1, 0.05, 0.15), {0: (0.2, 0, 0), 1: (-0.01, 0, 0)}, "inconclusive"),  # the seeds disagree
        (None, {}, "not measured yet"),
    ],
)
def test_difference_verdict_rules(pooled, per_seed, verdict):
    assert findings.Difference("a", "b", "t2i", None, 1, pooled, per_seed).verdict == verdict
    if pooled is not None and verdict != "inconclusive":  # a claim of the opposite sign gets the opposite verdict
        flipped = {"reproduces": "does not reproduce", "does not reproduce": "reproduces"}[verdict]
        assert findings.Difference("a", "b", "t2i", None, -1, pooled, per_seed).verdict == flipped


def test_claims_combine_their_tests_verdicts():
    r, c, i, n = findings.REPRODUCES, findings.CONTRADICTS, findings.INCONCLUSIVE, findings.NOT_MEASURED
    assert findings.combine([r, r]) == r
    assert findings.combine([r, i]) == i
    assert findings.combine([r, c, i]) == c
    assert findings.combine([r, n, c]) == n


def test_pairs_on_the_seed_mean_and_per_seed(tmp_path):
    """The seed-mean difference pairs each sample's mean over seeds; each seed's own difference is kept."""
    a = findings.Side(
        "a", {0: _entry(4, {"x": [3.0, 3.0]}, {"y": [1.0]}), 1: _entry(4, {"x": [2.0, 2.0]}, {"y": [1.0]})}
    )
    b = findings.Side("b", {None: _entry(4, {"x": [2.0, 2.0]}, {"y": [1.0]})})
    d = findings.measure(a, b, "t2i", None, 1)
    assert d.pooled == pytest.approx((0.5, 0.5, 0.5))
    assert {s: v[0] for s, v in d.per_seed.items()} == pytest.approx({0: 1.0, 1: 0.0})


def test_two_student_rows_pool_only_the_seeds_both_have_finished():
    """A row with a second seed against a row with only its first: seed 1 must not enter the pooled difference."""
    a = findings.Side(
        "a", {0: _entry(4, {"x": [3.0, 3.0]}, {"y": [1.0]}), 1: _entry(4, {"x": [1.0, 1.0]}, {"y": [1.0]})}
    )
    b = findings.Side("b", {0: _entry(4, {"x": [2.0, 2.0]}, {"y": [1.0]})})
    d = findings.measure(a, b, "t2i", None, 1)
    assert d.pooled == pytest.approx((1.0, 1.0, 1.0)) and list(d.per_seed) == [0]
    c = findings.Side("c", {1: _entry(4, {"x": [2.0, 2.0]}, {"y": [1.0]})})
    assert findings.measure(b, c, "t2i", None, 1).pooled is None  # no seed in common: not measured


def test_probe_events_are_read_without_tensorflow_and_a_truncated_tail_is_skipped(tmp_path):
    _write_events(tmp_path, {0: 2.0, 100: 2.5})
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    with open(event_file, "ab") as f:  # a record a running job has not finished writing
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    assert findings.probe_curves(tmp_path)["t2i"] == {0: 2.0, 100: 2.5}
    assert findings.curve_drop({0: 2.0, 100: 2.6, 200: 2.2}) == pytest.approx(0.4)


def test_row_times_come_from_the_sweep_log_else_the_row_files(tmp_path):
    workdir = make_sweep(tmp_path / "sweep", skip={"E1, seed 1"})
    log = tmp_path / "sweep.log"
    log.write_text("sweep paper: row 'E1' finished in 600s\nsweep paper: row '5:5, seed 1' finished in 30s\n")
    timing = findings.row_times(workdir, findings.ROW_LABELS, 2, log)
    assert timing.seconds["E1"] == 600 and timing.source["E1"] == "sweep log"
    # E2's events: a second per step from the file's creation to step 100 (its last probe).
    assert timing.source["E2"] == "row logs" and timing.seconds["E2"] == pytest.approx(100, abs=3)
    assert "E1, seed 1" not in timing.seconds
    # A row with the job's own absl log (a row run outside the sweep): from the log's name to its last line.
    row = workdir / "E3"
    for path in (row / "logs").iterdir():
        path.unlink()
    (row / "logs" / "py_main.vm.root.log.INFO.20261204-125806.14103").write_text(
        "I1204 12:58:06.197859 1 toy.py:83] preparing\nI1204 14:02:15.125159 1 checkpoint.py:1] done\n"
    )
    timing = findings.row_times(workdir, ["E3"], 1)
    assert timing.seconds["E3"] == pytest.approx(64 * 60 + 9, abs=1)


def test_a_missing_sweep_directory_is_a_findings_error(tmp_path):
    with pytest.raises(findings.FindingsError, match="no such sweep directory"):
        findings.write_findings(tmp_path / "nothing")


def test_rows_and_seeds_match_the_sweeps():
    assert findings.ROW_LABELS == tuple(label for label, _, _ in sweep.PAPER_ROWS)
    assert findings.SEEDS == sweep.DEFAULT_SEEDS["paper"]
    assert sweep.row_dirname("single + first-step FM, seed 1") == "single___first_step_FM__seed_1"


@pytest.mark.skipif(not PAPER_FILE.is_file(), reason="the paper's text is not on this machine")
def test_quoted_numbers_are_the_papers():
    """Each quoted row's numbers appear in the paper's text in the same order (Gemini's, then GPT's)."""
    text = " ".join(PAPER_FILE.read_text().split())
    for table, rows in findings.PAPER.items():
        for name, (gemini, gpt) in rows.items():
            pattern = r"\s+".join([re.escape(f"{v:.2f}") for v in gemini] + [r"\d"] + ["GPT 5.5"])
            pattern += r"\s+" + r"\s+".join(re.escape(f"{v:.2f}") for v in gpt)
            assert re.search(pattern, text), f"{table} {name}: {gemini} / {gpt} not in the paper"


def test_the_paper_sweep_writes_the_findings_after_its_rows(tmp_path, monkeypatch):
    from qwen_flash_jax.train import jobs

    def fake_run(config, workdir):
        label = next(label for label in findings.ROW_LABELS if findings.row_dirname(label) == workdir.name)
        (workdir / "logs").mkdir(parents=True)
        (workdir / "results.json").write_text(json.dumps(_results(label, 0)))

    monkeypatch.setattr(jobs, "run", fake_run)
    sweep.run_suite("paper", tmp_path, log=lambda *_: None, seeds=1)
    text = (tmp_path / "paper_findings.md").read_text()
    assert "Partial sweep" not in text
    assert "| F2a | " in text and "(11 rows x 1 seeds;" in text
