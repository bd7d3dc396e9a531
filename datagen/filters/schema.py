"""Structured answers: pull the JSON out of an answer and validate it against a JSON
Schema written in the job file, or a pydantic model named by import path.

    filters:
      - {name: schema, json_schema: {type: object, required: [order_id], properties: {...}}}
      - {name: schema, model: "mypkg.schemas:Order"}

A JSON Schema may be ``true`` (any JSON value passes) or ``false`` (none does), as draft
2020-12 allows; a row without a JSON value is dropped either way. Other scalars are refused
(no coercion: ``1`` or ``"yes"`` is not ``true``).
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any, Literal

from pydantic import Field, StrictBool, model_validator

from datagen.filters.base import Context, Filter, FilterError, FilterSpec, Row, Seed, Verdict

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


# jsonschema's failing keyword -> our reason code.
_JSONSCHEMA_REASONS = {"required": "schema.missing_field", "type": "schema.wrong_type",
                       "enum": "schema.not_allowed", "const": "schema.not_allowed",
                       "additionalProperties": "schema.extra_field"}


class SchemaSpec(FilterSpec):
    name: Literal["schema"] = "schema"
    json_schema: dict[str, Any] | StrictBool | None = Field(
        None, description="a JSON Schema (draft 2020-12): an object, or true / false")
    model: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                              description="a pydantic model, 'package.module:Class'")

    @model_validator(mode="after")
    def _one_source(self) -> SchemaSpec:
        if (self.json_schema is None) == (self.model is None):
            raise ValueError("schema needs exactly one of json_schema or model")
        if self.json_schema is not None:
            try:
                from jsonschema import Draft202012Validator
                from jsonschema.exceptions import SchemaError
            except ImportError:
                raise ValueError("json_schema needs the 'jsonschema' package "
                                 "(pip install 'datagen[filters]')") from None
            try:
                Draft202012Validator.check_schema(self.json_schema)
            except SchemaError as exc:
                raise ValueError(f"json_schema is not a valid JSON Schema: {exc.message}") from None
        return self

    def build(self, answer: Any, context: Context) -> Filter:
        if self.json_schema is not None:
            return JsonSchemaCheck(self.json_schema)
        return ModelCheck(self.model or "")


class JsonSchemaCheck(Filter):
    name = "schema"

    def __init__(self, schema: dict[str, Any] | bool):
        from jsonschema import Draft202012Validator

        self.validator = Draft202012Validator(schema)

    def check(self, row: Row, seed: Seed) -> Verdict:
        try:
            value = extract_json(row.get("response") or "")
        except ValueError:
            return self.drop("schema.invalid_json", details=(row.get("response") or "")[:120])
        err = next(iter(sorted(self.validator.iter_errors(value), key=lambda e: list(e.path))), None)
        if err is None:
            return self.keep()
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        return self.drop(_JSONSCHEMA_REASONS.get(str(err.validator), "schema.invalid"),
                         details=f"{where}: {err.message}"[:200])


class ModelCheck(Filter):
    name = "schema"

    def __init__(self, path: str):
        module, _, attr = path.partition(":")
        try:
            model = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise FilterError(f"schema: cannot import the model {path!r}: {exc}") from None
        if not hasattr(model, "model_validate"):
            raise FilterError(f"schema: {path!r} is not a pydantic model")
        self.model = model

    def check(self, row: Row, seed: Seed) -> Verdict:
        from pydantic import ValidationError

        try:
            value = extract_json(row.get("response") or "")
        except ValueError:
            return self.drop("schema.invalid_json", details=(row.get("response") or "")[:120])
        try:
            self.model.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(root)"
            reason = "schema.missing_field" if first["type"] == "missing" else "schema.invalid"
            return self.drop(reason, details=f"{where}: {first['msg']}"[:200])
        return self.keep()
