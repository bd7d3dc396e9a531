"""What every filter shares: the verdict, the filter interface, the spec base class.

A filter looks at a row (and the seed row it came from, for reference answers and unit
tests) and answers keep-or-drop with a reason code such as ``math.wrong_answer``. A
filter that cannot decide -- its sandbox would not start, a judge's API is down, it hit
a bug -- raises; it never turns its own failure into a verdict, because "the verifier
was broken" must not drop (or keep) data silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from datagen.errors import DatagenError

Row = dict[str, Any]
Seed = dict[str, Any] | None
# What a filter may need from the job beyond its own params: {"teachers": {name: config}}
# (a judge grades with one of the job's teachers).
Context = Mapping[str, Any]


@dataclass(frozen=True)
class Verdict:
    filter: str
    keep: bool
    reason: str
    score: float | None = None
    details: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FilterError(DatagenError):
    """A filter could not reach a verdict (infrastructure or configuration, not the data)."""


class Filter:
    """One check. Subclasses implement ``check``; ``check_batch`` may run rows concurrently."""

    name: str = "filter"

    def check(self, row: Row, seed: Seed) -> Verdict:
        raise NotImplementedError

    def check_batch(self, rows: Sequence[Row], seeds: Sequence[Seed]) -> list[Verdict]:
        return [self.check(r, s) for r, s in zip(rows, seeds)]

    def check_seeds(self, seeds: Sequence[dict[str, Any]], *, id_field: str) -> None:
        """Refuse, before any generation, seeds this filter cannot judge against."""

    @cached_property
    def ok(self) -> Verdict:
        """The plain keep verdict, built once: verdicts are immutable, and a cheap filter
        keeping most rows should not pay for a new object per row."""
        return Verdict(self.name, True, "ok")

    def keep(self, reason: str = "ok", score: float | None = None, details: str | None = None) -> Verdict:
        return Verdict(self.name, True, reason, score, details)

    def drop(self, reason: str, details: str | None = None, score: float | None = None) -> Verdict:
        return Verdict(self.name, False, reason, score, details)


class FilterSpec(BaseModel):
    """A filter's entry in the job file: ``name`` plus its own params (unknown ones are errors).

    A spec whose params are all defaults dumps as its bare name, so job files (and run
    fingerprints) written before filters took params stay the same.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    # Judges all samples of a prompt together: the driver then sends whole groups.
    groups_by_prompt: ClassVar[bool] = False

    def build(self, answer: Any, context: Context) -> Filter:
        raise NotImplementedError


def require_field(seeds: Sequence[dict[str, Any]], field: str, *, id_field: str, filter_name: str) -> None:
    for s in seeds:
        if s.get(field) in (None, ""):
            raise FilterError(
                f"filters: {filter_name} needs a reference in each seed's {field!r} field, but seed "
                f"{s.get(id_field)!r} has none (set {filter_name}'s field name, or fix the seed file)"
            )
