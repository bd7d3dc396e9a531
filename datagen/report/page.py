"""The report as one HTML file: ``collect.py``'s dict and ``plots.py``'s SVGs through the
Jinja2 template ``page.html.j2``.

Every string from the output (reasons, prompts, answers, axis values, teacher names) goes
through Jinja's autoescape; the only markup inserted unescaped is matplotlib's SVG,
whose text matplotlib escapes itself. The page has no script, and a Content-Security-
Policy that forbids fetching anything (``default-src 'none'``): it reads the same with
JavaScript off and offline. Sections without data say why (``EMPTY``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from importlib import resources
from typing import Any

from jinja2 import Environment, StrictUndefined

from datagen.report import plots, scan

EMPTY = {
    "throughput": "no metrics.jsonl in this output (runs before metrics were written have none)",
    "throughput_short": "metrics.jsonl has fewer than two periodic lines (the run was shorter than "
                        "runtime.metrics_every_s); the final figures are in the summary",
    "reasons": "no row was rejected or failed",
    "lengths": "no row reports its completion tokens",
    "logprobs": "no accepted row carries log-probs (sampling.logprobs unset, or an API that sends none; "
                "`datagen rescore` adds them)",
    "scores": "no filter gave a score",
    "prompts": "no prompts_report.json in this output (written by `datagen run` since the diversity report)",
    "axes": "the job deals no diversity axes",
    "dedupe": "no dedupe view (OUT/dedupe/report.json): run `datagen dedupe OUT`, or set dedupe.streaming",
    "similarity": "fewer than two prompts: no pairs to compare",
    "clusters": "the dedupe view has no clusters",
    "licenses": "no accepted rows",
    "samples": "the output has no rows",
    "train": "no training log: pass `--train DIR` (a `datagen train` output) to `datagen report`",
    "eval": "no eval table: pass `--eval FILE` (the output of `datagen eval`) to `datagen report`",
    "routing": "no routing report: pass `--routing DIR` (`datagen route report EVAL --out DIR`) to `datagen "
               "report`, or write it to OUT/route/ or the `--train` output's route/",
    "routing_curve": "the routing report has no curve to draw",
}


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{round(value):,}" if isinstance(value, (int, float)) else str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _metric(value: Any, pct: bool = False) -> str:
    """A routing number, which may be ``{"undefined": reason}`` (``route.metrics.Metric``)."""
    if isinstance(value, dict) or value is None:
        return "undefined" if isinstance(value, dict) else "–"
    return _pct(value) if pct else f"{value:.3f}"


def _ci(v: dict[str, float] | None, pct: bool = True) -> str:
    """An interval of ``router.Interval`` as ``value [low, high]``."""
    if not v:
        return "–"
    f = _pct if pct else (lambda x: f"{x:.3f}")
    return f"{f(v['value'])} [{f(v['low'])}, {f(v['high'])}]"


def _env() -> Environment:
    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(n=_n, pct=_pct, metric=_metric, ci=_ci)
    return env


def figures(d: dict[str, Any]) -> dict[str, str | None]:
    """Every figure of the page, or None for one with nothing to draw."""
    rows = d["rows"]
    prompts = d["prompts"] or {}
    return {
        "throughput": plots.throughput(d["metrics"]) if d["metrics"] else None,
        "reasons": plots.reasons(d["reasons"], height=0.9 + 0.22 * sum(min(len(r), 12) for r in d["reasons"].values())),
        "lengths": plots.lengths(rows["streams"]),
        "logprobs": plots.logprobs(rows["logprobs"]) if rows["logprobs"] else None,
        "scores": plots.scores(rows["scores"]) if rows["scores"] else None,
        "axes": plots.axis_shares(prompts["axes"]) if prompts.get("axes") else None,
        "similarity": plots.similarity(prompts.get("similarity") or {}) if prompts else None,
        "clusters": plots.cluster_sizes(d["dedupe"]["cluster_sizes"] or {}) if d["dedupe"] else None,
        "licenses": plots.license_classes(d["licenses"]["by_class"]),
        "train": plots.train(d["train"]) if d["train"] else None,
        "routing": plots.routing(d["routing"]) if d["routing"] else None,
    }


def render(d: dict[str, Any]) -> str:
    template = resources.files("datagen.report").joinpath("page.html.j2").read_text()
    return _env().from_string(template).render(
        d=d, fig=figures(d), missing=EMPTY, limits={"samples": scan.SAMPLES["rejected"], "chars": scan.SAMPLE_CHARS},
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
