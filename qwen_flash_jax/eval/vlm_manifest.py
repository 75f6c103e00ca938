"""The manifest a `generate` run writes, checked line by line, and the chat a judge is asked per sample.

Manifest lines: `id`, `model`, `category`, `prompt` (T2I) or `instruction` (edits), `image` and, for edits,
`source` (a path or a list of paths); relative paths resolve against the manifest's folder; other keys (`steps`,
`seed`, ...) are ignored. A bad line is a ConfigError naming FILE:LINE.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import pathlib

from PIL import Image

from qwen_flash_jax.eval.vlm_rubrics import CATEGORIES, system_prompt
from qwen_flash_jax.models.config import ConfigError

TEXT_FIELD = {"t2i": "prompt", "edit": "instruction"}
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    model: str
    category: str
    text: str  # the prompt (T2I) or the instruction (edit)
    image: str
    sources: tuple[str, ...]  # edits only


def _check_image(path: str, where: str) -> None:
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some corrupt files
        raise ConfigError(f"{where}: unreadable image {path} ({type(e).__name__}: {e})") from None


def _path(value, field: str, base: pathlib.Path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: field {field!r} must be a non-empty path, got {value!r}")
    path = str(base / os.path.expanduser(value.strip()))
    _check_image(path, where)
    return path


def _sample(obj, bench: str, base: pathlib.Path, where: str) -> Sample:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    fields = ["id", "model", "category", TEXT_FIELD[bench], "image"] + (["source"] if bench == "edit" else [])
    missing = [f for f in fields if obj.get(f) in (None, "")]
    if missing:
        raise ConfigError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ConfigError(f"{where}: field 'id' must be a string or an integer, got {rid!r}")
    for field in ("model", "category", TEXT_FIELD[bench]):
        if not isinstance(obj[field], str):
            raise ConfigError(f"{where}: field {field!r} must be a string")
    if obj["category"] not in CATEGORIES[bench]:
        raise ConfigError(
            f"{where}: unknown category {obj['category']!r}; valid {bench} categories: {', '.join(CATEGORIES[bench])}"
        )
    sources = ()
    if bench == "edit":
        raw = obj["source"] if isinstance(obj["source"], list) else [obj["source"]]
        if not raw:
            raise ConfigError(f"{where}: field 'source' is an empty list")
        sources = tuple(_path(s, "source", base, where) for s in raw)
    image = _path(obj["image"], "image", base, where)
    return Sample(str(rid), obj["model"], obj["category"], obj[TEXT_FIELD[bench]], image, sources)


def jsonl_objects(path: pathlib.Path, what: str):
    """(line number, "path:line", parsed JSON) for every non-blank line of a JSONL file; ConfigError on an unreadable
    file (`what` names it) or a line that is not JSON."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the {what} {path}: {e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield number, where, json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{where}: not JSON ({e})") from None


def read_manifest(path, bench: str) -> list[Sample]:
    """Every line of a manifest, checked (fields, category, readable images); ConfigError names the first bad line."""
    path = pathlib.Path(path)
    samples, seen = [], set()
    for _, where, obj in jsonl_objects(path, "manifest"):
        sample = _sample(obj, bench, path.parent, where)
        if (sample.id, sample.model) in seen:
            raise ConfigError(f"{where}: id {sample.id!r} of model {sample.model!r} appears twice")
        seen.add((sample.id, sample.model))
        samples.append(sample)
    if not samples:
        raise ConfigError(f"the manifest {path} has no samples")
    return samples


# ------------------------------------------------------------------------------------------------------ requests
def image_url(path: str) -> str:
    """A data URL of the image file: its own bytes when a judge API takes its format, else re-encoded as PNG."""
    data = pathlib.Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        mime = _MIME.get(im.format)
        if mime is None:
            buffer = io.BytesIO()
            im.convert("RGB").save(buffer, format="PNG")
            data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _image_part(path: str) -> dict:
    return {"type": "image_url", "image_url": {"url": image_url(path)}}


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def messages(bench: str, sample: Sample) -> list[dict]:
    """The chat for one sample (the model's name is never sent: the judge must not know whose image it scores)."""
    if bench == "t2i":
        user = [_text_part(f"Caption: {sample.text}"), _image_part(sample.image)]
    else:
        user = [
            _text_part("Input/source image(s):"),
            *(_image_part(s) for s in sample.sources),
            _text_part(f"Edit instruction: {sample.text}"),
            _text_part("Output image:"),
            _image_part(sample.image),
        ]
    return [{"role": "system", "content": system_prompt(bench, sample.category)}, {"role": "user", "content": user}]
