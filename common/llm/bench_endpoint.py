"""An OpenAI-compatible chat endpoint on 127.0.0.1 with a fixed latency, for measuring and testing clients.

It answers POST /v1/chat/completions after `latency` seconds with a text that depends on the request
alone (sha256 of the messages, and of the seed when temperature > 0), so two runs can be compared
answer by answer; it ignores `n` as llama.cpp's server does. It counts the requests it serves at once
(GET /stats: max_in_flight) and can misbehave on purpose:
- refuse_above=K: a request arriving while K are being served gets 429 with Retry-After (a provider's limit);
- malformed=p: a share p of the replies (every round(1/p)-th request, cycling through MALFORMED_KINDS)
  is a 200 that is no usable chat completion.

`python -m fedhydra.common.llm.bench_endpoint --latency 0.4` serves until interrupted and prints its URL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MALFORMED_KINDS = ("not-json", "no-choices", "wrong-types", "empty-content")
WORDS = re.compile(r"[A-Za-z']+")


def answer_for(body: dict) -> str:
    """The endpoint's answer to a request: words of its last message, picked by a hash of what decides it."""
    messages = body.get("messages") or []
    temperature = float(body.get("temperature") or 0.0)
    key = json.dumps([messages, body.get("max_tokens"), temperature,
                      body.get("seed") if temperature > 0 else None], sort_keys=True)
    rng = random.Random(hashlib.sha256(key.encode()).hexdigest())
    words = WORDS.findall(messages[-1].get("content", "") if messages else "") or ["nothing"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))


def malformed_body(kind: str, body: dict) -> tuple[bytes, str]:
    """(a 200's body, its content type) that is no usable chat completion, of the given kind."""
    if kind == "not-json":
        return b"<html><body>502 upstream hiccup</body></html>", "text/html"
    doc = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": body.get("model", "")}
    if kind == "no-choices":
        pass
    elif kind == "wrong-types":
        doc["choices"] = [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": 42}}]
    elif kind == "empty-content":
        doc["choices"] = [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": ""}}]
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; kinds: {', '.join(MALFORMED_KINDS)}")
    return json.dumps(doc).encode(), "application/json"


class BenchEndpoint:
    """The endpoint, served by a thread of this process (start()) until close()."""

    def __init__(self, latency: float = 0.4, refuse_above: int = 0, malformed: float = 0.0,
                 kinds: tuple[str, ...] = MALFORMED_KINDS, port: int = 0, retry_after: float = 0.2):
        if latency < 0 or refuse_above < 0 or not 0 <= malformed <= 1:
            raise ValueError(f"need latency >= 0, refuse_above >= 0, 0 <= malformed <= 1; "
                             f"got {latency}, {refuse_above}, {malformed}")
        self.latency, self.refuse_above, self.retry_after = latency, refuse_above, retry_after
        self.every = 0 if malformed == 0 else max(1, round(1 / malformed))
        self.kinds = tuple(kinds)
        self._lock = threading.Lock()
        self.reset()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.startswith("/stats"):
                    self._send(200, json.dumps(outer.stats(reset="reset" in self.path)).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                kind = outer._admit()
                if kind == "refused":
                    self._send(429, b'{"error": {"message": "rate limited: too many requests in flight"}}',
                               extra={"Retry-After": f"{outer.retry_after:g}"})
                    return
                try:
                    time.sleep(outer.latency)
                    if kind:
                        data, ctype = malformed_body(kind, body)
                        self._send(200, data, ctype)
                    else:
                        self._send(200, json.dumps(completion(body)).encode())
                finally:
                    with outer._lock:
                        outer.in_flight -= 1

            def _send(self, code: int, data: bytes, ctype: str = "application/json", extra: dict | None = None):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (extra or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this request

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # the default backlog (5) stalls a burst of new connections for 1 s

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread: threading.Thread | None = None

    def _admit(self) -> str | None:
        """'refused', a malformed kind, or None (a good reply) for the request arriving now."""
        with self._lock:
            self.requests += 1
            if self.refuse_above and self.in_flight >= self.refuse_above:
                self.refused += 1
                return "refused"
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.served += 1
            if self.every and self.served % self.every == 0:
                self.malformed += 1
                return self.kinds[(self.served // self.every - 1) % len(self.kinds)]
            return None

    def stats(self, reset: bool = False) -> dict:
        with self._lock:
            out = {"requests": self.requests, "served": self.served, "refused": self.refused,
                   "malformed": self.malformed, "max_in_flight": self.max_in_flight}
            if reset:
                self._zero()
            return out

    def reset(self) -> None:
        with self._lock:
            self._zero()

    def _zero(self) -> None:
        self.requests = self.served = self.refused = self.malformed = self.max_in_flight = self.in_flight = 0

    def start(self) -> "BenchEndpoint":
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "BenchEndpoint":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def completion(body: dict) -> dict:
    text = answer_for(body)
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
    return {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                      "total_tokens": prompt_tokens + len(text.split())}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.4, help="seconds before each answer")
    p.add_argument("--refuse-above", type=int, default=0, help="429 when this many are in flight (0: never)")
    p.add_argument("--malformed", type=float, default=0.0, help="share of malformed 200 replies")
    p.add_argument("--kinds", default=",".join(MALFORMED_KINDS), help="malformed kinds to cycle through")
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    for k in kinds:
        malformed_body(k, {})  # unknown kinds fail here, with the list
    endpoint = BenchEndpoint(args.latency, args.refuse_above, args.malformed, kinds, port=args.port)
    print(f"serving at {endpoint.url}", flush=True)
    try:
        endpoint.httpd.serve_forever(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.httpd.server_close()


if __name__ == "__main__":
    main()
