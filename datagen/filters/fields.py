"""Field-level reference check for structured answers: the JSON answer's fields against
the seed's reference columns (an extraction task's ``order_id`` and ``product``).

    filters:
      - {name: fields, fields: [order_id, product], ids: [order_id]}

Each field is normalised on both sides before comparison: strip, casefold, inner
whitespace collapsed, surrounding punctuation removed; an id field (``ids``) compares its
digits only (``#48213``, ``ORD-48213`` and ``48213`` agree), unless the reference has no
digits. A null reference means "the message has none": the answer must be null too
(``""``, ``"null"``, ``"none"``, ``"n/a"`` count as null). The row is kept when every field
is right; the score is the share of fields right.

Not covered: synonyms and paraphrases (``lamp`` is not ``desk lamp``), and a reference
that is itself a list or object (compared as its JSON text).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import Field, model_validator

from datagen.filters.base import Context, Filter, FilterError, FilterSpec, Row, Seed, Verdict
from datagen.filters.schema import extract_json

_NULLS = {"", "null", "none", "n/a", "na"}
_SPACE = re.compile(r"\s+")
_EDGE = re.compile(r"^[\W_]+|[\W_]+$")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = _EDGE.sub("", _SPACE.sub(" ", text.strip().casefold()))
    return None if text in _NULLS else text


def normalise(value: Any, *, is_id: bool = False) -> str | None:
    """The comparable form of a field's value; None for a null (or null-like) value."""
    text = _text(value)
    if text is None or not is_id:
        return text
    digits = re.sub(r"\D", "", text)
    return digits or text


class FieldsSpec(FilterSpec):
    name: Literal["fields"] = "fields"
    fields: list[str] = Field(min_length=1, description="answer keys compared with the seed's same-named columns")
    ids: list[str] = Field(default_factory=list, description="fields compared by their digits (order numbers)")

    @model_validator(mode="after")
    def _ids_in_fields(self) -> FieldsSpec:
        stray = [f for f in self.ids if f not in self.fields]
        if stray:
            raise ValueError(f"ids names fields not in fields: {stray}")
        return self

    def build(self, answer: Any, context: Context) -> Filter:
        return FieldsMatch(self)


class FieldsMatch(Filter):
    name = "fields"

    def __init__(self, spec: FieldsSpec):
        self.s = spec
        self.ids = set(spec.ids)

    def check_seeds(self, seeds, *, id_field: str) -> None:
        # A null reference is an answer ("no order id"), so only a missing column is refused.
        for s in seeds:
            missing = [f for f in self.s.fields if f not in s]
            if missing:
                raise FilterError(
                    f"filters: fields needs a reference in each seed's {missing[0]!r} column, but seed "
                    f"{s.get(id_field)!r} has none (list it in the template's reference, or fix the seed file)")

    def check(self, row: Row, seed: Seed) -> Verdict:
        seed = seed or {}
        try:
            value = extract_json(row.get("response") or "")
        except ValueError:
            return self.drop("fields.invalid_json", score=0.0)
        if not isinstance(value, dict):
            return self.drop("fields.invalid_json", score=0.0, details="the answer is not a JSON object")
        wrong, missing = [], []
        for f in self.s.fields:
            if f not in value:
                missing.append(f)
            elif normalise(value[f], is_id=f in self.ids) != normalise(seed.get(f), is_id=f in self.ids):
                wrong.append(f"{f}: got {value[f]!r}, expected {seed.get(f)!r}")
        score = 1.0 - (len(wrong) + len(missing)) / len(self.s.fields)
        if wrong:
            return self.drop("fields.mismatch", score=score, details="; ".join(wrong)[:200])
        if missing:
            return self.drop("fields.missing", score=score, details=f"no {', '.join(missing)}")
        return self.keep(score=1.0)
