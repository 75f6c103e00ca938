"""The full-scale job's evaluation end to end on the tiny random pipeline (tests/test_full_scale_job.py's
checkpoints): the main job with `eval.judge='vlm'` against a scripted chat-completions server on 127.0.0.1
(tests/vlm_server.py), the config check of bench prompts against the job's prompt length, and a full-scale sweep.

Every job here is the same T2I-only config (configs/t2i_only.py:full, shrunk by `--set` overrides), so their programs
are compiled once per test session (the persistent compilation cache, tests/conftest.py)."""

import json
import zlib

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from qwen_flash_jax import config_lib, sweep  # noqa: E402
from qwen_flash_jax.eval import vlm_manifest, vlm_rubrics  # noqa: E402
from qwen_flash_jax.models.config import ConfigError  # noqa: E402
from qwen_flash_jax.train import jobs  # noqa: E402
from tests import test_full_scale_job  # noqa: E402
from tests.test_full_scale_job import CAPTIONS, IMAGE_SIZE, INSTRUCTIONS, LATENT_CHANNELS, TEXT_WIDTH  # noqa: E402
from tests.vlm_server import FakeJudgeServer, image_key  # noqa: E402

pytestmark = pytest.mark.job
tiny_checkpoints = test_full_scale_job.checkpoints  # its fixture: the tiny random pipeline, built once here

MODELS = ["teacher base (3 steps)", "teacher base (4 steps)", "student (4 steps)"]
T2I_BENCH = [("landscape", CAPTIONS[0]), ("portrait", CAPTIONS[1]), ("text", CAPTIONS[2]), ("landscape", CAPTIONS[3])]
EDIT_BENCH = [("scene", INSTRUCTIONS[0]), ("style", INSTRUCTIONS[3])]


def overrides(checkpoints, cache_dir) -> list[str]:
    """The `--set` overrides that shrink a full-scale config to the tiny checkpoints (as test_full_scale_job's
    full_config does), two student updates."""
    t2i, edit = checkpoints["data"]
    model = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, in_channels=LATENT_CHANNELS)
    model.update(out_channels=LATENT_CHANNELS, context_in_dim=TEXT_WIDTH, axes_dims_rope="(4, 6, 6)")
    model.update(dtype="float32", remat_policy="none")
    data = dict(image_size=IMAGE_SIZE, t2i_jsonl=t2i, edit_jsonl=edit, batch_size=8)
    data.update(max_prompt_tokens=64, edit_prompt_tokens=80)
    return [
        f"cache_dir={cache_dir}",
        *(f"model.{k}={v}" for k, v in model.items()),
        f"text_encoder.path={checkpoints['text_encoder']}",
        f"codec.path={checkpoints['vae']}",
        f"teachers.base.path={checkpoints['teacher']}",
        f"teachers.text.path={checkpoints['teacher']}",
        *(f"data.{k}={v}" for k, v in data.items()),
        "train.steps=2",
        "train.log_every=1",
        "train.checkpoint_every=100",
        "fake_score.updates_per_student=1",
        "sampling.teacher_steps=3",
        "eval.unjudged_samples=2",
        "mesh.axes=(('data', -1), ('fsdp', 1), ('tensor', 1))",
    ]


def vlm_overrides(server, bench_dir) -> list[str]:
    """Two judges on the scripted server, and bench files of the tiny tokenizer's words (the example set's A.2
    prompts are longer than the tiny config's 64 prompt tokens)."""
    (bench_dir / "sources").mkdir(parents=True)
    rng = np.random.default_rng(1)
    edits = []
    for i, (category, instruction) in enumerate(EDIT_BENCH):
        source = f"sources/{i}.png"
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)).save(bench_dir / source)
        edits.append({"id": f"e{i}", "category": category, "instruction": instruction, "source": source})
    t2i = [{"id": f"t{i}", "category": c, "prompt": p} for i, (c, p) in enumerate(T2I_BENCH)]
    for bench, lines in (("t2i", t2i), ("edit", edits)):
        (bench_dir / f"{bench}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    judges = ", ".join(f"'{n}=judge-{n}@{server.url},key_env=FAKE_JUDGE_KEY'" for n in ("one", "two"))
    return [
        "eval.judge=vlm",
        f"eval.vlm_judges=({judges},)",
        f"eval.vlm_t2i_bench={bench_dir / 't2i.jsonl'}",
        f"eval.vlm_edit_bench={bench_dir / 'edit.jsonl'}",
        "eval.vlm_timeout=10",
        "eval.vlm_concurrency=4",
    ]


def scripted_score(key: str) -> float | None:
    """The server's reply for a sample: a score from its key, or (one sample in five) never a valid reply."""
    h = zlib.crc32(key.encode())
    return None if h % 5 == 0 else 1.0 + h % 9 / 2


def script(key: str) -> list[tuple]:
    score = scripted_score(key)
    return [("malformed",)] if score is None else [("prose", score)]


def config_with(*sets) -> config_lib.ml_collections.ConfigDict:
    config = config_lib.load_config("configs/t2i_only.py:full")
    for override in sets:
        sweep.apply_override(config, override)
    return config


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "secret")


def _check_vlm_table(run_dir, entry, bench, models):
    """A bench's table (table.json, table.md) against the scores on file and the server's script."""
    table = json.loads((run_dir / entry["table_json"]).read_text())
    assert table == entry["table"] and (run_dir / entry["table_md"]).read_text().startswith("| Model | Judge |")
    assert table["models"] == models and table["judges"] == ["one", "two"]
    records = [json.loads(line) for line in (run_dir / entry["scores_jsonl"]).read_text().splitlines()]
    assert len(records) == len(models) * 2 * len(T2I_BENCH if bench == "t2i" else EDIT_BENCH)
    manifest = vlm_manifest.read_manifest(run_dir / "vlm_eval" / bench / "manifest.jsonl", bench)
    images = {(s.id, s.model): s.image for s in manifest}
    for r in records:  # each score is the scripted one for its image: no score lost, none invented
        key = image_key(f"judge-{r['judge']}", vlm_manifest.image_url(images[(r["id"], r["model"])]))
        assert r["score"] == scripted_score(key), r
    bench_lines = T2I_BENCH if bench == "t2i" else EDIT_BENCH
    for row in table["rows"]:
        for category, cell in row["categories"].items():
            mine = [
                r for r in records if (r["model"], r["judge"], r["category"]) == (row["model"], row["judge"], category)
            ]
            valid = [r["score"] for r in mine if r["score"] is not None]
            assert cell["n"] + cell["failures"] == sum(c == category for c, _ in bench_lines) == len(mine)
            assert cell["failures"] == len(mine) - len(valid)
            assert cell["mean"] == (pytest.approx(np.mean(valid)) if valid else None)
    assert sum(r["score"] is None for r in records) == sum(row["failures"] for row in table["rows"])
    return table, records


def test_bench_prompts_longer_than_the_jobs_prompts_are_one_line_before_any_work(tiny_checkpoints, tmp_path):
    """The example set's A.2 prompts (2,235 and 2,818 characters) do not fit the tiny config's 64 prompt tokens."""
    judge = "eval.vlm_judges=('j=m@http://127.0.0.1:9/v1,key_env=FAKE_JUDGE_KEY',)"
    config = config_with(*overrides(tiny_checkpoints, tmp_path / "cache"), "eval.judge=vlm", judge)
    with pytest.raises(ConfigError, match=r"the example t2i bench .* line 'a2-hard-1' does not fit") as error:
        jobs.run(config, tmp_path / "run")
    assert "\n" not in str(error.value) and "data.max_prompt_tokens is 64" in str(error.value)
    assert not (tmp_path / "run").exists()
    long_edit = tmp_path / "edit.jsonl"
    long_edit.write_text(json.dumps({"category": "style", "instruction": "a dark forest " * 40, "source": "x.png"}))
    config.eval.vlm_edit_bench = str(long_edit)
    config.data.max_prompt_tokens = 100_000  # the A.2 prompts fit; the edit bench's line does not
    with pytest.raises(ConfigError, match=r"eval.vlm_edit_bench=.* line 'edit.jsonl:1' .* data.edit_prompt_tokens"):
        jobs.validate(config)


def test_a_full_scale_sweep_and_its_jobs_score_their_models_with_the_vlm_judges(
    tiny_checkpoints, tmp_path, monkeypatch
):
    """Two rows, each the full-scale main job scored by the VLM judges, and the sweep's table of them (the table that
    `--variant=full` once crashed building, after every row had trained; unscored rows: tests/test_sweep.py). A row
    is checked as the job's own result; rerunning the finished sweep, or the job on a finished row's workdir,
    evaluates again from the kept images and scores without asking the judges again."""
    monkeypatch.setitem(
        sweep.SUITES,
        "pair",
        (("first", "configs/t2i_only.py:{variant}", ()), ("second", "configs/t2i_only.py:{variant}", ())),
    )
    workdir = tmp_path / "sweep"
    with FakeJudgeServer(default=script) as server:
        sets = overrides(tiny_checkpoints, tmp_path / "cache") + vlm_overrides(server, tmp_path / "bench")
        table = sweep.run_suite("pair", workdir, "full", sets, log=lambda *_: None)
        asked = sum(server.counts.values())
        assert sweep.run_suite("pair", workdir, "full", sets, log=lambda *_: None) == table  # finished rows
        jobs.run(config_with(*sets), workdir / "first")  # the row's own job, finished: it evaluates again
        assert sum(server.counts.values()) == asked

    run_dir = workdir / "first"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["scored"] is True and [m["name"] for m in results["models"]] == MODELS
    assert set(results["vlm"]) == {"t2i", "edit"}
    t2i, records = _check_vlm_table(run_dir, results["vlm"]["t2i"], "t2i", MODELS)
    edit, _ = _check_vlm_table(run_dir, results["vlm"]["edit"], "edit", MODELS)
    assert t2i["categories"] == ["landscape", "portrait", "text"] and edit["categories"] == ["scene", "style"]
    assert {r["category"] for r in records} == set(vlm_rubrics.CATEGORIES["t2i"])
    assert any(r["score"] is None for r in records)  # the script's failures are counted, not scored
    md = (run_dir / "results.md").read_text()
    assert "## T2I-Bench (vlm_eval/t2i/table.md)" in md and "## Editing-Bench (vlm_eval/edit/table.md)" in md
    assert (run_dir / "vlm_eval" / "t2i" / "table.md").read_text() in md
    assert np.asarray(Image.open(run_dir / "grid_t2i.png")).std() > 0

    assert [row["label"] for row in table["rows"]] == ["first", "second"]
    assert [m["name"] for m in table["rows"][1]["models"]] == MODELS and table["rows"][1]["grids"] == [
        "second/grid_t2i.png"
    ]
    for bench in ("t2i", "edit"):
        vlm = table["vlm"][bench]
        assert vlm["models"] == [*MODELS[:2], "student, first", "student, second"] and vlm["judges"] == ["one", "two"]
        rows = {(r["model"], r["judge"]): r for r in vlm["rows"]}
        for label in ("first", "second"):  # each row's models, under their sweep names, as its own table has them
            own = json.loads((workdir / label / "vlm_eval" / bench / "table.json").read_text())
            for row in own["rows"]:
                if row["model"].startswith("student"):
                    assert rows[(f"student, {label}", row["judge"])]["categories"] == row["categories"]
                elif label == "first":
                    assert rows[(row["model"], row["judge"])]["categories"] == row["categories"]
    assert json.loads((workdir / "table.json").read_text()) == table
    md = (workdir / "table.md").read_text()
    assert "## T2I-Bench" in md and "## Editing-Bench" in md and "| student, second | one |" in md
    assert "| second | second | teacher base (3 steps) (3); teacher base (4 steps) (4); student (4 steps) (4) |" in md
