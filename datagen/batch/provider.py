"""One teacher's side of a provider's Batch API, through the official ``openai`` client:
upload an input file (``purpose="batch"``), create, retrieve, cancel and find batches,
read a result file.

The client's own retries (429, 5xx, dropped connections; bounded, with back-off) are
the retry policy of these few control calls; what still fails is a ``BatchError``: one
line naming the teacher, the call and the provider's status and message, with the key
scrubbed out and no URL in it. Not covered: providers whose batch API is not OpenAI's
(Anthropic's Message Batches has its own shapes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from datagen.batch.lines import ENDPOINT
from datagen.errors import DatagenError
from datagen.teachers.openai_api import api_key
from datagen.teachers.spec import OpenAITeacher

FIND_LIMIT = 1000  # batches listed, newest first, when looking for one created just before a crash


class BatchError(DatagenError):
    """A batch call the provider refused or never answered. ``transient``: it may work later."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class Provider:
    def __init__(self, cfg: OpenAITeacher):
        import openai

        self.cfg = cfg
        self._key = api_key(cfg)  # only handed to the client; never logged, stored or repr'd
        self._client = openai.OpenAI(base_url=cfg.base_url, api_key=self._key or "not-needed", max_retries=3,
                                     timeout=max(cfg.timeout_s, 300.0))

    def __repr__(self) -> str:
        return f"Provider(teacher={self.cfg.name!r})"

    def upload(self, key: str, data: bytes) -> str:
        with self._call(f"upload of batch input file {key}"):
            return self._client.files.create(file=(f"{key}.jsonl", data, "application/jsonl"), purpose="batch").id

    def create(self, key: str, file_id: str, token: str) -> Any:
        with self._call(f"creating batch {key}"):
            return self._client.batches.create(
                input_file_id=file_id, endpoint=ENDPOINT, completion_window=self.cfg.batch.completion_window,
                metadata={"datagen_output": token, "datagen_batch": key})

    def retrieve(self, key: str, batch_id: str) -> Any:
        with self._call(f"status of batch {key}"):
            return self._client.batches.retrieve(batch_id)

    def cancel(self, key: str, batch_id: str) -> Any:
        with self._call(f"cancelling batch {key}"):
            return self._client.batches.cancel(batch_id)

    def content(self, key: str, file_id: str) -> str:
        with self._call(f"reading the results of batch {key}"):
            return self._client.files.content(file_id).text

    def find(self, key: str, token: str) -> Any | None:
        """The batch this output created as ``key``, if the provider has one (it was created
        and the driver died before recording its id)."""
        with self._call(f"looking for batch {key}"):
            for n, b in enumerate(self._client.batches.list(limit=100)):
                meta = b.metadata or {}
                if meta.get("datagen_output") == token and meta.get("datagen_batch") == key:
                    return b
                if n >= FIND_LIMIT:
                    break
        return None

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        import openai

        try:
            yield
        except openai.APIStatusError as exc:
            status = exc.status_code
            raise BatchError(f"teacher {self.cfg.name!r}: {what} refused: HTTP {status}: {self._message(exc)}",
                             transient=status in (408, 409, 429) or status >= 500) from None
        except openai.APIConnectionError as exc:  # time-outs too, after the client's retries
            raise BatchError(f"teacher {self.cfg.name!r}: {what} failed: the provider did not answer "
                             f"({type(exc).__name__})", transient=True) from None

    def _message(self, exc: Any) -> str:
        body = getattr(exc, "body", None)
        msg = body.get("message") if isinstance(body, dict) else None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            msg = body["error"].get("message")
        return self.scrub(str(msg or exc))

    def scrub(self, text: str) -> str:
        return scrub(text, self._key)


def scrub(text: str, secret: str | None) -> str:
    """One line, the key replaced, at most 200 characters: safe for a row, a log or an error."""
    text = " ".join(text.split())
    if secret:
        text = text.replace(secret, "***")
    return text[:200]
