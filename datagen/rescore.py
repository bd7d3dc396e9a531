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
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import TypeAdapter, ValidationError

from datagen import records
from datagen.config import Output, Runtime, VLLMTeacher, format_validation_error, read_yaml, teacher_identity
from datagen.errors import ConfigError, DatagenError, remote_cause
from datagen.storage.shards import ShardStore, resumable_build


@dataclass
class RescoreResult:
    dest: Path
    rows: int = 0
    by_ids: int = 0  # scored on the row's own token ids
    by_text: int = 0  # scored on the re-tokenized response text
    failed: Counter = field(default_factory=Counter)
    resumed: int = 0  # rows a killed or interrupted earlier call had already scored
    redone: int = 0  # batches sent again after their actor or node died under them
    renewed: int = 0  # replicas started anew after Ray gave up on them (runner._Actors._renew)
    seconds: float = 0.0


def load_teacher(path: Path) -> VLLMTeacher:
    """One teacher mapping, as in a job file's ``teachers:`` list; it must be ``backend: vllm``."""
    data = read_yaml(path, what="teacher file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a teacher file must be one mapping (name, backend, model, ...)")
    if data.get("backend") != "vllm":
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

    from datagen.replicas import lost_work_errors
    from datagen.run.driver import _Actors, _StopFlag, died_alone, init_ray

    store = ShardStore.open(src)
    dest = dest or src / "rescored"
    k = teacher.sampling.logprobs
    lid = _terms(store, teacher)
    res = RescoreResult(dest=dest)
    started = time.perf_counter()
    src_meta = store.job_meta()
    # What the rows' log-probs depend on: a half-finished re-score continues only under it,
    # whatever its replicas, batch size or engine memory (config.OPERATIONAL_*).
    meta = {**{key: v for key, v in src_meta.items() if key != "rescore"},
            "rescore": {"source": str(src), "teacher": teacher_identity(teacher.model_dump(mode="json")), "k": k}}
    output = Output(path=dest, shard_rows=50_000, commit_every_s=commit_every_s)
    with resumable_build(dest, meta, key="rescore", output=output) as out, _StopFlag() as stop:
        done = out.row_ids(("accepted", "failed"))
        res.resumed = len(done)
        started_ray = init_ray(runtime or Runtime())
        try:
            actors = _Actors(_OneTeacher(teacher), startup_timeout_s=teacher_startup_s(runtime))
            if not actors.wait_started(teacher_startup_s(runtime), lambda: stop.set):
                raise _interrupted(out, res)
            info = actors.info[teacher.name]
            tag = f"{teacher.name}/vllm/{teacher.model}@{info.get('revision') or ''}"
            # each in flight: (actor, [(row, request), ...])
            inflight: dict[Any, tuple[Any, list[tuple[dict[str, Any], dict[str, Any]]]]] = {}
            # Lost with a replica, to send again: as any batch, or alone (``_Actors.lost``), as a run does.
            again: deque[list[tuple[dict[str, Any], dict[str, Any]]]] = deque()
            suspects = actors.suspects[teacher.name]
            todo = (r for r in store.iter_rows("accepted") if r["row_id"] not in done)
            batches = _batches(todo, teacher.batch_size)
            exhausted = False

            def send(actor: Any, work: list[tuple[dict[str, Any], dict[str, Any]]], **options: Any) -> None:
                method = actor.rescore.options(**options) if options else actor.rescore
                inflight[method.remote([req for _, req in work], k=k)] = (actor, work)
                actors.load[actor] += 1

            def replica(pick: Callable[[], Any]) -> Any:
                try:
                    return pick()
                except DatagenError:
                    raise DatagenError(f"re-scoring teacher {teacher.name!r}: every replica died and Ray did "
                                       f"not restart it; {_kept(out, res)}") from None

            while True:
                if not stop.set and (suspect := replica(lambda: actors.suspect(teacher.name))) is not None:
                    send(*suspect, max_task_retries=0)
                while (again or not exhausted) and not stop.set:
                    if (actor := replica(lambda: actors.free(teacher.name, inflight_per_actor))) is None:
                        break
                    if again:
                        send(actor, again.popleft())
                        continue
                    rows = next(batches, None)
                    if rows is None:
                        exhausted = True
                        break
                    send(actor, [(r, _request(r, info["tokenizer_fingerprint"], res)) for r in rows])
                if not inflight:
                    # work left, and every replica that could take it is down
                    if (suspects or again or not exhausted) and not stop.set:
                        actors.liveness.wait(1.0)
                        continue
                    break
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                if not ready:
                    continue
                actor, work = inflight.pop(ready[0])
                actors.load[actor] -= 1
                try:
                    gens = ray.get(ready[0])
                except lost_work_errors() as exc:
                    # Its actor or node died and Ray's own retries ran out: the rows are
                    # scored again, maybe alone, as in a run; one that killed its replica alone fails.
                    res.redone += 1
                    lost_again, culprit = actors.lost(actor, teacher.name, work, work[0][0]["row_id"], exc)
                    if lost_again:
                        again.append(lost_again)
                    if culprit is None:
                        continue
                    work, gens = [culprit], [died_alone(culprit[0]["row_id"], exc)]
                except ray.exceptions.RayError as exc:
                    raise DatagenError(f"re-scoring teacher {teacher.name!r} failed: {remote_cause(exc)}; "
                                       f"{_kept(out, res)}") from None
                else:
                    actors.returned(actor, teacher.name)
                for (row, _), g in zip(work, gens):
                    _apply(row, g, info, tag)
                    row["license"] = {**row["license"], "logprobs": lid}
                    if g["error"]:
                        res.failed[g["error"].split(":", 1)[0]] += 1
                        out.add("failed", row)
                    else:
                        res.rows += 1
                        out.add("accepted", row)
                out.commit_due()
            res.renewed = sum(actors.renewed.values())
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


class _OneTeacher:
    """The slice of a Job that ``runner._Actors`` reads: one teacher."""

    def __init__(self, teacher: VLLMTeacher):
        self.teachers = [teacher]


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
