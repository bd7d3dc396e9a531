"""A queued fault of the fake servers (``fake_openai.py``, ``fake_batches.py``) and how
the next one is taken: the first rule a request qualifies for, used up after ``times``
(``None``: kept forever)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Fault:
    kind: str
    times: int | None = 1
    match: str | None = None  # only requests whose last message contains this
    seconds: float = 0.0
    retry_after: float = 0.1


def take(faults: list[Fault], applies: Callable[[Fault], bool]) -> Fault | None:
    """The first fault in ``faults`` that ``applies``, counted down (and removed when spent)."""
    for f in faults:
        if not applies(f):
            continue
        if f.times is not None:
            f.times -= 1
            if f.times <= 0:
                faults.remove(f)
        return f
    return None
