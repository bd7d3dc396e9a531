"""How good a router is: quality against the share of traffic sent to the teacher.

Inputs are per-row arrays: ``q_s`` (the student's quality on the row, in [0, 1]), ``q_t``
(the teacher's), ``score`` (the router's confidence in the student: higher = keep). A
threshold router escalates a row to the teacher when ``score < threshold``.

Definitions (RouteLLM, Ong et al. 2024, arXiv 2406.18665; "weak" = the student, "strong" =
the teacher, ``x`` = the share of rows sent to the teacher, in [0, 1]):

- ``q(x)``: mean quality when the rows below the threshold go to the teacher and the rest
  stay with the student: ``q(x) = mean(q_s) + sum(q_t - q_s over escalated rows) / n``.
- ``PGR(x) = (q(x) - q_weak) / (q_strong - q_weak)``, ``q_weak = mean(q_s)``,
  ``q_strong = mean(q_t)``: the share of the quality gap recovered.
- ``APGR = integral_0^1 PGR(x) dx = (AUC(q) - q_weak) / (q_strong - q_weak)``, the area
  under the quality curve normalised by the all-student and all-teacher areas, as in
  RouteLLM's ``evals/evaluate.py`` (trapezoids over the evaluated thresholds).
- ``CPT(p)``: the smallest share of calls to the teacher at which ``PGR(x) >= p``.

Discretisation. RouteLLM evaluates 11 thresholds (10 quantile bins of the score); here
every distinct score is a threshold, so the curve's points are the tie-block boundaries:
``x = k / n`` where the k lowest-scoring rows are exactly the rows below some threshold.
**Ties**: rows with equal scores are never split -- no threshold separates them -- and
between two points the curve is the straight line, which is the expected quality when
a tie block is split at random. So a router whose scores are all equal has exactly the
random router's curve (PGR(x) = x, APGR = 0.5), whatever the row order. APGR is the
trapezoid area of that piecewise-linear curve (exact for it); CPT interpolates on it
(RouteLLM ``np.interp``s the inverse, which is the same where the curve rises).

Curves that are not monotone. Where the student is better than the teacher on some rows
(``q_s > q_t``), escalating them lowers quality: ``q(x)`` may fall, PGR may be negative
or above 1 on the way, and nothing is clipped. CPT is the *first* share that reaches
``p``. The oracle (below) escalates only rows where the teacher is better, so it can end
above ``q_strong`` (PGR > 1). PGR, APGR and CPT are undefined (``Metric.value`` None, with
a reason) when ``q_strong <= q_weak``: there is no gap to recover.

The random router: ``q(x) = (1 - x) q_weak + x q_strong`` (its expected value, analytic).
The oracle: it knows ``q_t - q_s`` per row and, for a budget of ``x n`` calls, escalates
the rows with the largest positive gain, never one where the teacher is not better (as
RouteLLM's ``get_optimal_accuracy``); a fractional budget is linearly interpolated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from datagen.errors import DatagenError, MissingExtra

EPS = 1e-12


def need_sklearn(why: str) -> None:
    """scikit-learn is an extra (``route``): say so in one line when it is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise MissingExtra("scikit-learn", "route", why) from None


@dataclass(frozen=True)
class Metric:
    """A number, or None with the reason it is undefined."""

    value: float | None
    reason: str | None = None

    def to_json(self) -> float | dict[str, str] | None:
        return self.value if self.value is not None else {"undefined": self.reason or "undefined"}


@dataclass(frozen=True)
class Curve:
    """Quality against the teacher share, as points of a piecewise-linear curve.
    ``threshold[i]``: escalate ``score < threshold[i]`` to get ``share[i]`` (None for the
    oracle, which has no threshold)."""

    share: np.ndarray
    quality: np.ndarray
    threshold: np.ndarray | None = None

    def at(self, x: float) -> float:
        return float(np.interp(x, self.share, self.quality))

    def to_json(self) -> dict[str, list[float]]:
        out = {"share": self.share.tolist(), "quality": self.quality.tolist()}
        if self.threshold is not None:
            out["threshold"] = self.threshold.tolist()
        return out


def arrays(q_s: Sequence[float], q_t: Sequence[float], score: Sequence[float] | None = None
           ) -> tuple[np.ndarray, ...]:
    """Checked float64 arrays: the same length, at least one row, finite, qualities in [0, 1]."""
    out = [np.asarray(a, dtype=np.float64) for a in (q_s, q_t, score) if a is not None]
    if len({a.shape for a in out}) != 1 or out[0].ndim != 1 or not out[0].size:
        raise DatagenError(f"routing metrics need 1-D arrays of one length, at least one row "
                           f"(got shapes {[a.shape for a in out]})")
    for name, a in zip(("student quality", "teacher quality", "router score"), out):
        if not np.isfinite(a).all():
            raise DatagenError(f"{name}: {int((~np.isfinite(a)).sum())} rows are NaN or infinite")
        if name != "router score" and ((a < 0) | (a > 1)).any():
            raise DatagenError(f"{name}: values must be in [0, 1] (got {a.min():g} .. {a.max():g})")
    return tuple(out)


def routing_curve(q_s: Sequence[float], q_t: Sequence[float], score: Sequence[float]) -> Curve:
    """The threshold router's curve: lowest scores escalate first, ties never split."""
    q_s, q_t, score = arrays(q_s, q_t, score)
    n = len(score)
    order = np.argsort(score, kind="stable")
    s = score[order]
    gain = np.concatenate([[0.0], np.cumsum((q_t - q_s)[order])])
    k = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1], [True]]))  # block boundaries 0..n
    thresholds = []
    for i in k:
        if i == 0:
            thresholds.append(s[0])  # nothing is below the lowest score
        elif i == n:
            thresholds.append(np.nextafter(s[-1], np.inf))
        else:
            mid = s[i - 1] + (s[i] - s[i - 1]) / 2
            thresholds.append(mid if s[i - 1] < mid <= s[i] else s[i])
    return Curve(share=k / n, quality=q_s.mean() + gain[k] / n, threshold=np.asarray(thresholds))


def random_curve(q_s: Sequence[float], q_t: Sequence[float]) -> Curve:
    q_s, q_t = arrays(q_s, q_t)
    return Curve(share=np.array([0.0, 1.0]), quality=np.array([q_s.mean(), q_t.mean()]))


def oracle_curve(q_s: Sequence[float], q_t: Sequence[float]) -> Curve:
    """Best quality for a budget of ``k`` teacher calls, k = 0..n: positive gains, largest first."""
    q_s, q_t = arrays(q_s, q_t)
    n = len(q_s)
    gain = np.sort((q_t - q_s)[q_t > q_s])[::-1]
    cum = np.concatenate([[0.0], np.cumsum(gain)])
    k = np.arange(n + 1)
    return Curve(share=k / n, quality=q_s.mean() + cum[np.minimum(k, len(gain))] / n)


def gap(q_weak: float, q_strong: float) -> Metric:
    """``q_strong - q_weak``, or None with the reason PGR is undefined."""
    if abs(q_strong - q_weak) <= EPS:
        return Metric(None, f"teacher and student score the same ({q_weak:.4g}): PGR is undefined")
    if q_strong < q_weak:
        return Metric(None, f"the student ({q_weak:.4g}) beats the teacher ({q_strong:.4g}) on these rows: "
                            "no gap to recover, PGR is undefined")
    return Metric(q_strong - q_weak)


def pgr(curve: Curve, q_weak: float, q_strong: float, x: float) -> Metric:
    g = gap(q_weak, q_strong)
    return g if g.value is None else Metric((curve.at(x) - q_weak) / g.value)


def apgr(curve: Curve, q_weak: float, q_strong: float) -> Metric:
    g = gap(q_weak, q_strong)
    if g.value is None:
        return g
    return Metric((float(np.trapezoid(curve.quality, curve.share)) - q_weak) / g.value)


def cpt(curve: Curve, q_weak: float, q_strong: float, p: float) -> Metric:
    """Smallest teacher share whose PGR reaches ``p`` (0 < p <= 1), interpolated on the curve."""
    if not 0 < p <= 1:
        raise DatagenError(f"CPT needs a PGR target in (0, 1] (got {p})")
    g = gap(q_weak, q_strong)
    if g.value is None:
        return g
    pg = (curve.quality - q_weak) / g.value
    hit = np.flatnonzero(pg >= p - EPS)
    if not hit.size:  # cannot happen on a full curve (PGR(1) = 1); kept for partial ones
        return Metric(None, f"PGR never reaches {p:.0%}")
    i = int(hit[0])
    if i == 0:
        return Metric(float(curve.share[0]))
    x0, x1, y0, y1 = curve.share[i - 1], curve.share[i], pg[i - 1], pg[i]
    return Metric(float(x0 + (p - y0) / (y1 - y0) * (x1 - x0)))


def summary(curve: Curve, q_weak: float, q_strong: float) -> dict[str, Any]:
    """PGR at 20/50/80% teacher share, APGR, CPT(50%), CPT(80%) as JSON values."""
    return {
        **{f"pgr@{int(x * 100)}%": pgr(curve, q_weak, q_strong, x).to_json() for x in (0.2, 0.5, 0.8)},
        "apgr": apgr(curve, q_weak, q_strong).to_json(),
        "cpt50": cpt(curve, q_weak, q_strong, 0.5).to_json(),
        "cpt80": cpt(curve, q_weak, q_strong, 0.8).to_json(),
    }


# ------------------------------------------------------------------ the operating point


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    share: float  # on the rows it was chosen on
    quality: float
    loss: float  # relative to all-teacher: (q_strong - q) / q_strong


def relative_loss(quality: float, q_strong: float) -> float:
    """Quality lost against all-teacher, as a fraction of all-teacher quality (absolute if 0)."""
    return (q_strong - quality) / q_strong if q_strong > 0 else q_strong - quality


def operating_point(curve: Curve, q_strong: float, tolerance: float) -> OperatingPoint:
    """The curve point with the smallest teacher share (the largest student share) whose
    relative quality loss against all-teacher is at most ``tolerance``. Always exists:
    all-teacher loses nothing."""
    if curve.threshold is None:
        raise DatagenError("an operating point needs a threshold router's curve")
    if not 0 <= tolerance < 1:
        raise DatagenError(f"tolerance must be in [0, 1) (got {tolerance})")
    loss = np.array([relative_loss(q, q_strong) for q in curve.quality])
    i = int(np.flatnonzero(loss <= tolerance + EPS)[0])
    return OperatingPoint(float(curve.threshold[i]), float(curve.share[i]), float(curve.quality[i]),
                          float(loss[i]))


def bootstrap(stat: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000, level: float = 0.95,
              seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(row indices)`` over ``n`` rows resampled with
    replacement; the same ``seed`` gives the same interval."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)])
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ------------------------------------------------------------- does a score predict failure


def auroc(failed: Sequence[bool], score: Sequence[float]) -> Metric:
    """AUROC of low confidence (``-score``) for failure (1.0: every failure scores below
    every success; 0.5: no better than chance)."""
    failed = np.asarray(failed, dtype=bool)
    if failed.all() or not failed.any():
        return Metric(None, f"{'every' if failed.all() else 'no'} row is a failure: AUROC is undefined")
    need_sklearn("AUROC")
    from sklearn.metrics import roc_auc_score

    return Metric(float(roc_auc_score(failed, -np.asarray(score, dtype=np.float64))))


def reliability(ok: Sequence[bool], score: Sequence[float], bins: int = 10,
                right: Sequence[bool] | None = None) -> list[dict[str, Any]]:
    """Rows in score-quantile bins (equal scores share a bin): per bin the score range and
    mean, the share of rows where the student was fine (``ok``) and, given ``right``, the
    share it got right (``right_rate``). For a probability score (the learned router)
    ``mean_score`` against ``ok_rate`` is its calibration."""
    ok, score = np.asarray(ok, dtype=bool), np.asarray(score, dtype=np.float64)
    edges = np.unique(np.quantile(score, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, max(len(edges) - 2, 0))
    table = []
    for b in np.unique(which):
        m = which == b
        table.append({"rows": int(m.sum()), "score_min": float(score[m].min()), "score_max": float(score[m].max()),
                      "mean_score": float(score[m].mean()), "ok_rate": float(ok[m].mean()),
                      **({} if right is None else {"right_rate": float(np.asarray(right, dtype=bool)[m].mean())})})
    return table
