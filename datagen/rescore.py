"""``datagen rescore OUTPUT_DIR --teacher TEACHER.yaml``: a self-hosted teacher's top-k
log-probs over rows that already exist.

Soft distillation needs the teacher's distribution at every response token. An API
teacher may give none (or only strings), and survivors of filtering may come from a
teacher other than the one a student should match. Re-scoring runs a vLLM teacher
*teacher-forced* over prompt + response (vLLM ``prompt_logprobs``): no sampling, one
forward pass per row, and the top-k at each response position are stored in the usual
KD columns, so the trainer does not care what produced the text.

Which tokens are scored:

* the row's own ``token_ids`` when its ``tokenizer_fingerprint`` equals the re-scoring
  teacher's (a row from the same model family: exact, end-of-text token included);
* otherwise the response text, tokenized by the re-scoring teacher without special
  tokens (an API row: the end-of-text token is not scored, since the text has none).

The result is a derived store (like ``datagen dedupe``'s view), built aside (in
``.NAME.partial`` beside the destination, committing as it goes) and renamed into place
when every row is scored: the source is never modified. A re-score that is killed or
interrupted keeps what it committed there, and the same command run again continues
from it (a different teacher or top-k is refused rather than mixed in). Its rows keep their ids, text, verdicts and
licenses; ``token_ids``, the log-prob columns and ``tokenizer_fingerprint`` are the
re-scoring teacher's, ``provenance.logprobs_by`` names it and ``license.logprobs`` holds
its terms (a student trained on those log-probs learns from that teacher's outputs, so
``datagen export`` counts them in the row's class). Terms that cannot be mixed with a
row's own are refused before any engine starts. A row that cannot be scored (too long
for the context, empty) goes to the ``failed`` stream with its reason.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import TypeAdapter, ValidationError

from datagen import records
from datagen.config import Output, Runtime
from datagen.teachers.spec import SPECS, VLLMTeacher, teacher_identity
from datagen.validation import format_validation_error, read_yaml
from datagen.errors import ConfigError, DatagenError
from datagen.storage import open_store
from datagen.storage.derived import resumable_build
from datagen.storage.shards import ShardStore


@dataclass
class RescoreResult:
    dest: Path
    rows: int = 0
    by_ids: int = 0  # scored on the row's own token ids
    by_text: int = 0  # scored on the re-tokenized response text
    failed: Counter = field(default_factory=Counter)
    resumed: int = 0  # rows a killed or interrupted earlier call had already scored
    redone: int = 0  # batches sent again after their actor or node died under them
    renewed: int = 0  # replicas started anew after Ray gave up on them (TeacherFleet._renew)
    seconds: float = 0.0


def load_teacher(path: Path) -> VLLMTeacher:
    """One teacher mapping, as in a job file's ``teachers:`` list; it must be ``backend: vllm``."""
    data = read_yaml(path, what="teacher file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a teacher file must be one mapping (name, backend, model, ...)")
    spec = SPECS.get(data.get("backend"))  # type: ignore[arg-type]
    if spec is None or not spec.rescores:
        raise ConfigError(f"{path}: backend: re-scoring needs a self-hosted vLLM teacher (backend: vllm), "
                          f"got {data.get('backend')!r}")
    try:
        t = TypeAdapter(VLLMTeacher).validate_python(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where=str(path))) from None
    if t.sampling.logprobs is None:
        t = t.model_copy(update={"sampling": t.sampling.model_copy(update={"logprobs": 20})})
    return t


def rescore(src: Path, teacher: VLLMTeacher, *, dest: Path | None = None, runtime: Runtime | None = None,
            inflight_per_actor: int = 2, commit_every_s: float = 60.0) -> RescoreResult:
    import ray

    from datagen.run.cluster import StopFlag, init_ray
    from datagen.teachers.fleet import TeacherFleet, TeacherLost, TeacherRaised

    store = open_store(src)
    dest = dest or src / "rescored"
    k = teacher.sampling.logprobs
    lid = _terms(store, teacher)
    res = RescoreResult(dest=dest)
    started = time.perf_counter()
    src_meta = store.job_meta()
    # What the rows' log-probs depend on: a half-finished re-score continues only under it,
    # whatever its replicas, batch size or engine memory (teachers.spec.OPERATIONAL_*).
    meta = {**{key: v for key, v in src_meta.items() if key != "rescore"},
            "rescore": {"source": str(src), "teacher": teacher_identity(teacher.model_dump(mode="json")), "k": k}}
    output = Output(path=dest, shard_rows=50_000, commit_every_s=commit_every_s)
    with resumable_build(dest, meta, key="rescore", output=output) as out, StopFlag() as stop:
        done = out.row_ids(("accepted", "failed"))
        res.resumed = len(done)
        started_ray = init_ray(runtime or Runtime())
        try:
            # work items: (row, request); sent to TeacherActor.rescore
            fleet = TeacherFleet([teacher], startup_timeout_s=teacher_startup_s(runtime), limit=inflight_per_actor,
                                 call=lambda actor, work, opts: (actor.rescore.options(**opts) if opts
                                                                 else actor.rescore).remote([q for _, q in work], k=k),
                                 key=lambda item: item[0]["row_id"])
            if not fleet.wait_started(teacher_startup_s(runtime), lambda: stop.set):
                raise _interrupted(out, res)
            info = fleet.info[teacher.name]
            tag = f"{teacher.name}/vllm/{teacher.model}@{info.get('revision') or ''}"
            todo = (r for r in store.iter_rows("accepted") if r["row_id"] not in done)
            batches = ([(r, _request(r, info["tokenizer_fingerprint"], res)) for r in rows]
                       for rows in _batches(todo, teacher.batch_size))

            def take(answer: Any) -> None:
                for (row, _), g in zip(answer.work, answer.results):
                    _apply(row, g, info, tag)
                    row["license"] = {**row["license"], "logprobs": lid}
                    if g["error"]:
                        res.failed[g["error"].split(":", 1)[0]] += 1
                        out.add("failed", row)
                    else:
                        res.rows += 1
                        out.add("accepted", row)
                out.commit_due()

            try:
                # lost work runs again alone, or as any batch, as in a run; on a stop, what
                # is in flight comes back and is committed
                fleet.feed(teacher.name, batches, take, lambda: stop.set)
            except TeacherRaised as exc:
                raise DatagenError(f"re-scoring teacher {teacher.name!r} failed: {exc.cause}; "
                                   f"{_kept(out, res)}") from None
            except TeacherLost:
                raise DatagenError(f"re-scoring teacher {teacher.name!r}: every replica died and Ray did "
                                   f"not restart it; {_kept(out, res)}") from None
            finally:
                res.redone = fleet.redone
            res.renewed = sum(fleet.renewed.values())
            if stop.set:
                raise _interrupted(out, res)
        finally:
            if started_ray:
                ray.shutdown()
    res.seconds = time.perf_counter() - started
    return res


def _kept(out: ShardStore, res: RescoreResult) -> str:
    return (f"{res.resumed + res.rows + sum(res.failed.values())} rows scored so far are kept in {out.root}; "
            "run the command again to continue (its teacher file may change replicas, batch_size or "
            "engine memory settings, not the model)")


def _interrupted(out: ShardStore, res: RescoreResult) -> DatagenError:
    return DatagenError(f"interrupted: {_kept(out, res)}")


def _terms(store: ShardStore, teacher: VLLMTeacher) -> str:
    """The re-scoring teacher's license id, checked against every license already in the store."""
    from datagen.teachers import embedded
    from datagen.licenses import Registry

    meta = store.job_meta().get("job") or {}
    registry = Registry.for_job(meta)
    declared = teacher.license or (embedded.lookup(teacher.model).license if embedded.is_embedded(teacher.model)
                                   else None)
    lid = registry.teacher_license(model=teacher.model, license=declared)
    if lid is None or registry.get(lid) is None:
        raise ConfigError(f"teacher {teacher.name!r}: license: unknown terms for {teacher.model} "
                          f"({lid or 'none declared'}); set `license:` to an id `datagen licenses` lists")
    present = {v for per in store.manifest.license_totals().values() for v in per if v != "unknown"}
    clash = registry.conflicts(present | {lid})
    if clash:
        raise ConfigError(f"re-scoring with {lid} would mix terms that conflict: {'; '.join(clash)}")
    return lid


def teacher_startup_s(runtime: Runtime | None) -> float:
    return (runtime or Runtime()).startup_timeout_s


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _request(row: dict[str, Any], fingerprint: str, res: RescoreResult) -> dict[str, Any]:
    req: dict[str, Any] = {"row_id": row["row_id"], "messages": row["messages"]}
    if row.get("token_ids") and row.get("tokenizer_fingerprint") == fingerprint:
        req["response_ids"] = row["token_ids"]
        res.by_ids += 1
    else:
        req["response"] = row.get("response") or ""
        res.by_text += 1
    return req


def _apply(row: dict[str, Any], g: dict[str, Any], info: dict[str, Any], tag: str) -> None:
    row.update(
        token_ids=g["token_ids"], token_logprobs_q=records.quantize_logprobs(g["token_logprobs"]),
        tokenizer_fingerprint=info["tokenizer_fingerprint"] if not g["error"] else None,
        error=g["error"],
    )
    row["top_ids"], row["top_logprobs_q"] = records.encode_top(g["top_ids"], g["top_logprobs"])
    row["provenance"] = {**(row.get("provenance") or {}), "logprobs_by": tag}
