"""``datagen`` command line: run, resume, validate, preview, expand, schema, inspect, report, dedupe,
rescore, export, verify, submit, jobs, cancel, licenses, train, eval, route, onpolicy.

Exit codes: 0 done; 1 error (one line, names the problem); 2 usage; 3 the job finished
but some rows failed at the teacher (``datagen resume`` retries them); 130 interrupted
(committed rows are valid; ``datagen resume`` finishes the job); ``errors.EXIT_*``.

Long: one argparse table for twenty verbs, each verb a few lines that call the module
that does its work (``run``, ``storage``, ``report``, ``dedupe``, ``rescore``, ``export``, ``submit``, ``train``,
``route``, ``onpolicy``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from datagen.errors import EXIT_ERROR, EXIT_FAILED_ROWS, EXIT_INTERRUPTED, DatagenError


def _plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")


def _run(job, job_path: Path | None, *, resume: bool, quiet: bool) -> int:
    from datagen import report, run as runner
    from datagen.console import LiveProgress, summary_table, where_line

    out = Console()
    err = Console(stderr=True, quiet=quiet)  # progress: silenced by --quiet
    warn = Console(stderr=True)  # what the user must act on: never silenced
    # A run allocates millions of short-lived containers (a row's top-k is ~100 lists):
    # at the default threshold (700) the collector ran ~1000 times per 20k rows and its
    # full passes walked every long-lived object, ~30% of the driver's CPU.
    gc.set_threshold(100_000, 10, 10)
    stream, fingerprint = runner.prepare(job)
    root = job.output.path
    store, changed = runner.open_output(job, stream, fingerprint, resume=resume, job_path=job_path)
    for line in changed:
        warn.print(f"resuming with {line}", soft_wrap=True, highlight=False, markup=False)
    prompt_lines = _write_prompts_report(stream, store)
    gc.freeze()  # the plan, the seeds and the modules live as long as the run: out of the collector's way
    try:
        with LiveProgress(err, job.name) as progress:
            stats = runner.execute(job, store, stream, on_progress=progress)
    finally:
        store.close()
    page = report.after_run(root, job.output, warn)  # never raises: a failure is one warning line
    if not quiet:
        out.print(summary_table(stats, store))
        for line in prompt_lines:
            out.print(line, soft_wrap=True, highlight=False)
        out.print(where_line(store) + (f"\nreport: {page}" if page else ""), soft_wrap=True, highlight=False)
    died = stats.reasons.get(("failed", "teacher_died"), 0)
    if stats.lost:  # something died on the way: say so, even with --quiet
        what = ", ".join(f"{n} {_plural(kind, n)}" for kind, n in sorted(stats.lost.items()))
        cost = "it cost time, not rows" if not died else "and the rows it cost, below"
        warn.print(f"redone after an actor or node died: {what} ({cost})", style="yellow", soft_wrap=True)
    if died:
        warn.print(f"{died} {_plural('row', died)} failed alone: the teacher's replica died running "
                   f"{'each' if died > 1 else 'it'} alone, after dying with {'them' if died > 1 else 'it'} in a "
                   "batch (a prompt that crashes or hangs the engine; the row's error says how)",
                   style="yellow", soft_wrap=True)
    if stats.metrics is not None and stats.metrics.log.problem:
        warn.print(f"note: {stats.metrics.log.problem} (the run's rows are not affected)", soft_wrap=True)
    if stats.interrupted:
        warn.print(f"interrupted: committed rows are safe; `datagen resume {root}` finishes the job",
                   style="yellow", soft_wrap=True, markup=False)
        return EXIT_INTERRUPTED
    unresolved = store.unresolved_failures()
    if unresolved:
        warn.print(f"{unresolved} {_plural('row', unresolved)} failed at the teacher (reasons above); "
                  f"`datagen resume {root}` retries them", style="yellow", markup=False)
        return EXIT_FAILED_ROWS
    return 0


def _output_arg(arg: str, *, command: str | None = None) -> Path | str:
    """An output directory resolved, or an object-store URL as given (refused by
    ``command``s that work on local files only)."""
    if "://" in arg:
        if command:
            raise DatagenError(f"`datagen {command}` works on a local output; copy {arg} to disk first")
        return arg
    return Path(arg).resolve()


def _write_prompts_report(stream, store) -> list[str]:
    """The prompt plan's diversity report, a side file of the store (``inspect`` shows it)."""
    from datagen.prompts import diversity

    rep = diversity.report(stream, seed=stream.job.seed)
    store.attach(diversity.REPORT_FILE, json.dumps(rep, indent=1))  # local disk or object store
    return diversity.lines(rep)


def cmd_run(args: argparse.Namespace) -> int:
    from datagen.config import load_job

    job = load_job(args.job, output=args.output)
    return _run(job, Path(args.job).resolve(), resume=False, quiet=args.quiet)


def cmd_resume(args: argparse.Namespace) -> int:
    from datagen.config import load_job, parse_job
    from datagen.storage import open_store
    from datagen.storage.shards import JOB_FILE

    root = _output_arg(args.output_dir)
    meta = open_store(root).job_meta()  # clear errors for a non-output or a damaged one
    derived = next((k for k in ("export", "dedupe") if k in meta), None)
    if derived:
        raise DatagenError(f"{root} is a derived dataset (made by `datagen {derived}`), not a run; "
                           "resume the run it came from instead")
    if args.job:  # the same rows, made with the settings of this file (checked in _run)
        job_path = Path(args.job).resolve()
        job = load_job(args.job)
    else:
        job_path = Path(meta["job_file"]) if meta.get("job_file") else None
        job = parse_job(meta["job"], where=f"{root}/{JOB_FILE}",
                        base_dir=Path.cwd() if isinstance(root, str) else root)
    job = job.model_copy(update={"output": job.output.model_copy(update={"path": root})})
    return _run(job, job_path, resume=True, quiet=args.quiet)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel an output's open provider batches. A verb of its own, like resume: it acts
    on an output, not a job file, and it takes the output's lock, so it never races a
    live run (stop that first; its batches stay open until cancelled or finished)."""
    from datagen.batch import BatchRoom
    from datagen.config import parse_job
    from datagen.storage import open_store
    from datagen.storage.shards import JOB_FILE

    root = _output_arg(args.output_dir, command="cancel")
    store = open_store(root, for_writing=True)
    try:
        job = parse_job(store.job_meta()["job"], where=f"{root}/{JOB_FILE}", base_dir=root)
        room = BatchRoom(job.teachers, root)
        if not room.teachers:
            raise DatagenError(f"{root}: its job has no teacher with mode: batch, so no batches to cancel")
        cancelled = room.cancel()
    finally:
        store.close()
    for b in cancelled:
        print(f"batch {b.key} ({b.teacher}, {b.rows} rows, provider id {b.id}): {b.status}")
    print(f"{len(cancelled)} open {_plural('batch', len(cancelled))} cancelled; `datagen resume {root}` "
          "keeps the rows they answered and submits the rest again")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from datagen import run as runner
    from datagen.config import load_job

    job = load_job(args.job, output=args.output)
    stream, fingerprint = runner.prepare(job)
    teachers = ", ".join(f"{t.name} ({t.backend}, {t.model}, n={t.sampling.n})" for t in job.teachers)
    for line in stream.plan.report["bad_seed_rows"]:
        print(f"skipped bad seed row: {line}", file=sys.stderr)
    print(f"ok: {args.job}: {len(stream.plan.slots)} prompts from template {stream.template.spec.id} "
          f"v{stream.template.spec.version} -> {len(stream)} rows; teachers: {teachers}; "
          f"output {job.output.path}; fingerprint {fingerprint[:12]}")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    """Rendered prompts and the diversity report; no teacher is called, nothing is written,
    so the job file need not list any teacher."""
    from datagen.config import load_job
    from datagen.prompts import PromptStream, diversity

    job = load_job(args.job, need_teachers=False)
    stream = PromptStream(job, run_fingerprint="")  # no teacher checks: an API key need not be set
    shown = [stream.prompt(k) for k in range(min(args.n, len(stream.plan.slots)))]
    rep = diversity.report(stream, seed=job.seed) if not args.no_report else None
    if args.json:
        print(json.dumps({"prompts": [{"messages": m, "provenance": p} for m, p in shown], "report": rep},
                         indent=1, ensure_ascii=False))
        return 0
    for k, (messages, prov) in enumerate(shown):
        tags = f"seed {prov['seed_ids'][0]}" + "".join(f" · {a['name']}={a['value']}" for a in prov["axes"] or [])
        print(f"--- prompt {k + 1} of {len(stream.plan.slots)} ({tags})")
        for m in messages:
            print(f"[{m['role']}] {m['content']}")
    if rep is not None:
        print("---")
        for line in diversity.lines(rep):
            print(line)
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    """Evol-Instruct or Self-Instruct with one of the job's teachers -> a new seed file."""
    from datagen.config import load_job
    from datagen.prompts import expand

    job = load_job(args.job)
    out = Path(args.out).resolve()
    if args.method == "evol":
        res = expand.evol_instruct(job, out=out, teacher=args.teacher, field=args.field, rounds=args.rounds,
                                   limit=args.limit)
    else:
        if not args.count:
            raise DatagenError("--count: self-instruct needs the number of new tasks to write")
        res = expand.self_instruct(job, out=out, count=args.count, teacher=args.teacher, field=args.field,
                                   examples=args.examples)
    dropped = ", ".join(f"{k} {v}" for k, v in res.dropped.items()) or "none"
    print(f"wrote {res.written} new seeds to {res.path} (dropped: {dropped}; failed calls: {res.failed}); "
          f"provenance in {res.path.name}.meta.json")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from datagen.config import job_schema

    print(json.dumps(job_schema(), indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from datagen.console import inspect_output
    from datagen.storage import open_store

    store = open_store(_output_arg(args.output_dir))
    inspect_output(store, Console(), rows=args.rows, stream=args.stream, as_json=args.json)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from datagen.report import write_report

    dest = write_report(_output_arg(args.output_dir), Path(args.to).resolve() if args.to else None,
                        train=args.train and Path(args.train), eval_file=args.eval and Path(args.eval),
                        routing=args.routing and Path(args.routing))
    print(f"report: {dest}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from datagen.export import export

    res = export(_output_arg(args.output_dir, command="export"), Path(args.to).resolve(), license_class=args.license_class,
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
    from datagen.dedupe.view import dedupe
    from datagen.storage import open_store

    src = _output_arg(args.output_dir, command="dedupe")
    job = (open_store(src).job_meta().get("job") or {})
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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 (got {text!r})")
    return value


def cmd_rescore(args: argparse.Namespace) -> int:
    from datagen.rescore import load_teacher, rescore

    teacher = load_teacher(Path(args.teacher))
    if args.logprobs is not None:
        teacher = teacher.model_copy(update={"sampling": teacher.sampling.model_copy(update={"logprobs": args.logprobs})})
    res = rescore(_output_arg(args.output_dir, command="rescore"), teacher,
                  dest=Path(args.to).resolve() if args.to else None, commit_every_s=args.commit_every)
    failed = ", ".join(f"{why}: {n}" for why, n in sorted(res.failed.items())) or "none"
    if res.resumed:
        print(f"continued a re-score stopped half-way: {res.resumed} rows were already scored")
    print(f"re-scored {res.rows} rows with top-{teacher.sampling.logprobs} from {teacher.name} "
          f"({res.by_ids} on their own token ids, {res.by_text} on re-tokenized text; failed: {failed}) "
          f"in {res.seconds:.1f} s -> {res.dest}")
    if res.redone:
        print(f"{res.redone} batch(es) scored again after their engine's actor or node died")
    if res.renewed:
        print(f"{res.renewed} replica(s) started anew after Ray gave up restarting them")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from datagen.storage.verify import verify

    root = _output_arg(args.output_dir)
    rep = verify(root)
    for note in rep.notes:
        print(f"note: {note}", file=sys.stderr)
    for problem in rep.problems:
        print(f"error: {root}/{problem}", file=sys.stderr)
    if rep.problems:
        return EXIT_ERROR
    print(f"ok: {root}: {rep.shards} shards, {rep.rows} rows match the manifest")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from datagen import submit

    sub = submit.build(args.job, working_dir=args.working_dir, output=args.output, requirements=args.requirements,
                       runtime_env_file=args.runtime_env, env=args.env or [], python=args.python,
                       resume=args.resume)
    for warning in sub.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    job_id = submit.submit(sub, address=args.address)
    print(job_id)
    if sub.metadata["datagen_secret_env"]:
        print(f"the cluster must provide: {sub.metadata['datagen_secret_env'].replace(',', ', ')}", file=sys.stderr)
    if not args.follow:
        print(f"follow it: datagen jobs logs {job_id} --follow", file=sys.stderr)
        return 0
    final = submit.follow(job_id, address=args.address)
    print(f"job {job_id}: {final}", file=sys.stderr)
    return submit.EXIT.get(final, 1)


def cmd_jobs(args: argparse.Namespace) -> int:
    from datagen import submit

    if args.action == "status":
        info = submit.status(args.job_id, address=args.address)
        print(json.dumps(info, indent=1, default=str) if args.json else
              f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            return submit.EXIT.get(submit.follow(args.job_id, address=args.address), 1)
        sys.stdout.write(submit.logs(args.job_id, address=args.address))
        return 0
    stopped = submit.stop(args.job_id, address=args.address)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def cmd_licenses(args: argparse.Namespace) -> int:
    from datagen.licenses import Registry

    reg = Registry()
    for lid, t in sorted(reg.terms.items(), key=lambda kv: (kv[1].rank, kv[0])):
        print(f"{lid:<36} {t.license_class:<12} outputs may train other models: {t.outputs_train_other_models:<12} {t.name}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from datagen.train.cli import run_train

    return run_train(args.train_file, resume=args.resume, quiet=args.quiet, check=args.check)


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
    r.add_argument("--job", help="go on with this job file's settings: how its teachers run (replicas, engine "
                   "memory, concurrency, rate limits, time-outs), the runtime, target and budget may differ "
                   "from the run's; what decides a row may not")
    r.add_argument("--quiet", "-q", action="store_true")
    r.set_defaults(func=cmd_resume)

    r = sub.add_parser("cancel", help="cancel an output's open provider batches (teachers with mode: batch)")
    r.add_argument("output_dir")
    r.set_defaults(func=cmd_cancel)

    r = sub.add_parser("validate", help="check a job file and everything it points to")
    r.add_argument("job")
    r.add_argument("--output", "-o")
    r.set_defaults(func=cmd_validate)

    r = sub.add_parser("preview", help="print rendered prompts and the diversity report (calls no teacher)")
    r.add_argument("job")
    r.add_argument("-n", type=int, default=5, help="prompts to print (default 5)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.add_argument("--no-report", action="store_true", help="skip the diversity report")
    r.set_defaults(func=cmd_preview)

    r = sub.add_parser("expand", help="grow the job's seeds with a teacher (Evol-Instruct, Self-Instruct)")
    r.add_argument("job")
    r.add_argument("--method", choices=["evol", "self-instruct"], required=True)
    r.add_argument("--out", required=True, help="the new seed file (JSONL; must not exist)")
    r.add_argument("--teacher", help="which of the job's teachers (default: the first)")
    r.add_argument("--field", help="the seed column holding the instruction (default: the only text variable)")
    r.add_argument("--rounds", type=int, default=1, help="evol: rounds of mutation (survivors evolve again)")
    r.add_argument("--limit", type=int, help="evol: evolve at most this many seeds")
    r.add_argument("--count", type=int, help="self-instruct: new tasks to write")
    r.add_argument("--examples", type=int, default=3, help="self-instruct: seed tasks shown per request")
    r.set_defaults(func=cmd_expand)

    r = sub.add_parser("schema", help="print the JSON Schema of job files")
    r.set_defaults(func=cmd_schema)

    r = sub.add_parser("inspect", help="counts, schema and a few rows of an output directory")
    r.add_argument("output_dir")
    r.add_argument("--rows", "-n", type=int, default=3)
    r.add_argument("--stream", choices=["accepted", "rejected", "failed"], default="accepted")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=cmd_inspect)

    r = sub.add_parser("report", help="write one self-contained HTML page that shows an output at a glance")
    r.add_argument("output_dir")
    r.add_argument("--to", help="the HTML file (default OUTPUT_DIR/report.html)")
    r.add_argument("--train", help="a `datagen train` output: its loss curves go into the page")
    r.add_argument("--eval", help="a `datagen eval` report (JSON): its table goes into the page")
    r.add_argument("--routing", help="a `datagen route report` folder (or its report.json): curves, operating "
                                     "points and slices go into the page (default: TRAIN/route or OUTPUT_DIR/route)")
    r.set_defaults(func=cmd_report)

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

    r = sub.add_parser("rescore", help="a vLLM teacher's top-k logprobs over existing rows (teacher-forced)")
    r.add_argument("output_dir")
    r.add_argument("--teacher", required=True, help="YAML file with one vLLM teacher (as in a job's teachers: list)")
    r.add_argument("--to", help="destination directory (default OUTPUT_DIR/rescored; must not exist)")
    r.add_argument("--logprobs", type=int, choices=range(1, 21), metavar="K", help="top-k to store (1-20; default the teacher's, else 20)")
    r.add_argument("--commit-every", type=_seconds, default=60.0, metavar="S",
                   help="commit scored rows at least every S seconds (default 60): what a killed re-score keeps")
    r.set_defaults(func=cmd_rescore)

    r = sub.add_parser("verify", help="check every shard against the manifest (exit 1 on any mismatch)")
    r.add_argument("output_dir")
    r.set_defaults(func=cmd_verify)

    address = {"help": "Ray job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)"}
    r = sub.add_parser("submit", help="run a job file on a Ray cluster through the Ray Jobs API")
    r.add_argument("job", help="job file (YAML), inside the working directory")
    r.add_argument("--address", **address)
    r.add_argument("--output", "-o", help="output.path on the cluster: s3://bucket/prefix or shared storage")
    r.add_argument("--working-dir", help="folder to upload (default: the current one)")
    r.add_argument("--requirements", help="pip requirements file to install on the cluster")
    r.add_argument("--runtime-env", help="runtime env template (YAML), e.g. cluster/runtime-env.yaml")
    r.add_argument("--env", action="append", metavar="NAME=VALUE", help="non-secret env var for the job")
    r.add_argument("--python", default="python", help="python on the cluster (default: python)")
    r.add_argument("--follow", "-f", action="store_true", help="stream the job's logs until it ends")
    r.add_argument("--resume", action="store_true", help="finish the run already in the output, with this "
                   "file's teacher settings (`datagen resume OUTPUT --job JOB` on the cluster)")
    r.set_defaults(func=cmd_submit)

    r = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    r.add_argument("action", choices=["status", "logs", "stop"])
    r.add_argument("job_id")
    r.add_argument("--address", **address)
    r.add_argument("--follow", "-f", action="store_true", help="logs: stream until the job ends")
    r.add_argument("--json", action="store_true", help="status: machine-readable")
    r.set_defaults(func=cmd_jobs)

    r = sub.add_parser("licenses", help="list the license registry")
    r.set_defaults(func=cmd_licenses)

    r = sub.add_parser("train", help="train a student on a run's accepted rows (SFT and/or KD)")
    r.add_argument("train_file", help="train file (YAML); see examples/train.yaml")
    r.add_argument("--resume", action="store_true", help="continue from the output's last checkpoint")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    r.add_argument("--check", action="store_true",
                   help="check the file, the student's size and the scaling settings; train nothing")
    r.set_defaults(func=cmd_train)

    r = sub.add_parser("eval", help="compare students with the teacher on held-out prompts")
    r.add_argument("eval_file", help="eval file (YAML); see examples/eval.yaml")
    r.add_argument("--quiet", "-q", action="store_true")
    r.set_defaults(func=cmd_eval)

    from datagen.route.cli import add_parser as add_route  # its own module: route/cli.py
    add_route(sub)
    from datagen.onpolicy.cli import add_parser as add_onpolicy  # onpolicy/cli.py
    add_onpolicy(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DatagenError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `datagen licenses | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
