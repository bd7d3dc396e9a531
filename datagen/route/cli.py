"""``datagen route eval EVAL.yaml``, ``datagen route report EVAL`` and
``datagen route check router.json TRAFFIC``.

Kept apart from ``datagen/cli.py``, which only registers the verb (``add_parser``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from datagen.errors import EXIT_ERROR


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("route", help="the student as router: report on eval rows, drift check on traffic")
    verbs = r.add_subparsers(dest="route_command", required=True)
    p = verbs.add_parser("eval", help="the student answers an eval set; writes the eval table `report` reads")
    p.add_argument("eval_config", help="YAML (route/infer.py: RouteEval); see examples/route_eval.yaml")
    p.set_defaults(func=run_eval)
    p = verbs.add_parser("report", help="routing report and router.json from eval rows (JSONL or Parquet)")
    p.add_argument("eval_file")
    p.add_argument("--out", required=True, help="folder for report.json and router.json")
    p.add_argument("--tolerance", type=float, default=0.02, help="quality loss against all-teacher (relative)")
    p.add_argument("--cost", help="YAML cost model (route/costs.py: CostModel)")
    p.add_argument("--calibration-fraction", type=float, default=0.5)
    p.add_argument("--quality-floor", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_report)
    p = verbs.add_parser("check", help="escalation share on new traffic against the calibrated interval")
    p.add_argument("router_file")
    p.add_argument("traffic_file", help="student answers (JSONL or Parquet), as decide() reads them")
    p.set_defaults(func=run_check)


def run_eval(args: argparse.Namespace) -> int:
    from datagen.route import infer

    cfg = infer.load(args.eval_config)
    rows, summary = infer.build(cfg)
    infer.write(cfg, rows, summary)
    print(eval_line(summary) + f"; table: {cfg.output}")
    return 0


def eval_line(summary: dict) -> str:
    c = summary["counts"]
    held = (f"{c['held_out']} held-out prompts, {c.get('contaminated', 0)} dropped as near-duplicates of "
            f"training prompts, " if "held_out" in c else "")
    t = summary.get("teacher_run")
    ran = (f"; teacher {t['teacher']['name']!r} answered {t['answered']} rows ({t['failed']} failed)"
           if t else "")
    return (f"eval set {summary['source']}: {held}{c['rows']} rows; quality: {summary['quality']}{ran}; student "
            f"{summary['backend']}: {summary['rows_per_s']:.2f} rows/s")


def run_report(args: argparse.Namespace) -> int:
    from datagen.route import infer, report, router
    from datagen.route.costs import CostModel
    from datagen.storage.shards import atomic_write_text
    from datagen.validation import read_model

    cost = read_model(Path(args.cost), CostModel, what="cost file") if args.cost else None
    rows = report.read_rows(args.eval_file)
    meta = infer.meta_path(args.eval_file)
    out, chosen = report.build(rows, eval_sha256=report.file_sha256(args.eval_file), tolerance=args.tolerance,
                               cost=cost, calibration_fraction=args.calibration_fraction, seed=args.seed,
                               quality_floor=args.quality_floor)
    if meta.is_file():  # written by `datagen route eval`
        out["eval_set"] = json.loads(meta.read_text())
        print(eval_line(out["eval_set"]))
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "report.json", json.dumps(out, indent=1))
    router.write(folder / "router.json", chosen)
    for t in report.tables(out):
        Console().print(t)
    print(f"report: {folder / 'report.json'}; router: {folder / 'router.json'} ({chosen.signal})")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from datagen.route import report, router

    result = router.check(router.load(args.router_file), report.read_rows(args.traffic_file))
    print(result["line"])
    return EXIT_ERROR if result["drift"] else 0
