"""Scoring models on the toy benchmarks and writing what a person reads: results.json, results.md, PNG grids.

`evaluate` takes named generators (a teacher sampled with N Euler steps, the 4-NFE student, ...), runs each on the
same held-out prompts, edits and noise seeds, and scores them with the toy judge per T2I and edit category (1-5,
higher is better), mirroring the paper's Tables 1-4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Callable

import numpy as np

from qwen_flash_jax import atomic
from qwen_flash_jax.eval import bench_sets, vlm_table
from qwen_flash_jax.eval.generate import GridSection, save_grid

BENCH_TITLES = {"t2i": "T2I-Bench", "edit": "Editing-Bench"}
_T2I_TERMS = ("compliance", "quality", "penalty_noise", "penalty_blur", "penalty_block", "penalty_feature")


@dataclasses.dataclass
class Contender:
    name: str
    nfe: int
    t2i: Callable  # captions -> uint8 images
    edit: Callable  # (sources, instructions) -> uint8 images
    # What determines this contender's images (its parameters' digest and sampler): equal keys, equal images. With
    # `evaluate(image_cache=...)` a keyed contender's benchmark images are generated once and reused by later runs
    # (the frozen teachers' rows, the bulk of an evaluation). None: generated every time.
    cache_key: str | None = None


def evaluate(
    contenders: list[Contender],
    judge,
    *,
    size: int,
    prompts_per_category: int,
    edits_per_category: int,
    seed: int,
    grid_dir=None,
    image_cache=None,
    log=print,
) -> dict:
    """Scores every contender on the same benchmark prompts, edits and seeds. `image_cache`: a directory where the
    images of contenders with a `cache_key` are kept between runs (scores are always recomputed)."""
    t2i = bench_sets.t2i_bench(size, prompts_per_category, seed)
    edits = bench_sets.edit_bench(size, edits_per_category, seed)
    bench = [size, prompts_per_category, edits_per_category, seed]
    results, t2i_images, edit_images = {}, {}, {}
    for c in contenders:
        t2i_images[c.name], edit_images[c.name] = _benchmark_images(c, t2i, edits, bench, image_cache, log)
        t2i_scores = {cat: judge.score_t2i(t2i_images[c.name][cat], b.specs) for cat, b in t2i.items()}
        edit_scores = {cat: judge.score_edit(b.sources, edit_images[c.name][cat], b.specs) for cat, b in edits.items()}
        results[c.name] = {
            "nfe": c.nfe,
            "t2i": {cat: float(s["mean"]) for cat, s in t2i_scores.items()},
            "t2i_fd": {cat: float(s["fidelity_fd"][cat]) for cat, s in t2i_scores.items()},
            # What the T2I score is made of (score = 1 + 4 compliance quality): which of the two limits a model.
            "t2i_terms": {cat: {k: float(np.mean(s[k])) for k in _T2I_TERMS} for cat, s in t2i_scores.items()},
            "edit": {cat: float(s["mean"]) for cat, s in edit_scores.items()},
            # Per-sample scores in a fixed order (same prompts, sources and seeds for every contender), for
            # paired comparisons between contenders.
            "t2i_scores": {cat: [float(x) for x in s["per_sample"]] for cat, s in t2i_scores.items()},
            "edit_scores": {cat: [float(x) for x in s["per_sample"]] for cat, s in edit_scores.items()},
        }
        for task in ("t2i", "edit"):
            results[c.name][f"{task}_average"] = float(np.mean(list(results[c.name][task].values())))
    if grid_dir is not None:  # after scoring, from the scored arrays (read, never changed)
        grid_dir = pathlib.Path(grid_dir)
        grid_dir.mkdir(parents=True, exist_ok=True)
        t2i_sections, edit_sections = benchmark_sections(
            t2i, edits, {row_name(c): (t2i_images[c.name], edit_images[c.name]) for c in contenders}
        )
        save_grid(grid_dir / "grid_t2i.png", t2i_sections)
        save_grid(grid_dir / "grid_edit.png", edit_sections)
    return results


def _benchmark_images(c: Contender, t2i, edits, bench: list, image_cache, log):
    """The contender's images per T2I and edit category: from `image_cache` when it holds them, else generated
    (and stored there, whole or not at all, when the contender has a cache key)."""
    path = None
    if c.cache_key is not None and image_cache is not None:
        digest = hashlib.sha256(json.dumps([c.cache_key, *bench]).encode()).hexdigest()[:16]
        path = pathlib.Path(image_cache) / f"{digest}.npz"
        if path.exists():
            try:
                with np.load(path) as stored:
                    cached = ({cat: stored[f"t2i/{cat}"] for cat in t2i}, {cat: stored[f"edit/{cat}"] for cat in edits})
                log(f"evaluating {c.name} ({c.nfe} NFE): its images from {path}")
                return cached
            except (OSError, KeyError, ValueError) as e:  # unreadable or from other benchmark categories: regenerate
                log(f"ignoring the cached images in {path} ({type(e).__name__}: {e})")
    log(f"evaluating {c.name} ({c.nfe} NFE)")
    t2i_images = {cat: c.t2i(b.captions) for cat, b in t2i.items()}
    edit_images = {cat: c.edit(b.sources, b.instructions) for cat, b in edits.items()}
    if path is not None:
        # Concurrent runs each write their own, then rename.
        with atomic.publish(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                **{f"t2i/{cat}": x for cat, x in t2i_images.items()},
                **{f"edit/{cat}": x for cat, x in edit_images.items()},
            )
    return t2i_images, edit_images


def row_name(c: Contender) -> str:
    """A contender's row name in the grids: its name, and its NFE on a line of its own."""
    return f"{c.name}\n{c.nfe} NFE"


def benchmark_sections(t2i: dict, edits: dict, models: dict, per_row: int = 8):
    """Grid sections (`generate.GridSection`) of a benchmark, one per category, for T2I and for edits: the
    category's real images (edits: sources and targets) above one row per model, `per_row` columns labelled with
    their prompts or instructions. `models`: row name -> (T2I images, edit images), each {category: images}."""
    t2i_sections = [
        GridSection(
            cat,
            b.captions[:per_row],
            [("real", b.real[:per_row])] + [(name, images[cat][:per_row]) for name, (images, _) in models.items()],
        )
        for cat, b in t2i.items()
    ]
    edit_sections = [
        GridSection(
            cat,
            b.instructions[:per_row],
            [("source", b.sources[:per_row]), ("target", b.targets[:per_row])]
            + [(name, images[cat][:per_row]) for name, (_, images) in models.items()],
        )
        for cat, b in edits.items()
    ]
    return t2i_sections, edit_sections


def sample_unjudged(
    workdir,
    contenders: list[Contender],
    t2i_captions: list[str],
    edit_items: list[tuple],
    *,
    title: str,
    vlm_tables: dict[str, dict] | None = None,
    log=print,
) -> dict:
    """Runs every contender on the same prompts and seeds and writes the grids with results.md / results.json,
    without toy-judge scores: for full-scale runs. `vlm_tables`: the VLM judges' tables of the same contenders
    (`vlm_bench.run_recipe_from_config`'s result), recorded under results.json's "vlm" and shown in results.md;
    None: the run is unscored (the VLM judges can score the grids offline).

    `edit_items` holds (source uint8 image, instruction) pairs. Grid rows: one per contender, named with its NFE
    (edits: the sources first); columns labelled with their prompts, shortened; results.json lists the prompts
    whole, in column order.
    """
    workdir = pathlib.Path(workdir)
    t2i_rows, edit_rows = [], []
    sources = np.stack([src for src, _ in edit_items]) if edit_items else None
    instructions = [text for _, text in edit_items]
    for c in contenders:
        log(f"sampling {c.name} ({c.nfe} NFE)")
        if t2i_captions:
            t2i_rows.append(c.t2i(t2i_captions))
        if edit_items:
            edit_rows.append(c.edit(sources, instructions))
    names = [row_name(c) for c in contenders]
    if t2i_rows:
        save_grid(workdir / "grid_t2i.png", [GridSection("T2I", t2i_captions, list(zip(names, t2i_rows)))])
    if edit_rows:
        save_grid(
            workdir / "grid_edit.png",
            [GridSection("edit", instructions, [("source", sources)] + list(zip(names, edit_rows)))],
        )
    results = {
        "scored": vlm_tables is not None,  # by the VLM judges: full scale has no toy judge
        "models": [{"name": c.name, "nfe": c.nfe} for c in contenders],
        "t2i_prompts": list(t2i_captions),
        "edit_instructions": instructions,
    }
    if vlm_tables is None:
        about = [
            "Not scored: this run has no judge (`eval.judge='none'`). The grids hold one row per "
            "model, in the order below, on the same prompts and noise seeds; score them with the VLM judges' "
            "rubrics."
        ]
    else:
        results["vlm"] = vlm_tables
        about = ["Scored by the VLM judges (`eval.judge='vlm'`), 1-5, higher is better; failures never count."]
        for bench, entry in vlm_tables.items():
            about += ["", f"## {BENCH_TITLES[bench]} ({entry['table_md']})", "", vlm_table.markdown(entry["table"])]
        about += ["## Sample grids", "", "The grids hold one row per model, in the order below, on the same prompts "
                  "and noise seeds."]  # fmt: skip
    lines = [f"# {title}", "", *about, "", "| row | model | NFE |", "|---|---|---|"]
    lines += [f"| {i + 1} | {c.name} | {c.nfe} |" for i, c in enumerate(contenders)]
    lines += [
        "",
        "T2I prompts (grid_t2i.png columns): " + "; ".join(t2i_captions) if t2i_captions else "",
        "",
        "Edit instructions (grid_edit.png columns, sources in the first row): " + "; ".join(instructions)
        if instructions
        else "",
        "",
    ]
    _write_atomically(workdir / "results.md", "\n".join(lines))
    _write_atomically(workdir / "results.json", json.dumps(results, indent=2))
    return results


def paired_difference(
    results: dict, name: str, reference: str, task: str, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float] | None:
    """Mean per-sample score difference `name - reference` on `task` and its 95% bootstrap interval.

    Both were scored on the same prompts and seeds, so the paired difference cancels most prompt-to-prompt
    variance. Samples are resampled within each category (categories stay equally weighted, like the table's
    average). None when per-sample scores are missing.
    """
    key = f"{task}_scores"
    if key not in results[name] or key not in results[reference]:
        return None
    diffs = [np.asarray(results[name][key][c]) - np.asarray(results[reference][key][c]) for c in results[name][key]]
    mean = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    boot = np.mean([d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1) for d in diffs], axis=0)
    low, high = np.percentile(boot, [2.5, 97.5])
    return mean, float(low), float(high)


def write_results(
    workdir, results: dict, *, title: str, notes: str = "", stem: str = "results", reference: str | None = None
) -> None:
    """<stem>.json (machine-readable) and <stem>.md (tables in the paper's layout, with ranks); each file appears
    whole or not at all (a reader polling for results.json never sees half of one)."""
    workdir = pathlib.Path(workdir)
    lines = [f"# {title}", "", "Toy judge scores, 1-5, higher is better (`qwen_flash_jax.eval.judge`).", ""]
    for task, label in (("t2i", "T2I-Bench (toy)"), ("edit", "Editing-Bench (toy)")):
        cats = list(next(iter(results.values()))[task])
        avg = {name: r[f"{task}_average"] for name, r in results.items()}
        ranks = {name: i + 1 for i, name in enumerate(sorted(avg, key=avg.get, reverse=True))}
        lines += [
            f"## {label}",
            "",
            "| model | NFE | " + " | ".join(cats) + " | average | rank |",
            "|---|---|" + "---|" * (len(cats) + 2),
        ]
        for name, r in results.items():
            cells = " | ".join(f"{r[task][c]:.2f}" for c in cats)
            lines.append(f"| {name} | {r['nfe']} | {cells} | {avg[name]:.2f} | {ranks[name]} |")
        lines.append("")
    if reference in results:
        lines += [
            f"## Paired differences against {reference}",
            "",
            "Mean per-sample score difference on the same prompts and seeds, with a 95% bootstrap interval "
            "(resampled within categories); an interval above 0 means better than the reference.",
            "",
            "| model | T2I difference | Edit difference |",
            "|---|---|---|",
        ]
        for name in results:
            if name == reference:
                continue
            cells = []
            for task in ("t2i", "edit"):
                d = paired_difference(results, name, reference, task)
                cells.append("n/a" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        lines.append("")
    if notes:
        lines += [notes, ""]
    _write_atomically(workdir / f"{stem}.md", "\n".join(lines))
    _write_atomically(workdir / f"{stem}.json", json.dumps(results, indent=2))  # row and category order kept


def _write_atomically(path: pathlib.Path, text: str) -> None:
    with atomic.publish(path) as tmp:
        tmp.write_text(text)
