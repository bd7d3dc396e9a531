"""What every config file shares: strict pydantic models, one-line errors that name the
field, and YAML reading.

Every model forbids unknown fields, and every validation error is reported as one line
per problem that names the field path and the bad value, e.g.::

    examples/job.yaml: teachers[0].max_concurrency: Input should be greater than or equal to 1 (got 0)

Values of fields that may hold a secret (``api_key_env``, ``base_url``, ``output.path``)
are never echoed. Not covered: what a file's fields mean; each file's models say that
(``config.py`` the job, ``teachers/spec.py`` a teacher, ``train/config.py`` training).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from datagen.errors import ConfigError

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Upper case only: conventional for env vars, and it refuses most pasted keys
# (sk-…, sk_live_…, ghp_…), which would otherwise be echoed by "X is not set".
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _loc(loc: tuple[Any, ...], tags: frozenset[str]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in tags and i > 0 and isinstance(loc[i - 1], int):
            continue  # the discriminated union's tag is noise in a path the user reads
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _redact(value: Any) -> Any:
    """Hide api_key_env values inside echoed input: a user may have pasted the key there."""
    if isinstance(value, dict):
        return {k: "***" if k in ("api_key_env", "base_url") else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _short(value: Any) -> str:
    text = repr(_redact(value))
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(exc: ValidationError, *, where: str, tags: frozenset[str] = frozenset()) -> str:
    """One line per problem. ``tags``: the discriminators of the model's unions (a teacher's
    ``backend``, a filter's ``name``), left out of the paths a user reads."""
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = _loc(err["loc"], tags)
        if not err["loc"]:  # a cross-field check: its message names the fields itself
            lines.append(f"{where}: {msg}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{where}: {loc}: unknown field")
        elif err["type"] == "missing":
            lines.append(f"{where}: {loc}: required field is missing")
        elif loc.endswith(("api_key_env", "base_url", "output.path")):  # never echo what may hold a key
            lines.append(f"{where}: {loc}: {msg}")
        else:
            lines.append(f"{where}: {loc}: {msg} (got {_short(err.get('input'))})")
    return "\n".join(lines)


def read_yaml(path: Path, *, what: str) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} is a directory, not a file: {path}") from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} is unreadable: {path}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{at}: invalid YAML: {problem}") from None


def read_model(path: Path, model: type[BaseModel], *, what: str, tags: frozenset[str] = frozenset()) -> Any:
    """A YAML file validated as ``model``; every problem is a ``ConfigError`` naming the file
    (and the field, through ``format_validation_error``)."""
    data = read_yaml(path, what=what)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where=str(path), tags=tags)) from None
