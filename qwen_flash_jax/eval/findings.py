"""The paper's findings F1-F5 re-measured from a paper sweep's rows: a verdict per claim, with plots.

    python -m qwen_flash_jax.eval.findings --workdir=/tmp/qf_paper [--out=docs/experiments] [--sweep_log=FILE]

Reads the rows of `python -m qwen_flash_jax.sweep --suite=paper --workdir=DIR` (each a toy main job's workdir:
results.json with per-sample scores, grids, TensorBoard events with the probe scores) and writes OUT/paper_findings.md
and its plots in OUT/paper_findings/ (OUT defaults to the workdir). A partial sweep is fine: rows not run yet are
listed as such, and a claim that needs one of them is "not measured yet". The sweep calls this after its last row.

Each claim is a set of paired differences between rows (same prompts, edits and noise in every row), each with the
side of 0 the paper puts it on. A row with several distillation seeds enters as the per-sample mean over its seeds;
each seed's own difference is shown too. The interval is report.paired_difference's 95% bootstrap over samples: it
holds the benchmark's sampling noise, not the run-to-run noise of training, which the per-seed differences show.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess

from absl import app, flags

from qwen_flash_jax import atomic
from qwen_flash_jax.errors import command_line_errors
from qwen_flash_jax.eval import plots
from qwen_flash_jax.eval.paper_numbers import PAPER, PAPER_EDIT_CATEGORIES, PAPER_T2I_CATEGORIES  # noqa: F401
from qwen_flash_jax.eval.report import paired_difference
from qwen_flash_jax.eval.sweep_rows import (  # noqa: F401  (re-exported: the sweep and tests use findings.X)
    DOC,
    PLOT_DIR,
    ROW_LABELS,
    SEEDS,
    STEPWISE,
    FindingsError,
    Row,
    Timing,
    events,
    load_rows,
    only_category,
    probe_curves,
    read_scalars,
    row_dirname,
    row_times,
    seed_label,
    seed_mean,
)

REPRODUCES, CONTRADICTS, INCONCLUSIVE, NOT_MEASURED = (
    "reproduces",
    "does not reproduce",
    "inconclusive",
    "not measured yet",
)
# F3/F5's stability rule: a probe curve's drop (best probe score minus the last) differing by less than this between
# two rows is not told apart. Probe scores are category means without per-sample scores, so there is no bootstrap;
# 0.05 on the 1-5 scale is about the half-width of the final scores' paired intervals in the toy.
DROP_MARGIN = 0.05


# ---------------------------------------------------------------------------------------------------------------
# Claims and verdicts


@dataclasses.dataclass
class Side:
    """One side of a paired difference: a student row (its seeds), or a teacher (one entry, the same for all)."""

    name: str
    entries: dict  # seed -> results entry; a teacher's holds the single key None

    def at(self, seed):
        return self.entries[None] if None in self.entries else self.entries.get(seed)

    def seeds(self) -> set:
        return set() if None in self.entries else set(self.entries)


@dataclasses.dataclass
class Difference:
    """`a - b` on `task` (one category, or all), claimed by the paper to be above 0 (sign +1) or below (-1)."""

    a: str
    b: str
    task: str
    category: str | None
    sign: int
    pooled: tuple | None = None  # (mean, low, high) on the seed-mean entries; None: a row is missing
    per_seed: dict = dataclasses.field(default_factory=dict)  # seed -> (mean, low, high)

    @property
    def name(self) -> str:
        where = self.category or f"{self.task.upper() if self.task == 't2i' else 'edit'} average"
        return f"{self.a} {'>' if self.sign > 0 else '<'} {self.b} ({where})"

    @property
    def verdict(self) -> str:
        """The rule stated in the doc: the seed-mean interval on the claimed side of 0 and every seed's own
        difference on that side too: reproduces; both on the opposite side: does not; otherwise inconclusive."""
        if self.pooled is None:
            return NOT_MEASURED
        _, low, high = (self.sign * x for x in self.pooled)
        low, high = min(low, high), max(low, high)
        seeds = [self.sign * d[0] for d in self.per_seed.values()]
        if low > 0 and all(s > 0 for s in seeds):
            return REPRODUCES
        if high < 0 and all(s < 0 for s in seeds):
            return CONTRADICTS
        return INCONCLUSIVE


def measure(a: Side, b: Side, task: str, category: str | None, sign: int) -> Difference:
    diff = Difference(a.name, b.name, task, category, sign)
    if not a.entries or not b.entries:
        return diff
    restrict = (lambda e: only_category(e, task, category)) if category else (lambda e: e)

    def paired(x, y):
        return paired_difference({"a": restrict(x), "b": restrict(y)}, "a", "b", task)

    # Two student rows pool only the seeds both have finished: a row's second seed must not be compared with
    # the other's first alone.
    seeds = sorted(a.seeds() & b.seeds()) if a.seeds() and b.seeds() else sorted(a.seeds() | b.seeds())
    if not seeds and (a.seeds() or b.seeds()):
        return diff
    means = [seed_mean([x.at(s) for s in (seeds or [None])]) for x in (a, b)]
    diff.pooled = paired(*means)
    diff.per_seed = {s: paired(a.at(s), b.at(s)) for s in seeds}
    return diff


def combine(verdicts: list[str]) -> str:
    """A claim made of several differences: reproduces when all do, does not when any does not (the paper needs
    every one), not measured while any lacks its rows, otherwise inconclusive."""
    if NOT_MEASURED in verdicts:
        return NOT_MEASURED
    if CONTRADICTS in verdicts:
        return CONTRADICTS
    return REPRODUCES if all(v == REPRODUCES for v in verdicts) else INCONCLUSIVE


@dataclasses.dataclass
class StabilityTest:
    """The probe curve of `a` drops (best minus last probe T2I score) more than `b`'s (sign +1), or less (-1)."""

    a: str
    b: str
    sign: int
    drops: dict = dataclasses.field(default_factory=dict)  # row label -> {seed: drop}

    @property
    def name(self) -> str:
        return f"{self.a}'s probe curve drops {'more' if self.sign > 0 else 'less'} than {self.b}'s"

    def gaps(self) -> dict:
        a, b = self.drops.get(self.a, {}), self.drops.get(self.b, {})
        return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}

    @property
    def verdict(self) -> str:
        """Every common seed's drop gap beyond DROP_MARGIN on the claimed side: reproduces; beyond it on the other
        side: does not; no common seed: not measured; otherwise inconclusive (within the probes' noise)."""
        gaps = [self.sign * g for g in self.gaps().values()]
        if not gaps:
            return NOT_MEASURED
        if all(g > DROP_MARGIN for g in gaps):
            return REPRODUCES
        if all(g < -DROP_MARGIN for g in gaps):
            return CONTRADICTS
        return INCONCLUSIVE


def curve_drop(curve: dict) -> float | None:
    """Best probe score over training minus the last one: 0 for a curve that ends at its best. None: < 2 probes."""
    if len(curve) < 2:
        return None
    values = list(curve.values())
    return float(max(values) - values[-1])


@dataclasses.dataclass
class Claim:
    key: str  # "F2b"
    title: str
    paper: str  # the paper's claim, with its numbers
    tests: list  # Differences and StabilityTests
    rows: tuple  # the row labels it needs
    shown: list = dataclasses.field(default_factory=list)  # Differences shown beside the tests, not judged

    @property
    def verdict(self) -> str:
        return combine([t.verdict for t in self.tests])


def sides(rows: dict[str, Row]) -> dict[str, Side]:
    """Every student row as a Side (finished seeds), and the base teacher's rows (from any finished row: every row
    distils the same cached teacher and is scored on the same benchmark)."""
    out = {label: Side(label, {s: row.student(s) for s in row.results}) for label, row in rows.items()}
    finished = [row for row in rows.values() if row.done]
    teachers = {}
    if finished:
        results = finished[0].results[min(finished[0].results)]
        teachers = {name: r for name, r in results.items() if name.startswith("teacher ")}
    for name in ("teacher base (40 steps)", "teacher base (4 steps)"):
        out[name] = Side(name, {None: teachers[name]} if name in teachers else {})
    return out


def claims(rows: dict[str, Row]) -> list[Claim]:
    s = sides(rows)

    def d(a, b, task, category=None, sign=1):
        return measure(s[a], s[b], task, category, sign)

    t1, t3, t4 = PAPER["Table 1"], PAPER["Table 3"], PAPER["Table 4"]
    base40, flash = PAPER["Table 2"]["Qwen-Image-2.0-Base (80 NFE)"], PAPER["Table 2"]["Qwen-Image-Flash-T2I (4 NFE)"]
    gem, gpt = 0, 1
    avg = -1
    drops = {
        label: {
            seed: curve_drop(c["t2i"]) for seed, c in rows[label].curves.items() if curve_drop(c["t2i"]) is not None
        }
        for label in ("single", "single + first-step FM", STEPWISE)
        if label in rows
    }
    out = [
        Claim(
            "F1",
            "The 4-NFE student matches or beats the 40-step teacher, and its own 4-step sampling",
            f"Table 2: the 4-NFE Qwen-Image-Flash-T2I averages {flash[gem][avg]:.2f} (Gemini 3.1 Pro) and "
            f"{flash[gpt][avg]:.2f} (GPT 5.5) on T2I-Bench against {base40[gem][avg]:.2f} and {base40[gpt][avg]:.2f} "
            "for the 80-NFE base teacher (40 steps with CFG). The paper gives no 4-step teacher number; beating it "
            "is the premise of distillation. Toy rows: the 5:5 student against the base teacher sampled with 40 "
            "and with 4 Euler steps.",
            [d("5:5", "teacher base (40 steps)", "t2i"), d("5:5", "teacher base (4 steps)", "t2i")],
            ("5:5",),
        ),
        Claim(
            "F2a",
            "Data composition orders the T2I students E2 > {E1, E4} > E5 > E3",
            "Table 1 (T2I-Bench averages, Gemini / GPT): "
            + ", ".join(f"{e} {t1[e][gem][avg]:.2f} / {t1[e][gpt][avg]:.2f}" for e in t1)
            + ". GPT 5.5 orders them E2 > E1 > E4 > E5 > E3; Gemini and the rank column put E4 above E1, so only "
            "the pairs both judges agree on are tested (E1 against E4 is shown, not judged).",
            [
                d("E2", "E1", "t2i"),
                d("E2", "E4", "t2i"),
                d("E1", "E5", "t2i"),
                d("E4", "E5", "t2i"),
                d("E5", "E3", "t2i"),
            ],
            ("E1", "E2", "E3", "E4", "E5"),
            shown=[d("E1", "E4", "t2i")],
        ),
        Claim(
            "F2b",
            "Text-centric data alone hurts even text prompts",
            f"Table 1, text-centric split: E3 scores {t1['E3'][gem][2]:.2f} / {t1['E3'][gpt][2]:.2f} "
            f"(Gemini / GPT) against E1 {t1['E1'][gem][2]:.2f} / {t1['E1'][gpt][2]:.2f} and "
            f"E2 {t1['E2'][gem][2]:.2f} / {t1['E2'][gpt][2]:.2f}, which saw no text prompts.",
            [d("E1", "E3", "t2i", "text"), d("E2", "E3", "t2i", "text")],
            ("E1", "E2", "E3"),
        ),
        Claim(
            "F3a",
            "Step-wise multi-teacher guidance beats the specialist alone",
            "Section 4.4 and Table 2: the step-wise student (Flash-T2I, "
            f"{flash[gem][avg]:.2f} / {flash[gpt][avg]:.2f}) inherits the specialist teacher's strength "
            "(80-NFE Task-Specialized: "
            f"{PAPER['Table 2']['Qwen-Image-2.0-Task-Specialized (80 NFE)'][gem][avg]:.2f} / "
            f"{PAPER['Table 2']['Qwen-Image-2.0-Task-Specialized (80 NFE)'][gpt][avg]:.2f}), where the specialist "
            "used alone degrades samples (Fig. 3a; no table number). Toy rows: step-wise = the T2I-only row "
            "(base + text teachers), single = the text specialist alone.",
            [d(STEPWISE, "single", "t2i")],
            (STEPWISE, "single"),
        ),
        Claim(
            "F3b",
            "The specialist alone destabilises distillation; step-wise guidance stays stable",
            "Section 4.2 and Fig. 3: with the specialist as the only teacher, quality first improves, then "
            "'deteriorates as training continues'; step-wise guidance 'maintains sample fidelity ... across "
            "training iterations' (qualitative; no numbers).",
            [StabilityTest("single", STEPWISE, 1, drops)],
            ("single", STEPWISE),
        ),
        Claim(
            "F4a",
            "5:5 is the best T2I:Edit ratio for editing",
            "Table 3 (Editing-Bench averages, Gemini / GPT): "
            + ", ".join(f"{r} {t3[r][gem][avg]:.2f} / {t3[r][gpt][avg]:.2f}" for r in list(t3)[1:])
            + "; 5:5 ranks first.",
            [d("5:5", "7:3", "edit"), d("5:5", "9:1", "edit"), d("5:5", "T2I only", "edit")],
            ("5:5", "7:3", "9:1", "T2I only"),
        ),
        Claim(
            "F4b",
            "9:1 falls below the T2I-only student on edits",
            f"Table 3: 9:1 {t3['9:1'][gem][avg]:.2f} against T2I only {t3['Zero-shot (T2I only)'][gem][avg]:.2f} "
            f"(Gemini); GPT 5.5 has it the other way ({t3['9:1'][gpt][avg]:.2f} against "
            f"{t3['Zero-shot (T2I only)'][gpt][avg]:.2f}); the rank column puts 9:1 last.",
            [d("T2I only", "9:1", "edit")],
            ("T2I only", "9:1"),
        ),
        Claim(
            "F4c",
            "Edit data raises T2I scores above the T2I-only student",
            "Table 4 (T2I-Bench averages, Gemini / GPT): "
            + ", ".join(f"{r} {t4[r][gem][avg]:.2f} / {t4[r][gpt][avg]:.2f}" for r in list(t4)[1:])
            + ": every joint student above T2I only.",
            [d("9:1", "T2I only", "t2i"), d("7:3", "T2I only", "t2i"), d("5:5", "T2I only", "t2i")],
            ("9:1", "7:3", "5:5", "T2I only"),
        ),
        Claim(
            "F5a",
            "The first-step flow-matching regulariser stabilises the specialist's distillation",
            "Section 6.1: it 'does improve structural stability to some extent ... reduces the severe geometric "
            "drift' of direct specialist guidance (qualitative; no numbers).",
            [StabilityTest("single + first-step FM", "single", -1, drops)],
            ("single + first-step FM", "single"),
        ),
        Claim(
            "F5b",
            "... at a cost in visual quality",
            "Section 6.1: 'this benefit comes with a mild degradation in visual quality' (no numbers). Toy: the "
            "regularised student's T2I score below the unregularised one's.",
            [d("single + first-step FM", "single", "t2i", sign=-1)],
            ("single + first-step FM", "single"),
        ),
    ]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The document


def _fmt(interval) -> str:
    return "-" if interval is None else f"{interval[0]:+.3f} [{interval[1]:+.3f}, {interval[2]:+.3f}]"


def _seeds_cell(diff: Difference) -> str:
    return "; ".join(f"seed {s}: {d[0]:+.3f}" for s, d in diff.per_seed.items()) or "-"


def _test_lines(test) -> list[str]:
    if isinstance(test, Difference):
        return [f"| {test.name} | {_fmt(test.pooled)} | {_seeds_cell(test)} | {test.verdict} |"]
    gaps = test.gaps()
    cell = "; ".join(f"seed {s}: {g:+.3f}" for s, g in gaps.items()) or "-"
    drops = "; ".join(
        f"{label}: " + ", ".join(f"seed {s} {v:.3f}" for s, v in sorted(test.drops.get(label, {}).items()))
        for label in (test.a, test.b)
    )
    return [f"| {test.name} (drop gap; drops {drops}) | - | {cell} | {test.verdict} |"]


def _key_numbers(claim: Claim) -> str:
    cells = []
    for t in claim.tests:
        if isinstance(t, Difference) and t.pooled is not None:
            cells.append(f"{t.a} - {t.b}{f' ({t.category})' if t.category else ''} {_fmt(t.pooled)}")
        elif isinstance(t, StabilityTest) and t.gaps():
            cells.append(f"drop gap {', '.join(f'{g:+.3f}' for g in t.gaps().values())}")
    return "; ".join(cells) or "-"


def _score_table(rows: dict[str, Row], s: dict[str, Side], labels, task: str) -> list[str]:
    """Seed-mean scores per category of the given rows (and per seed averages), for a finding's section."""
    entries = {label: s[label] for label in labels if s[label].entries}
    if not entries:
        return ["No row of this table has finished yet.", ""]
    first = next(iter(entries.values()))
    cats = list(first.at(next(iter(first.seeds() or [None])))[task])
    lines = [
        "| row | seeds | " + " | ".join(cats) + " | average | per seed |",
        "|---|---|" + "---|" * (len(cats) + 2),
    ]
    for label, side in entries.items():
        seeds = sorted(side.seeds()) or [None]
        mean = seed_mean([side.at(x) for x in seeds])
        per_seed = ", ".join(f"{side.at(x)[f'{task}_average']:.3f}" for x in seeds)
        n = "teacher" if seeds == [None] else str(len(seeds))
        cells = " | ".join(f"{mean[task][c]:.3f}" for c in cats)
        lines.append(f"| {label} | {n} | {cells} | {mean[f'{task}_average']:.3f} | {per_seed} |")
    return lines + [""]


def _provenance() -> list[str]:
    here = pathlib.Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"- Written by commit `{commit or 'unknown'}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC, on {cpu} with {os.cpu_count()} CPUs (`lscpu | grep 'Model name'`).",
    ]


def render(workdir, rows: dict[str, Row], found: list[Claim], timing: Timing, seeds: int, plot_files: dict) -> str:
    s = sides(rows)
    lines = [
        "# The paper's findings on the toy world",
        "",
        "Generated by `python -m qwen_flash_jax.eval.findings` from the paper sweep "
        f"(`python -m qwen_flash_jax.sweep --suite=paper --workdir={workdir}`); do not edit by hand.",
        "",
    ]
    missing = [
        (seed_label(label, seed), status)
        for label, row in rows.items()
        for seed, status in row.status.items()
        if status != "done"
    ]
    if missing:
        lines += [
            f"**Partial sweep:** {len(missing)} of {len(rows) * seeds} row runs have no results yet "
            f"({', '.join(f'{name} ({status})' for name, status in missing)}). Claims that need them are "
            f'"{NOT_MEASURED}"; the others use the seeds that have finished.',
            "",
        ]
    lines += [
        "## Verdicts",
        "",
        "| finding | claim | verdict | key numbers (toy, paired, 95% interval) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c.key} | {c.title} | **{c.verdict}** | {_key_numbers(c)} |" for c in found]
    lines.append("")
    for caption, file in plot_files.get("summary", []):
        lines += [f"![{caption}]({file})", "", f"*{caption}*"]
    lines += [
        "",
        "## How the verdicts are decided",
        "",
        "Scores are the toy judge's (1-5, higher is better) on the same held-out prompts, edits and noise seeds in "
        "every row, so rows are compared sample by sample. A row distilled with several seeds enters as the "
        "per-sample mean over its finished seeds. Each claim is a set of paired differences, each with the side of "
        "0 the paper puts it on; the interval is the 95% bootstrap of the mean difference (resampled within "
        "categories, `eval/report.paired_difference`). It measures the benchmark's sampling noise only: training's "
        "run-to-run noise shows in the per-seed differences, listed beside it.",
        "",
        "- A difference **reproduces** when its seed-mean interval lies on the claimed side of 0 and every seed's own "
        "difference is on that side too; it **does not reproduce** when the interval lies on the opposite side and "
        "every seed agrees; otherwise it is **inconclusive**.",
        "- A claim made of several differences reproduces when all of them do, does not when any of them does not, "
        "and is otherwise inconclusive; it is **not measured yet** while a row it needs has no finished seed.",
        "- Stability (F3b, F5a) has no per-sample scores: the probe (every `train.sample_every` steps) records "
        "category means. A curve's *drop* is its best probe T2I score minus its last. The claim reproduces when, in "
        f"every seed, the drop gap between the two rows is beyond {DROP_MARGIN} on the claimed side; it does not when "
        "every seed's gap is beyond it on the other side; otherwise inconclusive.",
        "",
    ]
    shown_files = {}
    for c in found:
        lines += [f"## {c.key}: {c.title}", "", f"**Paper.** {c.paper}", "", f"**Verdict: {c.verdict}.**", ""]
        lines += ["| test | seed-mean difference [95%] | per seed | verdict |", "|---|---|---|---|"]
        for t in c.tests:
            lines += _test_lines(t)
        for t in c.shown:
            lines.append(f"| {t.name} | {_fmt(t.pooled)} | {_seeds_cell(t)} | (not judged) |")
        lines.append("")
        not_done = [label for label in c.rows if not rows[label].done]
        if not_done:
            lines += [f"Rows not run yet: {', '.join(not_done)}.", ""]
        for task in _tasks_of(c):
            labels = [x for x in _table_rows(c) if x in s]
            lines += [f"Toy {'T2I' if task == 't2i' else 'edit'} scores (mean over seeds):", ""]
            lines += _score_table(rows, s, labels, task)
        for caption, file in plot_files.get(c.key, []):
            if file in shown_files:  # a table's plots serve all its claims: drawn under the first
                lines += [f"Plot: [{caption}]({file}) (above, under {shown_files[file]}).", ""]
            else:
                shown_files[file] = c.key
                lines += [f"![{caption}]({file})", "", f"*{caption}*", ""]
    lines += ["## Probe scores over training, every row", ""]
    for caption, file in plot_files.get("curves", []):
        lines += [f"![{caption}]({file})", "", f"*{caption}*", ""]
    lines += _run_section(workdir, rows, timing, seeds)
    return "\n".join(lines) + "\n"


def _tasks_of(claim: Claim) -> list[str]:
    tasks = [t.task for t in claim.tests if isinstance(t, Difference)]
    return list(dict.fromkeys(tasks)) or ["t2i"]


def _table_rows(claim: Claim) -> list[str]:
    if claim.key == "F1":
        return ["teacher base (40 steps)", "teacher base (4 steps)", "5:5"]
    return list(claim.rows)


def _run_section(workdir, rows: dict[str, Row], timing: Timing, seeds: int) -> list[str]:
    total = sum(timing.seconds.values())
    median = statistics.median(timing.seconds.values()) if timing.seconds else 0.0
    runs = sum(len(row.status) for row in rows.values())
    sources = sorted(set(timing.source.values()))
    lines = [
        "## The sweep: command, time, how to run it faster",
        "",
        f"- Command: `python -m qwen_flash_jax.sweep --suite=paper --workdir={workdir}` ({len(rows)} rows x {seeds} "
        "seeds; resumable: a finished row is not rerun; all rows share the cached teachers). This document: "
        f"`python -m qwen_flash_jax.eval.findings --workdir={workdir} --out=docs/experiments`.",
        f"- Run time: {total / 3600:.2f} h for the {len(timing.seconds)} finished row runs "
        f"(sum of per-row wall times, from the {' and '.join(sources) or 'rows'}; the first row's includes training "
        "the shared toy teachers).",
        f"- A row takes {median / 60:.1f} min (median), so the whole sweep about {median * runs / 3600:.1f} h on the "
        "machine below; a row whose wall time is far above the median also counts the time its process was paused.",
        "- Faster: run rows in parallel processes, each with its own `--workdir` and the same `--set=cache_dir=...` "
        "(teachers are trained once, by whichever row gets there first, then read by all); fewer updates with "
        "`--set=train.steps=N`; one seed with `--seeds=1` (halves the time; per-seed agreement is then not shown).",
        *_provenance(),
        "",
        "| row | status | wall time |",
        "|---|---|---|",
    ]
    for label, row in rows.items():
        for seed, status in row.status.items():
            name = seed_label(label, seed)
            t = timing.seconds.get(name)
            lines.append(f"| {name} | {status} | {'-' if t is None else f'{t / 60:.1f} min ({timing.source[name]})'} |")
    return lines + [""]


def write_findings(workdir, out_dir=None, *, labels=ROW_LABELS, seeds: int = SEEDS, sweep_log=None) -> pathlib.Path:
    """Writes OUT/paper_findings.md and its PNGs in OUT/paper_findings/ (OUT: `out_dir`, default the workdir), the
    plots first and the document last, each file whole or not at all. Returns the document's path."""
    workdir = pathlib.Path(workdir)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else workdir
    rows = load_rows(workdir, labels, seeds)
    found = claims(rows)
    plot_files = plots.write_plots(
        out_dir / PLOT_DIR, {label: workdir / row_dirname(label) for label in rows}, rows, found, sides(rows)
    )
    plot_files = {k: [(caption, f"{PLOT_DIR}/{name}") for caption, name in v] for k, v in plot_files.items()}
    text = render(workdir, rows, found, row_times(workdir, labels, seeds, sweep_log), seeds, plot_files)
    path = out_dir / DOC
    with atomic.publish(path) as tmp:
        tmp.write_text(text)
    with atomic.publish(out_dir / PLOT_DIR / "verdicts.json") as tmp:
        tmp.write_text(json.dumps({c.key: c.verdict for c in found}, indent=2))
    return path


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as one: the sweep imports it, and its own
    --workdir would clash."""
    flags.DEFINE_string("workdir", None, "The paper sweep's directory (finished or partial).")
    flags.DEFINE_string("out", None, "Where paper_findings.md and paper_findings/*.png go; default: the workdir.")
    flags.DEFINE_integer("seeds", SEEDS, "Distillation seeds per row the sweep was run with (its --seeds).")
    flags.DEFINE_string(
        "sweep_log", None, "The sweep's console output, for its rows' wall times ('row ... finished in Ns')."
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    if not values.workdir:
        raise app.UsageError("--workdir is required")
    with command_line_errors((FindingsError,)):
        print(write_findings(values.workdir, values.out, seeds=values.seeds, sweep_log=values.sweep_log))


if __name__ == "__main__":
    define_flags()
    app.run(main)
