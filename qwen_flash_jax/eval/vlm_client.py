"""An OpenAI-compatible chat-completions client for the VLM judges, on the standard library only.

A judge is named on the command line as `NAME=MODEL@BASE_URL[,key_env=VAR]`:
    gpt=gpt-4o@https://api.openai.com/v1                                          key from $OPENAI_API_KEY
    gemini=gemini-2.5-pro@https://generativelanguage.googleapis.com/v1beta/openai,key_env=GEMINI_API_KEY
    qwen=Qwen/Qwen3-VL-8B-Instruct@http://127.0.0.1:8000/v1,key_env=none          a local vLLM server, no key
Requests go to BASE_URL/chat/completions with temperature 0. Timeouts, connection failures, 408/409/425/429 and
5xx are retried with exponential backoff (a 429's or 503's Retry-After is honoured); 401/403/404 mean a wrong key,
model or URL and stop the run (`FatalJudgeError`); any other 4xx fails the one request (`RequestFailed`).
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request

from qwen_flash_jax.models.config import ConfigError

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "none"
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
FATAL_STATUS = frozenset({401, 403, 404})
MAX_WAIT_S = 600.0  # the longest single backoff or Retry-After wait
_JUDGE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)=(?P<model>[^@,\s]+)@(?P<url>https?://[^,\s]+)(?P<options>(,[^,]*)*)$")


class RequestFailed(RuntimeError):
    """A request that did not get a reply: retries exhausted, or a non-retryable HTTP error."""

    def __init__(self, message: str, requests: int):
        super().__init__(message)
        self.requests = requests  # the HTTP requests sent for it


class FatalJudgeError(ConfigError):
    """The judge's server rejects every request (wrong key, model or URL): running on would only record failures."""


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    name: str  # the judge's row label in the tables and its key in scores.jsonl
    model: str
    base_url: str
    key_env: str  # the environment variable holding the API key, or "none"

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def api_key(self) -> str | None:
        if self.key_env == NO_KEY:
            return None
        key = os.environ.get(self.key_env)
        if not key:
            raise ConfigError(
                f"judge {self.name!r}: environment variable {self.key_env} is not set (name another with "
                f"`,key_env=VAR`, or `,key_env=none` for a server without a key)"
            )
        return key


def parse_judge(text: str) -> JudgeSpec:
    """A `--judge` value: NAME=MODEL@BASE_URL[,key_env=VAR]; ConfigError when malformed."""
    match = _JUDGE.match(text.strip())
    if not match:
        raise ConfigError(f"--judge={text!r} is not NAME=MODEL@BASE_URL[,key_env=VAR] (URL starting with http(s)://)")
    key_env = DEFAULT_KEY_ENV
    for option in filter(None, match["options"].split(",")):
        name, sep, value = option.partition("=")
        if name != "key_env" or not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ConfigError(f"--judge={text!r}: unknown option {option!r} (the only option is key_env=VAR)")
        key_env = value
    return JudgeSpec(match["name"], match["model"], match["url"], key_env)


def parse_judges(texts) -> list[JudgeSpec]:
    judges = [parse_judge(t) for t in texts]
    if not judges:
        raise ConfigError("no judge given: pass --judge=NAME=MODEL@BASE_URL at least once")
    names = [j.name for j in judges]
    if len(set(names)) != len(names):
        raise ConfigError(f"judge names must differ, got {', '.join(names)}")
    return judges


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header's wait: delta-seconds (fractions accepted) or an HTTP date; None if absent/unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclasses.dataclass
class ChatClient:
    """Posts chat completions for one judge. Thread-safe; `requests` counts the HTTP requests sent."""

    judge: JudgeSpec
    timeout: float = 120.0
    retries: int = 5  # extra requests after a retryable failure, per `complete` call
    backoff: float = 1.0  # first wait in seconds, doubled after each retry
    sleep: object = time.sleep

    def __post_init__(self):
        self._key = self.judge.api_key()
        self._lock = threading.Lock()
        self.requests = 0

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.judge.endpoint, data=body, headers=headers, method="POST")
        with self._lock:
            self.requests += 1
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def complete(self, messages: list[dict]) -> tuple[str, int]:
        """(the reply's text, requests sent) for a chat at temperature 0; RequestFailed or FatalJudgeError."""
        body = json.dumps({"model": self.judge.model, "messages": messages, "temperature": 0}).encode()
        sent = 0
        for attempt in range(self.retries + 1):
            wait = min(MAX_WAIT_S, self.backoff * 2**attempt)
            sent += 1
            try:
                return _reply_text(self._post(body)), sent
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code in FATAL_STATUS:
                    raise FatalJudgeError(
                        f"judge {self.judge.name!r}: HTTP {e.code} from {self.judge.endpoint}: {detail}"
                    ) from None
                if e.code not in RETRYABLE_STATUS and e.code < 500:
                    raise RequestFailed(f"HTTP {e.code}: {detail}", sent) from None
                failure = f"HTTP {e.code}: {detail}"
                told = retry_after_seconds(e.headers.get("Retry-After")) if e.headers else None
                if told is not None:
                    wait = min(MAX_WAIT_S, told)
            except (TimeoutError, socket.timeout):
                failure = f"no reply within {self.timeout:g} s"
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                timed_out = isinstance(reason, (TimeoutError, socket.timeout))
                failure = f"no reply within {self.timeout:g} s" if timed_out else f"connection failed: {reason}"
            except ValueError as e:  # a 200 whose body is not a chat completion
                raise RequestFailed(f"malformed chat-completions response: {e}", sent) from None
            if attempt < self.retries:
                self.sleep(wait)
        raise RequestFailed(f"{failure} (after {sent} requests)", sent)


def _reply_text(response: dict) -> str:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise ValueError("message content is not text")
    return content


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        text = error.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    try:
        text = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return " ".join(str(text or error.reason).split())[:200]
