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
``reset``       reset the connection (TCP RST) before any answer, as an overloaded load
                balancer or a restarting server does
``malformed``   200 with a body that is not JSON
``truncated``   200 whose body stops short of its Content-Length
``garbage``     200 with valid JSON that is not a completion (no ``choices``)
``undecodable`` 200 with a body that is not even UTF-8 (a proxy's Latin-1 page)
``kill_client`` SIGKILL the process on this machine that sent the request, as a prompt that
                crashes an engine kills the actor it runs in (a poison prompt)

``arrivals`` records ``(monotonic time, kind)`` of every chat request, for tests that
check pacing; ``last_headers`` holds the headers of the latest one (lower-case names).

The Batch API (``/v1/files``, ``/v1/batches``) is ``fake_batches.py``'s, on the same
server: ``server.batches``, with its own faults.

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
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from datagen.testing.fake_batches import FakeBatches
from datagen.testing.faults import Fault, take

FAULT_KINDS = ("latency", "400", "408", "409", "429", "500", "503", "hang", "reset", "malformed", "truncated",
               "garbage", "undecodable", "kill_client")
VOCAB = 49152
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 409: "Conflict",
            429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


def echo_answer(messages: list[dict[str, str]]) -> str:
    return "echo: " + messages[-1]["content"]


def _tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or [text]


def _tid(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "big") % VOCAB


class Exchange:
    """One request/response on a connection: what ``_serve`` writes to. Writing a
    response ends the exchange; the connection then reads its next request."""

    def __init__(self, conn: _Connection, headers: dict[str, str]):
        self.conn = conn
        self.headers = headers
        self.close_connection = False
        self.done = False
        self.counted = 0  # 1 while it counts towards the server's requests in flight

    def raw(self, status: int, data: bytes, *, length: int | None = None,
            headers: dict[str, str] | None = None) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(data) if length is None else length}\r\n"
                f"{extra}\r\n")
        self.conn.transport.write(head.encode("latin-1") + data)
        self.finish()

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.raw(status, _dumps(obj), headers=headers)

    def drop(self) -> None:
        """End the exchange by closing the socket, with no response."""
        self.close_connection = True
        self.finish()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.conn.finished(self)


class _Connection(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive with Content-Length bodies, one
    request at a time (a pipelined request waits in the buffer for the answer before
    it). A protocol, not asyncio streams with a task per connection: the server shares
    the benchmark's cores with the client it measures, and this costs half the CPU."""

    def __init__(self, server: FakeOpenAIServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.current: Exchange | None = None
        self.timer: asyncio.TimerHandle | None = None  # a delayed answer or a hang
        self.reading = False  # inside _next: an answer given at once lets its loop go on

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        self.reading = True
        try:
            self._read()
        finally:
            self.reading = False

    def _read(self) -> None:
        while self.current is None and not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                lines = self.buffer[:end].decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                headers = {}
                for line in lines[1:]:
                    k, sep, v = line.partition(":")
                    if sep:
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", 0))
            except ValueError:
                self.transport.close()
                return
            if len(self.buffer) < end + 4 + length:
                return
            data = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            self.current = Exchange(self, headers)
            self.server._dispatch(self.current, method, path, data)

    def finished(self, h: Exchange) -> None:
        self.current, self.timer = None, None
        self.server._concurrent -= h.counted
        if h.close_connection or h.headers.get("connection", "").lower() == "close":
            self.transport.close()
        elif not self.reading:  # (pipelined requests answered at once: no recursion)
            self._next()

    def later(self, seconds: float, then: Callable[[], None]) -> None:
        self.timer = asyncio.get_running_loop().call_later(seconds, then)

    def close(self) -> None:
        """Drop the connection and whatever it was answering (the client went away, or
        the server stops)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        h, self.current = self.current, None
        if h is not None and not h.done:
            h.done = True
            self.server._concurrent -= h.counted
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _kill_sender(peer: tuple[str, int]) -> bool:
    """SIGKILL the local process whose socket is ``peer`` (the other end of a connection);
    False if there is none."""
    import os
    import signal

    import psutil

    for c in psutil.net_connections(kind="tcp"):
        if c.pid and c.laddr and (c.laddr.ip, c.laddr.port) == tuple(peer[:2]) and c.pid != os.getpid():
            os.kill(c.pid, signal.SIGKILL)
            return True
    return False


def _json_encoder() -> Callable[[Any], bytes]:
    """msgspec when installed (vLLM brings it): a top-20 logprobs body costs a tenth of
    ``json.dumps``, and the server shares the machine with what it serves."""
    try:
        import msgspec

        return msgspec.json.Encoder().encode
    except ImportError:
        return lambda obj: json.dumps(obj).encode()


_dumps = _json_encoder()


def _json_decoder() -> Callable[[bytes], Any]:
    try:
        import msgspec

        return msgspec.json.Decoder().decode
    except ImportError:
        return json.loads


_loads = _json_decoder()


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
        self.last_headers: dict[str, str] = {}
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
        self._connections: set[_Connection] = set()
        self._positions: dict[tuple[str, int, bool], dict[str, Any]] = {}  # see _position
        self.batches = FakeBatches(self)

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
        return take(self._faults, lambda f: f.match is None or f.match in last)

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
            for conn in list(self._connections):  # hung requests, idle keep-alive connections
                conn.close()
            await asyncio.sleep(0)  # let the transports finish closing

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
            self._loop.create_server(lambda: _Connection(self), sock=self._sock, backlog=2048))

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- serving ---------------------------------------------------------------------
    def _dispatch(self, h: Exchange, method: str, path: str, data: bytes) -> None:
        path = path.split("?")[0].rstrip("/")
        if method == "GET" and path.endswith("/models"):
            h._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            return
        if "/files" in path or "/batches" in path:
            self.batches.handle(h, method, path, data)
            return
        if method != "POST" or not path.endswith("/chat/completions"):
            h._json(404, {"error": {"message": "not found"}})
            return
        try:
            body = _loads(data or b"{}")
        except Exception:  # noqa: BLE001 - json's ValueError or msgspec's DecodeError
            h.close_connection = True
            h._json(400, {"error": {"message": "request body is not JSON"}})
            return
        with self._lock:
            self.requests += 1
            self.last_headers = h.headers
            fault = self._take_fault(body.get("messages") or [])
        self.arrivals.append((time.monotonic(), fault.kind if fault else "ok"))
        self._concurrent += 1  # until the exchange finishes (Exchange.finish)
        h.counted = 1
        self.max_concurrent = max(self.max_concurrent, self._concurrent)
        self._serve(h, body, fault)

    def _serve(self, h: Exchange, body: dict[str, Any], fault: Fault | None) -> None:
        """Answer now, or schedule the answer (``latency``) or the drop (``hang``) on the
        connection's timer; either way ``h`` is finished exactly once."""
        kind = fault.kind if fault else "ok"
        self.served[kind] += 1
        if kind == "latency":
            h.conn.later(fault.seconds, lambda: h._json(200, self.completion(body)))
            return
        elif kind == "429":
            h._json(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                    {"retry-after": str(fault.retry_after)})
            return
        elif kind in ("400", "408", "409", "500", "503"):
            h._json(int(kind), {"error": {"message": f"injected {kind}", "type": "server_error"}})
            return
        elif kind == "hang":
            h.conn.later(fault.seconds or 30.0, h.drop)
            return
        elif kind == "reset":  # SO_LINGER 0: close() sends RST, not FIN
            sock = h.conn.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.drop()
            return
        elif kind == "malformed":
            h.raw(200, b"<html>502 Bad Gateway</html> {not json")
            return
        elif kind == "truncated":
            data = json.dumps(self.completion(body)).encode()
            h.close_connection = True
            h.raw(200, data[: len(data) // 3], length=len(data))
            return
        elif kind == "undecodable":  # a proxy's page in Latin-1: not even UTF-8
            h.raw(200, b"<html>\xa9 proxy error</html>")
            return
        elif kind == "kill_client":
            if not _kill_sender(h.conn.transport.get_extra_info("peername")):
                self.served["kill_client: no sender found"] += 1
            h.drop()
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
        prompt_tokens = sum(len(str(m.get("content", "")).split()) or 1 for m in messages)  # = len(_tokens(...))
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
