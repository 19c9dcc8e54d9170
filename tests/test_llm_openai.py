"""The openai backend against the real `fedhydra llm serve` and a fault-injecting HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fedhydra.common.llm import LLMError, make_llm
from fedhydra.common.llm.embedded import EmbeddedLLM, embedded_unavailable_reason
from fedhydra.common.llm.openai_backend import OpenAIChat, retry_after_seconds
from fedhydra.common.llm.serve import serve

pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Invent a name for a new fantasy creature. Answer with the name only."}]
TINY = {"backoff": 0.001, "max_backoff": 0.01}  # retries in tests should not sleep


class FaultServer:
    """A ThreadingHTTPServer on 127.0.0.1 speaking just enough of POST /v1/chat/completions.

    `script` is consumed one entry per request, then `default` applies. Entries:
    ("ok",) a completion; ("status", code, headers) an error; ("sleep", seconds) a completion after a delay;
    ("raw", body_bytes) a 200 with that body.
    Answers name their seed and choice ("seed=7 choice=0"), so tests can see which request made them.
    honour_n=False imitates llama.cpp's server, which returns one choice whatever n is.
    """

    def __init__(self, script=(), default=("ok",), honour_n: bool = False):
        self.script = list(script)
        self.default = default
        self.honour_n = honour_n
        self.requests: list[dict] = []
        self.headers: list[dict] = []  # the headers tests look at, per request
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer._lock:
                    outer.requests.append(body)
                    outer.headers.append({"Authorization": self.headers.get("Authorization")})
                    action = outer.script.pop(0) if outer.script else outer.default
                try:
                    if action[0] == "status":
                        self._send(action[1], {"error": {"message": f"injected {action[1]}"}}, action[2])
                        return
                    if action[0] == "raw":
                        self._send_bytes(200, action[1], {})
                        return
                    if action[0] == "sleep":
                        time.sleep(action[1])
                    n = int(body.get("n") or 1) if outer.honour_n else 1
                    seed = body.get("seed")
                    self._send(200, {
                        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": i, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": f"seed={seed} choice={i}"}}
                                    for i in range(n)],
                        "usage": {"prompt_tokens": 7, "completion_tokens": 3 * n, "total_tokens": 7 + 3 * n},
                    }, {})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def _send(self, code, payload, headers):
                self._send_bytes(code, json.dumps(payload).encode(), headers)

            def _send_bytes(self, code, data, headers):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fault_server():
    made: list[FaultServer] = []

    def start(*args, **kwargs) -> FaultServer:
        made.append(FaultServer(*args, **kwargs))
        return made[-1]

    yield start
    for s in made:
        s.close()


# --- retries and failures ------------------------------------------------------------------

def test_retries_429_500_503_then_succeeds(fault_server):
    srv = fault_server([("status", 429, {}), ("status", 500, {}), ("status", 503, {})])
    llm = OpenAIChat(srv.url, "m", timeout=5, max_retries=5, **TINY)
    assert llm.complete(MESSAGES, n=1, temperature=1.0, seed=4) == ["seed=4 choice=0"]
    assert llm.stats.retries == 3
    assert llm.stats.calls == 1 and llm.stats.prompt_tokens == 7 and llm.stats.completion_tokens == 3
    assert len(srv.requests) == 4


def test_always_500_raises_llm_error_naming_endpoint_status_and_attempts(fault_server):
    srv = fault_server(default=("status", 500, {}))
    llm = OpenAIChat(srv.url, "my-model", timeout=5, max_retries=3, **TINY)
    with pytest.raises(LLMError) as info:
        llm.complete(MESSAGES, n=4, temperature=1.0)
    text = str(info.value)
    assert srv.url in text and "my-model" in text and "HTTP 500" in text and "4 attempt(s)" in text
    assert len(srv.requests) == 4 and llm.stats.retries == 3 and llm.stats.calls == 0


def test_timeout_is_retried_then_succeeds(fault_server):
    srv = fault_server([("sleep", 1.5)])
    llm = OpenAIChat(srv.url, "m", timeout=0.4, max_retries=2, **TINY)
    start = time.monotonic()
    assert llm.complete(MESSAGES, seed=1) == ["seed=1 choice=0"]
    assert 0.4 <= time.monotonic() - start < 1.4  # gave up on the slow reply instead of waiting it out
    assert llm.stats.retries == 1 and len(srv.requests) == 2


def test_timeout_every_time_is_an_llm_error(fault_server):
    srv = fault_server(default=("sleep", 1.0))
    llm = OpenAIChat(srv.url, "m", timeout=0.2, max_retries=1, **TINY)
    with pytest.raises(LLMError, match=r"2 attempt\(s\).*timed out after 0.2 s"):
        llm.complete(MESSAGES)


def test_400_fails_at_once_without_retry(fault_server):
    srv = fault_server(default=("status", 400, {}))
    llm = OpenAIChat(srv.url, "m", timeout=5, max_retries=5, **TINY)
    with pytest.raises(LLMError, match=r"HTTP 400.*not retried"):
        llm.complete(MESSAGES)
    assert len(srv.requests) == 1 and llm.stats.retries == 0


def test_connection_refused_is_retried_then_llm_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", timeout=2, max_retries=2, **TINY)
    with pytest.raises(LLMError, match=r"3 attempt\(s\).*connection error"):
        llm.complete(MESSAGES)
    assert llm.stats.retries == 2


def test_retry_after_is_honoured_and_capped(fault_server):
    srv = fault_server([("status", 429, {"Retry-After": "0.5"})])
    llm = OpenAIChat(srv.url, "m", timeout=5, **TINY)
    start = time.monotonic()
    llm.complete(MESSAGES)
    assert time.monotonic() - start >= 0.5
    srv = fault_server([("status", 503, {"Retry-After": "3600"})])
    llm = OpenAIChat(srv.url, "m", timeout=5, max_retry_after=0.2, **TINY)
    start = time.monotonic()
    llm.complete(MESSAGES)
    assert time.monotonic() - start < 3


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


@pytest.mark.parametrize("body, match", [
    (b"garbage{", "malformed reply.*(JSON|garbage)"),
    (b'{"choices": "x"}', "malformed reply.*choices is 'x', not a list"),
    (b"{}", "malformed reply.*no choices"),
    (b'{"choices": []}', "malformed reply.*no choices"),
    (b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": null}}]}', "content is NoneType"),
])
def test_malformed_200_is_retried_then_an_llm_error_naming_the_endpoint(fault_server, body, match):
    srv = fault_server(default=("raw", body))
    llm = OpenAIChat(srv.url, "m", timeout=5, max_retries=2, **TINY)
    with pytest.raises(LLMError, match=match) as info:
        llm.complete(MESSAGES, n=2)
    assert srv.url in str(info.value) and "3 attempt(s)" in str(info.value)
    assert llm.stats.retries == 2 and llm.stats.malformed == 3 and llm.stats.calls == 0 and len(srv.requests) == 3


def test_a_malformed_reply_then_a_good_one_succeeds(fault_server):
    srv = fault_server([("raw", b"garbage{"), ("raw", b"{}")])
    llm = OpenAIChat(srv.url, "m", timeout=5, **TINY)
    assert llm.complete(MESSAGES, seed=3) == ["seed=3 choice=0"]
    assert llm.stats.malformed == 2 and llm.stats.retries == 2 and llm.stats.calls == 1


def test_an_empty_answer_the_model_stopped_on_is_an_answer(fault_server):
    body = b'{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ""}}]}'
    srv = fault_server(default=("raw", body))
    llm = OpenAIChat(srv.url, "m", timeout=5, **TINY)
    assert llm.complete(MESSAGES) == [""] and llm.stats.malformed == 0 and len(srv.requests) == 1


# --- exactly n answers -----------------------------------------------------------------------

def test_server_ignoring_n_gets_seeded_fallback_requests(fault_server):
    srv = fault_server(honour_n=False)
    llm = OpenAIChat(srv.url, "m", timeout=5, **TINY)
    answers = llm.complete(MESSAGES, n=3, temperature=1.0, seed=10)
    assert answers == ["seed=10 choice=0", "seed=11 choice=0", "seed=12 choice=0"]
    # the first request, then the missing seeds together (through the request pool, in any order)
    assert (srv.requests[0]["n"], srv.requests[0]["seed"]) == (3, 10)
    assert sorted((r["n"], r["seed"]) for r in srv.requests[1:]) == [(1, 11), (1, 12)]
    assert llm.seeded_fallback_requests == 2 and llm.stats.calls == 3


def test_server_honouring_n_needs_one_request(fault_server):
    srv = fault_server(honour_n=True)
    llm = OpenAIChat(srv.url, "m", timeout=5, **TINY)
    assert llm.complete(MESSAGES, n=4, seed=2) == [f"seed=2 choice={i}" for i in range(4)]
    assert len(srv.requests) == 1 and llm.seeded_fallback_requests == 0


def test_failing_fallback_raises_instead_of_returning_fewer(fault_server):
    srv = fault_server([("ok",)], default=("status", 502, {}))
    llm = OpenAIChat(srv.url, "m", timeout=5, max_retries=1, **TINY)
    with pytest.raises(LLMError, match="HTTP 502"):
        llm.complete(MESSAGES, n=3)


# --- keys and construction -------------------------------------------------------------------

def test_api_key_from_env_is_sent_and_dummy_key_only_for_loopback(fault_server, monkeypatch):
    srv = fault_server()
    monkeypatch.setenv("FEDHYDRA_TEST_KEY", "sk-test-123")
    OpenAIChat(srv.url, "m", api_key_env="FEDHYDRA_TEST_KEY").complete(MESSAGES)
    monkeypatch.delenv("FEDHYDRA_TEST_KEY")
    OpenAIChat(srv.url, "m", api_key_env="FEDHYDRA_TEST_KEY").complete(MESSAGES)
    auth = [h.get("Authorization") for h in srv.headers]
    assert auth == ["Bearer sk-test-123", "Bearer sk-local"]
    with pytest.raises(ValueError, match="set the environment variable FEDHYDRA_TEST_KEY"):
        OpenAIChat("https://api.example.com/v1", "m", api_key_env="FEDHYDRA_TEST_KEY")


def test_name_and_make_llm_checks(tmp_path):
    llm = make_llm("openai", base_url="http://127.0.0.1:9/v1/", model="x", cache=False)
    assert isinstance(llm, OpenAIChat) and llm.name == "openai:http://127.0.0.1:9/v1:x"
    with pytest.raises(ValueError, match="needs --llm-base-url"):
        make_llm("openai", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="only used with --llm openai"):
        make_llm("embedded", base_url="http://127.0.0.1:9/v1", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown LLM backend"):
        make_llm("gpt", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="http"):
        OpenAIChat("127.0.0.1:8765", "m")


def test_serve_refuses_a_non_loopback_host():
    with pytest.raises(ValueError, match="not a loopback address.*--allow-remote"):
        serve(host="0.0.0.0", port=0)


# --- against the real server -----------------------------------------------------------------

_REASON = embedded_unavailable_reason()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`fedhydra llm serve` on a free loopback port; its /v1 URL. Terminated when the module ends."""
    if _REASON:
        pytest.skip(f"embedded LLM unavailable: {_REASON}")
    exe = Path(sys.executable).parent / "fedhydra"
    if not exe.exists():
        pytest.skip(f"the fedhydra console script is not installed next to {sys.executable}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # One thread: llama.cpp's spinning thread pool slows down badly when cores are oversubscribed.
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "llm", "serve", "--port", str(port), "--threads", "1"],
                                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fedhydra llm serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    models = json.load(r)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"fedhydra llm serve did not answer within 90 s: {log.read_text()[-2000:]}")
                time.sleep(0.3)
        assert [m["id"] for m in models["data"]] == ["smollm2-135m"]
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.llm
def test_served_model_gives_exactly_8_candidates_via_seeded_fallback(served):
    url, log = served
    assert f"at {url}" in log.read_text()  # the ready line
    llm = OpenAIChat(url, "smollm2-135m", timeout=60)
    answers = llm.complete(MESSAGES, n=8, temperature=1.0, max_tokens=16, seed=0)
    assert len(answers) == 8 and all(isinstance(a, str) and a.strip() for a in answers)
    assert len(set(answers)) >= 2  # sampled, not one answer copied
    assert llm.seeded_fallback_requests == 7 and llm.stats.calls == 8  # the server ignored n=8
    assert llm.stats.prompt_tokens > 8 * 10 and 8 <= llm.stats.completion_tokens <= 8 * 16
    assert llm.stats.retries == 0


@pytest.mark.llm
def test_served_model_is_the_embedded_model(served):
    url, _ = served
    question = [{"role": "user", "content": "What is the capital of France? Answer in English."}]
    remote = OpenAIChat(url, "smollm2-135m", timeout=60).complete(question, temperature=0.0, max_tokens=16)
    local = EmbeddedLLM(n_threads=1).complete(question, temperature=0.0, max_tokens=16)
    assert remote == local and "Paris" in remote[0]
