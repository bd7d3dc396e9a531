"""``RunStats``: what a run did, as the progress display, the summary and the exit code read it."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunStats:
    total: int = 0  # rows the job asks for
    skipped: int = 0  # already committed before this run started
    started: float = field(default_factory=time.monotonic)
    teachers_ready: float | None = None  # when every actor answered its first call
    generation_ended: float | None = None  # when the last row was committed (teardown not counted)
    counts: Counter = field(default_factory=Counter)  # stream -> rows this run
    reasons: Counter = field(default_factory=Counter)  # (stream, reason) -> rows this run
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None  # None: no priced teacher answered
    interrupted: bool = False
    unique: int | None = None  # accepted rows left after streaming dedupe, when it ran
    stop_reason: str | None = None  # why generation stopped early: target_accepted, max_rows, ...
    # work done again because an actor or node died with it (Ray's own silent retries
    # not counted): "teacher batch", "filter batch", "dedupe index rebuild" -> times
    lost: Counter = field(default_factory=Counter)
    metrics: Any = None  # datagen.run.metrics.RunMetrics: per-stage figures, queue depths
    batches: Any = None  # datagen.batch.BatchRoom: provider batch jobs (view() is None when none)

    @property
    def generated(self) -> int:
        return sum(self.counts.values())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def startup_s(self) -> float:
        return (self.teachers_ready or time.monotonic()) - self.started

    @property
    def generating_s(self) -> float:
        """Seconds from teachers ready to the last row committed (or now, while the run
        goes on): the denominator of throughput figures. Stopping Ray and its engines
        afterwards (seconds for a vLLM engine) is not generating."""
        if not self.teachers_ready:
            return 0.0
        return (self.generation_ended or time.monotonic()) - self.teachers_ready
