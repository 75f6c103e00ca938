"""Bench files for the VLM judges, the packaged example set, and the recipe: generate, judge, tabulate.

A bench file is JSONL in the schema of the project's real-data sources (data/sources/jsonl.py):
    T2I:  {"id", "category": landscape|portrait|text, "prompt"}
    edit: {"id", "category": scene|enhance|object|text_edit|identity|style, "instruction",
           "source": a path or a list of paths (relative to the file's folder)}
The paper's T2I-Bench and Editing-Bench are not public; users supply their own. The example set,

    python -m qwen_flash_jax.eval.vlm_bench --out=DIR          (writes DIR/t2i.jsonl, DIR/edit.jsonl, DIR/sources/)

holds the paper's two A.2 hard-case prompts (eval/vlm_examples/t2i_hard_cases.jsonl) and, per category, one toy-world
caption or edit (the sources rendered by data.world at --size from --seed, so the package ships no images).

`run_recipe` is what a training job calls at its end (eval.judge="vlm"): each contender generates the bench's images,
a manifest is written as `generate` writes it, and `vlm_judge.judge_manifest` scores it into DIR/<bench>/table.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import numpy as np
from PIL import Image

from qwen_flash_jax import atomic
from qwen_flash_jax.data import world
from qwen_flash_jax.data.pipeline import PromptTooLongError
from qwen_flash_jax.data.sources.jsonl import load_image
from qwen_flash_jax.eval import vlm_client, vlm_judge, vlm_manifest
from qwen_flash_jax.eval.vlm_rubrics import BENCHES, CATEGORIES
from qwen_flash_jax.models.config import ConfigError

HARD_CASES = pathlib.Path(__file__).resolve().parent / "vlm_examples" / "t2i_hard_cases.jsonl"


# ------------------------------------------------------------------------------------------------ example set
def _example_lines(size: int, seed: int) -> tuple[list[dict], list[tuple[dict, np.ndarray]]]:
    """The example set: its T2I bench lines, and its edit bench lines each with its source image."""
    t2i = [json.loads(line) for line in HARD_CASES.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, category in enumerate(world.T2I_CATEGORIES):
        sample = world.sample_t2i(np.random.default_rng([seed, 1, i]), category, size)
        t2i.append({"id": f"toy-{category}", "category": category, "prompt": sample.caption})
    edits = []
    for i, category in enumerate(world.EDIT_CATEGORIES):
        sample = world.sample_edit(np.random.default_rng([seed, 2, i]), category, size)
        line = {"id": f"toy-{category}", "category": category, "instruction": sample.instruction}
        edits.append(({**line, "source": f"sources/toy-{category}.png"}, sample.source))
    return t2i, edits


def write_example_bench(out_dir, size: int = 64, seed: int = 0) -> dict[str, pathlib.Path]:
    """The example bench files in `out_dir`: {"t2i": t2i.jsonl, "edit": edit.jsonl}; deterministic in (size, seed)."""
    out_dir = pathlib.Path(out_dir)
    (out_dir / "sources").mkdir(parents=True, exist_ok=True)
    t2i, edits = _example_lines(size, seed)
    for line, source in edits:
        world.save_png(source, str(out_dir / line["source"]))
    paths = {}
    for bench, lines in (("t2i", t2i), ("edit", [line for line, _ in edits])):
        paths[bench] = out_dir / f"{bench}.jsonl"
        with atomic.publish(paths[bench]) as tmp:
            tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return paths


def read_bench(path, bench: str) -> list[dict]:
    """The bench file's lines, checked: {"id", "category", "text", "sources": [absolute paths]}."""
    path = pathlib.Path(path)
    text_field = vlm_manifest.TEXT_FIELD[bench]
    out = []
    for number, where, obj in vlm_manifest.jsonl_objects(path, "bench file"):
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str) or not obj[text_field].strip():
            raise ConfigError(f"{where}: needs a non-empty string {text_field!r}")
        if obj.get("category") not in CATEGORIES[bench]:
            raise ConfigError(
                f"{where}: unknown category {obj.get('category')!r}; valid: {', '.join(CATEGORIES[bench])}"
            )
        sources = []
        if bench == "edit":
            raw = obj.get("source")
            raw = raw if isinstance(raw, list) else [raw]
            if not raw or not all(isinstance(s, str) and s for s in raw):
                raise ConfigError(f"{where}: 'source' must be a path or a non-empty list of paths")
            sources = [str(path.parent / s) for s in raw]
        out.append(
            {
                "id": str(obj.get("id", f"{path.name}:{number}")),
                "category": obj["category"],
                "text": obj[text_field],
                "sources": sources,
            }
        )
    if len({line["id"] for line in out}) != len(out):
        raise ConfigError(f"{path}: ids must be unique")
    return out


# ---------------------------------------------------------------------------------------------------- recipe
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def generate_manifest(bench: str, lines: list[dict], contender, out_dir, image_size: int, log=print) -> list[dict]:
    """The contender's images for the bench lines under out_dir/images/<model>/ and their manifest lines; kept in
    out_dir/manifest.<model>.jsonl, published after its images, so a rerun reuses a finished model's images."""
    out_dir = pathlib.Path(out_dir)
    slug = _slug(contender.name)
    kept = out_dir / f"manifest.{slug}.jsonl"
    if kept.exists():
        log(f"{bench}: the images of {contender.name} from {kept}")
        return [json.loads(line) for line in kept.read_text(encoding="utf-8").splitlines() if line.strip()]
    images_dir = out_dir / "images" / slug
    images_dir.mkdir(parents=True, exist_ok=True)
    if bench == "edit":
        several = [line["id"] for line in lines if len(line["sources"]) != 1]
        if several:
            log(f"edit: skipping {len(several)} line(s) with several sources (the job's sampler takes one source)")
        lines = [line for line in lines if len(line["sources"]) == 1]
    manifest = []
    log(f"{bench}: generating {len(lines)} images with {contender.name}")
    for category in CATEGORIES[bench]:
        group = [line for line in lines if line["category"] == category]
        if not group:
            continue
        texts = [line["text"] for line in group]
        if bench == "t2i":
            images = contender.t2i(texts)
        else:
            sources = np.stack([load_image(line["sources"][0], image_size) for line in group])
            images = contender.edit(sources, texts)
        for line, image in zip(group, np.asarray(images), strict=True):
            path = images_dir / f"{_slug(line['id'])}.png"
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
            entry = {"id": line["id"], "model": contender.name, "category": category}
            entry[vlm_manifest.TEXT_FIELD[bench]] = line["text"]
            entry["image"] = str(path.relative_to(out_dir))
            if bench == "edit":
                entry["source"] = line["sources"][0]
            manifest.append(entry)
    with atomic.publish(kept) as tmp:
        tmp.write_text("".join(json.dumps(entry) + "\n" for entry in manifest))
    return manifest


def run_recipe(
    out_dir,
    contenders,
    judges: list[vlm_client.JudgeSpec],
    *,
    image_size: int,
    benches: dict[str, str | None] | None = None,
    log=print,
    **judge_options,
) -> dict[str, dict]:
    """Generate, judge, tabulate: {bench: table}, with DIR/<bench>/table.md.

    contenders: objects with `name`, `t2i(prompts) -> (N, H, W, 3) uint8` and `edit(sources (N, S, S, 3) uint8,
    instructions) -> uint8 images` (eval.report.Contender); sources are loaded at `image_size`. benches: {"t2i":
    path, "edit": path}; a missing or empty entry takes the example set (written to DIR/example_bench). The rest
    (concurrency, max_attempts, retries, backoff, timeout) goes to `vlm_judge.judge_manifest`; a rerun resumes."""
    out_dir = pathlib.Path(out_dir)
    benches = dict(benches or {})
    if not all(benches.get(b) for b in BENCHES):
        example = write_example_bench(out_dir / "example_bench", size=image_size)
        benches = {b: benches.get(b) or str(example[b]) for b in BENCHES}
    tables = {}
    for bench in BENCHES:
        lines = read_bench(benches[bench], bench)
        bench_dir = out_dir / bench
        bench_dir.mkdir(parents=True, exist_ok=True)
        manifest = [
            entry for c in contenders for entry in generate_manifest(bench, lines, c, bench_dir, image_size, log)
        ]
        with atomic.publish(bench_dir / "manifest.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(entry) + "\n" for entry in manifest))
        tables[bench] = vlm_judge.judge_manifest(
            bench_dir / "manifest.jsonl", bench, judges, bench_dir, log=log, **judge_options
        )
        log(f"{bench}: the VLM judges' table is in {bench_dir / 'table.md'}")
    return tables


# The training config's fields for the recipe (eval.judge="vlm"); all but vlm_judges have defaults.
CONFIG_DEFAULTS = {
    "vlm_t2i_bench": "",  # a T2I bench file; "" = the example set
    "vlm_edit_bench": "",  # an edit bench file; "" = the example set
    "vlm_concurrency": 8,
    "vlm_max_attempts": 3,
    "vlm_timeout": 120.0,
}


def check_config(eval_config) -> list[vlm_client.JudgeSpec]:
    """The judges of `eval.vlm_judges` (strings in --judge's syntax), checked before a job starts (ConfigError)."""
    judges = vlm_client.parse_judges(tuple(eval_config.get("vlm_judges", ())))
    for judge in judges:
        judge.api_key()
    for bench in BENCHES:
        path = eval_config.get(f"vlm_{bench}_bench", "")
        if path:
            read_bench(path, bench)
    return judges


def check_prompts_fit(eval_config, encode, *, image_size: int, edit_slots: int) -> None:
    """Every prompt of the configured benches (or of the example set) fits the job's fixed prompt length, checked
    before training: the job samples them with its training prompt encoder `encode` (data.pipeline.PromptEncoder,
    `edit_slots` image slots per edit prompt). One ConfigError names the first prompt that does not fit."""
    example_t2i, example_edits = _example_lines(image_size, seed=0)
    example = {"t2i": example_t2i, "edit": [line for line, _ in example_edits]}
    for bench in BENCHES:
        path = eval_config.get(f"vlm_{bench}_bench", "")
        field = f"eval.vlm_{bench}_bench"
        if path:
            lines, where = read_bench(path, bench), f"{field}={path!r}"
        else:
            text_field = vlm_manifest.TEXT_FIELD[bench]
            lines = [{"id": line["id"], "text": line[text_field]} for line in example[bench]]
            where = f"the example {bench} bench ({field} is empty)"
        for line in lines:
            try:
                encode(line["text"], [edit_slots] if bench == "edit" else [])
            except PromptTooLongError as e:
                raise ConfigError(
                    f"eval.judge='vlm': {where}, line {line['id']!r} does not fit the job's prompts: {e}; "
                    f"use a bench of shorter prompts or raise that limit"
                ) from None


RECIPE_DIR = "vlm_eval"  # the job's recipe folder in its workdir


def run_recipe_from_config(eval_config, workdir, contenders, *, image_size: int, log=print) -> dict[str, dict]:
    """`run_recipe` into WORKDIR/vlm_eval with the settings of a training config's `eval` section. Returns, per
    bench, what results.json records: the table and its files (table.md, table.json, scores.jsonl) relative to
    WORKDIR."""
    get = lambda name: eval_config.get(name, CONFIG_DEFAULTS[name])  # noqa: E731
    tables = run_recipe(
        pathlib.Path(workdir) / RECIPE_DIR,
        contenders,
        check_config(eval_config),
        image_size=image_size,
        benches={"t2i": get("vlm_t2i_bench"), "edit": get("vlm_edit_bench")},
        concurrency=int(get("vlm_concurrency")),
        max_attempts=int(get("vlm_max_attempts")),
        timeout=float(get("vlm_timeout")),
        log=log,
    )
    return {
        bench: {
            **{f"{stem}_{ext}": f"{RECIPE_DIR}/{bench}/{stem}.{ext}" for stem, ext in _RECIPE_FILES},
            "table": table,
        }
        for bench, table in tables.items()
    }


_RECIPE_FILES = (("table", "md"), ("table", "json"), ("scores", "jsonl"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwen_flash_jax.eval.vlm_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for t2i.jsonl, edit.jsonl and sources/")
    parser.add_argument("--size", type=int, default=64, help="side of the toy-world source images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = write_example_bench(args.out, size=args.size, seed=args.seed)
    except ValueError as e:  # the world's size check
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {paths['t2i']} and {paths['edit']}")


if __name__ == "__main__":
    main()
