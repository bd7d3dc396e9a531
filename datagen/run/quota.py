"""``Quota``: when "enough" rows passed (``target_accepted``) or a budget is spent."""

from __future__ import annotations

from typing import Any


class Quota:
    """``target_accepted`` and ``budget``, counted over the whole output so a resume
    carries on where the last run stopped. The driver asks ``room()`` before it pulls a
    prompt, and pulls none once ``stop_reason()`` says why."""

    def __init__(self, target: int | None, budget: Any, store: Any):
        """``target``: ``target_accepted``; ``budget``: the job's ``Budget``; ``store``: the
        output, whose committed rows count."""
        counts = store.manifest.counts()
        self.target = target
        self.max_rows, self.max_tokens = budget.max_rows, budget.max_tokens
        self.accepted = counts["accepted"]
        self.rows = counts["accepted"] + counts["rejected"] + store.unresolved_failures()
        self.tokens = _committed_tokens(store) if self.max_tokens else 0
        self.inflight = 0  # rows pulled from the prompt stream and not yet routed

    def pulled(self) -> None:
        self.inflight += 1
        self.rows += 1

    def landed(self, *, accepted: bool, tokens: int) -> None:
        self.inflight -= 1
        self.accepted += accepted
        self.tokens += tokens

    def stop_reason(self) -> str | None:
        if self.target is not None and self.accepted >= self.target:
            return "target_accepted"
        if self.max_rows is not None and self.rows >= self.max_rows:
            return "max_rows"
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            return "max_tokens"
        return None

    def room(self) -> bool:
        """May one more prompt be pulled? With a target, only while the rows in flight
        could still be needed: a full pipeline must not overshoot N by its whole depth."""
        if self.stop_reason() is not None:
            return False
        return self.target is None or self.accepted + self.inflight < self.target


def _committed_tokens(store: Any) -> int:
    total = 0
    for stream in ("accepted", "rejected", "failed"):
        for usage in store.read(stream, columns=["usage"]).column("usage").to_pylist():
            if usage:
                total += (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
    return total
