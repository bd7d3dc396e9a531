"""The routing report: for each router, quality against the share of traffic sent to the
teacher, the operating point, what it costs, which inputs need the teacher.

An eval row (JSONL or Parquet, one per prompt) holds:

- ``id``; ``q_student``, ``q_teacher`` in [0, 1] (a verifier's pass, a judge's grade);
- ``signals`` (``signals.SIGNALS`` -> value), or ``answer`` (the student's answer with
  log-probs, samples, verdicts) to compute them from;
- ``student``, ``teacher``: identities (``router.Identity``), the same on every row;
  ``student_tokenizer`` (optional, the same on every row): written into ``router.json``;
- optional ``split`` (``calibration`` / ``test``; else a seeded hash of ``id`` decides);
- for slices: ``axes`` ({name: value}), ``prompt_tokens``, ``seed_source``,
  ``cluster_size`` (rows in the prompt's dedupe cluster);
- for costs: ``prompt_tokens``, ``teacher_completion_tokens`` or ``teacher_gpu_seconds``,
  ``student_seconds`` (see ``costs.py``).

Each router's ``curve`` (teacher share, quality, threshold per point) comes with its
``cost_curve`` when a cost model is given: the cascade's USD per 1,000 queries at each
point, from the rows' own costs.

Which rows say what. Curves, PGR / APGR / CPT, AUROC and the reliability table are on the
**test** split (the learned router is fit on the calibration split). Each router's
threshold is chosen on the **calibration** split (``metrics.operating_point``) and
reported on the test split with percentile-bootstrap intervals (fixed seed). The router
written to ``router.json`` is the one whose calibration operating point keeps the most
rows with the student (ties: the first in ``signals.SIGNALS`` order, then ``learned``).
The slice table and the worst confident-but-wrong rows use every row, at that router's
threshold. A slice is flagged when its routed quality is below the quality floor
(default: all-teacher quality x (1 - tolerance)).

Two kinds of failure, both counted on the test split (``failures``): the student is
**worse** than the teacher (``q_student < q_teacher``: what escalating could fix; the
learned router, ``auroc``, the reliability table's ``ok_rate`` and the worst rows read
this one) and the student is **wrong** (``q_student < 1``, not full credit: ``auroc_wrong``
and ``right_rate``). They part when the teacher is often wrong too: then a score can rank
the student's own mistakes well (``auroc_wrong``) and still not find the few rows where
the teacher does better (``auroc``, over few failures).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from datagen.errors import DatagenError
from datagen.route import costs, learned, metrics, signals
from datagen.route.router import LEARNED, Data, Expected, Identity, Interval, Router

PROMPT_BUCKETS = ((128, "<128"), (512, "128-511"), (2048, "512-2047"), (float("inf"), ">=2048"))


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DatagenError(f"{path}: no such eval file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatagenError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
    return rows


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def identity(rows: Sequence[Mapping[str, Any]], who: str) -> Identity:
    found = {json.dumps(r.get(who), sort_keys=True) for r in rows}
    if len(found) != 1 or rows[0].get(who) is None:
        raise DatagenError(f"eval rows: every row needs the same {who!r} identity (found {len(found)})")
    return Identity.model_validate(rows[0][who])


def split(rows: Sequence[Mapping[str, Any]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the calibration and test rows."""
    if all("split" in r for r in rows):
        bad = {r["split"] for r in rows} - {"calibration", "test"}
        if bad:
            raise DatagenError(f"eval rows: split must be calibration or test (got {sorted(bad)[0]!r})")
        cal = [i for i, r in enumerate(rows) if r["split"] == "calibration"]
    else:
        def u(r: Mapping[str, Any]) -> float:
            h = hashlib.blake2b(f"{seed}:{r['id']}".encode(), digest_size=8).digest()
            return int.from_bytes(h, "big") / 2**64

        cal = [i for i, r in enumerate(rows) if u(r) < fraction]
    test = sorted(set(range(len(rows))) - set(cal))
    if not cal or not test:
        raise DatagenError(f"eval rows: {len(cal)} calibration and {len(test)} test rows; both splits need rows")
    return cal, test


def slice_keys(row: Mapping[str, Any]) -> list[str]:
    keys = [f"axis:{k}={v}" for k, v in sorted((row.get("axes") or {}).items())]
    if row.get("prompt_tokens") is not None:
        keys.append("prompt_tokens:" + next(b for top, b in PROMPT_BUCKETS if row["prompt_tokens"] < top))
    if row.get("seed_source"):
        keys.append(f"seed_source:{row['seed_source']}")
    size = row.get("cluster_size")
    if size is not None:
        keys.append("cluster:" + ("singleton" if size <= 1 else "small (2-9)" if size < 10 else "common (10+)"))
    return keys


def _interval(stat: Any, n: int, resamples: int, seed: int) -> Interval:
    lo, hi = metrics.bootstrap(stat, n, resamples=resamples, seed=seed)
    return Interval(value=float(stat(np.arange(n))), low=lo, high=hi)


def build(rows: Sequence[Mapping[str, Any]], *, eval_sha256: str, tolerance: float = 0.02,
          cost: costs.CostModel | None = None, calibration_fraction: float = 0.5, seed: int = 0,
          quality_floor: float | None = None, worst: int = 10, resamples: int = 1000
          ) -> tuple[dict[str, Any], Router]:
    """The report dict and the chosen ``Router``."""
    if not rows:
        raise DatagenError("eval rows: none")
    student, teacher = identity(rows, "student"), identity(rows, "teacher")
    tokenizers = {r.get("student_tokenizer") for r in rows}
    if len(tokenizers) > 1:
        raise DatagenError(f"eval rows: the student's answers come from {len(tokenizers)} tokenizers "
                           "(student_tokenizer); its log-prob signals are comparable over one only")
    q_s, q_t = metrics.arrays([r.get("q_student") for r in rows], [r.get("q_teacher") for r in rows])
    c_s, c_t = costs.row_costs(rows, cost) if cost is not None else (None, None)
    cal, test = split(rows, calibration_fraction, seed)
    values = [r.get("signals") or signals.signals(r.get("answer") or {}) for r in rows]
    ok = q_s >= q_t  # not worse than the teacher
    right = q_s >= 1.0 - 1e-9  # full credit (a share of fields summed in floats)

    scores: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for name in signals.SIGNALS:
        col = [signals.score(v, name) for v in values]
        missing = sum(c is None for c in col)
        if missing:
            skipped[name] = f"missing on {missing} of {len(rows)} rows"
        else:
            scores[name] = np.asarray(col, dtype=np.float64)
    model = None
    if scores:
        feats = list(scores)
        x = np.stack([scores[f] for f in feats], axis=1)
        fitted = learned.fit(x[cal], ok[cal], feats, seed=seed)
        if isinstance(fitted, metrics.Metric):
            skipped[LEARNED] = fitted.reason or ""
        else:
            model = fitted
            scores[LEARNED] = np.array([model.prob(v) for v in values])
    if not scores:
        raise DatagenError(f"eval rows: no router has a score on every row ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")

    ts, tt = q_s[test], q_t[test]
    weak, strong = float(ts.mean()), float(tt.mean())
    report: dict[str, Any] = {
        "student": student.model_dump(), "teacher": teacher.model_dump(), "eval_sha256": eval_sha256,
        "rows": {"calibration": len(cal), "test": len(test)}, "tolerance": tolerance,
        "baselines": {"all_student": weak, "all_teacher": strong,
                      "random": metrics.summary(metrics.random_curve(ts, tt), weak, strong)},
        "failures": {"worse": int((~ok[test]).sum()), "wrong": int((~right[test]).sum())},
        "routers": {}, "skipped": skipped,
        "quality": sorted({str(r["quality"]) for r in rows if r.get("quality")}),  # how q was scored
    }
    oracle = metrics.oracle_curve(ts, tt)
    report["baselines"]["oracle"] = {**metrics.summary(oracle, weak, strong), "curve": oracle.to_json()}

    picks: dict[str, tuple[metrics.OperatingPoint, Expected]] = {}
    for name, s in scores.items():
        curve = metrics.routing_curve(ts, tt, s[test])
        op = metrics.operating_point(metrics.routing_curve(q_s[cal], q_t[cal], s[cal]), float(q_t[cal].mean()),
                                     tolerance)
        esc = s[test] < op.threshold
        routed = np.where(esc, tt, ts)
        expected = Expected(
            teacher_share=_interval(lambda i: esc[i].mean(), len(test), resamples, seed),
            quality=_interval(lambda i: routed[i].mean(), len(test), resamples, seed),
            quality_loss=_interval(lambda i: metrics.relative_loss(routed[i].mean(), tt[i].mean()),
                                   len(test), resamples, seed),
            cost_saving=None if c_t is None or not c_t[test].sum() else _interval(
                lambda i: 1 - (c_s[test] + esc * c_t[test])[i].sum() / max(c_t[test][i].sum(), 1e-300),
                len(test), resamples, seed))
        picks[name] = (op, expected)
        report["routers"][name] = {
            **metrics.summary(curve, weak, strong), "curve": curve.to_json(),
            # the cascade's USD per 1,000 queries at each point of the curve (test split)
            "cost_curve": None if c_t is None else [float((c_s[test] + (s[test] < t) * c_t[test]).mean() * 1000)
                                                    for t in curve.threshold],
            "auroc": metrics.auroc(~ok[test], s[test]).to_json(),
            "auroc_wrong": metrics.auroc(~right[test], s[test]).to_json(),
            "reliability": metrics.reliability(ok[test], s[test], right=right[test]),
            "operating_point": {"threshold": op.threshold, "calibration": {"teacher_share": op.share,
                                "quality": op.quality, "quality_loss": op.loss}, "test": expected.model_dump()},
        }
    chosen = min(picks, key=lambda k: picks[k][0].share)  # dicts keep SIGNALS order, learned last
    op, expected = picks[chosen]
    router = Router(signal=chosen, threshold=op.threshold, learned=model if chosen == LEARNED else None,
                    tolerance=tolerance, expected=expected, student=student, teacher=teacher,
                    student_tokenizer=next(iter(tokenizers)),
                    data=Data(eval_sha256=eval_sha256, calibration_rows=len(cal), test_rows=len(test)))
    esc_all = scores[chosen] < op.threshold
    report["chosen"] = chosen
    report["cost_per_1k"] = (costs.per_1k(c_s[test], c_t[test], esc_all[test]) if c_t is not None
                             else {"undefined": "no cost model given"})
    floor = quality_floor if quality_floor is not None else float(q_t.mean()) * (1 - tolerance)
    report["quality_floor"] = floor
    report["slices"] = slices(rows, q_s, q_t, esc_all, floor)
    report["worst"] = [{"id": rows[i].get("id"), "score": float(scores[chosen][i]), "q_student": float(q_s[i]),
                        "q_teacher": float(q_t[i]), "slices": slice_keys(rows[i])}
                       for i in sorted(np.flatnonzero(~ok & ~esc_all), key=lambda i: -scores[chosen][i])[:worst]]
    return report, router


def slices(rows: Sequence[Mapping[str, Any]], q_s: np.ndarray, q_t: np.ndarray, esc: np.ndarray,
           floor: float) -> list[dict[str, Any]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        for k in slice_keys(r):
            groups[k].append(i)
    out = []
    for key in sorted(groups):
        i = np.asarray(groups[key])
        routed = float(np.where(esc[i], q_t[i], q_s[i]).mean())
        out.append({"slice": key, "rows": len(i), "q_student": float(q_s[i].mean()),
                    "q_teacher": float(q_t[i].mean()), "gap": float((q_t[i] - q_s[i]).mean()),
                    "escalated": float(esc[i].mean()), "q_routed": routed, "below_floor": routed < floor})
    return out


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or isinstance(v, dict):
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def tables(report: Mapping[str, Any]) -> list[Table]:
    fails = report.get("failures") or {}
    t = Table(title=f"routing: {report['rows']['test']} test rows; all-student {report['baselines']['all_student']:.3f}, "
                    f"all-teacher {report['baselines']['all_teacher']:.3f}; the student is worse than the teacher on "
                    f"{fails.get('worse', '?')}, wrong on {fails.get('wrong', '?')}", header_style="bold")
    for col in ("router", "APGR", "CPT(50%)", "CPT(80%)", "AUROC worse", "AUROC wrong", "teacher share",
                "quality loss", "cost saving"):
        t.add_column(col, justify="left" if col == "router" else "right")
    named = {**{k: report["baselines"][k] for k in ("random", "oracle")}, **report["routers"]}
    for name, r in named.items():
        test = (r.get("operating_point") or {}).get("test") or {}

        def ci(key: str) -> str:
            v = test.get(key)
            return f"{v['value']:.1%} [{v['low']:.1%}, {v['high']:.1%}]" if v else "-"

        t.add_row(name + (" *" if name == report.get("chosen") else ""), _fmt(r["apgr"]), _fmt(r["cpt50"], True),
                  _fmt(r["cpt80"], True), _fmt(r.get("auroc")), _fmt(r.get("auroc_wrong")), ci("teacher_share"),
                  ci("quality_loss"), ci("cost_saving"))
    s = Table(title=f"slices at {report['chosen']}'s threshold (floor {report['quality_floor']:.3f})",
              header_style="bold")
    for col in ("slice", "rows", "student", "teacher", "gap", "escalated", "routed", ""):
        s.add_column(col, justify="left" if col == "slice" else "right")
    for r in report["slices"]:
        s.add_row(r["slice"], str(r["rows"]), _fmt(r["q_student"]), _fmt(r["q_teacher"]), _fmt(r["gap"]),
                  _fmt(r["escalated"], True), _fmt(r["q_routed"]), "BELOW FLOOR" if r["below_floor"] else "")
    return [t, s]
