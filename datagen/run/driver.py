"""The driver of a run: prompt stream -> teacher fleet (Ray) -> filters -> shard store.

Plain Ray actors, not Ray Data: see docs/architecture.md for the reasons (in short,
incremental commits and exact-once resume need a single committer that sees every row
as it lands; a Ray Data ``Datasink`` commits once, at the end of the whole write).

``execute`` sets the run up and tears it down (commit what was received, however it
ends); ``Driver.loop`` is the loop: fill free teacher slots, wait for a teacher batch or
a filter batch, route rows, commit when due. Backpressure: a teacher actor never holds
more than its slots (``teachers.fleet.slots``), and the driver pulls the next prompt
from the (lazy) stream only when a batch slot is free, so memory is bounded by actors x
slots x batch size, whatever the job size. Lost work, renewed replicas and placement
are the fleet's (``teachers/fleet.py``); verdicts the filter pool's
(``run/filter_pool.py``); when to stop the quota's (``run/quota.py``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from datagen import records
from datagen.batch import BatchRoom
from datagen.config import Job
from datagen.dedupe.view import row_text, write_view
from datagen.errors import DatagenError, OutputError
from datagen.filters import FilterError
from datagen.prompts import PromptStream, Request
from datagen.run import metrics
from datagen.run.cluster import StopFlag, check_resources, init_ray
from datagen.run.filter_pool import FilterFailed, FilterPool, Pending, PromptGroups, filter_context
from datagen.run.quota import Quota
from datagen.run.rows import make_row
from datagen.run.stats import RunStats
from datagen.storage.shards import ShardStore
from datagen.teachers.fleet import TeacherFleet, TeacherRaised


def execute(job: Job, store: ShardStore, stream: PromptStream,
            on_progress: Callable[[RunStats], None] | None = None) -> RunStats:
    """Run the job into ``store``. Rows already committed there are skipped (resume).
    ``stream`` is the one ``run.identity.prepare`` returned (its fingerprint and licenses set)."""
    import ray

    if stream.licenses is None:
        raise ValueError("execute takes the stream run.prepare returns (its licenses resolved)")
    stats = RunStats(total=len(stream))
    started_ray = init_ray(job.runtime)
    fleet = None
    stats.metrics = metrics.RunMetrics(job, store, dashboard=metrics.dashboard_links())
    try:
        with StopFlag() as stop:
            if started_ray:
                check_resources(job.teachers)
            online = [t for t in job.teachers if not t.in_batches]  # mode: batch runs no actor (datagen/batch/)
            fleet = TeacherFleet(online, startup_timeout_s=job.runtime.startup_timeout_s,
                                 inflight_per_actor=job.runtime.inflight_per_actor)
            r = job.runtime
            filters = FilterPool(job.filters, stream.template.spec.answer, short_circuit=job.filter_short_circuit,
                                 context=filter_context(job.teachers), actors=r.filter_actors,
                                 num_cpus=r.filter_num_cpus, slots=r.inflight_per_actor)
            dedup = _start_dedupe(job, store) if job.dedupe.streaming else None
            if on_progress:
                on_progress(stats)
            if fleet.wait_started(job.runtime.startup_timeout_s, lambda: stop.set):
                stats.teachers_ready = time.monotonic()
                try:
                    Driver(job, store, stream, stats, fleet, filters, dedup, stop, on_progress).loop()
                finally:
                    if fleet.renewed:
                        stats.lost["new teacher replica"] += sum(fleet.renewed.values())
            stats.interrupted = stop.set
            # Rows already received are complete: commit them. In-flight batches are not
            # committed; `datagen resume` regenerates them under the same ids.
            store.commit_all()
            stats.generation_ended = time.monotonic()
            if dedup is not None and not stats.interrupted:
                _finish_dedupe(job, store, dedup, stats)
            if dedup is not None and dedup.rebuilds:
                stats.lost["dedupe index rebuild"] += dedup.rebuilds
    except DatagenError as exc:
        # Commit what was received before stopping, unless writing is what broke.
        if not isinstance(exc, OutputError):
            _commit_quietly(store)
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep what can be kept
        stats.interrupted = True
        _commit_quietly(store)
    except BaseException:
        # A bug or an unexpected error: still commit what was received, then show it.
        _commit_quietly(store)
        raise
    finally:
        stats.metrics.close(stats)  # the last line: after the final commit, however the run ended
        if started_ray:
            ray.shutdown()  # frees actors and placement groups with it
        elif fleet is not None:
            fleet.close()
    if on_progress:
        on_progress(stats)
    return stats


class Driver:
    """One run's loop and the state it shares: the single committer. Failed rows are
    routed at once; the rest go to the filters and are routed when their verdicts come
    back, so verifying never holds up generating."""

    def __init__(self, job: Job, store: ShardStore, stream: PromptStream, stats: RunStats, fleet: TeacherFleet,
                 filters: FilterPool, dedup: Any, stop: StopFlag,
                 on_progress: Callable[[RunStats], None] | None = None):
        self.job, self.store, self.stats, self.fleet, self.filters = job, store, stats, fleet, filters
        self.dedup, self.stop, self.on_progress = dedup, stop, on_progress
        self.teachers = {t.name: t for t in job.teachers}
        self.quota = Quota(job.target_accepted, job.budget, store)
        spec = stream.template.spec
        self.row_licenses = {name: {"teacher": lid, "seed": spec.seeds.license, "template": spec.license}
                             for name, lid in stream.licenses.items()}
        self.sampling = {name: t.sampling.model_dump(include={"temperature", "top_p", "max_tokens", "logprobs",
                                                              "stop"})
                         for name, t in self.teachers.items()}
        grouped = any(type(f).groups_by_prompt for f in job.filters)
        self.groups = PromptGroups(store) if grouped else None
        done = store.row_ids(("accepted", "rejected"))
        # Teachers with mode: batch answer through provider batch jobs (datagen/batch/);
        # rows their submitted batches hold are in flight, not pulled again.
        self.batches = stats.batches = BatchRoom(job.teachers, store.root)
        held = self.batches.resume(done | store.row_ids(("failed",))) if self.batches.teachers else set()
        for _ in held:
            self.quota.pulled()
        done |= held
        self.pending = _Peekable(_not_done(stream, done, stats, self.groups.skipped if self.groups else None))
        self.last_prompt: str | None = None
        self.buffers: dict[str, list[Request]] = {name: [] for name in self.teachers}
        self.ready: deque[tuple[str, list[Request]]] = deque()
        self.exhausted = False
        self.consecutive_failures = 0
        # by the id rows carry in provenance.seed_ids (numbered rows have no id field)
        self.seeds = dict(zip(stream.template.seeds.ids, stream.template.seeds.rows))
        self.meter = stats.metrics
        self.meter.watch(inflight=fleet.inflight, ready=self.ready, actors=fleet, filters=filters, dedup=dedup)
        self.meter.teacher_slots(fleet.limit)

    def loop(self) -> None:
        import ray

        while not self.stop.set:
            self.fleet.resend(again=not self.filters.saturated())  # lost work first: alone, or as any batch
            self.fill()
            if not self.fleet.inflight and not self.filters.busy() and not self.batches.busy():
                if self.ready or self.fleet.owes():
                    self.fleet.liveness.wait(1.0)  # only when replicas are down: until one may be back
                    continue  # partial batches the quota just flushed, or lost work: send them
                if self.groups is not None and self.groups.held:
                    self.to_filters(self.groups.flush())  # groups a budget cut short vote with what they have
                    continue
                self.stats.stop_reason = self.quota.stop_reason() or ("prompts_exhausted" if self.quota.target
                                                                      else None)
                return
            refs = list(self.fleet.inflight) + self.filters.refs()
            if refs:
                done, _ = ray.wait(refs, num_returns=1, timeout=self.batches.wait_s(1.0))
            else:
                done = []
                if self.batches.busy():  # only provider batches are out: until the next poll
                    time.sleep(self.batches.wait_s(1.0))
            for teacher, work, results in self.batches.answers():
                self.answered(teacher, work, results)
            for ref in done:
                if ref in self.fleet.inflight:
                    self.teacher_batch(ref)
                else:
                    self.filter_batch(ref)
            self.store.commit_due()
            self.meter.tick(self.stats)
            if self.on_progress:
                self.on_progress(self.stats)

    def fill(self) -> None:
        """Send ready batches to free replicas, and pull prompts into batches while a slot
        could take one (backpressure: one waiting batch per replica at most)."""
        while True:
            # The first ready batch whose teacher has a free actor (one busy teacher
            # must not hold up another's batches).
            pick = next(((i, a) for i, (n, _) in enumerate(self.ready)
                         if (a := self.fleet.free(n)) is not None), None)
            if pick is not None and not self.filters.saturated():
                i, actor = pick
                name, batch = self.ready[i]
                del self.ready[i]
                self.fleet.send(actor, name, batch)
                continue
            if self.exhausted or len(self.ready) >= max(1, self.fleet.replicas):
                return  # backpressure: pull no more prompts until a slot frees
            finishing_group = (self.groups is not None and self.quota.stop_reason() is None
                               and (nxt := self.pending.peek()) is not None and nxt.prompt_id == self.last_prompt)
            if not self.quota.room() and not finishing_group:
                # Enough is in flight for the target (or a budget is spent): send the
                # partial batches, and pull again only if rows in flight get rejected.
                # (Grouped filters first get the rest of the current prompt's samples.)
                self.flush_buffers()
                return
            req = self.pending.next()
            if req is None:
                self.exhausted = True
                self.flush_buffers()
                continue
            self.quota.pulled()
            self.meter.pulled_one()
            self.last_prompt = req.prompt_id
            if self.groups is not None:
                nxt = self.pending.peek()
                self.groups.pulled(req.prompt_id, last=nxt is None or nxt.prompt_id != req.prompt_id)
            if self.batches.add(req):
                continue
            buffer = self.buffers[req.teacher]
            buffer.append(req)
            if len(buffer) >= self.teachers[req.teacher].batch_size:
                self.ready.append((req.teacher, buffer))
                self.buffers[req.teacher] = []

    def flush_buffers(self) -> None:
        self.batches.flush()
        self.ready.extend((n, b) for n, b in self.buffers.items() if b)
        self.buffers = {n: [] for n in self.teachers}

    def teacher_batch(self, ref: Any) -> None:
        """A teacher batch is back from the fleet."""
        try:
            answer = self.fleet.collect(ref)
        except TeacherRaised as exc:
            raise DatagenError(f"{exc}; committed rows are intact, `datagen resume {self.store.root}` "
                               "continues") from None
        if self.fleet.redone:
            self.stats.lost["teacher batch"] = self.fleet.redone
        if answer is None:
            return  # lost with its replica: the fleet sends it again, same row ids
        self.answered(answer.teacher, answer.work, answer.results)

    def answered(self, name: str, work: list[Request], results: list[dict[str, Any]]) -> None:
        """A teacher's answers (a fleet batch, or rows of a provider batch): failed rows
        are routed now, the rest go to the filters."""
        self.meter.generated_rows(name, len(results))
        info = self.fleet.info[name] if name in self.fleet.info else self.batches.info[name]
        good: list[dict[str, Any]] = []
        for req, gen in zip(work, results):
            row = make_row(req, gen, info, self.sampling[name], self.row_licenses[name],
                           price=self.teachers[name].billed_price)
            if gen["error"]:
                self.consecutive_failures += 1
                self.route("failed", row, 0)
                if self.groups is not None:
                    good += self.groups.failed(req.prompt_id)
                if self.consecutive_failures >= self.job.runtime.max_consecutive_failures:
                    raise DatagenError(
                        f"teacher {name!r} failed {self.consecutive_failures} rows in a row "
                        f"(last: {gen['error'][:200]}); committed rows are intact: fix the "
                        f"teacher, then `datagen resume {self.store.root}`"
                    )
                continue
            self.consecutive_failures = 0
            self.stats.prompt_tokens += gen["prompt_tokens"] or 0
            self.stats.completion_tokens += gen["completion_tokens"] or 0
            if row["usage"]["cost_usd"] is not None:
                self.stats.cost_usd = (self.stats.cost_usd or 0.0) + row["usage"]["cost_usd"]
            good += self.groups.add(row) if self.groups is not None else [row]
        self.to_filters(good)

    def filter_batch(self, ref: Any) -> None:
        try:
            finished = self.filters.done(ref)  # None: its actor was lost, the batch requeued
        except FilterFailed as exc:
            raise _filter_failed(exc, self.store) from None
        if finished is not None:
            self.judged(*finished)
        else:
            self.stats.lost["filter batch"] += 1

    def to_filters(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        row_seeds = [self.seeds.get((r["provenance"]["seed_ids"] or [None])[0]) for r in rows]
        peers = self.groups.peers(rows) if self.groups else {}
        try:
            for judged_batch in self.filters.submit(Pending(rows, peers), row_seeds):
                self.judged(*judged_batch)
        except FilterError as exc:  # in-driver filters: the same rule as on actors
            raise _filter_failed(exc, self.store) from None

    def judged(self, batch: Pending, verdicts: list[list[dict[str, Any]]]) -> None:
        self.meter.judged_rows(len(batch.rows))
        for row, vs in zip(batch.rows, verdicts):
            row["verdicts"] = vs
            keep, _ = records.decide(vs)
            usage = row["usage"]
            self.route("accepted" if keep else "rejected", row,
                       (usage["prompt_tokens"] or 0) + (usage["completion_tokens"] or 0))

    def route(self, stream: str, row: dict[str, Any], tokens: int) -> None:
        """The single commit path: every row lands here once, in the stream it belongs to."""
        reason = self.store.add(stream, row)
        if self.dedup is not None and stream == "accepted":
            self.dedup.add(row["row_id"], row_text(row["messages"], row["response"], self.job.dedupe.on))
        self.stats.counts[stream] += 1
        if reason is not None:
            self.stats.reasons[(stream, reason)] += 1
        self.quota.landed(accepted=stream == "accepted", tokens=tokens)


def _start_dedupe(job: Job, store: ShardStore):
    """Streaming dedupe index, rebuilt from the rows already committed (resume), and
    again from every accepted row so far if an index actor is lost mid-run."""
    from datagen.dedupe.streaming import StreamingDedupe

    def accepted_so_far() -> Iterator[tuple[str, str]]:
        store.commit_all()  # rows routed but not yet committed become readable
        for table in store.iter_tables("accepted", columns=["row_id", "messages", "response"]):
            for row in table.to_pylist():
                yield row["row_id"], row_text(row["messages"], row["response"], job.dedupe.on)

    dedup = StreamingDedupe(job.dedupe, source=accepted_so_far)
    dedup.load()
    return dedup


def _finish_dedupe(job: Job, store: ShardStore, dedup: Any, stats: RunStats) -> None:
    started = time.perf_counter()
    roots = dedup.roots()
    write_view(store, roots, job.dedupe, dest=store.root / "dedupe", replace=True,
               stats={"mode": "streaming", "candidate_pairs": dedup.checked, "actors": len(dedup.actors),
                      "seconds_at_end": round(time.perf_counter() - started, 3)})
    stats.unique = sum(1 for r, root in roots.items() if r == root)


def _commit_quietly(store: ShardStore) -> None:
    try:
        store.commit_all()
    except DatagenError:
        pass


def _filter_failed(exc: Exception, store: ShardStore) -> DatagenError:
    # Infrastructure, not data: the rows waiting for this verdict are neither dropped nor
    # kept; they are not committed, and resume regenerates them under the same ids.
    return DatagenError(f"a filter failed, so no verdict was given ({exc}); nothing was dropped or kept for "
                        f"it, committed rows are intact: fix it, then `datagen resume {store.root}`")


def _not_done(stream: PromptStream, done: set[str], stats: RunStats,
              skipped_prompts: set[str] | None = None) -> Iterator[Request]:
    for req in stream:
        if req.row_id in done:
            stats.skipped += 1
            if skipped_prompts is not None:
                skipped_prompts.add(req.prompt_id)
            continue
        yield req


class _Peekable:
    """An iterator with one request of lookahead (to finish a prompt's samples)."""

    _EMPTY = object()

    def __init__(self, it: Iterator[Request]):
        self.it, self.head = it, self._EMPTY

    def peek(self) -> Request | None:
        if self.head is self._EMPTY:
            self.head = next(self.it, None)
        return self.head  # type: ignore[return-value]

    def next(self) -> Request | None:
        head = self.peek()
        self.head = self._EMPTY
        return head
