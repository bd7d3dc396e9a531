"""``router.json`` and the one call a serving stack makes: ``decide(answer)``.

    from datagen.route.router import load
    router = load("router.json", student=Identity(name="s1", model="org/student", revision="abc"))
    router.decide({"token_logprobs": [...], "top_logprobs": [[...], ...]})  # "student" | "teacher"

The file holds the signal, the threshold (escalate when the score is below it), the
learned combination's coefficients when the signal is ``learned`` (a logistic regression
on standardised signals, evaluated here with ``math.exp``: scikit-learn is needed to fit
it, not to use it), what the calibration expects (teacher share, quality, loss, cost
saving, with bootstrap intervals), the student and teacher identities and the eval
data's hash, and the student's tokenizer fingerprint. A log-prob signal (mean / low
log-prob, entropy, or a learned router over one) is a number over the student's own
tokens: an answer that says it was tokenized otherwise (``tokenizer_fingerprint``) is
refused in one line rather than scored against a threshold it was not calibrated for.
Answers that carry no fingerprint are trusted (a serving stack may not know it).

Import-light: pydantic, numpy (through ``signals``) and the standard library; no torch,
ray, vllm or scikit-learn (tested in a subprocess). ``check`` is the drift check: the
escalation share on a new sample of traffic against the calibrated interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from datagen.errors import ConfigError, DatagenError
from datagen.route import signals as sig
from datagen.validation import Strict, format_validation_error

FORMAT = "datagen.router/1"
LEARNED = "learned"


class Identity(Strict):
    """Who answered: compared field by field when a router is loaded for a student."""

    name: str
    model: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.name!r} ({self.model}{'@' + self.revision if self.revision else ''})"


class LearnedModel(Strict):
    """P(the student is at least as good as the teacher) = sigmoid(intercept + sum coef_i * z_i),
    z_i = (oriented signal_i - mean_i) / scale_i."""

    features: list[str] = Field(min_length=1)
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float

    @model_validator(mode="after")
    def _shapes(self) -> LearnedModel:
        if not len(self.features) == len(self.mean) == len(self.scale) == len(self.coef):
            raise ValueError("learned: features, mean, scale and coef must have one entry each")
        unknown = [f for f in self.features if f not in sig.ORIENTATION]
        if unknown:
            raise ValueError(f"learned: unknown signal {unknown[0]!r}")
        return self

    def prob(self, values: Mapping[str, float | None]) -> float:
        z = self.intercept
        for f, m, s, c in zip(self.features, self.mean, self.scale, self.coef):
            v = sig.score(values, f)
            if v is None:
                raise DatagenError(f"the answer has no {f} signal, which the learned router needs")
            z += c * (v - m) / s
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class Interval(Strict):
    value: float
    low: float
    high: float


class Expected(Strict):
    """What the calibration promises on the test split (bootstrap intervals)."""

    teacher_share: Interval
    quality: Interval
    quality_loss: Interval
    cost_saving: Interval | None = None


class Data(Strict):
    eval_sha256: str
    calibration_rows: int = Field(ge=1)
    test_rows: int = Field(ge=1)


class Router(Strict):
    format: Literal["datagen.router/1"] = FORMAT
    signal: str
    threshold: float
    learned: LearnedModel | None = None
    low_quantile: float = Field(sig.LOW_QUANTILE, gt=0, lt=1)
    entropy_tail: Literal["bucket", "renormalize"] = "bucket"
    tolerance: float = Field(ge=0, lt=1)
    expected: Expected
    student: Identity
    teacher: Identity
    student_tokenizer: str | None = Field(None, description="the calibrated student's tokenizer fingerprint")
    data: Data

    @model_validator(mode="after")
    def _signal(self) -> Router:
        if self.signal != LEARNED and self.signal not in sig.ORIENTATION:
            raise ValueError(f"signal: unknown {self.signal!r} (known: {', '.join((*sig.SIGNALS, LEARNED))})")
        if (self.signal == LEARNED) != (self.learned is not None):
            raise ValueError("learned: set exactly when signal is learned")
        return self

    @property
    def reads_tokens(self) -> bool:
        """Whether the score is over the student's tokens (a log-prob signal)."""
        used = self.learned.features if self.learned is not None else [self.signal]
        return bool(sig.TOKEN_SIGNALS & set(used))

    def tokenizer_mismatch(self, answer: Mapping[str, Any]) -> str | None:
        """Why this router cannot score ``answer`` (tokenized by another tokenizer), or None."""
        fp = answer.get("tokenizer_fingerprint")
        if fp is None or self.student_tokenizer is None or fp == self.student_tokenizer or not self.reads_tokens:
            return None
        return (f"the answer was tokenized by {str(fp)[:12]}, but this router's {self.signal} threshold was "
                f"calibrated on log-probs over the student's tokenizer {self.student_tokenizer[:12]}: log-probs "
                "over other tokens are not comparable; calibrate a router for this student (datagen route report)")

    def score(self, answer: Mapping[str, Any]) -> float:
        """The answer's confidence score (higher: keep with the student)."""
        if (why := self.tokenizer_mismatch(answer)) is not None:
            raise DatagenError(why)
        values = answer.get("signals") or sig.signals(answer, q=self.low_quantile, tail=self.entropy_tail)
        if self.learned is not None:
            return self.learned.prob(values)
        v = sig.score(values, self.signal)
        if v is None:
            raise DatagenError(f"the answer has no {self.signal} signal, which this router needs")
        return v

    def decide(self, answer: Mapping[str, Any]) -> Literal["student", "teacher"]:
        return "teacher" if self.score(answer) < self.threshold else "student"


def write(path: str | Path, router: Router) -> None:
    from datagen.storage.shards import atomic_write_text

    atomic_write_text(Path(path), router.model_dump_json(indent=1))


def load(path: str | Path, *, student: Identity | None = None) -> Router:
    """Read and validate ``router.json``; refused (one line) when ``student`` is given and
    the file was calibrated for another one."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read a router file ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a datagen router file (format {FORMAT!r})")
    try:
        router = Router.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where=str(path))) from None
    if student is not None and student != router.student:
        raise ConfigError(f"{path}: calibrated for student {router.student}, not {student}: "
                          "calibrate a router for this student (datagen route report)")
    return router


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95% by default)."""
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def check(router: Router, answers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The escalation share on new traffic against the calibrated interval. ``drift`` is
    true when the traffic's own 95% (Wilson) interval and the calibrated one do not
    overlap, so a small sample does not cry drift on noise alone."""
    if not answers:
        raise DatagenError("traffic: no answers to check")
    for a in answers:
        who = a.get("student")
        if who is not None and Identity.model_validate(who) != router.student:
            raise DatagenError(f"traffic: answers from student {Identity.model_validate(who)}, but the router "
                               f"was calibrated for {router.student}")
    other = [i for i, a in enumerate(answers) if router.tokenizer_mismatch(a)]
    if other:
        raise DatagenError(f"traffic: {len(other)} of {len(answers)} answers (first: #{other[0] + 1}): "
                           + router.tokenizer_mismatch(answers[other[0]]))
    k = sum(router.decide(a) == "teacher" for a in answers)
    low, high = wilson(k, len(answers))
    cal = router.expected.teacher_share
    drift = high < cal.low or low > cal.high
    line = (f"escalation share {k / len(answers):.1%} on {len(answers)} answers (95% {low:.1%}..{high:.1%}); "
            f"calibrated {cal.value:.1%} ({cal.low:.1%}..{cal.high:.1%}): "
            + ("DRIFT: recalibrate" if drift else "within"))
    return {"rows": len(answers), "escalated": k, "share": k / len(answers), "interval": [low, high],
            "calibrated": cal.model_dump(), "drift": drift, "line": line}
