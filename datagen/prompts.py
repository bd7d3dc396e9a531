"""Template specs and the prompt stream.

A template spec (YAML, in ``prompts/``) names a versioned task: Jinja2 templates for the
system and user turns (strict: an undefined variable is an error, not an empty string),
the seed file whose rows fill them, the licenses of both, and the answer format the
minimal filters check. ``PromptStream`` turns a spec into the deterministic sequence of
``Request``s a run sends to its teachers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2
from pydantic import Field, ValidationError

from datagen import records
from datagen.config import Job, Strict, format_validation_error, read_yaml
from datagen.errors import ConfigError


class SeedSource(Strict):
    path: Path
    license: str = Field(min_length=1, description="SPDX id or LicenseRef-… of the seed data")
    id_field: str = "id"


class AnswerFormat(Strict):
    """What a well-formed answer looks like; the ``format`` filter checks it."""

    format: Literal["text", "choice", "json"] = "text"
    choices: list[str] = Field(default_factory=list, description="for format: choice")
    required: list[str] = Field(default_factory=list, description="keys a JSON answer must have")


class Shot(Strict):
    """A worked example, sent as a user/assistant turn pair before the real prompt."""

    vars: dict[str, Any]
    answer: str


class TemplateSpec(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    version: str
    license: str = Field(min_length=1, description="license of the template text itself")
    description: str = ""
    system: str | None = None
    user: str
    shots: list[Shot] = Field(default_factory=list)
    seeds: SeedSource
    answer: AnswerFormat = Field(default_factory=AnswerFormat)


class Template:
    """A loaded spec: its Jinja2 turns compiled once, its seeds read."""

    def __init__(self, spec: TemplateSpec, path: Path, text_hash: str, seeds: list[dict[str, Any]]):
        self.spec, self.path, self.text_hash, self.seeds = spec, path, text_hash, seeds
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        try:
            self._system = env.from_string(spec.system) if spec.system else None
            self._user = env.from_string(spec.user)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"{path}: template syntax error: {exc.message} (line {exc.lineno})") from None

    def _turn(self, tpl: jinja2.Template, values: dict[str, Any], what: str) -> str:
        try:
            return tpl.render(values).strip()  # one dict: a seed field named "self" is fine
        except jinja2.UndefinedError as exc:
            raise ConfigError(
                f"{self.path}: template uses a variable {what} does not have: {exc.message}"
            ) from None
        except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError) as exc:
            raise ConfigError(f"{self.path}: template failed to render {what}: {exc}") from None

    def render(self, seed: dict[str, Any]) -> list[dict[str, str]]:
        what = f"the seed row {seed.get(self.spec.seeds.id_field)!r}"
        messages = []
        if self._system is not None:
            messages.append({"role": "system", "content": self._turn(self._system, seed, what)})
        for i, shot in enumerate(self.spec.shots):
            messages.append({"role": "user", "content": self._turn(self._user, shot.vars, f"shots[{i}]")})
            messages.append({"role": "assistant", "content": shot.answer})
        messages.append({"role": "user", "content": self._turn(self._user, seed, what)})
        return messages


def load_template(path: Path) -> Template:
    data = read_yaml(path, what="template")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a template spec must be a mapping, got {type(data).__name__}")
    try:
        spec = TemplateSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where=str(path))) from None
    seeds_path = spec.seeds.path if spec.seeds.path.is_absolute() else path.parent / spec.seeds.path
    seeds = _read_seeds(seeds_path, spec.seeds.id_field)
    text_hash = records.content_hash(spec.model_dump(include={"system", "user", "shots"}))
    return Template(spec=spec, path=path, text_hash=text_hash, seeds=seeds)


def _read_seeds(path: Path, id_field: str) -> list[dict[str, Any]]:
    if path.suffix != ".jsonl":
        raise ConfigError(f"{path}: seed files are JSONL for now (one object per line)")
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"seed file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"seed file is unreadable: {path}: {exc}") from None
    rows, ids = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: invalid JSON: {exc.msg}") from None
        if not isinstance(row, dict) or id_field not in row:
            raise ConfigError(f"{path}:{n}: each seed must be an object with an {id_field!r} field")
        if not isinstance(row[id_field], (str, int)) or isinstance(row[id_field], bool):
            raise ConfigError(f"{path}:{n}: seed {id_field!r} must be a string or an integer")
        if row[id_field] in ids:
            raise ConfigError(f"{path}:{n}: duplicate seed id {row[id_field]!r}")
        ids.add(row[id_field])
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: the seed file is empty")
    return rows


@dataclass(frozen=True)
class Request:
    """One teacher call, which becomes exactly one row (accepted, rejected or failed)."""

    row_id: str
    prompt_id: str
    sample_index: int
    seed: int
    messages: list[dict[str, str]]
    teacher: str
    provenance: dict[str, Any]


class PromptStream:
    """The deterministic request sequence of a job: same job file, same requests, same ids.

    Order: seeds shuffled by the job seed, then for each prompt every teacher and every
    sample index. ``count`` larger than the number of distinct seeds is an error rather
    than silent repetition, since repeated prompts would collide on row id.
    """

    def __init__(self, job: Job, *, run_fingerprint: str):
        self.job = job
        self.template = load_template(job.prompts.template)
        seeds = list(self.template.seeds)
        random.Random(job.seed).shuffle(seeds)
        count = job.prompts.count
        if count is not None and count > len(seeds):
            raise ConfigError(
                f"prompts.count: {count} is more than the {len(seeds)} seeds in "
                f"{self.template.spec.seeds.path}; add seeds or raise teachers[].sampling.n "
                "for more samples per prompt"
            )
        self.seeds = seeds[:count] if count is not None else seeds
        self.run_fingerprint = run_fingerprint
        # Render every seed once up front, and keep nothing: this validates the template
        # against every seed before a teacher token is paid for, while iteration renders
        # again lazily so memory does not grow with the number of prompts.
        id_field = self.template.spec.seeds.id_field
        seen: dict[str, Any] = {}
        for s in self.seeds:
            pid = records.prompt_id(self.template.render(s))
            if pid in seen:
                raise ConfigError(
                    f"{self.template.spec.seeds.path}: seeds {seen[pid]!r} and {s[id_field]!r} render "
                    "the same prompt (they would be one row id); drop one or raise sampling.n"
                )
            seen[pid] = s[id_field]

    def __len__(self) -> int:
        return len(self.seeds) * sum(t.sampling.n for t in self.job.teachers)

    def __iter__(self) -> Iterator[Request]:
        spec = self.template.spec
        id_field = spec.seeds.id_field
        for seed_row in self.seeds:
            messages = self.template.render(seed_row)
            pid = records.prompt_id(messages)
            provenance = {
                "job": self.job.name,
                "run_fingerprint": self.run_fingerprint,
                "template_id": spec.id,
                "template_version": spec.version,
                "template_hash": self.template.text_hash,
                "seed_source": str(spec.seeds.path),
                "seed_ids": [str(seed_row[id_field])],
            }
            for teacher in self.job.teachers:
                ident = {"name": teacher.name, "backend": teacher.backend, "model": teacher.model}
                sampling = teacher.sampling.identity() | {"job_seed": self.job.seed}
                for k in range(teacher.sampling.n):
                    rid = records.row_id(messages=messages, teacher=ident, sampling=sampling, sample_index=k)
                    yield Request(
                        row_id=rid,
                        prompt_id=pid,
                        sample_index=k,
                        seed=int(records.content_hash([self.job.seed, rid], size=4), 16) & 0x7FFFFFFF,
                        messages=messages,
                        teacher=teacher.name,
                        provenance=provenance,
                    )
