"""Filters beside generation: a small pool of CPU Ray actors that judge rows while the
teachers keep generating.

The driver stays the one committer: it sends each teacher batch's rows to a filter actor
and routes them (accepted / rejected) when the verdicts come back. A row waiting for its
verdict is not committed; if the run stops first, resume regenerates it under the same
id, so exact-once holds. ``runtime.filter_actors: 0`` runs the chain in the driver
instead (no Ray round trip; a slow verifier then stalls generation).

Only the fields filters read travel to the actors, not the KD logprob arrays.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from datagen.errors import DatagenError, remote_cause
from datagen.filters import FilterChain
from datagen.replicas import ACTOR_MAX_RESTARTS, BATCH_MAX_REQUEUES, Liveness, ReplicasLost, lost_work_errors

# What a filter may read from a row; the rest (logprobs) stays in the driver.
VIEW_FIELDS = ("row_id", "prompt_id", "sample_index", "messages", "response", "finish_reason", "teacher",
               "sampling", "usage")


def view(row: dict[str, Any], peers: dict[str, list[str]] | None = None) -> dict[str, Any]:
    v = {k: row[k] for k in VIEW_FIELDS}
    if peers and row["prompt_id"] in peers:
        v["peer_responses"] = peers[row["prompt_id"]]  # earlier runs' samples of this prompt
    return v


def filter_context(teachers: list[Any]) -> dict[str, Any]:
    """What filters may see of the job besides their params: the teachers' configs (env-var
    names of keys, never keys), for a judge. A filter actor's context adds ``worker``:
    its ``index`` among ``count`` actors."""
    return {"teachers": {t.name: t.model_dump(mode="json") for t in teachers}}


class FilterWorker:
    """Hosts the job's filter chain in a Ray actor (or in the driver)."""

    def __init__(self, specs: list[Any], answer: dict[str, Any], short_circuit: bool, context: dict[str, Any]):
        from datagen.prompts import AnswerFormat

        self.chain = FilterChain(specs, AnswerFormat.model_validate(answer), short_circuit=short_circuit,
                                 context=context)

    def ready(self) -> bool:
        return True

    def run(self, rows: list[dict[str, Any]], seeds: list[dict[str, Any] | None]) -> list[list[dict[str, Any]]]:
        return [[v.to_dict() for v in vs] for vs in self.chain.run(rows, seeds)]


@dataclass
class Pending:
    """Rows handed to the filters, waiting for verdicts."""

    rows: list[dict[str, Any]]
    peers: dict[str, list[str]] = field(default_factory=dict)  # prompt_id -> committed samples' answers
    lost: int = 0  # times the actor judging it died with it


class PromptGroups:
    """For filters that judge a prompt's samples together (self-consistency): holds each
    row until every sample of its prompt pulled this run is back (failed ones excepted),
    then releases the group whole. A prompt's requests are consecutive in the stream, so
    its group is closed once the next request pulled is another prompt's."""

    def __init__(self, store: Any):
        self.store = store
        self.expected: Counter = Counter()
        self.closed: set[str] = set()  # every sample of these prompts has been pulled
        self.held: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.skipped: set[str] = set()  # prompts with samples committed by an earlier run
        self._peers: dict[str, list[str]] | None = None

    def pulled(self, prompt_id: str, *, last: bool) -> None:
        self.expected[prompt_id] += 1
        if last:
            self.closed.add(prompt_id)

    def add(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        self.held[row["prompt_id"]].append(row)
        return self._release(row["prompt_id"])

    def failed(self, prompt_id: str) -> list[dict[str, Any]]:
        self.expected[prompt_id] -= 1
        return self._release(prompt_id)

    def _release(self, prompt_id: str) -> list[dict[str, Any]]:
        if prompt_id not in self.closed or len(self.held.get(prompt_id, ())) < self.expected[prompt_id]:
            return []
        self.closed.discard(prompt_id)
        del self.expected[prompt_id]
        return self.held.pop(prompt_id, [])

    def flush(self) -> list[dict[str, Any]]:
        """Every partial group (the prompt stream or a budget ended mid-prompt)."""
        rows = [r for group in self.held.values() for r in group]
        self.held.clear()
        self.expected.clear()
        self.closed.clear()
        return rows

    def peers(self, rows: list[dict[str, Any]]) -> dict[str, list[str]]:
        wanted = {r["prompt_id"] for r in rows} & self.skipped
        if not wanted:
            return {}
        if self._peers is None:  # once per run, and only when a resumed prompt needs it
            self._peers = defaultdict(list)
            for stream in ("accepted", "rejected"):
                t = self.store.read(stream, columns=["prompt_id", "response"])
                for pid, text in zip(t.column("prompt_id").to_pylist(), t.column("response").to_pylist()):
                    if pid in self.skipped:
                        self._peers[pid].append(text)
        return {pid: self._peers.get(pid, []) for pid in wanted}


class FilterPool:
    """``submit`` a batch, then ``done`` the refs ``ray.wait`` returned. Each actor holds
    at most ``slots`` batches; more wait in the driver's queue (``backlog`` rows), and the
    driver stops handing out teacher work while the backlog is over ``max_backlog``."""

    def __init__(self, filters: list[Any], answer: Any, *, short_circuit: bool, context: dict[str, Any],
                 actors: int, num_cpus: float = 0.0, slots: int = 2):
        """``filters``: the job's filter specs, run in ``actors`` Ray actors (0: in the driver)."""
        specs = [s.model_dump(mode="json") for s in filters]
        answer_json = answer.model_dump(mode="json")
        self.actors: list[Any] = []
        self.load: dict[Any, int] = {}
        self.slots = slots
        self.inflight: dict[Any, tuple[Any, Pending, list[Any]]] = {}
        self.liveness = Liveness()  # actors that lost a batch (datagen/replicas.py)
        self.queue: deque[tuple[Pending, list[Any]]] = deque()
        self.local: FilterWorker | None = None
        n = actors
        if n == 0:
            self.local = FilterWorker(specs, answer_json, short_circuit, context)
            return
        import ray

        remote = ray.remote(FilterWorker).options(
            num_cpus=num_cpus, max_restarts=ACTOR_MAX_RESTARTS,
            max_task_retries=ACTOR_MAX_RESTARTS)
        # Each actor knows its place among the n: a judge takes its share of its teacher's budgets.
        self.actors = [remote.remote(specs, answer_json, short_circuit,
                                     {**context, "worker": {"index": i, "count": n}}) for i in range(n)]
        self.load = {a: 0 for a in self.actors}
        self.max_backlog = n * slots * 4

    def refs(self) -> list[Any]:
        if self.queue and not self.inflight:  # every actor down after losing a batch
            self.liveness.wait(1.0)  # (a bounded wait: the driver loop must not spin)
        self._dispatch()  # to an actor that is back
        return list(self.inflight)

    @property
    def backlog(self) -> int:
        return len(self.queue)

    def busy(self) -> bool:
        return bool(self.inflight or self.queue)

    def saturated(self) -> bool:
        return self.local is None and len(self.queue) > self.max_backlog

    def submit(self, pending: Pending, seeds: list[Any]) -> list[tuple[Pending, list[list[dict[str, Any]]]]]:
        """Queue a batch. In-driver mode judges it now and returns ``[(pending, verdicts)]``."""
        if self.local is not None:
            return [(pending, self.local.run([view(r, pending.peers) for r in pending.rows], seeds))]
        self.queue.append((pending, seeds))
        self._dispatch()
        return []

    def _dispatch(self) -> None:
        while self.queue:
            try:
                actor = self.liveness.pick(self.actors, self.load, self.slots)
            except ReplicasLost as exc:
                raise FilterFailed(f"filter actors: {exc}; committed rows are intact, `datagen resume` "
                                   "continues") from None
            if actor is None:
                return
            pending, seeds = self.queue.popleft()
            ref = actor.run.remote([view(r, pending.peers) for r in pending.rows], seeds)
            self.load[actor] += 1
            self.inflight[ref] = (actor, pending, seeds)

    def done(self, ref: Any) -> tuple[Pending, list[list[dict[str, Any]]]] | None:
        """The verdicts of a finished batch; a filter that raised stops the run. None when
        the batch's actor or node died: the batch is queued again (same rows), bounded."""
        import ray

        actor, pending, seeds = self.inflight.pop(ref)
        self.load[actor] -= 1
        try:
            verdicts = ray.get(ref)
        except lost_work_errors() as exc:
            self.liveness.lost(actor, actor.ready)
            pending.lost += 1
            if pending.lost > BATCH_MAX_REQUEUES:
                raise FilterFailed(f"its actor died {pending.lost} times on one batch: {remote_cause(exc)}") from None
            self.queue.appendleft((pending, seeds))
            verdicts = None
        except ray.exceptions.RayError as exc:
            raise FilterFailed(remote_cause(exc)) from None
        self._dispatch()
        return None if verdicts is None else (pending, verdicts)


class FilterFailed(DatagenError):
    """A filter (not the data) failed: the run stops; nothing is dropped or kept for it."""


__all__ = ["FilterFailed", "FilterPool", "FilterWorker", "Pending", "PromptGroups",
           "filter_context", "view"]
