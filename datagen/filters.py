"""Filters: each looks at one row and answers keep-or-drop with a reason.

A filter is a real check on the data. It never sees infrastructure failures: a row
whose teacher call failed goes to the ``failed`` stream before any filter runs, so
"the server was down" can never be mistaken for "the answer was wrong".

``FILTERS`` is the registry the job file's ``filters:`` list names. Filters run in that
order and stop at the first drop; every verdict that ran is stored on the row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from datagen.prompts import AnswerFormat


@dataclass(frozen=True)
class Verdict:
    filter: str
    keep: bool
    reason: str
    score: float | None = None
    details: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Filter = Callable[[dict[str, Any]], Verdict]


def nonempty(answer: AnswerFormat) -> Filter:
    def check(row: dict[str, Any]) -> Verdict:
        if not (row.get("response") or "").strip():
            return Verdict("nonempty", False, "empty.response")
        return Verdict("nonempty", True, "ok")

    return check


def not_truncated(answer: AnswerFormat) -> Filter:
    def check(row: dict[str, Any]) -> Verdict:
        if row.get("finish_reason") == "length":
            return Verdict("not_truncated", False, "truncated.max_tokens",
                           details=f"stopped at max_tokens ({row['sampling']['max_tokens']})")
        return Verdict("not_truncated", True, "ok")

    return check


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON value in ``text``: a fenced block, else the whole text, else the first
    ``{...}`` span. Raises ``ValueError`` when there is none."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for c in candidates:
        try:
            return json.loads(c.strip())
        except (json.JSONDecodeError, RecursionError):  # deeply nested garbage is not JSON either
            continue
    raise ValueError("no JSON value found")


def answer_format(answer: AnswerFormat) -> Filter:
    choices = {c.lower() for c in answer.choices}

    def check(row: dict[str, Any]) -> Verdict:
        text = (row.get("response") or "").strip()
        if answer.format == "json":
            try:
                value = extract_json(text)
            except ValueError:
                return Verdict("format", False, "format.invalid_json", details=text[:120])
            if answer.required:
                if not isinstance(value, dict):
                    return Verdict("format", False, "format.not_an_object", details=text[:120])
                missing = [k for k in answer.required if k not in value]
                if missing:
                    return Verdict("format", False, "format.missing_field", details=",".join(missing))
        elif answer.format == "choice":
            if text.lower().strip(" .\"'") not in choices:
                return Verdict("format", False, "format.not_a_choice", details=text[:120])
        return Verdict("format", True, "ok")

    return check


FILTERS: dict[str, Callable[[AnswerFormat], Filter]] = {
    "nonempty": nonempty,
    "not_truncated": not_truncated,
    "format": answer_format,
}


class FilterChain:
    def __init__(self, names: list[str], answer: AnswerFormat):
        self.filters = [FILTERS[n](answer) for n in names]

    def __call__(self, row: dict[str, Any]) -> list[Verdict]:
        verdicts = []
        for f in self.filters:
            v = f(row)
            verdicts.append(v)
            if not v.keep:
                break
        return verdicts
