"""The VLM judge command against a real chat-completions server on 127.0.0.1, started here.

The server (tests/vlm_server.py) answers each sample by a script: valid replies, replies wrapped in prose, malformed
JSON, scores out of range, 500s, 429s with Retry-After, replies slower than the client's timeout, or never a valid
reply; it counts the requests per sample, so a resumed run can be shown to ask nothing twice.

`python3 -m tests.test_vlm_judge OUT_DIR` runs the example bench set against it (docs/experiments/vlm_judge.md).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from qwen_flash_jax.eval import vlm_bench, vlm_client, vlm_judge, vlm_manifest, vlm_rubrics, vlm_table
from tests.vlm_server import FakeJudgeServer, image_key

REPO = pathlib.Path(__file__).resolve().parent.parent
FAST = dict(backoff=0.01, timeout=0.5, retries=2, max_attempts=3, concurrency=4)


# --------------------------------------------------------------------------------------------------- fixtures
def _png(path: pathlib.Path, colour) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)
    return str(path)


def t2i_manifest(root: pathlib.Path, models=("A", "B"), per_category=2) -> tuple[pathlib.Path, list[dict]]:
    lines, colour = [], 0
    for model in models:
        for category in ("landscape", "portrait", "text"):
            for i in range(per_category):
                colour += 1
                image = _png(root / "img" / f"{model}-{category}-{i}.png", (colour, 7 * colour % 256, 100))
                lines.append(
                    {
                        "id": f"{category}-{i}",
                        "model": model,
                        "category": category,
                        "prompt": f"a {category} number {i}",
                        "image": os.path.relpath(image, root),
                        "steps": 4,
                    }
                )
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path, lines


def key_of(root: pathlib.Path, line: dict, judge_model: str) -> str:
    return image_key(judge_model, vlm_manifest.image_url(str(root / line["image"])))


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "secret")


# ------------------------------------------------------------------------------------------------------- tests
def test_rubrics_are_the_papers():
    t2i = vlm_rubrics.system_prompt("t2i", "text")
    assert t2i.startswith("You are an expert evaluator for text-to-image generation results.")
    assert '{"score": <float from 1 to 5 rounded to two decimals>, "reasoning": "<one short English sentence>"}' in t2i
    for category in vlm_rubrics.CATEGORIES["edit"]:
        prompt = vlm_rubrics.system_prompt("edit", category)
        row = vlm_rubrics.edit_categories()[category]
        assert f"Category-specific rubric: {row['title']}\n{row['rubric']}\n" in prompt
        assert "<" + "category" not in prompt and "<sub-score" not in prompt
        assert re.findall(r"^- ([a-z_]+): ", prompt, re.MULTILINE) == list(vlm_rubrics.sub_score_keys(category))
    assert vlm_rubrics.sub_score_keys("object")[1] == "target_localization"  # a key the paper's text names
    assert "text_readability" in vlm_rubrics.sub_score_keys("text_edit")
    assert "identity_preservation" in vlm_rubrics.sub_score_keys("identity")


def test_reply_parsing_never_invents_a_score():
    parse = vlm_rubrics.parse_reply
    assert parse("t2i", "text", '{"score": 4.25, "reasoning": "ok"}')["score"] == 4.25
    wrapped = 'Sure!\n```json\n{"score": 2, "reasoning": "blurry"}\n```'
    assert parse("t2i", "text", wrapped)["score"] == 2.0
    assert parse("t2i", "text", 'I think {"note": 1} then {"score": 5, "reasoning": "x"} ok')["score"] == 5.0
    bad_replies = [
        '{"score": 5.5, "reasoning": "x"}',
        '{"score": "4", "reasoning": "x"}',
        '{"score": true, "reasoning": ""}',
        '{"score": NaN, "reasoning": ""}',
        '{"score": 4}',
        '{"score": 4.0, "reasoning": "cut',
        "no json at all",
    ]
    for bad in bad_replies:
        with pytest.raises(vlm_rubrics.InvalidReply):
            parse("t2i", "text", bad)
    keys = vlm_rubrics.sub_score_keys("style")
    good = {"overall_score": 3.5, "sub_scores": dict.fromkeys(keys, 3), "reasoning": "r", "failure_modes": ["x"]}
    assert parse("edit", "style", json.dumps(good))["sub_scores"] == dict.fromkeys(keys, 3.0)
    for broken in ({**good, "sub_scores": dict.fromkeys(keys[:-1], 3)}, {**good, "failure_modes": "x"}):
        with pytest.raises(vlm_rubrics.InvalidReply):
            parse("edit", "style", json.dumps(broken))


def test_judge_spec_parsing():
    spec = vlm_client.parse_judge("gem=gemini-2.5-pro@https://x.example/v1beta/openai,key_env=GEMINI_API_KEY")
    assert (spec.name, spec.model, spec.key_env) == ("gem", "gemini-2.5-pro", "GEMINI_API_KEY")
    assert spec.endpoint == "https://x.example/v1beta/openai/chat/completions"
    assert vlm_client.parse_judge("gpt=gpt-4o@https://api.openai.com/v1/").key_env == "OPENAI_API_KEY"
    for bad in ("gpt-4o@https://a/v1", "g=gpt-4o", "g=m@ftp://a", "g=m@https://a,key=X", "g=m@https://a,key_env=1X"):
        with pytest.raises(vlm_client.ConfigError):
            vlm_client.parse_judge(bad)
    assert vlm_client.retry_after_seconds("2") == 2.0 and vlm_client.retry_after_seconds(None) is None


def test_scores_tables_and_failures(tmp_path):
    manifest, lines = t2i_manifest(tmp_path)
    with FakeJudgeServer() as server:
        judges = [server.judge("j1", "judge-one"), server.judge("j2", "judge-two")]
        truth = {}  # (line index, judge) -> the score that must be recorded (None: a failure)
        plans = {  # (line index, judge name) -> script; the rest reply ("ok", 3.0)
            (0, "j1"): [("ok", 4.5)],
            (1, "j1"): [("prose", 2.0)],
            (2, "j1"): [("malformed",), ("ok", 3.5)],
            (3, "j1"): [("range", 7.0), ("range", 0.0), ("ok", 1.25)],
            (4, "j1"): [("status", 500), ("ok", 5.0)],
            (5, "j1"): [("status", 429, 0.3), ("ok", 2.5)],
            (6, "j1"): [("slow", 1.5, 1.0), ("ok", 4.0)],
            (7, "j1"): [("malformed",)],  # never valid: a failure
            (8, "j1"): [("status", 500)],  # always 500: a failure
            (9, "j2"): [("range", 9.0)],  # always out of range: a failure
        }
        for i, line in enumerate(lines):
            for judge in judges:
                script = plans.get((i, judge.name), [("ok", 3.0)])
                server.scripts[key_of(tmp_path, line, judge.model)] = script
                final = script[-1]
                truth[(i, judge.name)] = final[-1] if final[0] in ("ok", "prose", "slow") else None
        table = vlm_judge.judge_manifest(manifest, "t2i", judges, tmp_path / "out", log=lambda *_: None, **FAST)
        # A rerun asks again only the request failure (the server never answered), not the judge's invalid replies;
        # --retry_failed asks those too. Both end as before: the scripts repeat their last action.
        before = collections.Counter(server.counts)
        vlm_judge.judge_manifest(manifest, "t2i", judges, tmp_path / "out", log=lambda *_: None, **FAST)
        rerun = collections.Counter(server.counts) - before
        assert rerun == {key_of(tmp_path, lines[8], "judge-one"): 3}
        before = collections.Counter(server.counts)
        vlm_judge.judge_manifest(
            manifest, "t2i", judges, tmp_path / "out", log=lambda *_: None, retry_failed=True, **FAST
        )
        retried = collections.Counter(server.counts) - before
        assert set(retried) == {
            key_of(tmp_path, lines[i], m) for i, m in ((7, "judge-one"), (8, "judge-one"), (9, "judge-two"))
        }

    records = {(r["id"], r["model"], r["judge"]): r for r in map(json.loads, open(tmp_path / "out" / "scores.jsonl"))}
    assert len(records) == len(lines) * 2
    for (i, judge), score in truth.items():
        record = records[(lines[i]["id"], lines[i]["model"], judge)]
        assert record["score"] == score, (i, judge, record)
        assert (record["error"] is None) == (score is not None)
    record = lambda i, judge="j1": records[(lines[i]["id"], lines[i]["model"], judge)]  # noqa: E731
    assert record(7)["error"].startswith("no valid reply after 3 attempts") and record(7)["requests"] == 3
    assert "HTTP 500" in record(8)["error"] and record(8)["requests"] == 3  # the first request and 2 retries
    assert record(8)["failure"] == "request" and record(7)["failure"] == "reply" and record(0)["failure"] is None
    assert record(6)["requests"] == 2 and record(6)["attempts"] == 1  # the timed-out request, then the reply
    assert record(3)["attempts"] == 3  # two out-of-range replies, each asked again
    assert "outside [1, 5]" in record(9, "j2")["error"]

    # The 429's Retry-After (0.3 s) was waited, not the 0.01 s backoff; a re-ask tells the judge what was wrong.
    key429 = key_of(tmp_path, lines[5], "judge-one")
    times = [r["time"] for r in server.requests if r["key"] == key429]
    assert len(times) == 2 and times[1] - times[0] >= 0.3
    reasked = [r["body"] for r in server.requests if r["key"] == key_of(tmp_path, lines[2], "judge-one")][1]
    assert [m["role"] for m in reasked["messages"]] == ["system", "user", "assistant", "user"]
    assert "not valid" in reasked["messages"][3]["content"]
    first = server.requests[0]["body"]
    assert first["temperature"] == 0 and first["messages"][0]["content"] == vlm_rubrics.system_prompt(
        "t2i", "landscape"
    )
    assert first["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")

    # The table, against means computed here from the scripted scores.
    rows = {(r["model"], r["judge"]): r for r in table["rows"]}
    averages = {}
    for model in ("A", "B"):
        for judge in ("j1", "j2"):
            means = []
            for category in ("landscape", "portrait", "text"):
                scores = [
                    truth[(i, judge)] for i, x in enumerate(lines) if x["model"] == model and x["category"] == category
                ]
                valid = [s for s in scores if s is not None]
                cell = rows[(model, judge)]["categories"][category]
                assert cell["mean"] == pytest.approx(np.mean(valid)) and cell["failures"] == len(scores) - len(valid)
                means.append(np.mean(valid))
            assert rows[(model, judge)]["average"] == pytest.approx(np.mean(means))
            averages.setdefault(model, []).append(np.mean(means))
    assert rows[("A", "j1")]["categories"]["landscape"]["mean"] == pytest.approx((4.5 + 2.0) / 2)  # by hand
    assert rows[("A", "j1")]["categories"]["portrait"] == {"mean": 2.375, "n": 2, "failures": 0, "sub_scores": None}
    assert rows[("B", "j1")]["categories"]["landscape"] == {"mean": 4.0, "n": 1, "failures": 1, "sub_scores": None}
    assert rows[("B", "j1")]["failures"] == 2 and rows[("B", "j2")]["failures"] == 1
    best = max(averages, key=lambda m: np.mean(averages[m]))
    assert rows[(best, "j1")]["rank"] == 1 and rows[({"A": "B", "B": "A"}[best], "j1")]["rank"] == 2
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| Model | Judge | Landscape | Portrait | Text-centric | Average | Rank |" in md
    assert "| 4.00 (1 failed) |" in md and "| 2.38 (0 failed) |" in md
    assert json.loads((tmp_path / "out" / "table.json").read_text()) == table


def test_edit_bench_sub_scores_and_several_sources(tmp_path):
    src1, src2 = _png(tmp_path / "s1.png", (10, 20, 30)), _png(tmp_path / "s2.png", (40, 50, 60))
    lines = [
        {"id": "e1", "model": "M", "category": "text_edit", "instruction": "write CAT", "source": "s1.png",
         "image": _png(tmp_path / "o1.png", (1, 2, 3))},
        {"id": "e2", "model": "M", "category": "identity", "instruction": "add glasses", "source": [src1, src2],
         "image": _png(tmp_path / "o2.png", (4, 5, 6))},
    ]  # fmt: skip
    manifest = tmp_path / "edit.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with FakeJudgeServer(default=lambda key: [("prose", 4.0)]) as server:
        judge = server.judge("j", "vlm")
        table = vlm_judge.judge_manifest(manifest, "edit", [judge], tmp_path / "out", log=lambda *_: None, **FAST)
        bodies = [r["body"] for r in server.requests]
    assert len(bodies) == 2
    identity = next(b for b in bodies if "Identity-preserving editing" in b["messages"][0]["content"])
    images = [p for p in identity["messages"][1]["content"] if p["type"] == "image_url"]
    assert len(images) == 3  # two sources, then the output
    row = table["rows"][0]
    assert table["categories"] == ["text_edit", "identity"]
    assert row["categories"]["text_edit"]["sub_scores"] == dict.fromkeys(vlm_rubrics.sub_score_keys("text_edit"), 4.0)
    assert row["average"] == 4.0 and row["rank"] == 1


def kill_and_resume(server: FakeJudgeServer, manifest, out: pathlib.Path, judge_model: str, hang_after: int):
    """Runs the command in a child process with 2 requests in flight; requests after the first `hang_after` get no
    reply, and the child is killed (SIGKILL) once both hang and the replies it got are on file. Then reruns it here.
    Returns (requests per key in the first run, the (id, model) pairs it recorded, requests per key in the rerun)."""
    server.hang_after = hang_after
    argv = [
        sys.executable, "-m", "qwen_flash_jax.eval.vlm_judge", "--bench=t2i", f"--manifest={manifest}",
        f"--judge=j={judge_model}@{server.url},key_env=FAKE_JUDGE_KEY", f"--out={out}", "--concurrency=2",
        "--backoff=0.01", "--max_attempts=3",
    ]  # fmt: skip
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    scores = out / "scores.jsonl"

    def settled():  # both in-flight requests hang, and every answered pair is on file
        answered = {r["key"] for r in server.requests[:hang_after]}
        return (
            sum(server.counts.values()) >= hang_after + 2
            and scores.exists()
            and (len(scores.read_text().splitlines()) >= len(answered) - 2)
        )

    deadline = time.monotonic() + 120
    while not settled() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # a reply being written when the requests hung
    child.send_signal(signal.SIGKILL)
    child.wait()
    first_run = collections.Counter(server.counts)
    finished = {(r["id"], r["model"]) for r in map(json.loads, scores.read_text().splitlines())}
    server.hang_after = None
    server.release.set()
    vlm_judge.main(argv[3:] + ["--timeout=5"])
    return first_run, finished, collections.Counter(server.counts) - first_run


def test_killed_run_resumes_without_asking_twice(tmp_path):
    manifest, lines = t2i_manifest(tmp_path, per_category=3)
    out = tmp_path / "out"
    with FakeJudgeServer() as server:
        first_run, finished, second_run = kill_and_resume(server, manifest, out, "judge-one", hang_after=7)
    assert len(finished) == 7 and sum(first_run.values()) == 9  # 7 replies, 2 requests hanging when killed
    for line in lines:
        asked_again = second_run.get(key_of(tmp_path, line, "judge-one"), 0)
        assert asked_again == (0 if (line["id"], line["model"]) in finished else 1), line
    records = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["model"]) for r in records) == sorted((x["id"], x["model"]) for x in lines)
    assert all(r["score"] == 3.0 for r in records)


def test_rerun_after_a_cut_line_and_with_another_judge_model(tmp_path, capsys):
    manifest, lines = t2i_manifest(tmp_path, models=("A",), per_category=1)
    out = tmp_path / "out"
    with FakeJudgeServer() as server:
        judge = server.judge("j", "judge-one")
        vlm_judge.judge_manifest(manifest, "t2i", [judge], out, log=lambda *_: None, **FAST)
        kept = (out / "scores.jsonl").read_text().splitlines()
        (out / "scores.jsonl").write_text("\n".join(kept[:2]) + "\n" + kept[2][:40])  # a line cut by a kill
        before = collections.Counter(server.counts)
        table = vlm_judge.judge_manifest(manifest, "t2i", [judge], out, log=lambda *_: None, **FAST)
        asked = collections.Counter(server.counts) - before
        cut = json.loads(kept[2])
        assert list(asked) == [key_of(tmp_path, next(x for x in lines if x["id"] == cut["id"]), "judge-one")]
        assert table["rows"][0]["average"] == 3.0
        assert len((out / "scores.jsonl").read_text().splitlines()) == 4  # two kept, the cut one, its new line
        other = f"--judge=j=judge-two@{server.url},key_env=FAKE_JUDGE_KEY"
        with pytest.raises(SystemExit) as exit_info:
            vlm_judge.main(["--bench=t2i", f"--manifest={manifest}", other, f"--out={out}"])
    assert exit_info.value.code == 2 and "holds judge 'j' as model 'judge-one'" in capsys.readouterr().err


def _bad_input(tmp_path, capsys, lines=None, judge=None, bench="t2i"):
    manifest = tmp_path / "bad.jsonl"
    if lines is not None:
        manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    judge = judge or "j=m@http://127.0.0.1:9/v1,key_env=FAKE_JUDGE_KEY"
    with pytest.raises(SystemExit) as exit_info:
        vlm_judge.main([f"--bench={bench}", f"--manifest={manifest}", f"--judge={judge}", f"--out={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "scores.jsonl").exists()
    return err


def test_bad_input_prints_one_line_and_exits_2(tmp_path, capsys):
    image = _png(tmp_path / "ok.png", (1, 2, 3))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    good = {"id": 1, "model": "M", "category": "text", "prompt": "p", "image": image}
    assert "missing field prompt" in _bad_input(tmp_path, capsys, [good, {**good, "id": 2, "prompt": None}])
    assert "bad.jsonl:1: unreadable image" in _bad_input(tmp_path, capsys, [{**good, "image": "junk.png"}])
    assert "unreadable image" in _bad_input(tmp_path, capsys, [{**good, "image": "absent.png"}])
    assert "unknown category 'scene'" in _bad_input(tmp_path, capsys, [{**good, "category": "scene"}])
    edit = {"id": 1, "model": "M", "category": "style", "instruction": "i", "image": image}
    assert "missing field source" in _bad_input(tmp_path, capsys, [edit], bench="edit")
    assert "appears twice" in _bad_input(tmp_path, capsys, [good, good])
    assert "NAME=MODEL@BASE_URL" in _bad_input(tmp_path, capsys, [good], judge="gpt-4o@https://api.openai.com/v1")
    assert "NOT_SET_HERE is not set" in _bad_input(
        tmp_path, capsys, [good], judge="j=m@http://h/v1,key_env=NOT_SET_HERE"
    )


def test_wrong_key_stops_the_run(tmp_path, capsys, monkeypatch):
    manifest, _ = t2i_manifest(tmp_path, models=("A",), per_category=1)
    monkeypatch.setenv("FAKE_JUDGE_KEY", "wrong")
    with FakeJudgeServer() as server:
        with pytest.raises(SystemExit) as exit_info:
            vlm_judge.main(["--bench=t2i", f"--manifest={manifest}", f"--out={tmp_path / 'o'}",
                            f"--judge=j=m@{server.url},key_env=FAKE_JUDGE_KEY", "--concurrency=1"])  # fmt: skip
    assert exit_info.value.code == 2 and "HTTP 401" in capsys.readouterr().err
    assert (tmp_path / "o" / "scores.jsonl").read_text() == ""  # no failure recorded for a wrong key


def test_an_unreachable_judge_stops_the_run(tmp_path, capsys):
    manifest, _ = t2i_manifest(tmp_path, models=("A", "B"), per_category=2)  # 12 samples
    with FakeJudgeServer() as server:
        url = server.url
    args = [f"--manifest={manifest}", f"--out={tmp_path / 'o'}", "--concurrency=1", "--retries=1", "--backoff=0.01"]
    with pytest.raises(SystemExit) as exit_info:
        vlm_judge.main(["--bench=t2i", f"--judge=j=m@{url},key_env=FAKE_JUDGE_KEY", *args])  # nobody listens now
    assert exit_info.value.code == 1 and "no reply from" in capsys.readouterr().err
    records = [json.loads(x) for x in (tmp_path / "o" / "scores.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["failure"] == "request" and r["requests"] == 2 for r in records)


def test_recipe_on_the_example_set(tmp_path):
    class Flat:  # a contender that paints every image one grey
        def __init__(self, name, level):
            self.name, self.level = name, level

        def t2i(self, prompts):
            return np.full((len(prompts), 16, 16, 3), self.level, np.uint8)

        def edit(self, sources, instructions):
            return np.clip(sources.astype(int) + self.level, 0, 255).astype(np.uint8)

    with FakeJudgeServer() as server:
        tables = vlm_bench.run_recipe(
            tmp_path, [Flat("dark", 40), Flat("light", 200)], [server.judge("j", "m")], image_size=32,
            log=lambda *_: None, **FAST,
        )  # fmt: skip
    assert tables["t2i"]["categories"] == ["landscape", "portrait", "text"]
    assert len(tables["edit"]["categories"]) == 6
    manifest = [json.loads(x) for x in (tmp_path / "t2i" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 2 * 5 and {m["id"] for m in manifest} >= {"a2-hard-1", "a2-hard-2"}
    assert vlm_manifest.read_manifest(tmp_path / "edit" / "manifest.jsonl", "edit")[0].sources[0].endswith(".png")


# ---------------------------------------------------------------------------------- the documented example run
def _example(out: pathlib.Path) -> None:
    """The example set scored by two scripted judges, then a killed and resumed run's request counts."""

    class Shade:
        def __init__(self, name, level):
            self.name, self.level = name, level

        def _shade(self, text):  # one image per prompt and model: the server tells samples apart by their image
            return (self.level, zlib.crc32(text.encode()) % 256, 128)

        def t2i(self, prompts):
            return np.stack([np.full((32, 32, 3), self._shade(p), np.uint8) for p in prompts])

        def edit(self, sources, instructions):
            return np.stack(
                [(s // 2 + np.array(self._shade(i)) // 2).astype(np.uint8) for s, i in zip(sources, instructions)]
            )

    def script(key):  # scores 1.00-5.00 from the key; some samples need a re-ask or a retry; one in 7 never answers
        h = int(key, 16)
        score = round(1 + (h % 401) / 100, 2)
        if h % 7 == 0:
            return [("malformed",)]
        return [
            [("ok", score)],
            [("prose", score)],
            [("malformed",), ("ok", score)],
            [("status", 500), ("ok", score)],
            [("range", 6.0), ("ok", score)],
        ][h % 5]

    os.environ["FAKE_JUDGE_KEY"] = "secret"
    contenders = [Shade("student-4nfe", 60), Shade("teacher-40step", 170)]
    with FakeJudgeServer(default=script) as server:
        judges = [server.judge("judge-a", "vlm-a"), server.judge("judge-b", "vlm-b")]
        tables = vlm_bench.run_recipe(out, contenders, judges, image_size=64, **{**FAST, "timeout": 5.0})
        print(f"requests: {sum(server.counts.values())}")
        for bench, table in tables.items():
            failures = sum(row["failures"] for row in table["rows"])
            print(f"\n{bench} ({failures} failures):\n{vlm_table.markdown(table)}")
        before = collections.Counter(server.counts)
        server.counts.clear()
        first, finished, second = kill_and_resume(server, out / "t2i" / "manifest.jsonl", out / "resume", "vlm-c", 6)
        pairs = len(vlm_manifest.read_manifest(out / "t2i" / "manifest.jsonl", "t2i"))
        again = sum(n for key, n in second.items() if key in first and _pair(out, key) in finished)
        print(
            f"resume: {pairs} pairs; killed run: {sum(first.values())} requests, {len(finished)} pairs recorded; "
            f"rerun: {sum(second.values())} requests, {again} of them for a recorded pair"
        )
        server.counts.update(before)


def _pair(out: pathlib.Path, key: str) -> tuple[str, str]:
    manifest = out / "t2i" / "manifest.jsonl"
    for line in map(json.loads, manifest.read_text().splitlines()):
        if image_key("vlm-c", vlm_manifest.image_url(str(out / "t2i" / line["image"]))) == key:
            return line["id"], line["model"]
    raise KeyError(key)


if __name__ == "__main__":
    _example(pathlib.Path(sys.argv[1]))
