"""Math answers: extract the final answer from a worked solution and compare it with a
reference (from the seed row), numerically and symbolically.

Extraction, first that applies: the last ``\\boxed{...}`` (or ``\\fbox``), a GSM8K
``#### 42`` line, the last "the answer is ..." / "final answer: ...", the last number.
Markdown emphasis is removed first (``**18**``, ``__18__``, ``*18*``; not ``3**2``, a
power), and a phrase inside the phrase's answer is followed to its end ("Final Answer:
The final answer is 18." reads 18). The phrase's answer runs to the end of its sentence
or line; an ellipsis does not end it ("18 ... wait, 19" is not a number, so it is wrong).

Not covered: a retraction that starts a new sentence with no answer phrase ("The answer
is 18. Wait, it is 19." reads 18), and text after a ``\\boxed{}`` (the box wins).

Equality: both sides are normalised (LaTeX ``\\frac``, ``\\text{units}``, ``$``, ``\\%``,
thousands separators, trailing units, ``x = 5``), then compared as exact fractions
(``1/2 == 0.5 == 50%``; a percentage also matches its bare number, ``50% == 50``), with a
relative tolerance for long decimals, and a decimal the candidate rounded to two or more
places (``0.33`` for ``1/3``). What is not a number is compared with sympy when it is
installed (``2\\sqrt{2} == sqrt(8)``, ``x+1 == 1+x``), else as normalised text.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Literal

from pydantic import Field

from datagen.filters.base import Context, Filter, FilterSpec, Row, Seed, Verdict, require_field

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?|-?\.\d+%?")
# The answer after the phrase ends at a sentence's period (not an ellipsis's) or the line's end.
_ANSWER_IS = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*(.+?)"
                        r"(?:(?<!\.)\.(?!\.)\s|\.?$|\n)", re.IGNORECASE | re.MULTILINE)
# Markdown emphasis: a pair of markers around non-space text, not inside a word (3**2 is a power).
_EMPHASIS = (re.compile(r"(?<!\w)(\*\*|__)(?=\S)(.+?)(?<=\S)\1(?!\w)"),
             re.compile(r"(?<![\w*])\*(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*(?![\w*])"))
_HASHES = re.compile(r"####\s*(.+)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_TRAILING_WORDS = re.compile(r"(?<=[\d%.])\s+(?:[A-Za-z]{2,}\.?\s*)+$")


def _braced(text: str, start: int) -> str | None:
    """The content of the ``{...}`` group opening at ``text[start]``, braces balanced."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def strip_emphasis(text: str) -> str:
    """``text`` without markdown bold and italics markers."""
    text = _EMPHASIS[0].sub(r"\2", text)
    return _EMPHASIS[1].sub(r"\1", text)


def _after_phrase(text: str) -> str | None:
    """What follows the last answer phrase, followed into a phrase nested in it."""
    m = None
    for m in _ANSWER_IS.finditer(text):
        pass
    if not m or not m.group(1).strip():
        return None
    got = m.group(1).strip()
    return _after_phrase(got) or got


def extract_answer(text: str) -> str | None:
    """The final answer in a worked solution, or None when there is none."""
    text = strip_emphasis(text)
    for macro in ("\\boxed", "\\fbox"):
        i = text.rfind(macro + "{")
        if i >= 0:
            inner = _braced(text, i + len(macro))
            if inner is not None and inner.strip():
                return inner.strip()
    m = None
    for m in _HASHES.finditer(text):
        pass
    if m:
        return _after_phrase(m.group(1)) or m.group(1).strip()
    got = _after_phrase(text)
    if got:
        return got
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _replace_frac(s: str) -> str:
    while True:
        i = s.find("\\frac")
        if i < 0:
            return s
        j = i + len("\\frac")
        if j < len(s) and s[j] == "{":
            num = _braced(s, j)
            k = j + len(num or "") + 2
            den = _braced(s, k) if num is not None and k < len(s) and s[k] == "{" else None
            if num is None or den is None:
                return s
            s = f"{s[:i]}({num})/({den}){s[k + len(den) + 2:]}"
        elif j + 1 < len(s) and s[j : j + 2].isdigit():  # \frac12
            s = f"{s[:i]}{s[j]}/{s[j + 1]}{s[j + 2:]}"
        else:
            return s


def normalize(ans: str) -> str:
    s = ans.strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{[^{}]*\}", " ", s)  # units and words in LaTeX
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _replace_frac(s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", " "),
                 ("\\%", "%"), ("\\$", "$"), ("^\\circ", ""), ("^{\\circ}", ""), ("°", ""),
                 ("\\cdot", "*"), ("\\times", "*"), ("\\pi", "pi"), ("\\infty", "oo")):
        s = s.replace(a, b)
    s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("$", "").strip()
    if s.count("=") == 1:  # "x = 5" -> "5"
        s = s.split("=")[1].strip()
    s = _TRAILING_WORDS.sub("", s).strip()  # "18 dollars", "5 cm"
    s = s.rstrip(".").strip()
    if re.fullmatch(r"\(?[A-Ea-e]\)?", s):  # a multiple-choice letter
        s = s.strip("()").upper()
    return s


def to_number(s: str) -> tuple[Fraction, bool] | None:
    """``(value, was_percent)`` for a plain number, fraction, decimal or percentage."""
    t = s.replace(" ", "")
    percent = t.endswith("%")
    t = t.rstrip("%")
    if _THOUSANDS.match(t):
        t = t.replace(",", "")
    t = re.sub(r"^\((-?[\d.]+)\)/\((-?[\d.]+)\)$", r"\1/\2", t)  # "(1)/(2)" from \frac
    try:
        if "/" in t:
            num, den = t.split("/")
            value = Fraction(num) / Fraction(den)
        else:
            value = Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None
    return (value / 100 if percent else value), percent


def _decimals(s: str) -> int:
    m = re.search(r"\.(\d+)%?$", s.strip())
    return len(m.group(1)) if m else 0


def numbers_equal(cand: str, ref: str, *, rel_tol: float = 1e-6) -> bool | None:
    """True/False when both are numbers; None when either is not."""
    c, r = to_number(cand), to_number(ref)
    if c is None or r is None:
        return None
    cs = {c[0]} | ({c[0] * 100} if c[1] else set())
    rs = {r[0]} | ({r[0] * 100} if r[1] else set())
    for cv in cs:
        for rv in rs:
            if cv == rv or abs(cv - rv) <= rel_tol * max(1, abs(rv)):
                return True
            d = _decimals(cand)
            if d >= 2 and round(float(rv), d) == round(float(cv), d) and not c[1]:
                return True  # the candidate rounded: 0.33 for 1/3
    return False


_SAFE_EXPR = re.compile(r"^[0-9a-zA-Z+\-*/^().,\s]{1,80}$")
_NAMES = re.compile(r"[A-Za-z]+")


def symbols_equal(cand: str, ref: str) -> bool | None:
    """Symbolic equality with sympy (if installed), on a strict whitelist of inputs:
    sympy's parser evaluates Python, and the candidate is teacher-written text."""
    try:
        import sympy
        from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                                parse_expr, standard_transformations)
    except ImportError:
        return None
    exprs = []
    for s in (cand, ref):
        if not _SAFE_EXPR.match(s) or re.search(r"(\^|\*\*)\s*\(?\s*\d{3,}", s) or len(re.findall(r"\^|\*\*", s)) > 2:
            return None
        if any(len(n) > 1 and n not in ("pi", "sqrt", "oo") for n in _NAMES.findall(s)):
            return None
        try:
            exprs.append(parse_expr(s, local_dict={"pi": sympy.pi, "sqrt": sympy.sqrt, "e": sympy.E},
                                    transformations=standard_transformations
                                    + (implicit_multiplication_application, convert_xor)))
        except Exception:  # noqa: BLE001 -- unparseable text is "not symbolic", not an error
            return None
    try:
        return bool(sympy.simplify(exprs[0] - exprs[1]) == 0)
    except Exception:  # noqa: BLE001
        return None


def answers_equal(cand: str, ref: str, *, rel_tol: float = 1e-6) -> bool:
    c, r = normalize(cand), normalize(ref)
    eq = numbers_equal(c, r, rel_tol=rel_tol)
    if eq is not None:
        return eq
    if c.replace(" ", "").lower() == r.replace(" ", "").lower():
        return True
    return bool(symbols_equal(c, r))


def reference_answer(value: Any) -> str:
    """A seed's reference: a bare answer, or a worked solution (GSM8K's ``#### 42``)."""
    text = str(value)
    if "####" in text or "\\boxed" in text:
        return extract_answer(text) or text
    return text.strip()


class MathSpec(FilterSpec):
    name: Literal["math"] = "math"
    answer_field: str = Field("answer", min_length=1, description="the seed field holding the reference")
    rel_tol: float = Field(1e-6, ge=0.0, le=0.1)

    def build(self, answer: Any, context: Context) -> Filter:
        return MathAnswer(self)


class MathAnswer(Filter):
    name = "math"

    def __init__(self, spec: MathSpec):
        self.s = spec

    def check_seeds(self, seeds, *, id_field: str) -> None:
        require_field(seeds, self.s.answer_field, id_field=id_field, filter_name="math")

    def check(self, row: Row, seed: Seed) -> Verdict:
        ref = reference_answer((seed or {}).get(self.s.answer_field, ""))
        got = extract_answer(row.get("response") or "")
        if got is None:
            return self.drop("math.no_answer", score=0.0)
        if answers_equal(got, ref, rel_tol=self.s.rel_tol):
            return self.keep(score=1.0, details=f"answer {got[:60]}")
        return self.drop("math.wrong_answer", score=0.0, details=f"got {got[:60]!r}, expected {ref[:60]!r}")
