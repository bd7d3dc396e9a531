"""``BatchRoom``: the teachers of a run that answer through provider batch jobs
(``mode: batch``), as the driver sees them.

The driver hands it the requests of those teachers (``add``), says when no more are
coming for now (``flush``), and takes back finished rows as a fleet answer's
``(teacher, requests, generations)`` (``answers``), which it routes like online answers:
same ``make_row``, same filters, same single commit path. Here: requests are grouped
into input files within the teacher's limits (``batch.max_rows``, ``batch.max_bytes``),
uploaded, created as batches, polled every ``batch.poll_s``; a finished batch's output
and error files become generations through the online teacher's own parser
(``OpenAICompatibleTeacher.answer``: text, usage, logprobs). Rows an expired, cancelled
or partly failed batch did not answer are submitted again in a new batch, up to
``batch.max_submissions`` times, then failed with the reason (``batch.expired``,
``teacher.http_500``, ...); a line the provider refused as a bad request (4xx) fails at
once, as online.

Durable state is ``state.py``'s: a driver killed after submitting and resumed later
polls the batches it had (``resume``), re-reads the results of finished ones whose rows
were not committed, and finds by its metadata a batch created just before the crash.
Cost: rows are priced at the batch price (``OpenAITeacher.billed_price``); ``view``
also sums what the same tokens would have cost online. Not covered: object-store
outputs; a provider whose batch API is not OpenAI's; more than one driver per output.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque
from typing import Any

from datagen.batch.lines import Outcome, read_results, request_line
from datagen.batch.provider import BatchError, Provider, scrub
from datagen.batch.state import PREPARING, TERMINAL, Batch, BatchState
from datagen.errors import DatagenError
from datagen.prompts import Request
from datagen.storage.shards import is_url
from datagen.teachers.base import Generation
from datagen.teachers.openai_api import OpenAICompatibleTeacher


class _Buffer:
    def __init__(self) -> None:
        self.reqs: list[Request] = []
        self.lines: list[bytes] = []
        self.size = 0


class BatchRoom:
    def __init__(self, teachers: list[Any], root: Any):
        """``teachers``: the job's; those with ``in_batches`` are this room's. ``root``: the output."""
        self.teachers = {t.name: t for t in teachers if t.in_batches}
        self.info: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, set[str]] = {}  # open batch key -> row ids not yet handed back
        self.buffers: dict[tuple[str, int], _Buffer] = defaultdict(_Buffer)
        self.results: deque[tuple[str, list[Request], list[dict[str, Any]]]] = deque()
        self.rows: Counter = Counter()  # answered, resubmitted, failed (this run)
        self.cost = {"batch_usd": None, "online_usd": None}
        self.problem: str | None = None  # the last transient polling failure
        self.next_poll = 0.0
        if not self.teachers:
            return
        if is_url(root):
            raise DatagenError("teachers with mode: batch need a local output path (their batch state is kept "
                               "beside the shards); run with a local output and copy it afterwards")
        self.state = BatchState.load(root)
        self.clients = {n: OpenAICompatibleTeacher(t) for n, t in self.teachers.items()}
        self.info = {n: c.info() for n, c in self.clients.items()}
        self.providers = {n: Provider(t) for n, t in self.teachers.items()}
        self.poll_s = min(t.batch.poll_s for t in self.teachers.values())

    # -- the driver's side -------------------------------------------------------------
    def resume(self, done: set[str]) -> set[str]:
        """Pick up the batches an earlier driver submitted. ``done``: row ids committed in
        any stream. Returns the ids those batches still hold, which the driver must not
        pull again (a failed row committed earlier is not held: resume tries it again)."""
        if not self.teachers or not self.state.batches:
            return set()
        latest: dict[str, str] = {}  # row id -> key of the last batch it was submitted in
        requests = {key: self.state.read_requests(key) for key in self.state.batches}
        for key in sorted(requests):
            for r in requests[key]:
                latest[r.row_id] = key
        held: set[str] = set()
        for key, b in self.state.batches.items():
            ids = {r.row_id for r in requests[key] if latest[r.row_id] == key and r.row_id not in done}
            if not ids or b.teacher not in self.teachers:
                b.collected = True
                continue
            b.collected = False
            self.pending[key] = ids
            held |= ids
            if b.status == PREPARING:
                try:
                    self._recover(b, requests[key])
                except BatchError as exc:
                    if not exc.transient:
                        raise
                    self.problem = str(exc)  # the next poll tries again
        self.state.save()
        return held

    def add(self, req: Request) -> bool:
        """Take ``req`` if its teacher answers in batches (False: not this room's)."""
        if req.teacher not in self.teachers:
            return False
        self._put(req, 1)
        return True

    def flush(self) -> None:
        """Submit every partly filled input file (the driver pulls no more for now)."""
        for (name, attempt), buf in list(self.buffers.items()):
            if buf.reqs:
                self._submit(name, attempt)

    def busy(self) -> bool:
        return bool(self.pending or self.results or any(b.reqs for b in self.buffers.values()))

    def wait_s(self, most: float) -> float:
        """How long the driver may wait for other work before the next poll is due."""
        return max(0.0, min(most, self.next_poll - time.monotonic())) if self.pending else most

    def answers(self) -> list[tuple[str, list[Request], list[dict[str, Any]]]]:
        """Finished rows, as ``(teacher, requests, generations)``; polls when due."""
        if self.pending and time.monotonic() >= self.next_poll:
            self.next_poll = time.monotonic() + self.poll_s
            self._poll()
        out = list(self.results)
        self.results.clear()
        return out

    def cancel(self) -> list[Batch]:
        """Cancel this output's open batches at the provider (``datagen cancel``)."""
        cancelled = []
        for b in self.state.batches.values():
            if b.open and b.teacher in self.providers:
                self._update(b, self.providers[b.teacher].cancel(b.key, b.id))
                self.state.save()
                cancelled.append(b)
        return cancelled

    def view(self) -> dict[str, Any] | None:
        """Batches by status and rows by state, for the progress display and metrics."""
        if not self.teachers:
            return None
        by_status = Counter(b.status for b in self.state.batches.values() if not b.collected or b.status in TERMINAL)
        return {
            "submitted": sum(1 for b in self.state.batches.values() if b.id is not None),
            "by_status": dict(by_status),
            "open": len(self.pending),
            "rows": {"buffered": sum(len(b.reqs) for b in self.buffers.values()),
                     "in_batches": sum(len(ids) for ids in self.pending.values()), **self.rows},
            **self.cost,
            "problem": self.problem,
        }

    # -- submitting --------------------------------------------------------------------
    def _put(self, req: Request, attempt: int) -> None:
        t = self.teachers[req.teacher]
        line = request_line(t, req)
        buf = self.buffers[(req.teacher, attempt)]
        if buf.reqs and (len(buf.reqs) >= t.batch.max_rows or buf.size + len(line) > t.batch.max_bytes):
            self._submit(req.teacher, attempt)
            buf = self.buffers[(req.teacher, attempt)]
        buf.reqs.append(req)
        buf.lines.append(line)
        buf.size += len(line)

    def _submit(self, name: str, attempt: int) -> None:
        buf = self.buffers.pop((name, attempt))
        key = self.state.new_key()
        self.state.write_requests(key, buf.reqs)  # before anything is paid for
        b = self.state.batches[key] = Batch(key=key, teacher=name, attempt=attempt, rows=len(buf.reqs),
                                            bytes=buf.size)
        self.state.save()
        self.pending[key] = {r.row_id for r in buf.reqs}
        try:
            self._send(b, b"".join(buf.lines))
        except BatchError as exc:
            if not exc.transient:
                raise  # a refused input file stays refused: one clear line
            self.problem = str(exc)  # the provider did not answer: the next poll tries again (_recover)

    def _send(self, b: Batch, data: bytes) -> None:
        p = self.providers[b.teacher]
        b.input_file_id = p.upload(b.key, data)
        self.state.save()
        self._update(b, p.create(b.key, b.input_file_id, self.state.token))
        self.state.save()

    def _recover(self, b: Batch, reqs: list[Request]) -> None:
        """A batch whose creation the last driver did not see through: the provider's if
        it has it, else created now (nothing was paid for it yet)."""
        found = self.providers[b.teacher].find(b.key, self.state.token)
        if found is not None:
            self._update(b, found)
        else:
            self._send(b, b"".join(request_line(self.teachers[b.teacher], r) for r in reqs))

    # -- polling and collecting --------------------------------------------------------
    def _poll(self) -> None:
        try:
            for key in list(self.pending):
                b = self.state.batches[key]
                if b.status == PREPARING:
                    self._recover(b, self.state.read_requests(key))
                elif b.status not in TERMINAL:
                    self._update(b, self.providers[b.teacher].retrieve(b.key, b.id))
                if b.status in TERMINAL:
                    self._collect(b)
            self.problem = None
        except BatchError as exc:
            if not exc.transient:
                raise
            self.problem = str(exc)  # a provider hiccup during a long wait: poll again later
        finally:
            self.state.save()

    def _update(self, b: Batch, obj: Any) -> None:
        b.id, b.status = obj.id, obj.status
        b.output_file_id, b.error_file_id = obj.output_file_id, obj.error_file_id
        counts = getattr(obj, "request_counts", None)
        b.counts = counts.model_dump() if counts is not None else {}
        errors = getattr(obj, "errors", None)
        if errors is not None and getattr(errors, "data", None):
            b.errors = scrub("; ".join(f"{e.code}: {e.message}" for e in errors.data), None)
        b.created_at = obj.created_at
        b.ended_at = obj.completed_at or obj.expired_at or obj.cancelled_at or obj.failed_at

    def _collect(self, b: Batch) -> None:
        p, client, cfg = self.providers[b.teacher], self.clients[b.teacher], self.teachers[b.teacher]
        ids = self.pending[b.key]
        reqs = [r for r in self.state.read_requests(b.key) if r.row_id in ids]
        outcomes: dict[str, Outcome] = {}
        unreadable = 0
        for file_id in (b.error_file_id, b.output_file_id):  # answers last: they win
            if file_id:
                found, bad = read_results(p.content(b.key, file_id))
                outcomes.update({k: v for k, v in found.items() if k not in outcomes or v.body is not None})
                unreadable += bad
        done, gens, again = [], [], []
        latency = float(b.ended_at - b.created_at) if b.ended_at and b.created_at else 0.0
        for r in reqs:
            o = outcomes.get(r.row_id) or Outcome(error=self._missing(b, unreadable), retry=b.status != "failed")
            if o.body is not None:
                g = client.answer(r.row_id, o.body)
                retry = g.error is not None  # not a usable completion: as online, try again
            else:
                g, retry = Generation(row_id=r.row_id, error=p.scrub(o.error)), o.retry
            if retry and b.attempt < cfg.batch.max_submissions:
                again.append(r)
                continue
            if g.error:
                g.error = f"{g.error} (after {b.attempt} batch submission{'s' if b.attempt > 1 else ''})"
            g.attempts, g.latency_s = b.attempt, latency
            self._count(cfg, g)
            done.append(r)
            gens.append(g.to_dict())
        del self.pending[b.key]
        b.collected = True
        self.rows["resubmitted"] += len(again)
        for r in again:
            self._put(r, b.attempt + 1)
        if again:
            self._submit(b.teacher, b.attempt + 1)
        if done:
            self.results.append((b.teacher, done, gens))

    @staticmethod
    def _missing(b: Batch, unreadable: int) -> str:
        if b.status == "expired":
            return "batch.expired: not answered within the batch's completion window"
        if b.status == "cancelled":
            return "batch.cancelled: the batch was cancelled before this row was answered"
        if b.status == "failed":
            return f"batch.failed: the provider failed the whole batch ({b.errors or 'no reason given'})"
        if unreadable:
            return f"batch.malformed_output: the batch's result files had {unreadable} unreadable lines"
        return "batch.missing: the completed batch has no result line for this row"

    def _count(self, cfg: Any, g: Generation) -> None:
        self.rows["failed" if g.error else "answered"] += 1
        if cfg.price is None or g.error:
            return
        for what, price in (("batch_usd", cfg.billed_price), ("online_usd", cfg.price)):
            cost = price.cost(g.prompt_tokens, g.completion_tokens)
            if cost is not None:
                self.cost[what] = (self.cost[what] or 0.0) + cost
