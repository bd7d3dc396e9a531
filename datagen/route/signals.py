"""Confidence signals from a student's own answer: what a router can read without the teacher.

Every signal is oriented so that **higher means more confident** (``score``), and a row
escalates to the teacher when its score is below the router's threshold.

``mean_logprob``
    Mean of the sampled tokens' log-probs.
``low_logprob``
    A low quantile (``LOW_QUANTILE``, p10) of the sampled tokens' log-probs, with numpy's
    ``method="lower"``: the value of an actual token (the ``floor((n - 1) q)``-th smallest),
    so one very unsure token in a short answer shows, and no interpolation invents a value.
``mean_entropy``
    Mean over positions of the entropy (nats) of the top-k distribution. Only the top-k
    log-probs are known, so the tail is handled as in KD (``train/losses.py``):
    ``bucket`` (default) counts the mass outside the top-k, ``1 - sum(p)``, as one more
    outcome: the exact entropy of the coarsened distribution, a lower bound on the full one;
    ``renormalize`` spreads it over the top-k in proportion. Quantised log-probs can sum a
    little over 1; the tail is then taken as 0. Its score is ``-mean_entropy``.
``format_valid``
    1.0 when every verdict of a check function (``filters.base.Verdict``, a dict with
    ``keep``, or a plain bool) keeps the answer, else 0.0.
``agreement``
    The share of n samples whose answer key equals the routed answer's key (an answer with
    no key -- nothing extractable -- agrees with nothing). ``key`` defaults to
    whitespace- and case-folded text; pass ``filters.consistency.answer_key`` with a mode
    for math or JSON answers.

An answer is a dict. Log-probs come as plain floats (``token_logprobs``: one per token;
``top_logprobs``: one list per position, any order) as a serving stack has them, or as
the record schema stores them (``token_logprobs_q``, ``top_logprobs_q``: the codes of
``records.quantize_logprobs`` / ``encode_top``, decoded with ``records``; only then is
``datagen.records`` -- and pyarrow -- imported).

Pure functions over numpy; nothing here imports torch, ray or vllm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from datagen.errors import DatagenError

LOW_QUANTILE = 0.1
TAILS = ("bucket", "renormalize")
# signal -> sign that makes it "higher = more confident"
ORIENTATION = {"mean_logprob": 1.0, "low_logprob": 1.0, "mean_entropy": -1.0, "format_valid": 1.0, "agreement": 1.0}
SIGNALS = tuple(ORIENTATION)
# Signals read from the student's log-probs: over its own tokens, so a threshold holds only
# for answers tokenized as in calibration (``router.Router.student_tokenizer``).
TOKEN_SIGNALS = frozenset({"mean_logprob", "low_logprob", "mean_entropy"})


def token_logprobs(answer: Mapping[str, Any]) -> np.ndarray | None:
    """The sampled tokens' log-probs as float64, from floats or stored codes; None if absent."""
    if answer.get("token_logprobs") is not None:
        return np.asarray(answer["token_logprobs"], dtype=np.float64)
    if answer.get("token_logprobs_q") is not None:
        from datagen.records import dequantize_logprobs

        return dequantize_logprobs(answer["token_logprobs_q"]).astype(np.float64)
    return None


def top_logprobs(answer: Mapping[str, Any]) -> list[np.ndarray] | None:
    """The top-k log-probs per position (one array each), from floats or stored codes."""
    if answer.get("top_logprobs") is not None:
        return [np.asarray(p, dtype=np.float64) for p in answer["top_logprobs"]]
    if answer.get("top_logprobs_q") is not None:
        from datagen.records import decode_top

        return [np.asarray(p, dtype=np.float64) for p in decode_top(answer["top_logprobs_q"])]
    return None


def mean_logprob(lps: Sequence[float] | np.ndarray) -> float | None:
    a = np.asarray(lps, dtype=np.float64)
    return float(a.mean()) if a.size else None


def low_logprob(lps: Sequence[float] | np.ndarray, q: float = LOW_QUANTILE) -> float | None:
    a = np.asarray(lps, dtype=np.float64)
    return float(np.quantile(a, q, method="lower")) if a.size else None


def position_entropy(top: Sequence[float] | np.ndarray, tail: str = "bucket") -> float:
    """Entropy (nats) of one position's top-k log-probs, the tail handled as ``tail`` says."""
    if tail not in TAILS:
        raise DatagenError(f"entropy tail must be one of {', '.join(TAILS)} (got {tail!r})")
    p = np.exp(np.asarray(top, dtype=np.float64))
    p = p[p > 0]
    if tail == "renormalize":
        p = p / p.sum()
        return float(-(p * np.log(p)).sum())
    rest = max(0.0, 1.0 - float(p.sum()))
    h = float(-(p * np.log(p)).sum())
    return h - rest * np.log(rest) if rest > 0 else h


def mean_entropy(tops: Iterable[Sequence[float]], tail: str = "bucket") -> float | None:
    hs = [position_entropy(t, tail) for t in tops if len(t)]
    return float(np.mean(hs)) if hs else None


def format_valid(verdict: Any) -> float:
    """1.0 if the verdict (or every verdict of a list) keeps the answer, else 0.0."""
    verdicts = verdict if isinstance(verdict, (list, tuple)) else [verdict]
    keeps = [v if isinstance(v, bool) else v["keep"] if isinstance(v, Mapping) else v.keep for v in verdicts]
    return float(all(keeps))


def fold(text: str | None) -> str | None:
    """The default answer key: whitespace- and case-folded text; None when empty."""
    words = " ".join((text or "").lower().split())
    return words or None


def agreement(answer: str | None, samples: Sequence[str | None], key: Callable[[str], Any] = fold) -> float | None:
    """Share of ``samples`` whose key equals ``answer``'s; None with no samples."""
    if not samples:
        return None
    mine = key(answer or "")
    if mine is None:
        return 0.0
    return sum(key(s or "") == mine for s in samples) / len(samples)


def signals(answer: Mapping[str, Any], *, q: float = LOW_QUANTILE, tail: str = "bucket",
            key: Callable[[str], Any] = fold) -> dict[str, float | None]:
    """Every signal the answer has the inputs for (None where it has not).

    ``answer`` keys: log-probs as above; ``verdicts`` (or ``format_ok``) for
    ``format_valid``; ``response`` and ``samples`` (other answers to the same prompt) for
    ``agreement``."""
    lps = token_logprobs(answer)
    tops = top_logprobs(answer)
    checks = answer.get("verdicts", answer.get("format_ok"))
    return {
        "mean_logprob": None if lps is None else mean_logprob(lps),
        "low_logprob": None if lps is None else low_logprob(lps, q),
        "mean_entropy": None if tops is None else mean_entropy(tops, tail),
        "format_valid": None if checks is None else format_valid(checks),
        "agreement": agreement(answer.get("response"), answer.get("samples") or [], key),
    }


def score(values: Mapping[str, float | None], signal: str) -> float | None:
    """A signal's value, oriented so that higher means more confident."""
    if signal not in ORIENTATION:
        raise DatagenError(f"unknown signal {signal!r} (known: {', '.join(SIGNALS)})")
    v = values.get(signal)
    return None if v is None else ORIENTATION[signal] * float(v)
