"""An output read into the small dict the report page is drawn from.

``scan.py`` counts the rows; this module adds what the run wrote beside them: the
manifest's counts and reasons (the figures the page leads with are the manifest's),
the job (only the fields in ``TEACHER_FIELDS``: never a ``base_url`` or a key's name),
``metrics.jsonl`` (each run and resume: throughput and queue depths over time, wall
time, stop reason), ``prompts_report.json``, the dedupe view's ``dedupe/report.json``,
and, when given, a ``datagen train`` output's ``log.jsonl`` and a ``datagen eval`` report,
and a routing report (``datagen route report``'s ``report.json``: ``routing``).

A section that has no data is ``None`` in the dict and the page says why
(``page.EMPTY``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datagen.errors import DatagenError
from datagen.licenses import CLASSES, Registry
from datagen.report.scan import scan

TRAIN_LOG = "log.jsonl"  # datagen.train.trainer.LOG (that module imports torch; this one must not)
SERIES_POINTS = 400  # metrics.jsonl (and train log) lines plotted at most: every k-th line beyond
# The only fields of a teacher shown: never base_url (it may name a private host) nor key names.
TEACHER_FIELDS = ("name", "backend", "model", "replicas", "num_gpus", "num_cpus")
RATES = {"prompts": ("prompts", "per_s"), "teacher": ("teacher", "rows_per_s"),
         "filters": ("filters", "rows_per_s"), "store": ("store", "rows_per_s")}
DEPTHS = {"teacher in flight": ("teacher", "inflight_batches"), "teacher ready": ("teacher", "ready_batches"),
          "filters in flight": ("filters", "inflight_batches"), "filters queued": ("filters", "queued_batches")}


def side_text(store: Any, rel: str) -> str | None:
    """A side file of the output (local or object store), None when absent."""
    if hasattr(store, "read_text"):  # an object store
        return store.read_text(rel)
    try:
        return (Path(store.root) / rel).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def collect(store: Any, *, train: Path | None = None, eval_file: Path | None = None,
            routing_file: Path | None = None) -> dict[str, Any]:
    from datagen.prompts.diversity import REPORT_FILE
    from datagen.run.metrics import METRICS_FILE

    m = store.manifest
    meta = _json(side_text(store, "datagen-job.json")) or {}
    job = meta.get("job") or {}
    rows = scan(store)
    metrics = metrics_series(side_text(store, METRICS_FILE))
    counts = m.counts()
    total = sum(counts.values())
    return {
        "job": m.data["job"], "fingerprint": m.data["run_fingerprint"][:12],
        "schema_version": m.data["schema_version"], "root": str(store.root),
        "counts": counts, "total": total, "shards": len(m.shards),
        "accepted_share": counts["accepted"] / total if total else None,
        "reasons": {s: dict(m.reasons(s).most_common()) for s in ("rejected", "failed")},
        "unresolved_failed": store.unresolved_failures(),
        "teachers": teachers(job, rows["teachers"], metrics),
        "metrics": metrics,
        "rows": rows,
        "prompts": _json(side_text(store, REPORT_FILE)),
        "dedupe": dedupe(_json(side_text(store, "dedupe/report.json"))),
        "licenses": licenses(job, rows.pop("licenses"), m.license_totals()),
        "train": train_log(train),
        "eval": _json(eval_file.read_text()) if eval_file and eval_file.is_file() else None,
        "routing": routing(store, routing_file, train),
    }


def teachers(job: dict[str, Any], seen: dict[str, dict[str, Any]], metrics: dict[str, Any] | None) -> list[dict]:
    """Per teacher: rows and tokens (from the rows), API cost, and the hours its replicas
    were held (wall time of every run and resume × replicas × GPUs or CPUs per replica,
    from the job as last run: a resume that changed replicas is counted at the new figure)."""
    specs = {t.get("name"): {k: t.get(k) for k in TEACHER_FIELDS} for t in job.get("teachers") or []}
    wall_h = (metrics or {}).get("wall_s", 0.0) / 3600
    out = []
    for name in sorted(set(specs) | set(seen)):
        spec = specs.get(name) or {**dict.fromkeys(TEACHER_FIELDS), "name": name}
        c = seen.get(name, {})
        acc = c.get("accepted", 0)
        replicas = spec.get("replicas") or 1
        gpu_h = wall_h * replicas * (spec.get("num_gpus") or 0)
        cpu_h = wall_h * replicas * (spec.get("num_cpus") or 0)
        cost = c.get("cost_usd") if c.get("priced_rows") else None
        out.append({**spec, "rows": c.get("rows", 0), "accepted": acc,
                    "prompt_tokens": c.get("prompt_tokens", 0), "completion_tokens": c.get("completion_tokens", 0),
                    "cost_usd": cost, "cost_per_accepted": cost / acc if cost is not None and acc else None,
                    "gpu_hours": gpu_h, "cpu_hours": cpu_h,
                    "gpu_hours_per_accepted": gpu_h / acc if acc else None,
                    "cpu_hours_per_accepted": cpu_h / acc if acc else None})
    return out


def metrics_series(text: str | None) -> dict[str, Any] | None:
    """``metrics.jsonl`` as time series on one clock: each resume's lines start where the
    run before it ended. Final lines (whose rates cover a whole run) give the wall time
    and stop reason; the series plot the periodic lines."""
    lines = [_json(line) for line in (text or "").splitlines() if line.strip()]
    lines = [x for x in lines if isinstance(x, dict) and "stages" in x]
    if not lines:
        return None
    segments, offset, last = [], 0.0, None
    points = []
    for x in lines:
        if last is not None and (last.get("final") or x["elapsed_s"] < last["elapsed_s"]):
            segments.append(last)
            offset += last["elapsed_s"]
        if not x.get("final"):
            points.append((offset + x["elapsed_s"], x["stages"]))
        last = x
    segments.append(last)
    step = max(1, -(-len(points) // SERIES_POINTS))
    kept = points[::step]
    return {
        "lines": len(lines), "plotted": len(kept), "every": step, "runs": len(segments),
        "wall_s": round(sum(s["elapsed_s"] for s in segments), 2),
        "stop_reason": last.get("stop_reason") if last.get("final") else None,
        "interrupted": bool(last.get("interrupted")) if last.get("final") else None,
        "finished": bool(last.get("final")),
        "final_rows_per_s": last["stages"]["store"]["rows_per_s"] if last.get("final") else None,
        "t": [round(t, 2) for t, _ in kept],
        "rates": {k: [s[a][b] for _, s in kept] for k, (a, b) in RATES.items()},
        "depths": {k: [s[a][b] for _, s in kept] for k, (a, b) in DEPTHS.items()}
                  | {"store pending rows": [s["store"]["pending"] for _, s in kept]},
        "max": last.get("max"), "bounds": last.get("bounds"),
    }


def dedupe(rep: dict[str, Any] | None) -> dict[str, Any] | None:
    if not rep:
        return None
    keys = ("rows", "kept", "removed", "mode", "exact_duplicates", "candidate_pairs", "verified_pairs",
            "cluster_sizes", "keep_rule", "params", "examples")
    return {k: rep.get(k) for k in keys}


def licenses(job: dict[str, Any], combos: dict[tuple, int], totals: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Accepted rows by their combination of terms and its class (the strictest), and what
    ``datagen export --license-class C`` would keep for each class C."""
    reg = Registry.for_job(job)
    rows, by_class = [], dict.fromkeys(CLASSES, 0)
    for (teacher, seed, template, logprobs), n in sorted(combos.items(), key=lambda kv: -kv[1]):
        lic = {"teacher": teacher, "seed": seed, "template": template, "logprobs": logprobs}
        cls = reg.row_class(lic)
        by_class[cls] += n
        rows.append({**lic, "class": cls, "rows": n})
    export = {}
    for rank, cls in enumerate(CLASSES):
        ids = {v for r in rows if CLASSES.index(r["class"]) <= rank
               for v in (r["teacher"], r["seed"], r["template"], r["logprobs"]) if v}
        export[cls] = {"rows": sum(by_class[c] for c in CLASSES[:rank + 1]), "conflicts": reg.conflicts(ids)}
    return {"combinations": rows, "by_class": by_class, "export": export, "all_streams": totals}


def train_log(out: Path | None) -> dict[str, Any] | None:
    """A ``datagen train`` output's ``log.jsonl`` (one line per step)."""
    path = out / TRAIN_LOG if out else None
    if path is None or not path.is_file():
        return None
    steps = [x for x in map(_json, path.read_text().splitlines()) if isinstance(x, dict) and "step" in x]
    if not steps:
        return None
    every = max(1, -(-len(steps) // SERIES_POINTS))
    kept = steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else [])
    series = {k: [x.get(k) for x in kept] for k in ("loss", "ce", "kd", "lr")}
    return {"steps": len(steps), "every": every, "step": [x["step"] for x in kept], **series,
            "last": {k: steps[-1].get(k) for k in ("step", "loss", "ce", "kd", "tokens")}}


ROUTING_FILE = "route/report.json"  # where `datagen route report --out DIR` puts it, under DIR = OUT/route
CURVE_POINTS = 400  # points of a routing curve drawn at most: every k-th beyond (the last always kept)


def routing(store: Any, path: Path | None = None, train: Path | None = None) -> dict[str, Any] | None:
    """A ``datagen route report`` (``report.json``, or the folder holding it): ``path`` when
    given, else ``TRAIN/route/report.json`` (the README's layout), else the output's own
    ``route/report.json``. Only what the page shows: the curves (thinned to
    ``CURVE_POINTS``), the RouteLLM numbers, AUROC, each operating point with its
    intervals, costs and slices; never the worst rows' ids or the router's coefficients."""
    if path is not None:
        path = path / "report.json" if path.is_dir() else path
        text = path.read_text() if path.is_file() else None
        if text is None:
            raise DatagenError(f"{path}: no routing report (`datagen route report EVAL --out DIR` writes DIR/report.json)")
    elif train is not None and (train / ROUTING_FILE).is_file():
        text = (train / ROUTING_FILE).read_text()
    else:
        text = side_text(store, ROUTING_FILE)
    rep = _json(text)
    if not isinstance(rep, dict) or "routers" not in rep or "baselines" not in rep:
        if path is not None:
            raise DatagenError(f"{path}: not a routing report (no routers or baselines)")
        return None

    def thin(curve: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        if not curve:
            return None
        n = len(curve["share"])
        keep = sorted(set(range(0, n, max(1, -(-n // CURVE_POINTS)))) | {n - 1})
        return {k: [v[i] for i in keep] for k, v in curve.items() if isinstance(v, list) and len(v) == n}

    routers = {}
    for name, r in rep["routers"].items():
        curve = dict(r.get("curve") or {})
        if r.get("cost_curve"):
            curve["cost"] = r["cost_curve"]
        op = r.get("operating_point") or {}
        routers[name] = {"apgr": r.get("apgr"), "cpt50": r.get("cpt50"), "cpt80": r.get("cpt80"),
                         "auroc": r.get("auroc"), "auroc_wrong": r.get("auroc_wrong"), "curve": thin(curve),
                         "threshold": op.get("threshold"), "calibration": op.get("calibration") or {},
                         "test": op.get("test") or {}}
    base = rep["baselines"]
    eval_set = rep.get("eval_set") or {}
    return {
        "chosen": rep.get("chosen"), "rows": rep.get("rows") or {}, "tolerance": rep.get("tolerance"),
        "failures": rep.get("failures") or {},
        "quality": rep.get("quality") or [], "student": rep.get("student"), "teacher": rep.get("teacher"),
        "all_student": base.get("all_student"), "all_teacher": base.get("all_teacher"),
        "random": {k: v for k, v in (base.get("random") or {}).items() if k != "curve"},
        "oracle": {**{k: v for k, v in (base.get("oracle") or {}).items() if k != "curve"},
                   "curve": thin((base.get("oracle") or {}).get("curve"))},
        "routers": routers, "skipped": rep.get("skipped") or {},
        "cost": rep["cost_per_1k"] if "all_teacher" in (rep.get("cost_per_1k") or {}) else None,
        "quality_floor": rep.get("quality_floor"), "slices": rep.get("slices") or [],
        "eval_set": {"source": eval_set.get("source"), "counts": eval_set.get("counts") or {}} if eval_set else None,
    }
