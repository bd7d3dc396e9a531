"""Cheap per-row checks: empty, truncated, declared format, length, repetition, refusal,
language, template leaks. Each is a few regex/set operations, so a chain of them runs
at tens of thousands of rows per second per core (``benchmarks/bench_filters.py``).

Patterns and markers come from rule packs in ``filters/rules/`` (data, not code).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from datagen.filters.assets import rule_pack
from datagen.filters.base import Context, Filter, FilterError, FilterSpec, Row, Seed, Verdict
from datagen.filters.schema import extract_json

_HAS_CONTENT = re.compile(r"\w")


def _text(row: Row) -> str:
    return row.get("response") or ""


# --------------------------------------------------------------------------- spine filters


class NonEmpty(Filter):
    name = "nonempty"

    def check(self, row: Row, seed: Seed) -> Verdict:
        text = _text(row)
        if not text.strip():
            return self.drop("empty.response")
        if not _HAS_CONTENT.search(text):  # only punctuation/symbols: nothing to learn from
            return self.drop("empty.no_content", details=text[:60])
        return self.ok


class NotTruncated(Filter):
    name = "not_truncated"

    def check(self, row: Row, seed: Seed) -> Verdict:
        if row.get("finish_reason") == "length":
            max_tokens = (row.get("sampling") or {}).get("max_tokens")
            return self.drop("truncated.max_tokens", details=f"stopped at max_tokens ({max_tokens})")
        return self.ok


class AnswerFormatCheck(Filter):
    """The template's declared answer format (``answer:`` in the template spec)."""

    name = "format"

    def __init__(self, answer: Any):
        self.answer = answer
        self.choices = {c.lower() for c in answer.choices}

    def check(self, row: Row, seed: Seed) -> Verdict:
        text = _text(row).strip()
        fmt = self.answer.format
        if fmt == "json":
            try:
                value = extract_json(text)
            except ValueError:
                return self.drop("format.invalid_json", details=text[:120])
            if self.answer.required:
                if not isinstance(value, dict):
                    return self.drop("format.not_an_object", details=text[:120])
                missing = [k for k in self.answer.required if k not in value]
                if missing:
                    return self.drop("format.missing_field", details=",".join(missing))
        elif fmt == "choice" and text.lower().strip(" .\"'") not in self.choices:
            return self.drop("format.not_a_choice", details=text[:120])
        return self.ok


class NonEmptySpec(FilterSpec):
    name: Literal["nonempty"] = "nonempty"

    def build(self, answer: Any, context: Context) -> Filter:
        return NonEmpty()


class NotTruncatedSpec(FilterSpec):
    name: Literal["not_truncated"] = "not_truncated"

    def build(self, answer: Any, context: Context) -> Filter:
        return NotTruncated()


class FormatSpec(FilterSpec):
    name: Literal["format"] = "format"

    def build(self, answer: Any, context: Context) -> Filter:
        return AnswerFormatCheck(answer)


# --------------------------------------------------------------------------- length


class LengthSpec(FilterSpec):
    name: Literal["length"] = "length"
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(None, ge=1)
    min_words: int = Field(0, ge=0)
    max_words: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _order(self) -> LengthSpec:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError(f"max_words ({self.max_words}) is below min_words ({self.min_words})")
        return self

    def build(self, answer: Any, context: Context) -> Filter:
        return Length(self)


class Length(Filter):
    name = "length"

    def __init__(self, spec: LengthSpec):
        self.s = spec
        self.count_words = spec.min_words > 0 or spec.max_words is not None

    def check(self, row: Row, seed: Seed) -> Verdict:
        text = _text(row).strip()
        n, s = len(text), self.s
        if n < s.min_chars:
            return self.drop("length.too_short", details=f"{n} chars < {s.min_chars}")
        if s.max_chars is not None and n > s.max_chars:
            return self.drop("length.too_long", details=f"{n} chars > {s.max_chars}")
        if self.count_words:
            w = len(text.split())
            if w < s.min_words:
                return self.drop("length.too_short", details=f"{w} words < {s.min_words}")
            if s.max_words is not None and w > s.max_words:
                return self.drop("length.too_long", details=f"{w} words > {s.max_words}")
        return self.ok


# --------------------------------------------------------------------------- repetition


class RepetitionSpec(FilterSpec):
    """Degenerate loops: the share of word n-grams that repeat an earlier one, and of
    non-blank lines that repeat an earlier line (Gopher-style, simplified)."""

    name: Literal["repetition"] = "repetition"
    ngram: int = Field(3, ge=1, le=10)
    max_ngram_repeat: float = Field(0.3, gt=0.0, le=1.0, description="share of repeated n-grams")
    max_line_repeat: float = Field(0.3, gt=0.0, le=1.0, description="share of repeated lines")
    min_words: int = Field(12, ge=1, description="shorter answers are not judged")

    def build(self, answer: Any, context: Context) -> Filter:
        return Repetition(self)


class Repetition(Filter):
    name = "repetition"

    def __init__(self, spec: RepetitionSpec):
        self.s = spec

    def check(self, row: Row, seed: Seed) -> Verdict:
        text = _text(row)
        words = text.lower().split()
        n = self.s.ngram
        if len(words) < max(self.s.min_words, n):
            return self.ok
        distinct = len(set(zip(*(words[i:] for i in range(n))))) if n > 1 else len(set(words))
        repeat = 1.0 - distinct / (len(words) - n + 1)
        if repeat > self.s.max_ngram_repeat:
            return self.drop("repetition.ngrams", score=repeat,
                             details=f"{repeat:.0%} of {n}-grams repeat an earlier one")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()] if "\n" in text else ()
        if len(lines) >= 4:
            line_repeat = 1.0 - len(set(lines)) / len(lines)
            if line_repeat > self.s.max_line_repeat:
                return self.drop("repetition.lines", score=line_repeat,
                                 details=f"{line_repeat:.0%} of lines repeat an earlier one")
        return self.ok


# --------------------------------------------------------------------------- refusal


class RefusalSpec(FilterSpec):
    name: Literal["refusal"] = "refusal"
    pack: str = Field("refusal", pattern=r"^[a-z0-9_-]+$", description="filters/rules/<pack>.yaml")
    patterns: list[str] = Field(default_factory=list, description="extra regexes, case-insensitive")
    head_chars: int | None = Field(None, ge=1, description="search this many leading chars (pack default)")

    @model_validator(mode="after")
    def _compiles(self) -> RefusalSpec:
        for i, p in enumerate(self.patterns):
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"patterns[{i}] is not a valid regex: {exc}") from None
        return self

    def build(self, answer: Any, context: Context) -> Filter:
        return Refusal(self)


class Refusal(Filter):
    name = "refusal"

    def __init__(self, spec: RefusalSpec):
        pack = rule_pack(spec.pack)
        patterns = list(pack.get("patterns") or []) + spec.patterns
        if not patterns:
            raise FilterError(f"refusal: rule pack {spec.pack!r} has no patterns")
        # One alternation: a single regex scan per row, whatever the pack's size.
        self.regex = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
        self.head = spec.head_chars or int(pack.get("head_chars") or 400)
        # The pack's triggers: substrings every pack pattern needs. Most answers contain
        # none, and a substring test is far cheaper than the regex. Extra patterns from
        # the job file may need other words, so they turn the shortcut off.
        self.triggers = tuple(pack.get("triggers") or ()) if not spec.patterns else ()
        self.trigger_re = re.compile("|".join(map(re.escape, self.triggers)))

    def check(self, row: Row, seed: Seed) -> Verdict:
        head = _text(row)[: self.head].replace("\u2019", "'")  # typographic apostrophes: can’t
        if self.triggers:
            if not self.trigger_re.search(head.lower()):
                return self.ok
        m = self.regex.search(head)
        if m:
            return self.drop("refusal.detected", details=m.group(0)[:80])
        return self.ok


# --------------------------------------------------------------------------- language


class LanguageSpec(FilterSpec):
    """Is the answer in the expected language? A script share plus a stopword share (see
    ``filters/rules/language.yaml``): a heuristic, not a language identifier."""

    name: Literal["language"] = "language"
    expect: str = Field("en", pattern=r"^[a-z]{2,3}$")
    min_script_share: float = Field(0.8, ge=0.0, le=1.0, description="letters in the expected script")
    min_stopword_share: float = Field(0.08, ge=0.0, le=1.0, description="words that are stopwords")
    min_words: int = Field(8, ge=1, description="shorter answers only get the script check")

    def build(self, answer: Any, context: Context) -> Filter:
        return Language(self)


class Language(Filter):
    name = "language"

    def __init__(self, spec: LanguageSpec):
        pack = rule_pack("language")
        script = (pack.get("languages") or {}).get(spec.expect)
        if script is None:
            raise FilterError(f"language: {spec.expect!r} is not in filters/rules/language.yaml")
        self.s = spec
        self.in_script = re.compile(f"[{pack['scripts'][script]}]")
        self.letter = re.compile(r"[^\W\d_]")
        self.stopwords = frozenset((pack.get("stopwords") or {}).get(spec.expect) or ())
        self.latin = script == "latin"

    def check(self, row: Row, seed: Seed) -> Verdict:
        text = _text(row)
        if text.isascii() and self.latin:  # the common case, without a per-character regex
            share = 1.0
        else:
            letters = len(self.letter.findall(text))
            if not letters:
                return self.ok  # numbers/symbols only: nothing to judge
            share = len(self.in_script.findall(text)) / letters
        if share < self.s.min_script_share:
            return self.drop("language.wrong_script", score=share,
                             details=f"{share:.0%} of letters in the {self.s.expect} script")
        if self.stopwords:
            words = text.lower().split()
            if len(words) >= self.s.min_words:
                sw = sum(map(self.stopwords.__contains__, words)) / len(words)
                if sw < self.s.min_stopword_share:
                    return self.drop("language.unexpected", score=sw,
                                     details=f"{sw:.0%} {self.s.expect} stopwords")
        return self.ok


# --------------------------------------------------------------------------- template leaks


class TemplateLeakSpec(FilterSpec):
    name: Literal["template_leak"] = "template_leak"
    pack: str = Field("template_leak", pattern=r"^[a-z0-9_-]+$")
    markers: list[str] = Field(default_factory=list, description="extra substrings")

    def build(self, answer: Any, context: Context) -> Filter:
        return TemplateLeak(self)


class TemplateLeak(Filter):
    """Chat-template tokens, unrendered Jinja2, or the prompt echoed back as the answer."""

    name = "template_leak"

    def __init__(self, spec: TemplateLeakSpec):
        pack = rule_pack(spec.pack)
        markers = [re.escape(m) for m in list(pack.get("markers") or []) + spec.markers]
        self.regex = re.compile("|".join(markers + list(pack.get("patterns") or [])) or r"(?!)")
        self.echo = int(pack.get("echo_chars") or 0)

    def check(self, row: Row, seed: Seed) -> Verdict:
        text = _text(row)
        m = self.regex.search(text)
        if m:
            return self.drop("template.leak", details=m.group(0)[:80])
        if self.echo and len(text) >= self.echo:
            prompt = (row.get("messages") or [{}])[-1].get("content") or ""
            if len(prompt) >= self.echo and prompt[: self.echo] in text:
                return self.drop("template.prompt_echo", details=prompt[:60])
        return self.ok
