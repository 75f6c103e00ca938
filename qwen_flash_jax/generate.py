"""T2I images and edits from the command line, with a teacher or a distilled student.

    # the student of a training workdir (toy or full scale), in its own K steps; --config as the run was trained
    python -m qwen_flash_jax.generate --workdir=/tmp/qf_5to5 --config=configs/5to5.py:toy --out=/tmp/qf_images \
        --prompt="a red house under a blue sky" --prompt="a sign that says OPEN"
    # a teacher of a config (the toy teachers come from the cache): N Euler steps with CFG against the empty prompt
    python -m qwen_flash_jax.generate --teacher=base --config=configs/5to5.py:toy --steps=40 --cfg=2 --out=DIR ...
    # a diffusers pipeline folder (a teacher's, or one written by qwen_flash_jax.export), via qwen_flash_jax.Pipeline
    python -m qwen_flash_jax.generate --pipeline=/models/qwen_image_21 --steps=40 --cfg=4 --negative_prompt=" " ...

Input: `--prompt` (repeatable) or `--jsonl FILE` with one request a line, the training data's fields:
`{"prompt": ..., "category": optional, "id": optional}` for T2I, `{"instruction": ..., "source": path or [paths],
...}` for an edit (paths relative to the JSONL file's folder). Options: `--size` (H or HxW), `--seed`, `--batch`,
`--steps`, `--cfg`.

Output (`--out`, which must not exist): one PNG per request, `overview.png` (the first 64 requests' images in a
labelled grid: T2I prompts, then edits with their source images above; 8 columns a block; images over 256 px
shrunk) and `manifest.jsonl`, one line per image:
`id`, `model`, `category` (if the request gives one), `prompt` (T2I) or `instruction` (edit), `source` (edit: the
path, or the list of paths, as given), `image` (the PNG's path relative to the manifest), `steps`, `seed` (the seed
of the image's batch: batch b of a run with `--seed S` is sampled with seed S + b). The folder is assembled beside
itself and renamed into place when every image is written, so a failure leaves nothing behind.

Bad input (a missing workdir, folder or component, a model of another class, an unreadable image, a size the model
cannot take, a prompt longer than the text encoder allows) prints one `error: ...` line and exits with status 2
before anything is generated.

The toy world's text encoder reads any text (a byte-level BPE), but it knows only the toy world's words: its
captions ("a ... landscape with ...") and edit instructions are what it was trained on (`python -m
qwen_flash_jax.inspect_data` shows some).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

import qwen_flash_jax
from qwen_flash_jax import atomic, config_lib, distilled
from qwen_flash_jax.data.pipeline import PromptTooLongError
from qwen_flash_jax.data.sources import DataError
from qwen_flash_jax.data.sources.jsonl import load_image
from qwen_flash_jax.data.world import save_png
from qwen_flash_jax.errors import CheckpointError, command_line_errors
from qwen_flash_jax.eval.generate import Generator, GridSection, grid_image
from qwen_flash_jax.export import check_base, read_json
from qwen_flash_jax.loading import from_params
from qwen_flash_jax.models.config import ConfigError
from qwen_flash_jax.models.layout import LayoutError
from qwen_flash_jax.train import assets as assets_lib
from qwen_flash_jax.train import teacher as teacher_lib

MANIFEST = "manifest.jsonl"
OVERVIEW = "overview.png"
OVERVIEW_COLUMNS = 8  # requests per block of overview.png
OVERVIEW_REQUESTS = 64  # the first requests shown in overview.png (a benchmark's thousand would make a huge PNG)
OVERVIEW_SIDE = 256  # larger images are shrunk in overview.png (the PNGs beside it keep every pixel)
USER_ERRORS = (ConfigError, CheckpointError, PromptTooLongError, DataError, LayoutError)


@dataclasses.dataclass(frozen=True)
class Request:
    """One image to make: a T2I prompt, or an edit instruction with its source image paths."""

    id: str
    text: str
    sources: tuple[str, ...] = ()  # resolved paths; () for T2I
    given_sources: object = None  # the "source" field as the request gave it (for the manifest)
    category: str | None = None

    @property
    def is_edit(self) -> bool:
        return bool(self.sources)


# --- requests ------------------------------------------------------------------------------------------------------


def requests_from_prompts(prompts) -> list[Request]:
    return [Request(f"{i:05d}", str(p)) for i, p in enumerate(prompts)]


def requests_from_jsonl(path) -> list[Request]:
    """Requests of a JSONL file (T2I `prompt` or edit `instruction` + `source` lines); source paths resolve
    against the file's folder. Every line and every source image is checked here."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--jsonl {path} does not exist or is not a file")
    out, ids = [], set()
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {' '.join(str(e).split())}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON: {e}") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: not a JSON object")
        request_id = str(record.get("id", f"{len(out):05d}"))
        if request_id in ids or not request_id or "/" in request_id or request_id.startswith("."):
            raise ConfigError(f"{where}: id {request_id!r} is repeated or not usable as a file name")
        ids.add(request_id)
        category = record.get("category")
        if "instruction" in record:
            given = record.get("source")
            paths = [given] if isinstance(given, str) else given
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
                raise ConfigError(f"{where}: an edit needs \"source\": a path or a list of paths")
            resolved = tuple(str(p if Path(p).is_absolute() else path.parent / p) for p in paths)
            out.append(Request(request_id, str(record["instruction"]), resolved, given, category))
        elif "prompt" in record:
            out.append(Request(request_id, str(record["prompt"]), category=category))
        else:
            raise ConfigError(f"{where}: a line needs \"prompt\" (T2I) or \"instruction\" and \"source\" (edit)")
    if not out:
        raise ConfigError(f"--jsonl {path} holds no requests")
    return out


def read_sources(request: Request, size: int | None = None):
    """The request's source images: (size, size, 3) uint8 arrays when `size` is given, else PIL RGB images."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for source in request.sources:
        if not Path(source).is_file():
            raise ConfigError(f"request {request.id}: source image {source} does not exist")
        try:
            if size is not None:
                images.append(load_image(source, size))
            else:
                with Image.open(source) as im:
                    images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ConfigError(f"request {request.id}: cannot read source image {source}: {e}") from None
    return images


# --- models --------------------------------------------------------------------------------------------------------


class ConfigSampler:
    """A workdir's student or a config's teacher, sampled by the project's own `eval.generate.Generator` at the
    config's image size (the toy world, or a full-scale config with local checkpoints)."""

    def __init__(self, config, *, workdir=None, teacher=None, batch: int, log):
        self.config = config
        self.size = int(config.data.image_size)
        if workdir is not None:
            self.student = distilled.open_student(workdir, ema=None)
            self.schedule = distilled.student_schedule(config)
            self.model_name = f"student ({self.student.which}) of {Path(workdir).name}, step {self.student.step}"
        else:
            if teacher not in config.teachers:
                raise ConfigError(f"--teacher {teacher!r} is not a teacher of the config {sorted(config.teachers)}")
            teacher_lib.check_source(config, teacher)
            self.student, self.schedule = None, None
            self.model_name = f"teacher {teacher}"
        self.teacher, self.batch, self.log = teacher, int(batch), log
        self.scheduler = teacher_lib.target_scheduler(config)  # the teachers' pipeline scheduler (None: constants)

    def load(self):
        """The slow part (text encoder, codec, weights), after every request was checked."""
        log = self.log
        self._prompt_encoder()
        mesh, rules = config_lib.make_mesh(self.config), config_lib.mesh_rules(self.config)
        model_config = config_lib.transformer_config(self.config)
        if self.student is not None:
            self.student.check_against(model_config, "the config's transformer (--config as the run was trained)")
            params = self.student.read_params()
        else:
            params = teacher_lib.ensure_teacher(self.config, self.teacher, log=log or print, assets=self.assets)
        model = from_params(model_config, params, mesh=mesh, rules=rules)
        self.params = model.params
        timesteps = None if self.schedule is None else self.schedule.timesteps
        renoise = "fresh" if self.schedule is None else self.schedule.renoise
        self.generator = Generator(
            model,
            self.assets,
            teacher_lib.target_mu(self.config),
            batch_size=self.batch,
            student_timesteps=timesteps,
            student_renoise=renoise,
            scheduler=self.scheduler,
        )

    def check(self, requests, height, width, steps, cfg, negative_prompt):
        if (height, width) != (self.size, self.size):
            raise ConfigError(
                f"this model samples {self.size}x{self.size} images only (data.image_size of its config), "
                f"not {height}x{width}"
            )
        if negative_prompt:
            raise ConfigError("--negative_prompt needs --pipeline: a config's sampler guides against the empty prompt")
        if self.schedule is not None:
            k = len(self.schedule.timesteps)
            if steps not in (None, k):
                raise ConfigError(f"the distilled student samples in its own {k} steps, not {steps}")
            if cfg not in (None, 1.0):
                raise ConfigError("the distilled student samples without CFG (the guidance is distilled into it)")
        for r in requests:
            if len(r.sources) > 1:
                raise ConfigError(
                    f"request {r.id}: a workdir's or a config's model edits from one source image, not "
                    f"{len(r.sources)}; export it (python -m qwen_flash_jax.export) and use --pipeline for several"
                )
        # Prompt lengths against the encoder's limit, before anything is loaded (the tokenizer alone).
        prompts = self._prompt_encoder()
        spec_slots = (self.size // assets_lib.latent_scale(self.config)) ** 2 // 4
        for r in requests:
            prompts(r.text, [spec_slots] if r.is_edit else [])

    def _prompt_encoder(self):
        if getattr(self, "assets", None) is None:
            self.assets = assets_lib.build_assets(self.config, log=lambda *_: None)
        return self.assets.prompts

    def steps(self, steps):
        if self.schedule is not None:
            return len(self.schedule.timesteps)
        return int(steps if steps is not None else self.config.sampling.teacher_steps)

    def run(self, chunk, sources, seed, steps, cfg, negative_prompt, height, width) -> np.ndarray:
        student = self.schedule is not None
        cfg = 1.0 if student else float(cfg if cfg is not None else self.config.sampling.cfg_scale)
        kw = dict(num_steps=steps, seed=seed, student=student, cfg_scale=cfg)
        if chunk[0].is_edit:
            images = np.stack([s[0] for s in sources])
            return self.generator.edit(self.params, images, [r.text for r in chunk], **kw)
        return self.generator.t2i(self.params, [r.text for r in chunk], **kw)

    def read(self, request):
        return read_sources(request, self.size)


class PipelineSampler:
    """A diffusers pipeline folder, teacher or exported student, sampled by `qwen_flash_jax.Pipeline`."""

    DEFAULT_TEACHER_STEPS = 40

    def __init__(self, folder, *, dtype: str, log):
        self.folder = Path(folder)
        index, _ = check_base(self.folder)  # every component there, a Qwen-Image 2.x transformer
        self.sample_sigmas = index.get("sample_sigmas")
        self.dtype, self.log = dtype, log
        self.model_name = self.folder.name
        read_json(self.folder / "scheduler" / "scheduler_config.json", str(self.folder))

    def load(self):
        self.pipe = qwen_flash_jax.Pipeline.from_pretrained(self.folder, dtype=self.dtype)

    def check(self, requests, height, width, steps, cfg, negative_prompt):
        if height is not None and (height % 32 or width % 32 or height < 32 or width < 32):
            raise ConfigError(f"--size {height}x{width}: height and width must be positive multiples of 32")
        if self.sample_sigmas and steps not in (None, len(self.sample_sigmas)):
            raise ConfigError(
                f"{self.folder} samples in its own {len(self.sample_sigmas)} steps (model_index.json's "
                f"sample_sigmas), not {steps}"
            )

    def steps(self, steps):
        if self.sample_sigmas:
            return len(self.sample_sigmas)
        return int(steps if steps is not None else self.DEFAULT_TEACHER_STEPS)

    def run(self, chunk, sources, seed, steps, cfg, negative_prompt, height, width) -> np.ndarray:
        kw = dict(
            prompt=[r.text for r in chunk],
            negative_prompt=negative_prompt,
            true_cfg_scale=float(cfg if cfg is not None else 1.0),
            height=height,
            width=width,
            num_inference_steps=steps,
            seed=seed,
            output_type="np",
        )
        if chunk[0].is_edit:
            kw["image"] = [s if len(s) > 1 else s[0] for s in sources]
        images = np.asarray(self.pipe(**kw).images, np.float32)
        return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)

    def read(self, request):
        return read_sources(request)


# --- the command ---------------------------------------------------------------------------------------------------


def parse_size(text) -> tuple[int, int]:
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise ConfigError(f"--size must be H or HxW in pixels, got {text!r}")
    return (parts[0], parts[-1])


def generate(sampler, requests, out, *, size=None, seed=0, steps=None, cfg=None, negative_prompt=None, log=None):
    """Samples every request with `sampler` into the new folder `out` (PNGs + manifest.jsonl); returns the
    manifest's lines. Everything is checked before the first image is made; `out` appears only when complete."""
    log = log or (lambda message: None)
    out = Path(out).absolute()
    if out.exists():
        raise ConfigError(f"--out {out} already exists; remove it or choose another")
    # None: the model's own size (a config's image size; the pipeline's default, or the last source's aspect ratio).
    height, width = size if size is not None else (getattr(sampler, "size", None),) * 2
    sources = {r.id: sampler.read(r) for r in requests if r.is_edit}
    sampler.check(requests, height, width, steps, cfg, negative_prompt)
    n_steps = sampler.steps(steps)
    try:  # last of the checks: it creates out's parent
        atomic.check_publishable(out)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there: {e.strerror or e}") from None
    # A batch holds one task: T2I prompts and edits are sampled apart, each in input order.
    batch = getattr(sampler, "batch", 1)
    groups = [[r for r in requests if not r.is_edit], [r for r in requests if r.is_edit]]
    chunks = [g[i : i + batch] for g in groups for i in range(0, len(g), batch)]
    shown = f"{height}x{width}" if height else "the pipeline's default size"
    log(f"{len(requests)} image(s) with {sampler.model_name}, {n_steps} steps, {shown}; loading the model")
    sampler.load()
    shown_requests = requests[:OVERVIEW_REQUESTS]
    shown_ids = {r.id for r in shown_requests}
    lines, thumbnails, start, done = {}, {}, time.monotonic(), 0
    with atomic.publish(out, if_exists="error") as tmp:
        tmp.mkdir()
        for b, chunk in enumerate(chunks):
            images = sampler.run(
                chunk,
                [sources[r.id] for r in chunk if r.is_edit],
                seed + b,
                n_steps,
                cfg,
                negative_prompt,
                height,
                width,
            )
            for request, image in zip(chunk, images):
                name = f"{request.id}.png"
                save_png(image, str(tmp / name))
                if request.id in shown_ids:
                    thumbnails[request.id] = _thumbnail(image)
                line = {"id": request.id, "model": sampler.model_name}
                if request.category is not None:
                    line["category"] = request.category
                if request.is_edit:
                    line.update(instruction=request.text, source=request.given_sources)
                else:
                    line["prompt"] = request.text
                line.update(image=name, steps=n_steps, seed=seed + b)
                lines[request.id] = line
            done += len(chunk)
            log(f"[{done}/{len(requests)}] images, {time.monotonic() - start:.1f}s")
        ordered = [lines[r.id] for r in requests]
        overview = overview_sections(shown_requests, thumbnails, sources, sampler.model_name)
        save_png(grid_image(overview)[0], str(tmp / OVERVIEW))
        (tmp / MANIFEST).write_text("".join(json.dumps(line) + "\n" for line in ordered))
    log(f"wrote {len(ordered)} image(s), {OVERVIEW} and {MANIFEST} to {out}")
    return ordered


def overview_sections(requests, images, sources, model_name: str) -> list[GridSection]:
    """The labelled grid of overview.png: blocks of up to `OVERVIEW_COLUMNS` T2I prompts, then of edits, in input
    order; an edit block's rows are its requests' source images ("source 1", ...), then `model_name`'s outputs.
    `images` and `sources` map a request id to its output and to its source images (arrays or PIL images)."""
    sections = []
    for task, group in (("T2I", [r for r in requests if not r.is_edit]), ("edits", [r for r in requests if r.is_edit])):
        for start in range(0, len(group), OVERVIEW_COLUMNS):
            block = group[start : start + OVERVIEW_COLUMNS]
            rows = []
            for k in range(max((len(r.sources) for r in block), default=0)):
                blank = np.full((1, 1, 3), 255, np.uint8)  # an edit with fewer sources: an empty cell
                row = [_thumbnail(sources[r.id][k]) if k < len(r.sources) else blank for r in block]
                rows.append((f"source {k + 1}", row))
            rows.append((model_name, [_thumbnail(images[r.id]) for r in block]))
            sections.append(GridSection(task if start == 0 else "", [r.text for r in block], rows))
    return sections


def _thumbnail(image) -> np.ndarray:
    """(H, W, 3) uint8 of an image array or PIL image, its longer side shrunk to `OVERVIEW_SIDE` if above."""
    from PIL import Image

    im = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
    im = im.convert("RGB")
    if max(im.size) > OVERVIEW_SIDE:
        w, h = im.size
        scale = OVERVIEW_SIDE / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    return np.asarray(im, np.uint8)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error, instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m qwen_flash_jax.generate", description=__doc__.split("\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="a training run's --workdir: its distilled student (EMA if it kept one)")
    model.add_argument("--teacher", help="a teacher of --config by name (e.g. base)")
    model.add_argument("--pipeline", help="a diffusers pipeline folder: a teacher's, or an exported student's")
    p.add_argument("--config", default="configs/5to5.py", help="with --workdir / --teacher: the run's --config")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a T2I prompt (repeatable)")
    prompts.add_argument("--jsonl", help="a JSONL file of T2I prompts and edits")
    p.add_argument("--out", required=True, help="output folder (PNGs + manifest.jsonl); must not exist")
    p.add_argument("--size", default=None, help="H or HxW in pixels (default: the model's size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=4, help="images sampled together")
    p.add_argument("--steps", type=int, default=None, help="teacher steps (a student samples in its own)")
    p.add_argument("--cfg", type=float, default=None, help="teacher CFG scale (default: the config's)")
    p.add_argument("--negative_prompt", default=None, help="with --pipeline: the negative prompt of true CFG")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="with --pipeline")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: one `error: ...` line and exit status 2 on bad input."""
    argv, overrides = distilled.split_config_args(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    log = None if args.quiet else _log
    with command_line_errors(USER_ERRORS, ()):
        if args.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {args.batch}")
        size = None if args.size is None else parse_size(args.size)
        requests = requests_from_prompts(args.prompt) if args.prompt else requests_from_jsonl(args.jsonl)
        if args.pipeline:
            sampler = PipelineSampler(args.pipeline, dtype=args.dtype, log=log)
            sampler.batch = args.batch
        else:
            config = distilled.load_run_config(args.config, overrides)
            sampler = ConfigSampler(config, workdir=args.workdir, teacher=args.teacher, batch=args.batch, log=log)
        generate(
            sampler,
            requests,
            args.out,
            size=size,
            seed=args.seed,
            steps=args.steps,
            cfg=args.cfg,
            negative_prompt=args.negative_prompt,
            log=log,
        )


def _log(message: str):
    print(f"generate: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
