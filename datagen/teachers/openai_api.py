"""Any OpenAI-compatible chat endpoint, through the official ``openai`` async client.

Flow control is a ``Limiter`` per replica, holding its share of the teacher's budgets
(``ratelimit.py``, ``OpenAITeacher.for_replica``): adaptive concurrency,
``Retry-After`` pauses and request/token budgets, taken by every attempt. Every request
is retried by tenacity (bounded attempts, jittered exponential back-off, ``Retry-After``
honoured up to a cap), with the client's own retries switched off so there is exactly
one retry policy.

What is retried: 429, 5xx, time-outs (the client's, and a server's 408), dropped
connections, and bodies that are not the JSON the API promises (a proxy's HTML error
page, a body cut short). What is not: every other 4xx, 409 included (a bad request
stays bad; the issue's contract is 429/5xx/time-outs/resets only). A request that still fails becomes a row
in the ``failed`` stream with a reason such as ``teacher.http_500``; ``datagen resume``
tries it again.

Logprobs: asked for when ``sampling.logprobs`` is set. Stored only with token ids:
from a vLLM server's ``token_id:N`` names (``request_token_ids``) or, for servers that
give token strings, through the teacher's tokenizer (``tokenizer:``, ``tokenmap.py``).
A server that ignores the request, or tokens that cannot be mapped, leave the row's
logprob columns null: unavailable, never invented.

The API key is read from the environment variable the job file names, at actor start,
and lives only in the client object; it is never logged, stored or put in an error.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib
import itertools
import json
import math
import os
import random
import time
from datetime import datetime, timezone
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from datagen.errors import ConfigError
from datagen.teachers import eager
from datagen.teachers.base import Generation, collect_less
from datagen.teachers.ratelimit import Limiter
from datagen.teachers.spec import OpenAITeacher
from datagen.teachers.tokenmap import TokenMap

RETRY_AFTER_CAP_S = 60.0
ID_PREFIX = "token_id:"  # how a vLLM server names a token by id (return_tokens_as_token_ids)
_ID_CUT = len(ID_PREFIX)
# What a row's columns hold (records.SCHEMA: int32 ids and counts). A token id or a count
# beyond them is a server bug, not data: unavailable, like any other value we cannot use.
MAX_ID = MAX_COUNT = 2**31 - 1


class MalformedResponse(Exception):
    """The server answered 2xx with something that is not a usable completion."""


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, MalformedResponse)):
        return True
    if isinstance(exc, openai.APIResponseValidationError):
        return True
    status = _status(exc)
    return status is not None and (status in (408, 429) or status >= 500)


def _retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, else ``Retry-After`` as
    seconds or as an HTTP date. Capped. Nonsense (unparsable, NaN, negative) is ignored,
    header by header, and so is zero: "retry now" from every rejected request at once
    is what the jittered back-off is for (the openai client treats it the same way)."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    for name in ("retry-after-ms", "retry-after"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            value = value.strip()
            try:
                seconds = float(value) / (1000 if name == "retry-after-ms" else 1)
            except ValueError:
                if name == "retry-after-ms":
                    continue
                when = email.utils.parsedate_to_datetime(value)
                seconds = (when - datetime.now(timezone.utc)).total_seconds()
        except (ValueError, TypeError, OverflowError, AttributeError):
            continue
        if math.isfinite(seconds) and seconds > 0:
            return min(seconds, RETRY_AFTER_CAP_S)
    return None


class _Wait:
    """Retry-After when the server sends one, else full-jitter exponential back-off."""

    def __init__(self, base: float = 0.5, cap: float = 20.0):
        self.base, self.cap = base, cap

    def __call__(self, state: Any) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = _retry_after(exc) if exc is not None else None
        if hinted is not None:
            return hinted
        return random.uniform(0, min(self.cap, self.base * 2 ** (state.attempt_number - 1)))


def _timed_out(exc: BaseException) -> bool:
    """A real time-out. The client's aiohttp transport reports a connection reset (or
    refused) as a connect time-out; the OS error under it says what happened."""
    import openai

    if not isinstance(exc, openai.APITimeoutError):
        return False
    seen, cause = set(), exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConnectionError):
            return False
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return True


def _error_code(exc: BaseException) -> str:
    import openai

    if _timed_out(exc):
        return "teacher.timeout"
    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError's base: a reset under its name too
        return "teacher.connection"
    if isinstance(exc, (MalformedResponse, openai.APIResponseValidationError)):
        return "teacher.malformed_response"
    status = _status(exc)
    if status is not None:
        return f"teacher.http_{status}"
    return "teacher.error"


def _describe(exc: BaseException, secret: str | None) -> str:
    # The openai client's messages quote the server's body. A misbehaving proxy could
    # echo the key in it, so the key is scrubbed before the text goes into a row or a log.
    text = " ".join(str(exc).split())
    if secret:
        text = text.replace(secret, "***")
    return text[:200]


def api_key(cfg: OpenAITeacher) -> str | None:
    """The key from the environment variable the job names (None: the server needs none)."""
    if not cfg.api_key_env:
        return None
    # A key pasted or read from a secret file often ends in a newline, which no
    # HTTP header may hold: every request would fail as a "connection error".
    key = (os.environ.get(cfg.api_key_env) or "").strip()
    if not key:
        raise ConfigError(
            f"teacher {cfg.name!r}: environment variable {cfg.api_key_env} is not set "
            "(it should hold the API key)"
        )
    return key


def chat_body(cfg: OpenAITeacher, request: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body for one request: what an online call POSTs and what a
    batch input line carries (``datagen/batch/lines.py``)."""
    s = cfg.sampling
    body: dict[str, Any] = {
        "model": cfg.model, "messages": request["messages"],
        "temperature": request.get("temperature", s.temperature), "top_p": s.top_p, "max_tokens": s.max_tokens,
        "seed": request["seed"],
    }
    if s.stop:
        body["stop"] = s.stop
    if s.logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = s.logprobs
        if cfg.request_token_ids:
            # vLLM servers can name tokens by id ("token_id:123"); OpenAI's API would
            # reject the unknown field, hence opt-in.
            body["return_tokens_as_token_ids"] = True
    return body


class OpenAICompatibleTeacher:
    def __init__(self, cfg: OpenAITeacher):
        self.cfg = cfg
        self._key = api_key(cfg)  # only ever handed to the client; never logged, stored or repr'd
        self._tokens = TokenMap.load(cfg.tokenizer, teacher=cfg.name) if cfg.tokenizer else None
        # The whole URL, as the client would join it: a relative one is parsed and joined
        # to base_url again on every request (~5% of the client's CPU per request).
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._options: dict[str, Any] = {}
        self._response_type: type | None = None  # the HTTP library's Response: see _call
        self._keys = itertools.count()
        self.limiter: Limiter | None = None

    def _bind(self) -> None:
        """The client and limiter belong to one event loop; make them for the current one."""
        import openai

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            eager.install(loop)  # Python 3.11: aiohttp's body writer starts at once (eager.py)
            client = openai.AsyncOpenAI(
                base_url=self.cfg.base_url, api_key=self._key or "not-needed", max_retries=0,
                timeout=self.cfg.timeout_s, http_client=self._http_client(),
            )
            # The SDK's telemetry headers (X-Stainless-*: OS, CPU architecture, Python and
            # SDK versions, retry count, read time-out) describe this machine, not the
            # request; no API reads them. Leaving them out is ~8% of the client's CPU per
            # request (benchmarks/bench_openai.py). The User-Agent stays.
            omit = {name: openai.Omit() for name in client.default_headers if name.lower().startswith("x-stainless")}
            self._client = client.copy(default_headers=omit)
            self._options = {"headers": {"x-stainless-retry-count": openai.Omit(),
                                         "x-stainless-read-timeout": openai.Omit()}}
            # httpx2's or httpx's, by openai version (the module of the client's own Limits)
            from openai._constants import DEFAULT_CONNECTION_LIMITS

            http = importlib.import_module(type(DEFAULT_CONNECTION_LIMITS).__module__.partition(".")[0])
            self._response_type = http.Response
            c = self.cfg
            self.limiter = Limiter(
                max_concurrency=c.max_concurrency, min_concurrency=c.min_concurrency,
                adaptive=c.adaptive_concurrency, latency_ratio=c.latency_backoff,
                requests_per_minute=c.requests_per_minute, tokens_per_minute=c.tokens_per_minute,
            )

    def _http_client(self) -> Any:
        import openai
        from openai._constants import DEFAULT_CONNECTION_LIMITS

        # Keep a connection alive per request in flight: the client's default keeps 100, so
        # at 256 in flight most requests would pay a new TCP connection. (The Limits class
        # is taken from the client's own default: it is httpx's or httpx2's, by version.)
        n = self.cfg.max_concurrency
        limits = type(DEFAULT_CONNECTION_LIMITS)(max_connections=n, max_keepalive_connections=n)
        aio = getattr(openai, "DefaultAioHttpClient", None)
        if aio is not None:
            try:
                # aiohttp's pool hands out a connection in O(1); httpx's scans every
                # connection per request, which dominated the CPU at 256 in flight.
                return aio(limits=limits, timeout=self.cfg.timeout_s)
            except RuntimeError:  # openai installed without its aiohttp extra
                pass
        return openai.DefaultAsyncHttpxClient(limits=limits, timeout=self.cfg.timeout_s)

    def __repr__(self) -> str:
        return f"OpenAICompatibleTeacher(name={self.cfg.name!r}, base_url={self.cfg.base_url!r})"

    def in_actor(self) -> None:
        """In its Ray actor: the garbage collector tuned for an HTTP client's process."""
        collect_less()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name, "backend": "openai", "model": self.cfg.model,
            "revision": self.cfg.revision, "license": self.cfg.license,
            "tokenizer_fingerprint": self._tokens.fingerprint if self._tokens else None,
        }

    async def aclose(self) -> None:
        """Close the HTTP pool (a Ray actor's goes with its process; tests and scripts
        that run several event loops call this before each one ends)."""
        if self._client is not None:
            await self._client.close()
        self._client, self._loop = None, None

    async def generate(self, requests: list[dict[str, Any]]) -> list[Generation]:
        self._bind()
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def _estimate_tokens(self, request: dict[str, Any]) -> int:
        """Before the server has said: ~4 characters a token, plus the whole answer budget."""
        chars = sum(len(str(m.get("content", ""))) for m in request["messages"])
        return chars // 4 + self.cfg.sampling.max_tokens

    async def _one(self, request: dict[str, Any]) -> Generation:
        start = time.perf_counter()
        attempts = 1
        estimate = self._estimate_tokens(request) if self.cfg.tokens_per_minute else 0
        try:
            try:
                gen = await self._attempt(request, estimate)
            except Exception as first:  # noqa: BLE001 - tenacity decides below
                # Most requests succeed at once, and tenacity's per-attempt machinery cost
                # ~7% of the client's CPU, so it starts at the first failure: it is handed
                # that failure as its attempt 1 and owns the whole policy from there (stop,
                # wait, Retry-After, what is retryable).
                replay: BaseException | None = first
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.cfg.max_attempts),
                    wait=_Wait(),
                    retry=retry_if_exception(_retryable),
                    reraise=True,
                ):
                    with attempt:
                        if replay is not None:
                            failed, replay = replay, None
                            raise failed
                        attempts += 1
                        gen = await self._attempt(request, estimate)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reasoned row
            return Generation(
                row_id=request["row_id"], attempts=attempts,
                latency_s=time.perf_counter() - start,
                error=f"{_error_code(exc)}: {_describe(exc, self._key)} (after {attempts} attempts)",
            )
        gen.attempts = attempts
        gen.latency_s = time.perf_counter() - start
        return gen

    async def _attempt(self, request: dict[str, Any], estimate: int) -> Generation:
        """One HTTP attempt under the limiter: a slot and budget before, the outcome after."""
        ticket = await self.limiter.acquire(tokens=estimate)
        try:
            gen = await self._call(request)
        except BaseException as exc:
            self.limiter.release(ticket, ok=False, congestion=_congestion(exc), retry_after=_retry_after(exc))
            raise
        used = (gen.prompt_tokens + gen.completion_tokens
                if gen.prompt_tokens is not None and gen.completion_tokens is not None else None)
        self.limiter.release(ticket, ok=True, used_tokens=used, generated=gen.completion_tokens)
        return gen

    async def _call(self, request: dict[str, Any]) -> Generation:
        body = chat_body(self.cfg, request)
        # The client's generic ``post``, not the typed ``chat.completions.create``: same
        # auth, time-outs and status -> exception mapping, but the typed path walks every
        # message through a TypedDict transform and builds pydantic models of the answer,
        # which was over half the CPU per request at hundreds of requests/s. The answer
        # comes back as the HTTP response and is parsed here (the client's response
        # wrapper was ~5%; the client still raises its exceptions on error statuses).
        # The idempotency key (unused by OpenAI's client, unique per attempt as the
        # client's own) is a counter rather than a uuid4.
        eager.eager_tasks()
        response = await self._client.post(
            self._url, body=body, cast_to=self._response_type,
            options={**self._options, "idempotency_key": f"datagen-{next(self._keys)}"},
        )
        try:
            data = json.loads(response.content)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the parser
            raise MalformedResponse(f"body is not JSON ({type(exc).__name__}: {exc})"[:200]) from None
        return self._parse(request["row_id"], data)

    def answer(self, row_id: str, data: Any) -> Generation:
        """A chat-completion body that arrived another way (a batch output line) as a
        generation: the same parsing as an online answer; one that is not a usable
        completion is a generation with its error."""
        try:
            return self._parse(row_id, data)
        except MalformedResponse as exc:
            return Generation(row_id=row_id, error=f"teacher.malformed_response: {exc}")

    def _parse(self, row_id: str, data: Any) -> Generation:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise MalformedResponse("response has no choices")
        choice = choices[0]
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise MalformedResponse("response has no message content")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON may escape a lone surrogate; Parquet text is UTF-8
            raise MalformedResponse("message content is not valid Unicode") from None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        reason = choice.get("finish_reason")
        g = Generation(
            row_id=row_id, text=text, finish_reason=reason if isinstance(reason, str) else None,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
        )
        if self.cfg.sampling.logprobs is not None:
            self._logprobs(g, choice.get("logprobs"))
        return g

    def _logprobs(self, g: Generation, logprobs: Any) -> None:
        """Fill the KD columns, all or nothing: a server that ignored the request, an
        entry without a usable id, or a shape we do not know leaves them null."""
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if not content or not isinstance(content, list):
            return
        try:
            ids = self._ids(content)
            tops = [self._ids(c["top_logprobs"]) for c in content]
            lps = [float(c["logprob"]) for c in content]
            top_lps = [[float(t["logprob"]) for t in c["top_logprobs"]] for c in content]
        except (KeyError, TypeError, ValueError, OverflowError):
            return
        if ids is None or any(t is None for t in tops):
            return
        g.token_ids, g.token_logprobs, g.top_ids, g.top_logprobs = ids, lps, tops, top_lps

    def _ids(self, entries: list[dict[str, Any]]) -> list[int] | None:
        """The token ids of one position's entries, or None if any has none. With k = 20
        that is 21 entries per generated token, so vLLM's ``token_id:N`` names, the
        common case, are read in one sweep; anything else goes entry by entry."""
        names = [e["token"] for e in entries]
        try:
            ids = [int(n[_ID_CUT:]) for n in names if n[:_ID_CUT] == ID_PREFIX]
            if len(ids) == len(names):
                return ids if min(ids) >= 0 and max(ids) <= MAX_ID else None
        except (TypeError, ValueError):
            pass
        ids = [self._id(e) for e in entries]
        return None if None in ids else ids

    def _id(self, entry: dict[str, Any]) -> int | None:
        token = entry["token"]
        if not isinstance(token, str):
            return None
        if token.startswith(ID_PREFIX):
            try:
                i = int(token[_ID_CUT:])
            except ValueError:
                return None
            return i if 0 <= i <= MAX_ID else None
        return self._tokens.id(token, entry.get("bytes")) if self._tokens else None


def _count(v: Any) -> int | None:
    """A token count the server reported, or None when it is not a plausible one."""
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT else None


def _congestion(exc: BaseException) -> str | None:
    """The server pushing back (as opposed to a bug or a bad request)."""
    if _timed_out(exc):
        return "timeout"
    status = _status(exc)
    return str(status) if status in (429, 503) else None
