"""What routing costs, per 1,000 queries.

- The teacher, either at its API price (``Price``: USD per million input and output
  tokens, from the row's ``prompt_tokens`` and ``teacher_completion_tokens``) or at its
  GPU time (``teacher_gpu_seconds`` x ``teacher_usd_per_gpu_hour``): ``teacher_basis``
  says which.
- The student at its measured ``student_seconds`` x ``student_usd_per_hour``.
- A post-generation cascade always pays for the student, and for the teacher on the rows
  it escalates: ``cascade = mean(c_s + escalated * c_t) * 1000``.

A price missing for the basis asked for is one ``DatagenError`` line naming the field; a
row missing what the basis reads is one line naming the row. Not covered: prompt caching
discounts, batch-API prices, and a student that stops early when it escalates (it is
charged its whole answer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from datagen.errors import DatagenError
from datagen.teachers.spec import Price
from datagen.validation import Strict


class CostModel(Strict):
    teacher_basis: Literal["api", "gpu"] = "api"
    teacher_price: Price | None = Field(None, description="USD per 1M tokens (teacher_basis: api)")
    teacher_usd_per_gpu_hour: float | None = Field(None, ge=0, description="teacher_basis: gpu")
    student_usd_per_hour: float | None = Field(None, ge=0, description="the student's serving cost")

    def check(self) -> None:
        if self.teacher_basis == "api" and self.teacher_price is None:
            raise DatagenError("cost: teacher_basis is api but cost.teacher_price (input_per_mtok, "
                               "output_per_mtok) is not set")
        if self.teacher_basis == "gpu" and self.teacher_usd_per_gpu_hour is None:
            raise DatagenError("cost: teacher_basis is gpu but cost.teacher_usd_per_gpu_hour is not set")
        if self.student_usd_per_hour is None:
            raise DatagenError("cost: cost.student_usd_per_hour is not set (the student's cost per hour "
                               "of measured answer time)")


def _field(row: Mapping[str, Any], name: str, why: str) -> float:
    v = row.get(name)
    if v is None:
        raise DatagenError(f"row {row.get('id')!r}: no {name}, which {why} needs")
    return float(v)


def row_costs(rows: Sequence[Mapping[str, Any]], model: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """(student, teacher) USD per row."""
    model.check()
    student = np.array([_field(r, "student_seconds", "the student's cost") for r in rows]) \
        * model.student_usd_per_hour / 3600
    if model.teacher_basis == "api":
        p = model.teacher_price
        teacher = np.array([p.cost(int(_field(r, "prompt_tokens", "the API cost")),
                                   int(_field(r, "teacher_completion_tokens", "the API cost"))) for r in rows])
    else:
        teacher = np.array([_field(r, "teacher_gpu_seconds", "the GPU cost") for r in rows]) \
            * model.teacher_usd_per_gpu_hour / 3600
    return student, teacher


def per_1k(c_s: np.ndarray, c_t: np.ndarray, escalated: np.ndarray) -> dict[str, float | None]:
    """All-student, all-teacher and cascade USD per 1,000 queries, and the saving against
    all-teacher (None when the teacher costs nothing)."""
    cascade = float((c_s + escalated * c_t).mean() * 1000)
    teacher = float(c_t.mean() * 1000)
    return {"all_student": float(c_s.mean() * 1000), "all_teacher": teacher, "cascade": cascade,
            "saving": 1 - cascade / teacher if teacher > 0 else None}
