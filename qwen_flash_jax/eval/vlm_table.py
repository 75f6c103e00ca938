"""The VLM judges' scores as the paper's tables (Tables 1, 3, 4): table.json and table.md.

Rows are model x judge; columns the bench's categories (in the project's category order, headed with the paper's
labels), then the average, then the rank. A cell is the mean of its valid scores; failures (a judge that never gave
a valid reply) are counted beside it and never enter a mean. The average is the mean of the category means, as the
paper's averages are (its categories are equally sized), and is left empty when a category has no valid score. The
rank, one per model, orders models by their average taken over the judges; a model without an average under every
judge is not ranked. Equal averages share a rank.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from qwen_flash_jax import atomic
from qwen_flash_jax.eval.vlm_rubrics import CATEGORIES, LABELS


def build_table(bench: str, records: list[dict], models: list[str], judges: list[str]) -> dict:
    """The table of `records` (scores.jsonl lines, the last per (id, model, judge)) for `models` x `judges`."""
    present = {r["category"] for r in records}
    categories = [c for c in CATEGORIES[bench] if c in present]
    cells: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        cells.setdefault((r["model"], r["judge"], r["category"]), []).append(r)
    rows = []
    for model in models:
        for judge in judges:
            row = {"model": model, "judge": judge, "categories": {}}
            for category in categories:
                got = cells.get((model, judge, category), [])
                valid = [r["score"] for r in got if r["score"] is not None]
                row["categories"][category] = {
                    "mean": float(np.mean(valid)) if valid else None,
                    "n": len(valid),
                    "failures": len(got) - len(valid),
                    "sub_scores": _sub_score_means(got),
                }
            means = [cell["mean"] for cell in row["categories"].values()]
            row["average"] = float(np.mean(means)) if means and None not in means else None
            row["failures"] = sum(cell["failures"] for cell in row["categories"].values())
            rows.append(row)
    over_judges = {}
    for model in models:
        averages = [row["average"] for row in rows if row["model"] == model]
        if averages and None not in averages:
            over_judges[model] = float(np.mean(averages))
    for row in rows:
        mine = over_judges.get(row["model"])
        row["average_over_judges"] = mine
        row["rank"] = None if mine is None else 1 + sum(v > mine for v in over_judges.values())
    return {
        "bench": bench,
        "categories": categories,
        "labels": {c: LABELS[c] for c in categories},
        "judges": judges,
        "models": models,
        "rows": rows,
    }


def _sub_score_means(records: list[dict]) -> dict[str, float] | None:
    subs = [r["sub_scores"] for r in records if r["score"] is not None and r.get("sub_scores")]
    if not subs:
        return None
    return {k: float(np.mean([s[k] for s in subs])) for k in subs[0]}


def _cell(mean: float | None, failures: int) -> str:
    return f"{'-' if mean is None else f'{mean:.2f}'} ({failures} failed)"


def markdown(table: dict) -> str:
    header = ["Model", "Judge"] + [table["labels"][c] for c in table["categories"]] + ["Average", "Rank"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shown = set()
    for row in table["rows"]:
        first = row["model"] not in shown  # the model and its rank on its first row only, as the paper prints them
        shown.add(row["model"])
        cells = [_cell(c["mean"], c["failures"]) for c in row["categories"].values()]
        rank = ("-" if row["rank"] is None else str(row["rank"])) if first else ""
        lines.append(
            "| "
            + " | ".join(
                [row["model"] if first else "", row["judge"], *cells, _cell(row["average"], row["failures"]), rank]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_tables(out_dir, table: dict) -> None:
    """DIR/table.json and DIR/table.md, each whole or not at all."""
    out_dir = pathlib.Path(out_dir)
    with atomic.publish(out_dir / "table.json") as tmp:
        tmp.write_text(json.dumps(table, indent=2) + "\n")
    with atomic.publish(out_dir / "table.md") as tmp:
        tmp.write_text(markdown(table))
