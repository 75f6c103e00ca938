"""The VLM judges' rubrics (the paper's appendix A.1) and the validation of a judge's reply against them.

The rubric texts are package data in `eval/rubrics/`, word for word from the paper:
  t2i.txt               Table A, the T2I-Bench system prompt (every T2I category);
  edit_template.txt     Table B, the Editing-Bench meta-prompt with its three placeholders;
  edit_categories.json  Tables C and D: per edit category its title, rubric and sub-score criteria.
The paper's HTML rendering turned the prompts' ASCII quotes into curly ones and `<`/`>` into `¡`/`¿` (a LaTeX font
artefact); the files restore them. Table D names its criteria ("Target localization"); the reply's sub-score keys
are those names in snake case ("target_localization"), the form the paper's text quotes, and the criteria are listed
in the prompt as `- <key>: <description>` so the judge sees the exact keys it must return.

The project's category keys (data.world's T2I_CATEGORIES / EDIT_CATEGORIES, the manifests' `category`) map to the
paper's categories as follows (`LABELS` holds the paper's table headers):
  landscape -> Landscape, portrait -> Portrait, text -> Text-centric      (all scored with Table A)
  scene     -> Scene-level semantic transformation   (Scene trans.)
  enhance   -> Perceptual image enhancement          (Perceptual enhance.)
  object    -> Object-centric manipulation           (Object manip.)
  text_edit -> Textual content editing               (Text editing)
  identity  -> Identity-preserving editing           (Identity preserv.)
  style     -> Stylistic transfer                    (Style transfer)
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re

from qwen_flash_jax.data.world import EDIT_CATEGORIES, T2I_CATEGORIES

RUBRICS = pathlib.Path(__file__).resolve().parent / "rubrics"
BENCHES = ("t2i", "edit")
CATEGORIES = {"t2i": T2I_CATEGORIES, "edit": EDIT_CATEGORIES}
LABELS = {
    "landscape": "Landscape",
    "portrait": "Portrait",
    "text": "Text-centric",
    "scene": "Scene trans.",
    "enhance": "Perceptual enhance.",
    "object": "Object manip.",
    "text_edit": "Text editing",
    "identity": "Identity preserv.",
    "style": "Style transfer",
}
SCORE_RANGE = (1.0, 5.0)
SCORE_KEY = {"t2i": "score", "edit": "overall_score"}


class InvalidReply(ValueError):
    """A judge's reply that is not the JSON its rubric demands; the message says what is wrong (and is shown to the
    judge when it is asked again)."""


@functools.cache
def edit_categories() -> dict[str, dict]:
    """Tables C and D: category key -> {"title", "rubric", "criteria": [{"key", "name", "description"}]}."""
    return json.loads((RUBRICS / "edit_categories.json").read_text(encoding="utf-8"))


def sub_score_keys(category: str) -> tuple[str, ...]:
    return tuple(c["key"] for c in edit_categories()[category]["criteria"])


@functools.cache
def system_prompt(bench: str, category: str) -> str:
    """The rubric a sample of `category` is judged with: Table A for T2I; Table B instantiated with the category's
    rows of Tables C and D for edits."""
    if category not in CATEGORIES[bench]:
        raise ValueError(f"unknown {bench} category {category!r}; valid: {', '.join(CATEGORIES[bench])}")
    if bench == "t2i":
        return (RUBRICS / "t2i.txt").read_text(encoding="utf-8").strip()
    row = edit_categories()[category]
    criteria = "\n".join(f"- {c['key']}: {c['description']}" for c in row["criteria"])
    template = (RUBRICS / "edit_template.txt").read_text(encoding="utf-8").strip()
    return (
        template.replace("<category-title>", row["title"])
        .replace("<category-rubric>", row["rubric"])
        .replace("<sub-score-criteria>", criteria)
    )


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json_object(text: str, key: str) -> dict:
    """The JSON object in a reply: the whole text, else a code fence's content, else the first `{...}` in the prose
    that decodes to an object holding `key`."""
    text = text.strip()
    candidates = [text] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict) and key in value:
            return value
    raise InvalidReply("the reply holds no JSON object")


def _score(value, what: str) -> float:
    # bool is an int in Python; a judge answering `true` has not given a score.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidReply(f"{what} must be a number, got {json.dumps(value)}")
    low, high = SCORE_RANGE
    if not low <= value <= high:
        raise InvalidReply(f"{what} {value} is outside [{low:g}, {high:g}]")
    return float(value)


def parse_reply(bench: str, category: str, text: str) -> dict:
    """The validated reply: {"score", "reasoning", "sub_scores", "failure_modes"} (the last two None for T2I), or
    InvalidReply. Keys the rubric does not ask for are ignored; for edits the sub-scores must be exactly the
    category's criteria."""
    reply = extract_json_object(text, SCORE_KEY[bench])
    key = SCORE_KEY[bench]
    if key not in reply:
        raise InvalidReply(f"the JSON object has no {key!r}")
    score = _score(reply[key], key)
    reasoning = reply.get("reasoning")
    if not isinstance(reasoning, str):
        raise InvalidReply("'reasoning' must be a string")
    if bench == "t2i":
        return {"score": score, "reasoning": reasoning, "sub_scores": None, "failure_modes": None}
    sub = reply.get("sub_scores")
    if not isinstance(sub, dict):
        raise InvalidReply("'sub_scores' must be an object")
    expected = sub_score_keys(category)
    if set(sub) != set(expected):
        raise InvalidReply(f"'sub_scores' must have exactly the keys {', '.join(expected)}; got {', '.join(sub)}")
    sub_scores = {k: _score(sub[k], f"sub_scores.{k}") for k in expected}
    modes = reply.get("failure_modes")
    if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
        raise InvalidReply("'failure_modes' must be a list of strings")
    return {"score": score, "reasoning": reasoning, "sub_scores": sub_scores, "failure_modes": modes}
