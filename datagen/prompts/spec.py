"""Template specs.

A template spec (YAML, in ``prompts/``) names a versioned task: Jinja2 templates for the
system and user turns (strict: an undefined variable is an error, not an empty string,
reported with the template file and line), the seed source whose rows fill them, the
licenses of both, the seed columns that are reference answers, and the answer format
the minimal filters check.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.meta
import yaml
from pydantic import Field

from datagen import records
from datagen.config import SeedSource
from datagen.validation import Strict, read_model
from datagen.errors import ConfigError
from datagen.prompts.seeds import Seeds, read_seeds


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
    reference: list[str] = Field(
        default_factory=list, description="seed columns copied into provenance.reference for filters "
        "(a math answer, a code task's tests)")
    answer: AnswerFormat = Field(default_factory=AnswerFormat)


def _turn_lines(text: str) -> dict[str, int]:
    """File line (1-based) of the first template line of each turn, for error messages.
    Block scalars (``|``, ``>``) start on the line after their key; folded scalars join
    lines, so past their first line the figure is approximate."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    out = {}
    for key, value in getattr(root, "value", []) if isinstance(root, yaml.MappingNode) else []:
        if key.value in ("system", "user"):
            out[key.value] = value.start_mark.line + (2 if value.style in ("|", ">") else 1)
    return out


class Template:
    """A loaded spec: its Jinja2 turns compiled once, its seeds read."""

    def __init__(self, spec: TemplateSpec, path: Path, text_hash: str, seeds: Seeds,
                 lines: dict[str, int] | None = None):
        self.spec, self.path, self.text_hash, self.seeds = spec, path, text_hash, seeds
        self.lines = lines or {}
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        self._turns: dict[str, jinja2.Template] = {}
        self.variables: set[str] = set()
        for turn in ("system", "user"):
            source = getattr(spec, turn)
            if not source:
                continue
            try:
                self.variables |= jinja2.meta.find_undeclared_variables(env.parse(source))
                code = env.compile(source, filename=self._filename(turn))
            except jinja2.TemplateSyntaxError as exc:
                raise ConfigError(f"{self._where(turn, exc.lineno)}: template syntax error in the {turn} "
                                  f"turn: {exc.message}") from None
            self._turns[turn] = env.template_class.from_code(env, code, env.make_globals(None), None)

    def _filename(self, turn: str) -> str:
        return f"{self.path}#{turn}"  # a frame of this turn in a traceback carries its line

    def _where(self, turn: str, lineno: int | None) -> str:
        base = self.lines.get(turn)
        if base is None or lineno is None:
            return f"{self.path}"
        return f"{self.path}:{base + lineno - 1}"

    def _turn(self, turn: str, values: dict[str, Any], what: str) -> str:
        try:
            return self._turns[turn].render(values).strip()  # one dict: a seed field named "self" is fine
        except jinja2.UndefinedError as exc:
            at = self._where(turn, self._template_line(exc, turn))
            raise ConfigError(f"{at}: the {turn} turn uses an undefined variable: {exc.message} "
                              f"(rendering {what})") from None
        except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError) as exc:
            at = self._where(turn, self._template_line(exc, turn))
            raise ConfigError(f"{at}: the {turn} turn failed to render {what}: {exc}") from None

    def _template_line(self, exc: BaseException, turn: str) -> int | None:
        line = None
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            if frame.f_code.co_filename == self._filename(turn):
                line = lineno
        return line

    def render(self, values: dict[str, Any], *, what: str = "a seed row") -> list[dict[str, str]]:
        messages = []
        if "system" in self._turns:
            messages.append({"role": "system", "content": self._turn("system", values, what)})
        for i, shot in enumerate(self.spec.shots):
            messages.append({"role": "user", "content": self._turn("user", shot.vars, f"shots[{i}]")})
            messages.append({"role": "assistant", "content": shot.answer})
        messages.append({"role": "user", "content": self._turn("user", values, what)})
        return messages


def load_template(path: Path, *, seeds: SeedSource | None = None) -> Template:
    """Load a spec and its seeds; ``seeds`` (the job's ``prompts.seeds``, path resolved)
    replaces the spec's own source."""
    spec = read_model(path, TemplateSpec, what="template")
    if seeds is not None:
        spec = spec.model_copy(update={"seeds": seeds})
    seeds_path = spec.seeds.path if spec.seeds.path.is_absolute() else path.parent / spec.seeds.path
    rows = read_seeds(spec.seeds, seeds_path)
    text_hash = records.content_hash(spec.model_dump(include={"system", "user", "shots"}))
    template = Template(spec=spec, path=path, text_hash=text_hash, seeds=rows,
                        lines=_turn_lines(path.read_text()))
    for row, sid in zip(rows.rows, rows.ids):
        for col in spec.reference:
            if col not in row:
                raise ConfigError(f"{path}: reference: seed {sid!r} in {seeds_path} has no column {col!r}")
    return template
