"""``datagen`` command line: run, resume, validate, schema, inspect, dedupe, export, verify, licenses,
train, eval.

Exit codes: 0 done; 1 error (one line, names the problem); 2 usage; 3 the job finished
but some rows failed at the teacher (``datagen resume`` retries them); 130 interrupted
(committed rows are valid; ``datagen resume`` finishes the job).
"""

from __future__ import annotations

import argparse
import json
import os
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
    unresolved = store.unresolved_failures()
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
    from datagen.shards import JOB_FILE, ShardStore

    root = Path(args.output_dir).resolve()
    meta = ShardStore.open(root).job_meta()  # clear errors for a non-output or a damaged one
    derived = next((k for k in ("export", "dedupe") if k in meta), None)
    if derived:
        raise DatagenError(f"{root} is a derived dataset (made by `datagen {derived}`), not a run; "
                           "resume the run it came from instead")
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


def cmd_export(args: argparse.Namespace) -> int:
    from datagen.export import export

    res = export(Path(args.output_dir).resolve(), Path(args.to).resolve(), license_class=args.license_class,
                 allow=args.allow, allow_incompatible=args.allow_incompatible)
    left = ", ".join(f"{why}: {n}" for why, n in sorted(res.dropped.items())) or "none"
    print(f"exported {res.rows} rows to {res.dest} (licenses: {', '.join(sorted(res.licenses)) or 'none'}; "
          f"left out: {left})")
    if res.conflicts:
        print("override written into the card: " + "; ".join(res.conflicts), file=sys.stderr)
    return 0


def cmd_dedupe(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from datagen.config import Dedupe, format_validation_error
    from datagen.dedupe import dedupe
    from datagen.shards import ShardStore

    src = Path(args.output_dir).resolve()
    job = (ShardStore.open(src).job_meta().get("job") or {})
    settings = dict(job.get("dedupe") or {})
    for key in ("on", "threshold", "num_perm", "shingle", "ngram", "verify"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    try:
        cfg = Dedupe.model_validate(settings)
    except ValidationError as exc:
        raise DatagenError(format_validation_error(exc, where="dedupe settings")) from None
    res = dedupe(src, cfg, dest=Path(args.to).resolve() if args.to else None, workers=args.workers)
    r = res.report
    print(f"{res.rows} rows -> {res.kept} kept ({r['removed']} removed: {r['exact_duplicates']} exact, "
          f"{r['verified_pairs']} near-duplicate pairs); cluster sizes {r['cluster_sizes']}; "
          f"{r['seconds']} s; view: {res.dest}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from datagen.verify import verify

    root = Path(args.output_dir).resolve()
    rep = verify(root)
    for note in rep.notes:
        print(f"note: {note}", file=sys.stderr)
    for problem in rep.problems:
        print(f"error: {root}/{problem}", file=sys.stderr)
    if rep.problems:
        return 1
    print(f"ok: {root}: {rep.shards} shards, {rep.rows} rows match the manifest")
    return 0


def cmd_licenses(args: argparse.Namespace) -> int:
    from datagen.licenses import Registry

    reg = Registry()
    for lid, t in sorted(reg.terms.items(), key=lambda kv: (kv[1].rank, kv[0])):
        print(f"{lid:<36} {t.license_class:<12} outputs may train other models: {t.outputs_train_other_models:<12} {t.name}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from datagen.train.cli import run_train

    return run_train(args.train_file, resume=args.resume, quiet=args.quiet)


def cmd_eval(args: argparse.Namespace) -> int:
    from datagen.train.cli import run_eval

    return run_eval(args.eval_file, quiet=args.quiet)


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

    r = sub.add_parser("export", help="write the accepted rows whose terms allow it as a new dataset")
    r.add_argument("output_dir")
    r.add_argument("--to", required=True, help="destination directory (must not exist)")
    sel = r.add_mutually_exclusive_group()
    sel.add_argument("--license-class", choices=["permissive", "conditional", "restricted"],
                     help="the strictest class to include (default: permissive)")
    sel.add_argument("--allow", nargs="+", metavar="ID", help="include only rows whose every license is listed")
    r.add_argument("--allow-incompatible", metavar="REASON",
                   help="export even when the selected terms conflict; REASON goes into the card")
    r.set_defaults(func=cmd_export)

    r = sub.add_parser("dedupe", help="cluster near-duplicate accepted rows; write a deduplicated view")
    r.add_argument("output_dir")
    r.add_argument("--to", help="view directory (default OUTPUT_DIR/dedupe; must not exist)")
    r.add_argument("--on", choices=["response", "prompt", "both"], help="text to compare (default: job's dedupe.on)")
    r.add_argument("--threshold", type=float)
    r.add_argument("--num-perm", type=int)
    r.add_argument("--shingle", choices=["word", "char"])
    r.add_argument("--ngram", type=int)
    r.add_argument("--verify", choices=["exact", "estimate"])
    r.add_argument("--workers", type=int, help="processes for signatures (default: all cores)")
    r.set_defaults(func=cmd_dedupe)

    r = sub.add_parser("verify", help="check every shard against the manifest (exit 1 on any mismatch)")
    r.add_argument("output_dir")
    r.set_defaults(func=cmd_verify)

    r = sub.add_parser("licenses", help="list the license registry")
    r.set_defaults(func=cmd_licenses)

    r = sub.add_parser("train", help="train a student on a run's accepted rows (SFT and/or KD)")
    r.add_argument("train_file", help="train file (YAML); see examples/train.yaml")
    r.add_argument("--resume", action="store_true", help="continue from the output's last checkpoint")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_train)

    r = sub.add_parser("eval", help="compare students with the teacher on held-out prompts")
    r.add_argument("eval_file", help="eval file (YAML); see examples/eval.yaml")
    r.add_argument("--quiet", "-q", action="store_true")
    r.set_defaults(func=cmd_eval)
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
    except BrokenPipeError:  # `datagen licenses | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
