"""Filters: each looks at a row and answers keep-or-drop with a reason.

A filter is a real check on the data. It never sees infrastructure failures of the
teacher: a row whose teacher call failed goes to the ``failed`` stream before any filter
runs. And a filter's own failure (a sandbox that will not start, a bug) raises -- it is
never turned into a verdict -- so "the verifier was down" can never drop or keep a row.

``FILTERS`` is the registry the job file's ``filters:`` list names: each entry is the
filter's spec model (its params, validated with the job file). Filters run in list
order; by default a row stops at its first drop (``short_circuit``). Every verdict that
ran is stored on the row.

Modules: ``heuristics`` (cheap per-row checks), ``schema`` (JSON + JSON Schema / pydantic),
``fields`` (a JSON answer's fields vs the seed's reference columns),
``math_answer`` (final answers vs a reference), ``code`` + ``sandbox`` (unit tests in a
sandboxed subprocess), ``judge`` (a teacher grades with a rubric), ``consistency``
(the samples of a prompt vote; the driver sends them as one group). Rule packs and
verifier assets live in the repo's ``filters/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datagen.filters.base import Context, Filter, FilterError, FilterSpec, Row, Seed, Verdict
from datagen.filters.code import CodeSpec
from datagen.filters.consistency import ConsistencySpec
from datagen.filters.fields import FieldsSpec
from datagen.filters.heuristics import (FormatSpec, LanguageSpec, LengthSpec, NonEmptySpec, NotTruncatedSpec,
                                        RefusalSpec, RepetitionSpec, TemplateLeakSpec)
from datagen.filters.judge import JudgeSpec
from datagen.filters.math_answer import MathSpec
from datagen.filters.schema import SchemaSpec, extract_json

FILTERS: dict[str, type[FilterSpec]] = {
    "nonempty": NonEmptySpec,
    "not_truncated": NotTruncatedSpec,
    "format": FormatSpec,
    "length": LengthSpec,
    "repetition": RepetitionSpec,
    "refusal": RefusalSpec,
    "language": LanguageSpec,
    "template_leak": TemplateLeakSpec,
    "schema": SchemaSpec,
    "fields": FieldsSpec,
    "math": MathSpec,
    "code": CodeSpec,
    "judge": JudgeSpec,
    "self_consistency": ConsistencySpec,
}
DEFAULT_FILTERS = ("nonempty", "not_truncated", "format")

__all__ = ["DEFAULT_FILTERS", "FILTERS", "Filter", "FilterChain", "FilterError", "FilterSpec", "Verdict",
           "extract_json", "spec_of"]


def spec_of(value: str | dict[str, Any] | FilterSpec) -> FilterSpec:
    """A filter spec from a bare name, a ``{name: ..., **params}`` mapping, or a spec."""
    if isinstance(value, FilterSpec):
        return value
    data = {"name": value} if isinstance(value, str) else dict(value)
    name = data.get("name")
    if name not in FILTERS:
        raise FilterError(f"unknown filter {name!r} (known: {', '.join(FILTERS)})")
    return FILTERS[name].model_validate(data)


class FilterChain:
    """The job's filters, in order. ``run`` judges a batch: each filter sees the rows still
    alive (all rows when ``short_circuit`` is off), as one batch so it can run them
    concurrently (the code filter does)."""

    def __init__(self, specs: Sequence[str | dict[str, Any] | FilterSpec], answer: Any, *,
                 short_circuit: bool = True, context: Context | None = None):
        self.filters: list[Filter] = [spec_of(s).build(answer, context or {}) for s in specs]
        self.short_circuit = short_circuit
        self._stages: list[tuple[bool, list[Filter]]] | None = None
        self._current: Filter | None = None

    def check_seeds(self, seeds: Sequence[dict[str, Any]], *, id_field: str) -> None:
        for f in self.filters:
            f.check_seeds(seeds, id_field=id_field)

    def run(self, rows: Sequence[Row], seeds: Sequence[Seed]) -> list[list[Verdict]]:
        out: list[list[Verdict]] = [[] for _ in rows]
        alive = list(range(len(rows)))
        for batched, stage in self.stages:
            if not alive:
                break
            try:
                alive = (self._batch(stage[0], rows, seeds, alive, out) if batched
                         else self._row_by_row(stage, rows, seeds, alive, out))
            except FilterError:
                raise
            except Exception as exc:  # a bug or a broken verifier: never a verdict
                raise FilterError(f"filter {self._current.name!r} failed: {type(exc).__name__}: {exc}") from exc
        return out

    @property
    def stages(self) -> list[tuple[bool, list[Filter]]]:
        """Consecutive per-row filters fused into one stage (one pass over the rows, no
        per-filter lists: the heuristics' speed is mostly this loop); a filter with its
        own ``check_batch`` (concurrent code runs, judge calls, groups) is a stage alone."""
        if self._stages is None:
            stages: list[tuple[bool, list[Filter]]] = []
            for f in self.filters:
                batched = type(f).check_batch is not Filter.check_batch
                if batched or not stages or stages[-1][0]:
                    stages.append((batched, [f]))
                else:
                    stages[-1][1].append(f)
            self._stages = stages
        return self._stages

    def _row_by_row(self, stage: list[Filter], rows, seeds, alive: list[int], out) -> list[int]:
        still = []
        short = self.short_circuit
        for i in alive:
            row, seed, verdicts, keep = rows[i], seeds[i], out[i], True
            for f in stage:
                self._current = f
                v = f.check(row, seed)
                verdicts.append(v)
                if not v.keep:
                    keep = False
                    if short:
                        break
            if keep or not short:
                still.append(i)
        return still

    def _batch(self, f: Filter, rows, seeds, alive: list[int], out) -> list[int]:
        self._current = f
        verdicts = f.check_batch([rows[i] for i in alive], [seeds[i] for i in alive])
        if len(verdicts) != len(alive):
            raise FilterError(f"filter {f.name!r} returned {len(verdicts)} verdicts for {len(alive)} rows")
        for i, v in zip(alive, verdicts):
            out[i].append(v)
        return [i for i, v in zip(alive, verdicts) if v.keep] if self.short_circuit else alive

    def __call__(self, row: Row, seed: Seed = None) -> list[Verdict]:
        return self.run([row], [seed])[0]
