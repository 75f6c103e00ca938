"""A paper sweep's rows as the findings read them: their results per seed, probe curves from TensorBoard events
(read without TensorFlow), per-sample seed means and the rows' wall times."""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import re
import struct

import numpy as np
from tensorboard.compat.proto import event_pb2  # the protobuf alone: reading events needs no TensorFlow

from qwen_flash_jax.eval import compare

# The paper suite's rows (sweep.PAPER_ROWS, which tests/test_findings.py checks against), in the sweep's order, and
# its distillation seeds per row (sweep.DEFAULT_SEEDS["paper"]).
ROW_LABELS = ("5:5", "T2I only", "single", "single + first-step FM", "9:1", "7:3", "E1", "E2", "E3", "E4", "E5")
SEEDS = 2
STEPWISE = "T2I only"  # F3's step-wise multi-teacher row is the T2I-only student (configs/t2i_only.py)
DOC = "paper_findings.md"
PLOT_DIR = "paper_findings"


class FindingsError(ValueError):
    """The sweep directory cannot give findings (no such directory, rows without toy scores)."""


def row_dirname(label: str) -> str:
    """A row's directory under the sweep's workdir (the sweep names them with this too)."""
    return "".join(c if c.isalnum() else "_" for c in label)


def seed_label(label: str, seed: int) -> str:
    """The sweep's label of a row's seed-th distillation: seed 0 is the row itself."""
    return label if seed == 0 else f"{label}, seed {seed}"


# ---------------------------------------------------------------------------------------------------------------
# Reading the sweep


@dataclasses.dataclass
class Row:
    label: str
    results: dict  # seed -> that seed's results.json, finished seeds only
    status: dict  # seed -> "done" | "started, not finished" | "not run yet"
    curves: dict  # seed -> {"t2i": {step: score}, "edit": {step: score}} from the probes' TensorBoard scalars

    @property
    def done(self) -> bool:
        return bool(self.results)

    def student(self, seed: int) -> dict:
        results = self.results[seed]
        return results[compare.resolve(results, "student")]


def load_rows(workdir, labels=ROW_LABELS, seeds: int = SEEDS) -> dict[str, Row]:
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise FindingsError(f"{workdir}: no such sweep directory")
    rows = {}
    for label in labels:
        row = Row(label, {}, {}, {})
        for seed in range(seeds):
            row_dir = workdir / row_dirname(seed_label(label, seed))
            if (row_dir / "results.json").is_file():
                try:
                    results = compare.load_results(row_dir)
                except compare.CompareError as e:
                    raise FindingsError(str(e)) from None
                if not all("t2i_scores" in r for r in results.values()):
                    raise FindingsError(f"{row_dir}: results.json without per-sample toy scores (a full-scale row?)")
                row.results[seed], row.status[seed] = results, "done"
            else:
                row.status[seed] = "started, not finished" if row_dir.is_dir() else "not run yet"
            if row_dir.is_dir():
                row.curves[seed] = probe_curves(row_dir / "logs")
        rows[label] = row
    return rows


def events(path):
    """The Event protos of one TensorBoard event file, read from its TFRecord framing (length, its CRC, the proto,
    its CRC) so that no TensorFlow is loaded; a record a running job is still writing (a truncated tail) is skipped."""
    data, pos = pathlib.Path(path).read_bytes(), 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            return
        pos = end + 4
        yield event_pb2.Event.FromString(data[start:end])


def read_scalars(logdir, prefix: str = "") -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars in `logdir`'s TensorBoard event files (tags starting with `prefix`).
    Later files win a step written twice (a resumed run)."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        for event in events(path):
            for value in event.summary.value:
                if not value.tag.startswith(prefix):
                    continue
                if value.HasField("tensor"):  # clu writes scalars as rank-0 tensors
                    tensor = value.tensor
                    number = tensor.float_val[0] if tensor.float_val else np.frombuffer(tensor.tensor_content, "<f4")[0]
                else:
                    number = value.simple_value
                out.setdefault(value.tag, {})[int(event.step)] = float(number)
    return out


def probe_curves(logdir) -> dict[str, dict[int, float]]:
    """The probe's T2I and edit averages by training step (distill_job writes them as probe/*_average)."""
    scalars = read_scalars(logdir, "probe/")
    return {task: dict(sorted(scalars.get(f"probe/{task}_average", {}).items())) for task in ("t2i", "edit")}


def seed_mean(entries: list[dict]) -> dict:
    """One results entry whose per-sample scores are the mean over `entries` (the same samples in each), with its
    category means and averages recomputed from them."""
    out = {}
    for task in ("t2i", "edit"):
        scores = {
            c: list(np.mean([e[f"{task}_scores"][c] for e in entries], axis=0)) for c in entries[0][f"{task}_scores"]
        }
        out[f"{task}_scores"] = scores
        out[task] = {c: float(np.mean(s)) for c, s in scores.items()}
        out[f"{task}_average"] = float(np.mean(list(out[task].values())))
    return out


def only_category(entry: dict, task: str, category: str) -> dict:
    """`entry` restricted to one category of `task`: its paired difference is that category's."""
    return {f"{task}_scores": {category: entry[f"{task}_scores"][category]}}


@dataclasses.dataclass
class Timing:
    seconds: dict  # sweep label -> seconds
    source: dict  # sweep label -> where the number came from


def row_times(workdir, labels, seeds: int, sweep_log=None) -> Timing:
    """Each finished row's wall time: the sweep's own "row ... finished in Ns" line when its log is given; else from
    the row's logs (`_logged_span`). The first row's includes training the shared teachers, and a row resumed after a
    stop counts the gap."""
    workdir = pathlib.Path(workdir)
    logged = {}
    if sweep_log is not None and pathlib.Path(sweep_log).is_file():
        for m in re.finditer(r"row (['\"])(.+?)\1 finished in (\d+)s", pathlib.Path(sweep_log).read_text()):
            logged[m.group(2)] = float(m.group(3))
    timing = Timing({}, {})
    for label in labels:
        for seed in range(seeds):
            name = seed_label(label, seed)
            row_dir = workdir / row_dirname(name)
            if not (row_dir / "results.json").is_file():
                continue
            if name in logged:
                timing.seconds[name], timing.source[name] = logged[name], "sweep log"
                continue
            span = _logged_span(row_dir / "logs")
            if span is not None:
                timing.seconds[name], timing.source[name] = span[1] - span[0], "row logs"
    return timing


def _logged_span(logdir) -> tuple[float, float] | None:
    """(start, end) unix times of a row's logs: from the earliest creation time in a TensorBoard event file's or an
    absl log's name to the last event or log line. Without an absl log (the sweep sends those to its own), the end is
    the last event: the final evaluation after the last probe is not counted."""
    starts, ends = [], []
    for path in pathlib.Path(logdir).glob("events.out.tfevents.*"):
        if m := re.match(r"events\.out\.tfevents\.(\d+)\.", path.name):
            starts.append(float(m.group(1)))
        ends += [event.wall_time for event in events(path)][-1:]
    for path in pathlib.Path(logdir).glob("*.log.INFO.*"):
        if not (m := re.search(r"\.log\.INFO\.(\d{4})(\d{4}-\d{6})\.", path.name)):
            continue
        year = m.group(1)
        # absl names its logs and stamps its lines in local time; a line reads "I1204 14:02:15.129437 ...".
        starts.append(datetime.datetime.strptime(year + m.group(2), "%Y%m%d-%H%M%S").timestamp())
        stamps = re.findall(r"^[IWEF](\d{4} \d\d:\d\d:\d\d)", path.read_text(errors="replace")[-20000:], re.M)
        if stamps:
            ends.append(datetime.datetime.strptime(year + stamps[-1], "%Y%m%d %H:%M:%S").timestamp())
    if not starts or not ends:
        return None
    return min(starts), max(max(ends), min(starts))
