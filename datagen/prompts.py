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


@dataclass(frozen=True)
class Template:
    spec: TemplateSpec
    path: Path
    text_hash: str
    seeds: list[dict[str, Any]]

    def render(self, seed: dict[str, Any]) -> list[dict[str, str]]:
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        messages = []
        try:
            if self.spec.system:
                messages.append({"role": "system", "content": env.from_string(self.spec.system).render(**seed).strip()})
            user = env.from_string(self.spec.user)
            for shot in self.spec.shots:
                messages.append({"role": "user", "content": user.render(**shot.vars).strip()})
                messages.append({"role": "assistant", "content": shot.answer})
            messages.append({"role": "user", "content": user.render(**seed).strip()})
        except jinja2.UndefinedError as exc:
            raise ConfigError(
                f"{self.path}: template uses a variable the seed row "
                f"{seed.get(self.spec.seeds.id_field)!r} does not have: {exc.message}"
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"{self.path}: template syntax error: {exc.message} (line {exc.lineno})") from None
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
        # Render everything up front: this is also the validation of the template against
        # every seed, so a bad row fails before any teacher token is paid for.
        self._rendered = [self.template.render(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds) * sum(t.sampling.n for t in self.job.teachers)

    def __iter__(self) -> Iterator[Request]:
        spec = self.template.spec
        id_field = spec.seeds.id_field
        for seed_row, messages in zip(self.seeds, self._rendered):
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
