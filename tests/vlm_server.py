"""A chat-completions server on 127.0.0.1 that plays a VLM judge by script, for the VLM judge tests and the
full-scale job's VLM evaluation (tests/test_vlm_judge.py, tests/test_full_scale_eval.py).

`FakeJudgeServer` answers each sample by a script keyed by (judge model, the output image's data URL): valid replies,
replies wrapped in prose, malformed JSON, scores out of range, 500s, 429s with Retry-After, replies slower than the
client's timeout, or never a valid reply. It counts the requests per sample, so a resumed run can be shown to ask
nothing twice.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import re
import threading
import time

from qwen_flash_jax.eval import vlm_client


def image_key(judge_model: str, image_url: str) -> str:
    return hashlib.sha1(f"{judge_model}|{image_url}".encode()).hexdigest()[:12]


def _valid(system: str, score: float) -> dict:
    if '"overall_score"' not in system:
        return {"score": score, "reasoning": "Scripted."}
    keys = re.findall(r"^- ([a-z_]+): ", system, re.MULTILINE)
    return {
        "overall_score": score,
        "sub_scores": {k: score for k in keys},
        "reasoning": "Scripted.",
        "failure_modes": [],
    }


class FakeJudgeServer:
    """A chat-completions endpoint on 127.0.0.1. `scripts[key]` is the list of actions for the key's 1st, 2nd, ...
    request (the last one repeats); a key without a script gets `default(key)`. Actions:
      ("ok", s) a valid reply with score s       ("prose", s) the same inside prose and a code fence
      ("malformed",) broken JSON                 ("range", s) a valid shape with an out-of-range score
      ("status", code[, retry_after])            ("slow", seconds, s) a valid reply after a delay
      ("hang",) no reply until `release` is set
    """

    def __init__(self, default=None, api_key="secret"):
        self.scripts: dict[str, list[tuple]] = {}
        self.default = default or (lambda key: [("ok", 3.0)])
        self.api_key = api_key
        self.counts: collections.Counter = collections.Counter()
        self.requests: list[dict] = []  # (key, time, body) per request
        self.release = threading.Event()
        self.hang_after: int | None = None  # every request after this many hangs until `release`
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                try:
                    server._handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def judge(self, name: str, model: str, key_env: str = "FAKE_JUDGE_KEY") -> vlm_client.JudgeSpec:
        return vlm_client.JudgeSpec(name, model, self.url, key_env)

    def _reply(self, handler, status: int, payload: dict, headers=()):
        data = json.dumps(payload).encode()
        handler.send_response(status)
        for k, v in headers:
            handler.send_header(k, v)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _handle(self, handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        if handler.path != "/v1/chat/completions" or handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._reply(handler, 401, {"error": {"message": "bad key or path"}})
        system = body["messages"][0]["content"]
        url = [p["image_url"]["url"] for p in body["messages"][1]["content"] if p["type"] == "image_url"][-1]
        key = image_key(body["model"], url)
        with self._lock:
            self.counts[key] += 1
            n = self.counts[key]
            total = sum(self.counts.values())
            self.requests.append({"key": key, "time": time.monotonic(), "body": body})
        if self.hang_after is not None and total > self.hang_after:
            self.release.wait(60)
            return self._reply(handler, 503, {"error": {"message": "released"}})
        script = self.scripts.get(key) or self.default(key)
        action = script[min(n, len(script)) - 1]
        kind = action[0]
        if kind == "status":
            headers = [("Retry-After", str(action[2]))] if len(action) > 2 else []
            return self._reply(handler, action[1], {"error": {"message": f"scripted {action[1]}"}}, headers)
        if kind == "slow":
            time.sleep(action[1])
            kind, action = "ok", ("ok", action[2])
        if kind == "ok":
            text = json.dumps(_valid(system, action[1]))
        elif kind == "prose":
            text = f"Here is my evaluation.\n```json\n{json.dumps(_valid(system, action[1]))}\n```\nThanks."
        elif kind == "range":
            text = json.dumps(_valid(system, action[1]))
        else:  # malformed
            text = '{"score": 4.0, "reasoning": "cut short'
        self._reply(handler, 200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
