"""A real OpenAI-compatible HTTP server on 127.0.0.1 with deterministic answers and
switchable faults, for tests and benchmarks of everything above the teacher.

It speaks enough of ``POST /v1/chat/completions`` (and ``GET /v1/models``) for the
official ``openai`` client: same request, same answer; token "ids" and top-k logprobs
when asked (names tokens as ``token_id:N`` when the request sets vLLM's
``return_tokens_as_token_ids``; ``logprobs=False`` makes a server that ignores the
request, as some providers do).

It is a small HTTP/1.1 server on asyncio (keep-alive, Content-Length bodies), on its
own event loop in a background thread, or standalone in its own process. Not
``http.server``: a thread per connection could not keep 256 slow requests in flight at
thousands of requests/s, and the benchmark must measure the client, not this server.

Faults are queued rules: ``server.inject("429", times=2, retry_after=0.2)`` makes the
next two matching requests fail that way; ``match="text"`` limits a rule to requests
whose last message contains ``text`` (deterministic whatever the concurrency);
``times=None`` keeps a rule forever. Kinds:

``latency``     answer normally after ``seconds``
``429``         429 with a ``Retry-After`` header
``400``/``408``/``409``/``500``/``503`` that error status with a JSON error body
``hang``        sleep ``seconds`` (longer than the client's time-out), then drop the socket
``malformed``   200 with a body that is not JSON
``truncated``   200 whose body stops short of its Content-Length
``garbage``     200 with valid JSON that is not a completion (no ``choices``)

``arrivals`` records ``(monotonic time, kind)`` of every chat request, for tests that
check pacing.

Run standalone: ``python -m datagen.testing.fake_openai --port 8001 --fault 500:3 --latency 0.1``
(``--answer package.module:function`` picks the answer function; default: echo).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FAULT_KINDS = ("latency", "400", "408", "409", "429", "500", "503", "hang", "malformed", "truncated", "garbage")
VOCAB = 49152
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 409: "Conflict",
            429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


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


class Exchange:
    """One request/response on a connection: what ``_serve`` writes to."""

    def __init__(self, writer: asyncio.StreamWriter, headers: dict[str, str]):
        self.writer = writer
        self.headers = headers
        self.close_connection = False

    def raw(self, status: int, data: bytes, *, length: int | None = None,
            headers: dict[str, str] | None = None) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(data) if length is None else length}\r\n"
                f"{extra}\r\n")
        self.writer.write(head.encode("latin-1") + data)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.raw(status, _dumps(obj), headers=headers)


def _json_encoder() -> Callable[[Any], bytes]:
    """msgspec when installed (vLLM brings it): a top-20 logprobs body costs a tenth of
    ``json.dumps``, and the server shares the machine with what it serves."""
    try:
        import msgspec

        return msgspec.json.Encoder().encode
    except ImportError:
        return lambda obj: json.dumps(obj).encode()


_dumps = _json_encoder()


class FakeOpenAIServer:
    def __init__(self, *, answer: Callable[[list[dict[str, str]]], str] = echo_answer,
                 host: str = "127.0.0.1", port: int = 0, logprobs: bool = True):
        self.answer = answer
        self.logprobs = logprobs
        self._faults: list[Fault] = []
        self._lock = threading.Lock()  # inject() is called from the test's thread
        self.requests = 0
        self.served = Counter()  # "ok" or fault kind -> count
        self.arrivals: list[tuple[float, str]] = []
        self.max_concurrent = 0
        self._concurrent = 0
        # Bound now, so base_url is known before start() and a busy port fails here.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(2048)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._positions: dict[tuple[str, int, bool], dict[str, Any]] = {}  # see _position

    # -- control ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._sock.getsockname()[:2]
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
        ready = threading.Event()

        def run() -> None:
            self._open()
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="fake-openai")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            self._sock.close()
            return

        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):  # hung requests, idle keep-alive connections
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def serve_forever(self) -> None:
        """Standalone: serve in this thread until interrupted."""
        self._open()
        self._loop.run_forever()

    def _open(self) -> None:
        self._loop = _new_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, sock=self._sock, backlog=2048))

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- serving ---------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, path = lines[0].split(" ")[:2]
                    headers = {}
                    for line in lines[1:]:
                        k, sep, v = line.partition(":")
                        if sep:
                            headers[k.strip().lower()] = v.strip()
                    data = await reader.readexactly(int(headers.get("content-length", 0)))
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
                    break
                h = Exchange(writer, headers)
                await self._dispatch(h, method, path, data)
                await writer.drain()
                if h.close_connection or headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _dispatch(self, h: Exchange, method: str, path: str, data: bytes) -> None:
        path = path.split("?")[0].rstrip("/")
        if method == "GET" and path.endswith("/models"):
            h._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            return
        if method != "POST" or not path.endswith("/chat/completions"):
            h._json(404, {"error": {"message": "not found"}})
            return
        body = json.loads(data or b"{}")
        with self._lock:
            self.requests += 1
            fault = self._take_fault(body.get("messages") or [])
        self.arrivals.append((time.monotonic(), fault.kind if fault else "ok"))
        self._concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self._concurrent)
        try:
            await self._serve(h, body, fault)
        finally:
            self._concurrent -= 1

    async def _serve(self, h: Exchange, body: dict[str, Any], fault: Fault | None) -> None:
        kind = fault.kind if fault else "ok"
        self.served[kind] += 1
        if kind == "latency":
            await asyncio.sleep(fault.seconds)
        elif kind == "429":
            h._json(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                    {"retry-after": str(fault.retry_after)})
            return
        elif kind in ("400", "408", "409", "500", "503"):
            h._json(int(kind), {"error": {"message": f"injected {kind}", "type": "server_error"}})
            return
        elif kind == "hang":
            await asyncio.sleep(fault.seconds or 30.0)
            h.close_connection = True
            return
        elif kind == "malformed":
            h.raw(200, b"<html>502 Bad Gateway</html> {not json")
            return
        elif kind == "truncated":
            data = json.dumps(self.completion(body)).encode()
            h.raw(200, data[: len(data) // 3], length=len(data))
            h.close_connection = True
            return
        elif kind == "garbage":
            h._json(200, {"id": "x", "object": "chat.completion", "choices": [], "created": 0, "model": "fake"})
            return
        h._json(200, self.completion(body))

    def _position(self, tok: str, k: int, as_ids: bool) -> dict[str, Any]:
        """One generated token's logprobs entry. It depends on the token alone, so it is
        built once and shared by every answer that has the token (serialised, never changed)."""
        entry = self._positions.get((tok, k, as_ids))
        if entry is not None:
            return entry

        def name(t: str, tid: int) -> str:
            return f"token_id:{tid}" if as_ids else t

        tid = _tid(tok)
        tops = [{"token": name(tok, tid), "logprob": -0.05, "bytes": list(tok.encode())}]
        tops += [{"token": name(f"alt{j}", (tid + j) % VOCAB), "logprob": -3.0 - j,
                  "bytes": list(f"alt{j}".encode())} for j in range(1, k)]
        entry = {"token": name(tok, tid), "logprob": -0.05, "bytes": list(tok.encode()), "top_logprobs": tops[:k]}
        if len(self._positions) >= 100_000:
            self._positions.clear()
        self._positions[(tok, k, as_ids)] = entry
        return entry

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
        if body.get("logprobs") and self.logprobs:
            k = int(body.get("top_logprobs") or 0)
            as_ids = bool(body.get("return_tokens_as_token_ids"))

            choice["logprobs"] = {"content": [self._position(tok, k, as_ids) for tok in tokens]}
        prompt_tokens = sum(len(_tokens(str(m.get("content", "")))) for m in messages)
        return {
            "id": "chatcmpl-" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest(),
            "object": "chat.completion", "created": 0, "model": body.get("model", "fake"),
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                      "total_tokens": prompt_tokens + len(tokens)},
        }


def _new_loop() -> asyncio.AbstractEventLoop:
    try:  # uvloop when present (it comes with Ray/vLLM): the server costs less CPU
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _import(target: str) -> Callable[[list[dict[str, str]]], str]:
    import importlib

    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SystemExit(f"--answer {target}: cannot import it ({exc})") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--fault", action="append", default=[], metavar="KIND[:TIMES]",
                   help="queue a fault (repeatable); TIMES omitted means forever")
    p.add_argument("--latency", type=float, default=0.0, help="answer every request after this many seconds")
    p.add_argument("--answer", metavar="MODULE:FUNCTION", help="messages -> answer text (default: echo)")
    args = p.parse_args(argv)
    server = FakeOpenAIServer(port=args.port, answer=_import(args.answer) if args.answer else echo_answer)
    for spec in args.fault:
        kind, _, times = spec.partition(":")
        server.inject(kind, times=int(times) if times else None)
    if args.latency:
        server.inject("latency", times=None, seconds=args.latency)
    print(f"fake OpenAI server on {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
