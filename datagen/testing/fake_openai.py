"""A real OpenAI-compatible HTTP server on 127.0.0.1 with deterministic answers and
switchable faults, for tests and benchmarks of everything above the teacher.

It speaks enough of ``POST /v1/chat/completions`` (and ``GET /v1/models``) for the
official ``openai`` client: same request, same answer; token "ids" and top-k logprobs
when asked (names tokens as ``token_id:N`` when the request sets vLLM's
``return_tokens_as_token_ids``).

Faults are queued rules: ``server.inject("429", times=2, retry_after=0.2)`` makes the
next two matching requests fail that way; ``match="text"`` limits a rule to requests
whose last message contains ``text`` (deterministic whatever the concurrency);
``times=None`` keeps a rule forever. Kinds:

``latency``     answer normally after ``seconds``
``429``         429 with a ``Retry-After`` header
``400``/``500``/``503`` that error status with a JSON error body
``hang``        sleep ``seconds`` (longer than the client's time-out), then drop the socket
``malformed``   200 with a body that is not JSON
``truncated``   200 whose body stops short of its Content-Length
``garbage``     200 with valid JSON that is not a completion (no ``choices``)

Run standalone: ``python -m datagen.testing.fake_openai --port 8001 --fault 500:3``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("latency", "400", "429", "500", "503", "hang", "malformed", "truncated", "garbage")
VOCAB = 49152


@dataclass
class Fault:
    kind: str
    times: int | None = 1
    match: str | None = None
    seconds: float = 0.0
    retry_after: float = 0.1


def echo_answer(messages: list[dict[str, str]]) -> str:
    return "echo: " + messages[-1]["content"]


def _tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or [text]


def _tid(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "big") % VOCAB


class FakeOpenAIServer:
    def __init__(self, *, answer: Callable[[list[dict[str, str]]], str] = echo_answer,
                 host: str = "127.0.0.1", port: int = 0):
        self.answer = answer
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.requests = 0
        self.served = Counter()  # "ok" or fault kind -> count
        self.max_concurrent = 0
        self._concurrent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._json(404, {"error": {"message": "not found"}})
                    return
                with server._lock:
                    server.requests += 1
                    server._concurrent += 1
                    server.max_concurrent = max(server.max_concurrent, server._concurrent)
                    fault = server._take_fault(body.get("messages") or [])
                try:
                    server._serve(self, body, fault)
                finally:
                    with server._lock:
                        server._concurrent -= 1

            def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def inject(self, kind: str, *, times: int | None = 1, match: str | None = None,
               seconds: float = 0.0, retry_after: float = 0.1) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._faults.append(Fault(kind, times, match, seconds, retry_after))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, messages: list[dict[str, Any]]) -> Fault | None:
        last = str(messages[-1].get("content", "")) if messages else ""
        for f in self._faults:
            if f.match is not None and f.match not in last:
                continue
            if f.times is not None:
                f.times -= 1
                if f.times <= 0:
                    self._faults.remove(f)
            return f
        return None

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- serving ---------------------------------------------------------------------
    def _serve(self, h: Any, body: dict[str, Any], fault: Fault | None) -> None:
        kind = fault.kind if fault else "ok"
        self.served[kind] += 1
        if kind == "latency":
            time.sleep(fault.seconds)
        elif kind == "429":
            h._json(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                    {"retry-after": str(fault.retry_after)})
            return
        elif kind in ("400", "500", "503"):
            h._json(int(kind), {"error": {"message": f"injected {kind}", "type": "server_error"}})
            return
        elif kind == "hang":
            time.sleep(fault.seconds or 30.0)
            h.close_connection = True
            return
        elif kind == "malformed":
            data = b"<html>502 Bad Gateway</html> {not json"
            h.send_response(200)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        elif kind == "truncated":
            data = json.dumps(self.completion(body)).encode()
            h.send_response(200)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 3])
            h.wfile.flush()
            h.close_connection = True
            return
        elif kind == "garbage":
            h._json(200, {"id": "x", "object": "chat.completion", "choices": [], "created": 0, "model": "fake"})
            return
        h._json(200, self.completion(body))

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        text = self.answer(messages)
        tokens = _tokens(text)
        max_tokens = body.get("max_tokens") or len(tokens)
        finish = "stop"
        if len(tokens) > max_tokens:
            tokens, finish = tokens[:max_tokens], "length"
        text = "".join(tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                                  "message": {"role": "assistant", "content": text}}
        if body.get("logprobs"):
            k = int(body.get("top_logprobs") or 0)
            as_ids = bool(body.get("return_tokens_as_token_ids"))

            def name(tok: str, tid: int) -> str:
                return f"token_id:{tid}" if as_ids else tok

            content = []
            for tok in tokens:
                tid = _tid(tok)
                tops = [{"token": name(tok, tid), "logprob": -0.05, "bytes": None}]
                tops += [{"token": name(f"alt{j}", (tid + j) % VOCAB), "logprob": -3.0 - j, "bytes": None}
                         for j in range(1, k)]
                content.append({"token": name(tok, tid), "logprob": -0.05, "bytes": None,
                                "top_logprobs": tops[:k]})
            choice["logprobs"] = {"content": content}
        prompt_tokens = sum(len(_tokens(str(m.get("content", "")))) for m in messages)
        return {
            "id": "chatcmpl-" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest(),
            "object": "chat.completion", "created": 0, "model": body.get("model", "fake"),
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                      "total_tokens": prompt_tokens + len(tokens)},
        }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--fault", action="append", default=[], metavar="KIND[:TIMES]",
                   help="queue a fault (repeatable); TIMES omitted means forever")
    args = p.parse_args(argv)
    server = FakeOpenAIServer(port=args.port)
    for spec in args.fault:
        kind, _, times = spec.partition(":")
        server.inject(kind, times=int(times) if times else None)
    print(f"fake OpenAI server on {server.base_url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
