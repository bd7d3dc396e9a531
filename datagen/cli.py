"""``datagen`` command line: run, resume, validate, schema, inspect.

Exit codes: 0 done; 1 error (one line, names the problem); 2 usage; 3 the job finished
but some rows failed at the teacher (``datagen resume`` retries them); 130 interrupted
(committed rows are valid; ``datagen resume`` finishes the job).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from datagen.errors import DatagenError

EXIT_FAILED_ROWS = 3
EXIT_INTERRUPTED = 130


def _run(job, job_path: Path | None, *, resume: bool, quiet: bool) -> int:
    from datagen import runner
    from datagen.report import LiveProgress, summary_table, where_line
    from datagen.shards import ShardStore

    out = Console()
    err = Console(stderr=True, quiet=quiet)  # progress: silenced by --quiet
    warn = Console(stderr=True)  # what the user must act on: never silenced
    stream, fingerprint = runner.prepare(job)
    root = job.output.path
    if resume:
        store = ShardStore.open(root, job.output, for_writing=True)
        if store.manifest.data["run_fingerprint"] != fingerprint:
            raise DatagenError(
                f"{root} was written by a different job (its prompts, teachers or settings "
                "changed since); start a new output directory instead of resuming"
            )
    else:
        store = ShardStore.create(root, job.output, job_meta=runner.job_meta(job, fingerprint, job_path))
    try:
        with LiveProgress(err, job.name) as progress:
            stats = runner.execute(job, store, stream, on_progress=progress)
    finally:
        store.close()
    if not quiet:
        out.print(summary_table(stats, store))
        out.print(where_line(store), soft_wrap=True, highlight=False)
    if stats.interrupted:
        warn.print(f"interrupted: committed rows are safe; `datagen resume {root}` finishes the job",
                   style="yellow", soft_wrap=True)
        return EXIT_INTERRUPTED
    unresolved = len(store.row_ids(("failed",)) - store.row_ids(("accepted", "rejected")))
    if unresolved:
        warn.print(f"{unresolved} rows failed at the teacher (reasons above); "
                  f"`datagen resume {root}` retries them", style="yellow")
        return EXIT_FAILED_ROWS
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from datagen.config import load_job

    job = load_job(args.job, output=args.output)
    return _run(job, Path(args.job).resolve(), resume=False, quiet=args.quiet)


def cmd_resume(args: argparse.Namespace) -> int:
    from datagen.config import parse_job
    from datagen.shards import JOB_FILE, Manifest

    root = Path(args.output_dir).resolve()
    Manifest.load(root)  # a clear error if this is not a datagen output
    meta = json.loads((root / JOB_FILE).read_text())
    job_path = Path(meta["job_file"]) if meta.get("job_file") else None
    job = parse_job(meta["job"], where=str(root / JOB_FILE), base_dir=root)
    job = job.model_copy(update={"output": job.output.model_copy(update={"path": root})})
    return _run(job, job_path, resume=True, quiet=args.quiet)


def cmd_validate(args: argparse.Namespace) -> int:
    from datagen import runner
    from datagen.config import load_job

    job = load_job(args.job, output=args.output)
    stream, fingerprint = runner.prepare(job)
    teachers = ", ".join(f"{t.name} ({t.backend}, {t.model}, n={t.sampling.n})" for t in job.teachers)
    print(f"ok: {args.job}: {len(stream.seeds)} prompts from template {stream.template.spec.id} "
          f"v{stream.template.spec.version} -> {len(stream)} rows; teachers: {teachers}; "
          f"output {job.output.path}; fingerprint {fingerprint[:12]}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from datagen.config import job_schema

    print(json.dumps(job_schema(), indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from datagen.report import inspect_output
    from datagen.shards import ShardStore

    store = ShardStore.open(Path(args.output_dir).resolve())
    inspect_output(store, Console(), rows=args.rows, stream=args.stream, as_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="datagen", description="Build distillation datasets from teacher models.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a job file")
    r.add_argument("job", help="job file (YAML)")
    r.add_argument("--output", "-o", help="output directory (overrides output.path)")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    r.set_defaults(func=cmd_run)

    r = sub.add_parser("resume", help="finish an interrupted run (skips committed rows)")
    r.add_argument("output_dir")
    r.add_argument("--quiet", "-q", action="store_true")
    r.set_defaults(func=cmd_resume)

    r = sub.add_parser("validate", help="check a job file and everything it points to")
    r.add_argument("job")
    r.add_argument("--output", "-o")
    r.set_defaults(func=cmd_validate)

    r = sub.add_parser("schema", help="print the JSON Schema of job files")
    r.set_defaults(func=cmd_schema)

    r = sub.add_parser("inspect", help="counts, schema and a few rows of an output directory")
    r.add_argument("output_dir")
    r.add_argument("--rows", "-n", type=int, default=3)
    r.add_argument("--stream", choices=["accepted", "rejected", "failed"], default="accepted")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DatagenError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
