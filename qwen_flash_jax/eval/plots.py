"""The paper-findings document's PNGs: score bars per table, paired differences, probe curves, sample grids.

Drawn with matplotlib's object API (`Figure`, rendered by Agg without pyplot, so no global backend is set and no
display is needed) and Pillow; each file is written whole or not at all. `write_plots` is eval/findings.py's.
"""

from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from qwen_flash_jax import atomic
from qwen_flash_jax.eval.generate import grid_font

VERDICT_COLOURS = {
    "reproduces": "tab:green",
    "does not reproduce": "tab:red",
    "inconclusive": "tab:gray",
    "not measured yet": "lightgray",
}
GRID_WIDTH = 480  # px per row's grid in a side-by-side composite: about half the toy grids' width
SEED_STYLES = ("-", "--", ":", "-.")


def save_figure(fig: Figure, path: pathlib.Path) -> None:
    with atomic.publish(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def save_image(image: Image.Image, path: pathlib.Path) -> None:
    with atomic.publish(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)


def score_bars(sides: dict, labels: list[str], task: str, title: str) -> Figure | None:
    """One panel per category and the average: a bar per row at its mean over seeds, the error bar spanning its seeds'
    own scores (no bar: one seed, or a teacher). None when none of the rows has finished."""
    labels = [label for label in labels if sides[label].entries]
    if not labels:
        return None
    per_row = {}
    for label in labels:
        side = sides[label]
        entries = [side.at(s) for s in (sorted(side.seeds()) or [None])]
        cats = list(entries[0][task])
        values = np.array([[e[task][c] for c in cats] + [e[f"{task}_average"]] for e in entries])
        per_row[label] = values
    cats = cats + ["average"]
    fig = Figure(figsize=(2.4 * len(cats), 3.4))
    axes = fig.subplots(1, len(cats), sharey=True, squeeze=False)[0]
    colours = [f"C{i}" for i in range(len(labels))]
    for j, (ax, cat) in enumerate(zip(axes, cats)):
        means = [per_row[label][:, j].mean() for label in labels]
        low = [m - per_row[label][:, j].min() for m, label in zip(means, labels)]
        high = [per_row[label][:, j].max() - m for m, label in zip(means, labels)]
        x = np.arange(len(labels))
        ax.bar(x, means, color=colours, yerr=[low, high], capsize=3)
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(cat, fontsize=9)
    # Zoomed to the scores (the judge's scale starts at 1): the rows differ by hundredths.
    floor = min(float(np.min(v)) for v in per_row.values())
    ceiling = max(float(np.max(v)) for v in per_row.values())
    axes[0].set_ylim(max(1.0, floor - 0.3), min(5.0, ceiling + 0.1))
    axes[0].set_ylabel("toy judge score (1-5)")
    fig.suptitle(title, fontsize=10)
    return fig


def differences_plot(claims) -> Figure:
    """Every claim's paired differences (seed-mean, 95% interval) turned to the claimed side: right of 0 is what the
    paper says; coloured by the difference's verdict. Per-seed differences as small markers."""
    tests = [(c.key, t) for c in claims for t in c.tests if hasattr(t, "pooled")]
    fig = Figure(figsize=(8, 0.32 * len(tests) + 1.2))
    ax = fig.subplots()
    for i, (_, t) in enumerate(tests):
        y = len(tests) - 1 - i
        if t.pooled is not None:
            mean, low, high = (t.sign * v for v in t.pooled)
            low, high = min(low, high), max(low, high)
            ax.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o", color=VERDICT_COLOURS[t.verdict])
            for d in t.per_seed.values():
                ax.plot(t.sign * d[0], y, "x", color="black", markersize=4)
        else:
            ax.plot(0, y, "s", color=VERDICT_COLOURS[t.verdict])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(tests)), [f"{k}: {t.name}" for k, t in reversed(tests)], fontsize=7)
    ax.set_xlabel("paired score difference, signed so that > 0 is the paper's claim (95% interval; x: seeds)")
    handles = [ax.plot([], [], "o", color=c)[0] for c in VERDICT_COLOURS.values()]
    ax.legend(handles, list(VERDICT_COLOURS), fontsize=7, loc="lower right")
    return fig


def curves_plot(rows: dict, labels: list[str], task: str, title: str) -> Figure | None:
    """Probe score over training steps, one line per row and seed (seed 0 solid), as in the paper's Fig. 3."""
    drawn = [(label, seed, c[task]) for label in labels for seed, c in sorted(rows[label].curves.items()) if c[task]]
    if not drawn:
        return None
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    for label, seed, curve in drawn:
        ax.plot(
            list(curve),
            list(curve.values()),
            SEED_STYLES[seed % len(SEED_STYLES)],
            marker="o",
            color=colours[label],
            label=f"{label}, seed {seed}",
        )
    ax.set_xlabel("student update")
    ax.set_ylabel(f"probe {'T2I' if task == 't2i' else 'edit'} average (toy judge)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig


def all_curves_plot(rows: dict) -> Figure | None:
    """A panel per row: its probe T2I (solid) and edit (dashed) averages over training, a colour per seed."""
    labels = [label for label, row in rows.items() if any(c["t2i"] or c["edit"] for c in row.curves.values())]
    if not labels:
        return None
    columns = min(4, len(labels))
    lines = -(-len(labels) // columns)
    fig = Figure(figsize=(3.2 * columns, 2.6 * lines))
    axes = np.atleast_1d(fig.subplots(lines, columns, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, label in zip(axes, labels):
        for seed, curve in sorted(rows[label].curves.items()):
            for task, style in (("t2i", "-"), ("edit", "--")):
                if curve[task]:
                    ax.plot(list(curve[task]), list(curve[task].values()), style, color=f"C{seed}", marker=".")
        ax.set_title(label, fontsize=9)
    for ax in axes[len(labels) :]:
        ax.set_visible(False)
    fig.suptitle("probe scores over training: T2I solid, edit dashed; colour = seed (C0 seed 0)", fontsize=10)
    return fig


def side_by_side(images: list[tuple[str, pathlib.Path]], width: int = GRID_WIDTH) -> Image.Image | None:
    """The rows' sample grids side by side, each scaled to `width` px wide under a band with its row's label."""
    images = [(label, path) for label, path in images if path.is_file()]
    if not images:
        return None
    font = grid_font(20)
    band = 34
    scaled = []
    for label, path in images:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scaled.append((label, im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)))
    gap = 12
    canvas = Image.new(
        "RGB", (len(scaled) * (width + gap) - gap, band + max(im.height for _, im in scaled)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for i, (label, im) in enumerate(scaled):
        x = i * (width + gap)
        draw.text((x + 4, 6), label, fill=(0, 0, 0), font=font)
        canvas.paste(im, (x, band))
    return canvas


def write_plots(plot_dir, row_dirs: dict, rows: dict, claims, sides: dict) -> dict[str, list[tuple[str, str]]]:
    """The document's PNGs in `plot_dir`; returns {claim key, "summary" or "curves": [(caption, file name)]} for
    those that had data to draw. `row_dirs`: row label -> its (seed 0) directory, holding its sample grids."""
    plot_dir = pathlib.Path(plot_dir)
    out: dict[str, list[tuple[str, str]]] = {}

    def add(keys, name, caption, figure_or_image):
        if figure_or_image is None:
            return
        if isinstance(figure_or_image, Figure):
            save_figure(figure_or_image, plot_dir / name)
        else:
            save_image(figure_or_image, plot_dir / name)
        for key in keys:
            out.setdefault(key, []).append((caption, name))

    def grids(labels, kind):
        return side_by_side([(label, pathlib.Path(row_dirs[label]) / f"grid_{kind}.png") for label in labels])

    seeds_note = "bars: mean over seeds; error bars: the seeds' range"
    teachers = ["teacher base (40 steps)", "teacher base (4 steps)"]
    add(
        ["summary"],
        "differences.png",
        "Every claim's paired differences, signed so that right of 0 is the paper's claim; colour: verdict",
        differences_plot(claims),
    )
    add(
        ["F1"],
        "table2_t2i.png",
        f"F1 (Table 2): T2I scores, teacher against the 5:5 student; {seeds_note}",
        score_bars(sides, teachers + ["5:5"], "t2i", "Table 2 (toy): T2I"),
    )
    add(
        ["F1"],
        "table2_grid_t2i.png",
        "F1: the 5:5 row's T2I grid (teacher rows above the student's)",
        grids(["5:5"], "t2i"),
    )
    e_rows = ["E1", "E2", "E3", "E4", "E5"]
    add(
        ["F2a", "F2b"],
        "table1_t2i.png",
        f"F2 (Table 1): T2I scores by training data; {seeds_note}",
        score_bars(sides, e_rows, "t2i", "Table 1 (toy): T2I by data composition"),
    )
    add(["F2a", "F2b"], "table1_grid_t2i.png", "F2: T2I sample grids, E1 to E5 (seed 0)", grids(e_rows, "t2i"))
    guidance = ["single", "single + first-step FM", "T2I only"]
    add(
        ["F3a", "F5b"],
        "guidance_t2i.png",
        f"F3/F5: T2I scores by teacher guidance; {seeds_note}",
        score_bars(sides, guidance, "t2i", "Guidance (toy): single specialist, + first-step FM, step-wise"),
    )
    add(
        ["F3b", "F5a"],
        "guidance_curves.png",
        "F3/F5 (Fig. 3): probe T2I score over training, single specialist "
        "against step-wise (T2I only) and single + first-step FM",
        curves_plot(rows, guidance, "t2i", "Stability (toy): probe T2I score over training"),
    )
    add(["F3a", "F5b"], "guidance_grid_t2i.png", "F3/F5: T2I sample grids (seed 0)", grids(guidance, "t2i"))
    ratios = ["T2I only", "9:1", "7:3", "5:5"]
    add(
        ["F4a", "F4b"],
        "table3_edit.png",
        f"F4 (Table 3): edit scores by T2I:Edit ratio; {seeds_note}",
        score_bars(sides, ratios, "edit", "Table 3 (toy): edits by T2I:Edit ratio"),
    )
    add(["F4a", "F4b"], "table3_grid_edit.png", "F4: edit sample grids by ratio (seed 0)", grids(ratios, "edit"))
    add(
        ["F4c"],
        "table4_t2i.png",
        f"F4 (Table 4): T2I scores by T2I:Edit ratio; {seeds_note}",
        score_bars(sides, ratios, "t2i", "Table 4 (toy): T2I by T2I:Edit ratio"),
    )
    add(["F4c"], "table4_grid_t2i.png", "F4: T2I sample grids by ratio (seed 0)", grids(ratios, "t2i"))
    add(["curves"], "probe_curves.png", "Every row's probe scores over training", all_curves_plot(rows))
    return out
