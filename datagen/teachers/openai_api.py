"""Any OpenAI-compatible chat endpoint, through the official ``openai`` async client.

Concurrency is bounded by a semaphore per replica; every request is retried by tenacity
(bounded attempts, jittered exponential back-off, ``Retry-After`` honoured up to a cap),
with the client's own retries switched off so there is exactly one retry policy.

What is retried: 429, 408, 409, 5xx, time-outs, dropped connections and bodies that
are not the JSON the API promises (a proxy's HTML error page, a truncated body). What
is not: other 4xx (a bad request stays bad). A request that still fails becomes a row
in the ``failed`` stream with a reason such as ``teacher.http_500``; ``datagen resume``
tries it again.

The API key is read from the environment variable the job file names, at actor start,
and lives only in the client object; it is never logged, stored or put in an error.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import time
from datetime import datetime, timezone
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from datagen.config import OpenAITeacher
from datagen.errors import ConfigError
from datagen.teachers.base import Generation

RETRY_AFTER_CAP_S = 60.0


class MalformedResponse(Exception):
    """The server answered 2xx with something that is not a usable completion."""


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, MalformedResponse,
                        json.JSONDecodeError)):
        return True
    if isinstance(exc, openai.APIResponseValidationError):
        return True
    status = _status(exc)
    return status is not None and (status in (408, 409, 429) or status >= 500)


def _retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, or ``Retry-After`` as
    seconds or as an HTTP date. Capped; nonsense (negative, NaN, unparsable) is ignored."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    seconds: float | None = None
    try:
        if headers.get("retry-after-ms") is not None:
            seconds = float(headers["retry-after-ms"]) / 1000
        elif headers.get("retry-after") is not None:
            value = headers["retry-after"].strip()
            try:
                seconds = float(value)
            except ValueError:
                when = email.utils.parsedate_to_datetime(value)
                seconds = (when - datetime.now(timezone.utc)).total_seconds()
    except (ValueError, TypeError, OverflowError):
        return None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, RETRY_AFTER_CAP_S)


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


def _error_code(exc: BaseException) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "teacher.timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "teacher.connection"
    if isinstance(exc, (MalformedResponse, openai.APIResponseValidationError, json.JSONDecodeError)):
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


class OpenAICompatibleTeacher:
    def __init__(self, cfg: OpenAITeacher):
        self.cfg = cfg
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(
                    f"teacher {cfg.name!r}: environment variable {cfg.api_key_env} is not set "
                    "(it should hold the API key)"
                )
        self._key = key  # only ever handed to the client; never logged, stored or repr'd
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None

    def _bind(self) -> None:
        """The client and semaphore belong to one event loop; make them for the current one."""
        import openai

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._client = openai.AsyncOpenAI(
                base_url=self.cfg.base_url, api_key=self._key or "not-needed", max_retries=0,
                timeout=self.cfg.timeout_s,
            )
            self._sem = asyncio.Semaphore(self.cfg.max_concurrency)

    def __repr__(self) -> str:
        return f"OpenAICompatibleTeacher(name={self.cfg.name!r}, base_url={self.cfg.base_url!r})"

    def info(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name, "backend": "openai", "model": self.cfg.model,
            "revision": self.cfg.revision, "license": self.cfg.license,
            "tokenizer_fingerprint": None,
        }

    async def generate(self, requests: list[dict[str, Any]]) -> list[Generation]:
        self._bind()
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, request: dict[str, Any]) -> Generation:
        async with self._sem:
            start = time.perf_counter()
            attempts = 0
            try:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.cfg.max_attempts),
                    wait=_Wait(),
                    retry=retry_if_exception(_retryable),
                    reraise=True,
                ):
                    with attempt:
                        attempts += 1
                        gen = await self._call(request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a reasoned row
                return Generation(
                    row_id=request["row_id"], attempts=attempts,
                    latency_s=time.perf_counter() - start,
                    error=f"{_error_code(exc)}: {_describe(exc, self._key)} (after {attempts} attempts)",
                )
            gen.attempts = attempts
            gen.latency_s = time.perf_counter() - start
            return gen

    async def _call(self, request: dict[str, Any]) -> Generation:
        s = self.cfg.sampling
        kwargs: dict[str, Any] = {
            "model": self.cfg.model, "messages": request["messages"],
            "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
            "seed": request["seed"],
        }
        if s.stop:
            kwargs["stop"] = s.stop
        if s.logprobs is not None:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = s.logprobs
            if self.cfg.request_token_ids:
                # vLLM servers can name tokens by id ("token_id:123"); OpenAI's API would
                # reject the unknown field, hence opt-in.
                kwargs["extra_body"] = {"return_tokens_as_token_ids": True}
        resp = await self._client.chat.completions.create(**kwargs)
        return self._parse(request["row_id"], resp)

    def _parse(self, row_id: str, resp: Any) -> Generation:
        choices = getattr(resp, "choices", None)
        if not choices:
            raise MalformedResponse("response has no choices")
        choice = choices[0]
        text = getattr(getattr(choice, "message", None), "content", None)
        if not isinstance(text, str):
            raise MalformedResponse("response has no message content")
        usage = getattr(resp, "usage", None)
        g = Generation(
            row_id=row_id, text=text, finish_reason=choice.finish_reason,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
        )
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        if self.cfg.sampling.logprobs is not None and content:
            ids = [_token_id(c.token) for c in content]
            tops = [[_token_id(t.token) for t in c.top_logprobs] for c in content]
            # Without ids (a server that names tokens by text) KD cannot use them: store none.
            if all(i is not None for i in ids) and all(i is not None for t in tops for i in t):
                g.token_ids = ids
                g.token_logprobs = [c.logprob for c in content]
                g.top_ids = tops
                g.top_logprobs = [[t.logprob for t in c.top_logprobs] for c in content]
        return g


def _token_id(token: str) -> int | None:
    if token.startswith("token_id:"):
        try:
            return int(token[len("token_id:"):])
        except ValueError:
            return None
    return None
