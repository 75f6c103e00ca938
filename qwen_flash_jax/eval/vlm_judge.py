"""Scores generated images with VLM judges, with the paper's rubrics, into the paper's tables.

    python -m qwen_flash_jax.eval.vlm_judge --bench=t2i|edit --manifest=FILE.jsonl \\
        --judge=NAME=MODEL@BASE_URL[,key_env=VAR] [--judge=...] --out=DIR \\
        [--concurrency=8] [--max_attempts=3] [--retries=5] [--backoff=1] [--timeout=120] [--retry_failed]

Manifest lines (what `generate` writes): `id`, `model`, `category`, `prompt` (T2I) or `instruction` (edits), `image`
and, for edits, `source` (a path or a list of paths); relative paths resolve against the manifest's folder; other
keys are ignored. Every line is checked before the first request.

Each (sample, judge) is one chat: the category's rubric (eval/vlm_rubrics.py) as the system message, the caption or
the source images and instruction, and the image, inline as base64 data URLs. A reply that is not the rubric's JSON,
or holds a score outside [1, 5], is asked again (the judge is told what was wrong) up to --max_attempts times; then
the sample is recorded as a failure with score null. No score is ever made up.

DIR/scores.jsonl gets one line per (id, model, judge) as each reply arrives (`failure`: null, "reply" when the judge
never replied validly, "request" when its server never replied). A rerun skips the pairs it holds, except request
failures (an outage says nothing about the image); --retry_failed also asks again the invalid-reply failures.
DIR/table.json and DIR/table.md are the tables (eval/vlm_table.py). Bad input (a manifest line, an image, a
--judge) ends with one `error:` line and status 2.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import threading

from qwen_flash_jax.errors import command_line_errors
from qwen_flash_jax.eval import vlm_client, vlm_table
from qwen_flash_jax.eval.vlm_manifest import Sample, messages, read_manifest
from qwen_flash_jax.eval.vlm_rubrics import BENCHES, SCORE_KEY, InvalidReply, parse_reply
from qwen_flash_jax.models.config import ConfigError


class JudgeUnreachable(RuntimeError):
    """A judge's server answered none of many samples in a row."""


def judge_sample(client: vlm_client.ChatClient, bench: str, sample: Sample, max_attempts: int) -> dict:
    """One scores.jsonl record: the judge's validated reply, or score None and the error."""
    chat = messages(bench, sample)
    record = {
        "id": sample.id,
        "model": sample.model,
        "judge": client.judge.name,
        "judge_model": client.judge.model,
        "bench": bench,
        "category": sample.category,
        "score": None,
        "sub_scores": None,
        "reasoning": None,
        "failure_modes": None,
        "error": None,
        "failure": None,  # "reply": never a valid reply; "request": the server never replied
        "attempts": 0,
        "requests": 0,
    }
    asked = chat
    for _ in range(max_attempts):
        record["attempts"] += 1
        try:
            text, sent = client.complete(asked)
        except vlm_client.RequestFailed as e:
            record["requests"] += e.requests
            record["error"], record["failure"] = f"request failed: {e}", "request"
            return record
        record["requests"] += sent
        try:
            return {**record, **parse_reply(bench, sample.category, text), "error": None, "failure": None}
        except InvalidReply as e:
            record["error"], record["failure"] = f"no valid reply after {record['attempts']} attempts: {e}", "reply"
            # Asked again at temperature 0 with the same chat, a judge tends to repeat itself: tell it what was wrong.
            asked = chat + [
                {"role": "assistant", "content": text},
                {
                    "role": "user",
                    "content": f"Your reply is not valid: {e}. Reply again with strict JSON only, with a "
                    f"{SCORE_KEY[bench]} from 1 to 5, in the schema the instructions give.",
                },
            ]
    return record


# --------------------------------------------------------------------------------------------------- the run
def load_scores(path, log=print) -> dict[tuple[str, str, str], dict]:
    """(id, model, judge) -> its last record in scores.jsonl; a line cut short by a killed run is skipped."""
    path = pathlib.Path(path)
    out, broken = {}, 0
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
            out[(r["id"], r["model"], r["judge"])] = r
        except (ValueError, KeyError, TypeError):
            broken += 1
    if broken:
        log(f"{path}: skipped {broken} unreadable line(s) (a run killed while writing); those pairs are asked again")
    return out


def judge_manifest(
    manifest,
    bench: str,
    judges: list[vlm_client.JudgeSpec],
    out_dir,
    *,
    concurrency: int = 8,
    max_attempts: int = 3,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 120.0,
    retry_failed: bool = False,
    log=print,
) -> dict:
    """Scores every manifest sample with every judge not yet in DIR/scores.jsonl, then writes the tables; returns
    the table. FatalJudgeError (wrong key, model or URL) or JudgeUnreachable stop the run after the tables are
    written."""
    if bench not in BENCHES:
        raise ConfigError(f"--bench must be one of {', '.join(BENCHES)}, got {bench!r}")
    samples = read_manifest(manifest, bench)
    clients = {
        j.name: vlm_client.ChatClient(j, timeout=timeout, retries=retries, backoff=backoff) for j in judges
    }  # reads the API keys: a missing one stops the run here
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores_path = out_dir / "scores.jsonl"
    done = load_scores(scores_path, log)
    for (_, _, judge), r in done.items():
        if judge in clients and r.get("judge_model") != clients[judge].judge.model:
            raise ConfigError(
                f"{scores_path} holds judge {judge!r} as model {r.get('judge_model')!r}, not "
                f"{clients[judge].judge.model!r}: use another --out or another judge name"
            )

    def wanted(key) -> bool:
        record = done.get(key)
        if record is None or record["score"] is not None:
            return record is None
        return retry_failed or record.get("failure") == "request"

    todo = [(s, j) for s in samples for j in judges if wanted((s.id, s.model, j.name))]
    total = len(samples) * len(judges)
    log(f"{len(samples)} samples x {len(judges)} judges: {len(todo)} to ask, {total - len(todo)} already done")
    stop, fatal = threading.Event(), []
    if scores_path.exists() and scores_path.stat().st_size:
        with open(scores_path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut_short = f.read(1) != b"\n"
    else:
        cut_short = False

    # A judge whose server answers none of this many samples in a row (each after its retries) is down or misnamed:
    # stop rather than spend the backoff on every remaining sample; a rerun asks its pairs again.
    give_up_after = concurrency + 3
    no_reply_streak = dict.fromkeys(clients, 0)
    streak_lock = threading.Lock()

    def ask(sample: Sample, judge: vlm_client.JudgeSpec):
        if stop.is_set():
            return None
        try:
            record = judge_sample(clients[judge.name], bench, sample, max_attempts)
        except vlm_client.FatalJudgeError as e:
            stop.set()
            fatal.append(e)
            return None
        with streak_lock:
            no_reply_streak[judge.name] = no_reply_streak[judge.name] + 1 if record["failure"] == "request" else 0
            if no_reply_streak[judge.name] >= give_up_after and not stop.is_set():
                stop.set()
                fatal.append(
                    JudgeUnreachable(
                        f"judge {judge.name!r}: no reply from {judge.endpoint} for {give_up_after} samples in a row "
                        f"({record['error']}); stopped, a rerun resumes"
                    )
                )
        return record

    every = max(1, len(todo) // 10)
    with open(scores_path, "a", encoding="utf-8") as scores_file:
        if cut_short:
            scores_file.write("\n")  # the partial line stays on its own (skipped when read)
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(ask, s, j) for s, j in todo]
            try:
                for finished, future in enumerate(concurrent.futures.as_completed(futures), 1):
                    record = future.result()
                    if record is None:
                        continue
                    scores_file.write(json.dumps(record) + "\n")
                    scores_file.flush()  # on disk as it arrives: a killed run keeps every reply it got
                    done[(record["id"], record["model"], record["judge"])] = record
                    if finished % every == 0 or finished == len(todo):
                        failed = sum(r["score"] is None for r in done.values())
                        log(f"judged {finished}/{len(todo)} ({failed} failures recorded in all)")
            except BaseException:  # Ctrl-C or a worker's error: drop the queue, let requests in flight end
                stop.set()
                for future in futures:
                    future.cancel()
                raise
    wanted = {(s.id, s.model) for s in samples}
    names = [j.name for j in judges]
    records = [r for (rid, model, judge), r in done.items() if (rid, model) in wanted and judge in names]
    models = list(dict.fromkeys(s.model for s in samples))
    table = vlm_table.build_table(bench, records, models, names)
    vlm_table.write_tables(out_dir, table)
    if fatal:
        raise fatal[0]
    return table


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error, instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m qwen_flash_jax.eval.vlm_judge", description=__doc__.split("\n")[0])
    p.add_argument("--bench", required=True, choices=BENCHES)
    p.add_argument("--manifest", required=True, help="the JSONL manifest `generate` wrote")
    p.add_argument(
        "--judge",
        action="append",
        required=True,
        help="NAME=MODEL@BASE_URL[,key_env=VAR]: an OpenAI-compatible server; the key is read from $VAR "
        "(default OPENAI_API_KEY; key_env=none: no key). Repeat for several judges.",
    )
    p.add_argument("--out", required=True, help="output directory: scores.jsonl, table.json, table.md")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once, all judges together")
    p.add_argument("--max_attempts", type=int, default=3, help="asks per sample for a valid reply before a failure")
    p.add_argument("--retries", type=int, default=5, help="retries of a timed-out, 429 or 5xx request")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds, doubled each retry")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply")
    p.add_argument("--retry_failed", action="store_true", help="also ask again the pairs the judge answered invalidly")
    return p


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: status 2 and one `error: ...` line on bad input, 1 on an I/O error, 130 if interrupted."""
    args = _parser().parse_args(argv)
    with command_line_errors(
        ConfigError,
        (OSError, JudgeUnreachable),
        interrupted=f"interrupted; the replies so far are in {args.out}/scores.jsonl and a rerun resumes",
    ):
        for name, low in (("concurrency", 1), ("max_attempts", 1), ("retries", 0)):
            if getattr(args, name) < low:
                raise ConfigError(f"--{name} must be at least {low}, got {getattr(args, name)}")
        if args.timeout <= 0 or args.backoff < 0:
            raise ConfigError("--timeout must be positive and --backoff not negative")
        judges = vlm_client.parse_judges(args.judge)
        judge_manifest(
            args.manifest,
            args.bench,
            judges,
            args.out,
            concurrency=args.concurrency,
            max_attempts=args.max_attempts,
            retries=args.retries,
            backoff=args.backoff,
            timeout=args.timeout,
            retry_failed=args.retry_failed,
        )
    print((pathlib.Path(args.out) / "table.md").read_text(), end="")


if __name__ == "__main__":
    main()
