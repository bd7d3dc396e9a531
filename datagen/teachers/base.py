"""What every teacher backend takes and returns.

A backend gets a batch of ``{"row_id", "messages", "seed"}`` dicts (optionally
``"temperature"``, overriding the teacher's own for that request) and returns one
``Generation`` per request, in order. A request that cannot be answered after the
backend's bounded retries comes back with ``error`` set (``"code: message"``) instead
of raising, so one bad row never sinks its batch; anything that breaks the backend
itself (engine crash, dead actor) raises, and Ray restarts the actor and retries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class Generation:
    row_id: str
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    token_ids: list[int] | None = None
    token_logprobs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    latency_s: float = 0.0
    attempts: int = 1
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Shallow: the lists are this generation's own. ``asdict`` copied every element of
        # the logprob lists, one call per float.
        return dict(self.__dict__)


class Teacher(Protocol):
    def info(self) -> dict[str, Any]:
        """name, backend, model, revision, tokenizer_fingerprint, license."""

    async def generate(self, requests: list[dict[str, Any]]) -> list[Generation]: ...


def tokenizer_fingerprint(vocab: dict[str, int], special: dict[str, Any] | None = None) -> str:
    """A stable hash of a tokenizer's vocabulary and special tokens.

    KD needs the student to share the teacher's token ids; the trainer compares this
    fingerprint instead of trusting model names.
    """
    h = hashlib.sha256()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{tok}\n".encode())
    for key, value in sorted((special or {}).items()):
        h.update(f"special:{key}={value}\n".encode())
    return "sha256:" + h.hexdigest()[:32]


def collect_less() -> None:
    """For an HTTP client's process (the actor's own): a request allocates hundreds of
    short-lived objects, so with Python's default thresholds (700 allocations) the
    collector ran every few requests and rescanned every long-lived object (Ray, the
    client, all imported modules) in its full passes. Freeze what exists after start-up
    and collect the young generation every 10,000 allocations: ~10% less CPU per
    request (benchmarks/bench_openai.py). Cycles are still collected, just in bigger batches."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
