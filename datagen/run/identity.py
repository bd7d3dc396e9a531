"""What a run is: its fingerprint, the job stored with its output, and which changes a
resume accepts. ``prepare`` does everything that can fail on bad input before Ray starts
or a file is written.

Same rows asked for -> same fingerprint (``run_fingerprint``). A resume may change how a
run is made (``OPERATIONAL_*``: where and how fast teachers run, how many rows, the
output's layout) but nothing that decides a row; ``continue_run`` refuses the rest by
name. Not covered: which rows a store already holds (``storage``), or a row's own id
(``records.row_id``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datagen import licenses, records
from datagen.config import Job, parse_job
from datagen.errors import DatagenError
from datagen.filters import FilterChain
from datagen.prompts import PromptStream
from datagen.run.filter_pool import filter_context
from datagen.storage.shards import JOB_FILE, ShardStore
from datagen.teachers.spec import OPERATIONAL_ENGINE, OPERATIONAL_TEACHER, SPECS, teacher_identity

# Job-level parts that say how many rows to make and how to store them, never what one is.
OPERATIONAL_JOB = frozenset({"output", "runtime", "target_accepted", "budget"})


def run_fingerprint(job: Job, stream_hash: str, *, legacy: bool = False) -> str:
    """Same rows asked for -> same fingerprint: the job's content and its prompts' (the
    stream hash), without what a resume may change (``OPERATIONAL_JOB`` here, ``teachers.spec.OPERATIONAL_*``: the output's
    place and layout, the runtime, how many rows to make, how the teachers run).
    ``legacy``: the fingerprint outputs written before teacher settings could change on
    resume carry (it hashed how teachers ran too), so those still resume unchanged."""
    body = job.model_dump(mode="json", exclude={"output": {"path"}, "runtime": True,
                                                "target_accepted": True, "budget": True})
    # Paths out: the files' contents are in the stream hash, so a moved job still resumes.
    body["prompts"].pop("template")
    if body["prompts"].get("seeds"):
        body["prompts"]["seeds"].pop("path")
    for ev in (body["prompts"].get("decontaminate") or {}).get("evals", []):
        ev.pop("path")
    # New fields at their defaults stay out, so old outputs resume.
    if body.get("filter_short_circuit") is True:
        body.pop("filter_short_circuit")
    if legacy:
        for t in body["teachers"]:
            SPECS[t["backend"]].legacy_identity(t)
        return records.content_hash({"job": body, "prompts": stream_hash})
    body.pop("output")
    body["teachers"] = [teacher_identity(t) for t in body["teachers"]]
    for t in body["teachers"]:  # a chat template file: its text, not where it lies
        tpl = (t.get("engine") or {}).get("chat_template")
        if tpl and "{" not in tpl:
            try:
                t["engine"]["chat_template"] = records.content_hash(Path(tpl).read_text())
            except (OSError, UnicodeDecodeError):
                pass  # the engine reports it when it starts
    return records.content_hash({"job": body, "prompts": stream_hash, "v": 2})


def continue_run(job: Job, stream: PromptStream, store: ShardStore) -> list[str]:
    """Check that ``job`` asks for the rows ``store`` holds and make its rows carry the
    store's fingerprint. Returns the settings it changes (``teachers[t].replicas 1 -> 4``),
    all of them operational; anything else is refused, naming what changed."""
    stored = store.manifest.data["run_fingerprint"]
    before = parse_job(store.job_meta()["job"], where=f"{store.root}/{JOB_FILE}", base_dir=Path.cwd())
    old, new = before.model_dump(mode="json"), job.model_dump(mode="json")
    changes = [p for p in job_changes(old, new) if p != ("output", "path")]
    if stored not in (stream.run_fingerprint, run_fingerprint(job, stream.stream_hash, legacy=True)):
        root = store.root
        rows = [dotted(p) for p in changes if not is_operational(p)]
        if rows:
            raise DatagenError(
                f"{root} was written by a different job: {', '.join(rows[:6])}{' ...' if len(rows) > 6 else ''} "
                "changed since, and that decides what its rows are; put it back, or start a new output directory")
        if changes and run_fingerprint(before, stream.stream_hash, legacy=True) == stored:
            raise DatagenError(
                f"{root} was written by a datagen that could not resume a run with other teacher settings "
                f"({', '.join(dotted(p) for p in changes[:6])}); resume it with the job it was written with "
                "(`datagen resume` without --job), or start a new output directory")
        raise DatagenError(f"{root} no longer matches its run: the contents of the template, seed or eval files "
                           f"changed since (or its {JOB_FILE} was edited); put them back, or start a new output "
                           "directory")
    stream.run_fingerprint = stored
    return [_change_line(p, old, new) for p in changes]


def _change_line(path: tuple[str, ...], before: dict[str, Any], after: dict[str, Any]) -> str:
    def value(node: Any) -> Any:
        if path[0] == "teachers":
            node = next((t for t in node["teachers"] if t["name"] == path[1]), None)
            keys = path[2:]
        else:
            keys = path
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    if path[-1] in ("api_key_env", "base_url"):  # names a secret's place; may hold a pasted key
        return f"{dotted(path)} (changed)"
    return f"{dotted(path)}: {value(before)!r} -> {value(after)!r}"


def job_meta(job: Job, fingerprint: str, job_path: Path | None) -> dict[str, Any]:
    # The whole job is safe to store: secrets are referenced by env-var name only.
    return {
        "name": job.name,
        "run_fingerprint": fingerprint,
        "job_file": str(job_path) if job_path else None,
        "job": job.model_dump(mode="json"),
    }


def open_output(job: Job, stream: PromptStream, fingerprint: str, *, resume: bool,
                job_path: Path | None = None) -> tuple[ShardStore, list[str]]:
    """The store a run writes: a new one at ``job.output.path``, or (``resume``) the one
    there, after ``continue_run`` accepted the job. A resume that changes operational
    settings records the new job, so the next plain resume goes on with them. Returns the
    store, open for writing (the caller closes it), and the changed settings' lines."""
    from datagen.storage import create_store, open_store

    root = job.output.path
    if not resume:
        return create_store(root, job.output, job_meta=job_meta(job, fingerprint, job_path)), []
    store = open_store(root, job.output, for_writing=True)
    try:
        changed = continue_run(job, stream, store)
        if changed:
            store.write_job_meta(job_meta(job, stream.run_fingerprint, job_path))
    except BaseException:
        store.close()
        raise
    return store, changed


def prepare(job: Job) -> tuple[PromptStream, str]:
    """Everything that can fail on bad input, done before Ray starts or a file is written.
    Returns the job's prompt stream and its run fingerprint, which the stream's rows carry."""
    provisional = PromptStream(job, run_fingerprint="")
    fp = provisional.run_fingerprint = run_fingerprint(job, provisional.stream_hash)
    provisional.licenses = licenses.resolve_job(job, template=provisional.template)
    # Filters that judge against the seed (a reference answer, unit tests) refuse seeds
    # without it now, before a token is paid for.
    FilterChain(job.filters, provisional.template.spec.answer, context=filter_context(job.teachers)).check_seeds(
        provisional.seeds, id_field=provisional.template.spec.seeds.id_field)
    for t in job.teachers:
        if getattr(t, "api_key_env", None) and not os.environ.get(t.api_key_env):
            raise DatagenError(
                f"teacher {t.name!r}: environment variable {t.api_key_env} is not set "
                "(it should hold the API key)"
            )
    return provisional, fp



def is_operational(path: tuple[str, ...]) -> bool:
    """Whether a path from ``job_changes`` names a setting a resume may change."""
    if path[0] in OPERATIONAL_JOB:
        return True
    if path[0] != "teachers" or len(path) < 3:
        return False
    if path[2] == "engine":
        return len(path) > 3 and path[3] in OPERATIONAL_ENGINE
    return path[2] in OPERATIONAL_TEACHER


def job_changes(before: dict[str, Any], after: dict[str, Any],
                prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Where two jobs' JSON forms differ, as key paths; teachers are matched by name
    (``("teachers", NAME, "engine", "dtype")``), other lists compared whole."""
    out = []
    for key in sorted(set(before) | set(after), key=str):
        a, b, path = before.get(key), after.get(key), (*prefix, str(key))
        if path == ("teachers",) and isinstance(a, list) and isinstance(b, list):
            old, new = {t.get("name"): t for t in a}, {t.get("name"): t for t in b}
            for name in sorted(set(old) | set(new), key=str):
                if name not in old or name not in new:
                    out.append(("teachers", str(name)))
                elif old[name] != new[name]:
                    out += job_changes(old[name], new[name], ("teachers", str(name)))
        elif isinstance(a, dict) and isinstance(b, dict):
            out += job_changes(a, b, path)
        elif a != b:
            out.append(path)
    return out


def dotted(path: tuple[str, ...]) -> str:
    """A ``job_changes`` path as a user writes it: ``teachers[NAME].engine.dtype``."""
    if path[0] == "teachers" and len(path) > 1:
        return f"teachers[{path[1]}]" + "".join(f".{p}" for p in path[2:])
    return ".".join(path)
