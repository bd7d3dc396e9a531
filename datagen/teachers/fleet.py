"""``TeacherFleet``: the replicas of a set of teachers as Ray actors, fed batches and kept
alive. ``datagen run`` and ``datagen rescore`` drive the same fleet; they differ only in
what they send (``call``) and what they make of the answers.

What it owns:

* **Start and placement.** One ``TeacherActor`` per replica, each given its share of a
  teacher-wide budget (``for_replica``); a replica that spans several GPUs gets a
  placement group (``placement_for``). Actors run at normal CPU priority
  (``TEACHER_RUNTIME_ENV``), and with ``max_restarts`` / ``max_task_retries`` so Ray
  itself restarts a dead engine and re-runs its batches.
* **Feeding.** ``free`` picks the least-loaded answering replica with a free slot
  (``slots``: enough batches to keep its backend full); ``send`` hands it a batch and
  ``collect`` takes the answer back; ``feed`` is the whole loop for a caller with one
  teacher and a stream of batches (``rescore``, ``route eval``).
* **Lost work.** Work Ray gave up on (``replicas.lost_work_errors``) runs again under the
  same row ids: as any batch the first time its node went, else alone on a held replica
  without Ray's retries (``lost``, ``suspect``), a batch that dies alone row by row, and a
  row that dies alone fails (``died_alone``). ``resend`` sends what the fleet owes.
* **Renewal.** A replica Ray gave up on after it had answered a batch is started anew
  (``_renew``); one that never answered stays dead, so a crash loop ends the run.

Not covered: which rows to send (the caller's), what an answer becomes (a row, a
re-scored row), and committing. A replica that Ray can never place again (no node has
what it asks for) stays "restarting" (``replicas.py``).
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from datagen.errors import DatagenError, remote_cause
from datagen.replicas import ACTOR_MAX_RESTARTS, Liveness, ReplicasLost, lost_work_errors
from datagen.teachers.spec import TeacherSpec

# Ray re-runs a dead actor's tasks this often; after that the fleet sends the batch
# again, as any batch or alone on a replica (``TeacherFleet.lost``).
ACTOR_MAX_TASK_RETRIES = ACTOR_MAX_RESTARTS
# Ray lowers each worker process to nice 15 so user code cannot starve its raylet. The
# teachers are the run's throughput stage, so their actors (and the processes they start)
# keep the normal priority, the same as the driver and Ray's daemons, sharing the CPUs
# with them fairly (Ray's job supervisor does the same for itself). Below them, every
# wake-up of the driver, the raylet or an idle worker preempted a teacher: for a vLLM
# engine on CPU, whose threads wait on one another at every step, that held up each step
# it landed in (benchmarks/bench_vllm.py); an API teacher's event loop answered late.
TEACHER_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


def slots(teacher: TeacherSpec, inflight_per_actor: int, serves: int | None = None) -> int:
    """Batches the driver keeps on one replica of ``teacher``: ``inflight_per_actor``, or
    more when the backend serves more rows at once than that many batches hold
    (``TeacherSpec.serves``: an API replica's share of ``max_concurrency``; an async vLLM
    engine's ``max_num_seqs``), plus one batch, so the backend is still full while a
    finished batch travels back. (At 16 rows a batch and 2 slots, an H100 engine that
    batches 256-1024 sequences would otherwise decode 32 at a time.) ``serves``: the
    sequences a started engine reported it batches (its ``info()["max_num_seqs"]``)."""
    return max(inflight_per_actor, -(-teacher.serves(serves) // teacher.batch_size) + 1)


@dataclass
class Answer:
    """A batch back from the fleet: ``results`` are the backend's dicts, one per item of
    ``work``, in order."""

    teacher: str
    work: list[Any]
    results: list[dict[str, Any]]


class TeacherRaised(DatagenError):
    """A teacher's code raised (not a lost actor): the caller says what is kept."""

    def __init__(self, teacher: str, cause: str):
        super().__init__(f"teacher {teacher!r} raised {cause}")
        self.teacher, self.cause = teacher, cause


class TeacherLost(DatagenError):
    """Every replica of a teacher died before answering, and none can be started anew."""


class TeacherFleet:
    """The replicas of every teacher, with their in-flight batches.

    ``call(actor, work, options)`` sends ``work`` (a list of the caller's items) to an
    actor and returns the ObjectRef; ``key(item)`` is an item's row id. ``limit``: batches
    per replica, else ``slots`` from what each started replica reports."""

    def __init__(self, teachers: list[TeacherSpec], *, startup_timeout_s: float = 600.0,
                 inflight_per_actor: int = 2, limit: int | None = None,
                 call: Callable[[Any, list[Any], dict[str, Any]], Any] | None = None,
                 key: Callable[[Any], str] = lambda item: item.row_id):
        import ray

        from datagen.teachers.actor import TeacherActor

        self._remote = ray.remote(TeacherActor)
        self.teachers = {t.name: t for t in teachers}
        self.by_teacher: dict[str, list[Any]] = {}
        self.load: dict[Any, int] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.groups: list[Any] = []  # placement groups this fleet made, removed by close()
        self.liveness = Liveness()
        # Work lost with a replica after Ray's retries, to run again alone (``lost``, ``suspect``).
        self.suspects: dict[str, deque[list[Any]]] = {t.name: deque() for t in teachers}
        # ... and to send again as any batch (``lost``, ``resend``)
        self.again: dict[str, deque[list[Any]]] = {t.name: deque() for t in teachers}
        self.inflight: dict[Any, tuple[Any, str, list[Any]]] = {}  # ref -> (actor, teacher, work)
        self.redone = 0  # batches lost after Ray's retries and sent again (``collect``)
        self.renewed: Counter[str] = Counter()  # teacher -> replicas started anew (``_renew``)
        self._call = call or _generate
        self._key = key
        self._inflight_per_actor, self._fixed_limit = inflight_per_actor, limit
        self.limit: dict[str, int] = {}  # set by ``wait_started``
        self._held: dict[str, Any] = {}  # teacher -> the replica drained to run its suspects
        self._alone: set[Any] = set()  # replicas running a suspect, and nothing else
        self._lost: Counter[str] = Counter()  # first row id of a batch -> times lost
        self._second_chance: set[str] = set()  # teachers whose one successor for a never-answering replica is spent
        self._made: dict[Any, tuple[Any, int, dict[str, Any]]] = {}  # actor -> (teacher, replica index, options)
        self._answered: set[Any] = set()  # actors that returned a batch (``returned``)
        self._startup_s = startup_timeout_s
        self._fresh: dict[Any, tuple[str, float]] = {}  # started anew, not answering yet -> (teacher, deadline)
        for t in teachers:
            opts = [self._options(t) for _ in range(t.replicas)]
            self.by_teacher[t.name] = [self._start(t, i, o) for i, o in enumerate(opts)]
        self._starting = {a.info.remote(): name for name, actors in self.by_teacher.items() for a in actors}

    # ------------------------------------------------------------------ start-up

    def _start(self, t: Any, index: int, opts: dict[str, Any]) -> Any:
        # Each replica gets its share of a teacher-wide budget (OpenAITeacher.for_replica).
        actor = self._remote.options(**opts).remote(t.for_replica(index).model_dump(mode="json"))
        self._made[actor] = (t, index, opts)
        self.load[actor] = 0
        return actor

    def _options(self, t: Any) -> dict[str, Any]:
        opts: dict[str, Any] = {"max_restarts": ACTOR_MAX_RESTARTS, "max_task_retries": ACTOR_MAX_TASK_RETRIES,
                                "runtime_env": TEACHER_RUNTIME_ENV}
        if t.bundles() is None:
            # An API teacher waits on HTTP: 0 CPUs by default, so it never starves a small
            # machine; on a cluster whose head has 0 CPUs, num_cpus >= 1 keeps it on the workers.
            return opts | {"num_cpus": t.num_cpus, "num_gpus": t.gpus}
        group = placement_for(t)
        self.groups.append(group)
        return opts | placement_options(t, group)

    def wait_started(self, timeout_s: float, stop: Callable[[], bool]) -> bool:
        """Wait for every actor's first answer; False if ``stop()`` turned true first."""
        import ray

        deadline = time.monotonic() + timeout_s
        while self._starting:
            if stop():
                return False
            if time.monotonic() > deadline:
                names = sorted(set(self._starting.values()))
                raise DatagenError(
                    f"teacher(s) {', '.join(names)} did not start within {timeout_s:g} s "
                    "(runtime.startup_timeout_s); the Ray cluster may lack the resources they ask for"
                )
            ready, _ = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=1.0)
            for ref in ready:
                name = self._starting.pop(ref)
                try:
                    self.info[name] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise DatagenError(f"teacher {name!r} failed to start: {remote_cause(exc)}") from None
        # Sized by what each started engine reported it batches (async vLLM), else by config.
        self.limit = {name: self._fixed_limit or slots(t, self._inflight_per_actor,
                                                       self.info.get(name, {}).get("max_num_seqs"))
                      for name, t in self.teachers.items()}
        return True

    def close(self) -> None:
        import ray

        for group in self.groups:  # on a shared cluster nobody else would free them
            ray.util.remove_placement_group(group)

    @property
    def replicas(self) -> int:
        """Replicas in service, over every teacher (retired ones not counted)."""
        return sum(len(a) for a in self.by_teacher.values())

    # ------------------------------------------------------------------ feeding

    def send(self, actor: Any, teacher: str, work: list[Any], **options: Any) -> None:
        self.inflight[self._call(actor, work, options)] = (actor, teacher, work)
        self.load[actor] += 1

    def owes(self) -> bool:
        """Whether lost work waits to be sent again (``resend``)."""
        return any(self.suspects.values()) or any(self.again.values())

    def resend(self, *, again: bool = True) -> None:
        """Send the work the fleet owes: each teacher's next suspect alone on its held
        replica (Ray retrying none), then (``again``) lost work as any batch, while
        replicas are free."""
        for name in self.by_teacher:
            if (suspect := self.suspect(name)) is not None:
                self.send(suspect[0], name, suspect[1], max_task_retries=0)
            while again and self.again[name] and (actor := self.free(name)) is not None:
                self.send(actor, name, self.again[name].popleft())

    def collect(self, ref: Any) -> Answer | None:
        """The answer of the in-flight batch ``ref`` (ready). None when its work was lost
        and will run again (``resend``); a row lost alone comes back failed
        (``died_alone``). Raises ``TeacherRaised`` when the teacher's code raised."""
        import ray

        actor, name, work = self.inflight.pop(ref)
        self.load[actor] -= 1
        try:
            results = ray.get(ref)
        except lost_work_errors() as exc:
            # Its actor or node died and Ray's own retries ran out (datagen/replicas.py):
            # it runs again, maybe alone, under the same row ids, so no duplicates. A row
            # that killed its replica alone fails.
            self.redone += 1
            again, culprit = self.lost(actor, name, work, self._key(work[0]), exc)
            if again:
                self.again[name].append(again)
            if culprit is None:
                return None
            return Answer(name, [culprit], [died_alone(self._key(culprit), exc)])
        except ray.exceptions.RayError as exc:
            raise TeacherRaised(name, remote_cause(exc)) from None
        self.returned(actor, name)
        return Answer(name, work, results)

    def feed(self, teacher: str, batches: Iterator[list[Any]], on_answer: Callable[[Answer], None],
             stop: Callable[[], bool] = lambda: False) -> None:
        """Run every batch of ``batches`` (a lazy iterator, pulled only while a replica of
        ``teacher`` has a free slot) and hand each answer to ``on_answer``, lost work sent
        again first (``resend``). Returns when every batch is answered and nothing is
        owed, or, once ``stop()`` is true, when the batches in flight are back (nothing
        new or lost is sent then). The loop of a single-teacher caller (``datagen
        rescore``, ``datagen route eval``); ``datagen run``'s driver interleaves filters
        and commits, so it feeds the fleet itself."""
        import ray

        exhausted = False
        while True:
            if not stop():
                self.resend()
            while not exhausted and not stop() and (actor := self.free(teacher)) is not None:
                work = next(batches, None)
                if work is None:
                    exhausted = True
                    break
                self.send(actor, teacher, work)
            if not self.inflight:
                # work left, and every replica that could take it is down
                if (self.owes() or not exhausted) and not stop():
                    self.liveness.wait(1.0)
                    continue
                return
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
            if ready and (answer := self.collect(ready[0])) is not None:
                on_answer(answer)

    def free(self, teacher: str, limit: int | None = None) -> Any | None:
        """An answering replica with a free slot, or None. A replica held for suspects
        (``suspect``) gets no new work."""
        limit = self.limit[teacher] if limit is None else limit
        held = self._held.get(teacher)
        load = self.load if held is None else {**self.load, held: limit}
        try:
            actor = self.liveness.pick(self.by_teacher[teacher], load, limit)
            if self.liveness.dead or self._fresh:
                self._renew(teacher)
            return actor
        except ReplicasLost as exc:
            if self._renew(teacher):
                return None  # no replica answers until a new one is warm
            raise TeacherLost(f"teacher {teacher!r}: {exc}, each before answering a batch (one that had "
                               "answered is started anew); committed rows are intact, "
                               f"`datagen resume` continues{self.teachers[teacher].lost_hint}") from None

    # ------------------------------------------------------------------ lost work

    def lost(self, actor: Any, teacher: str, work: list[Any], key: str,
             exc: BaseException) -> tuple[list[Any] | None, Any]:
        """``work`` (a batch, as a list of rows; ``key``: its first row id) was lost with
        ``actor`` after Ray's own retries (``replicas.lost_work_errors``): the actor gets
        no work until it answers again. Returns ``(again, culprit)``: work to send again
        as any batch, and a row to fail; either may be None.

        A row may kill every engine it runs in (a prompt that crashes or hangs the
        engine), and every batch in flight there with it. Work whose actor died on
        every one of Ray's tries (``ActorDiedError``, its node not drained), or that was
        lost before, is a suspect: it runs again alone on one replica, without Ray's
        retries (``suspect``). A batch that dies alone comes back as single rows, each a
        suspect; a row that dies alone is the culprit, unless its node went (then it
        runs alone once more). Work lost with a node or an object store the first time
        is simply sent again."""
        import ray

        if actor in self._made:  # not a retired replica (``_renew``), whose batches come back lost too
            self.liveness.lost(actor, actor.info)
        queue = self.suspects[teacher]
        e = ray.exceptions
        node_went = (isinstance(exc, (e.NodeDiedError, e.ObjectLostError))
                     or (isinstance(exc, e.RayActorError) and exc.preempted))
        self._lost[key] += 1
        if actor in self._alone:
            self._alone.discard(actor)
            self._lost[f"alone {key}"] += 1
            if node_went and self._lost[f"alone {key}"] == 1:
                queue.appendleft(work)  # not its fault, as far as Ray can tell: once more
            elif len(work) > 1:
                queue.extendleft([row] for row in reversed(work))  # next, one by one
            else:
                self._release(teacher)
                return None, work[0]
            return None, None
        if (isinstance(exc, e.ActorDiedError) and not node_went) or self._lost[key] > 1:
            queue.append(work)
            return None, None
        return work, None

    def suspect(self, teacher: str) -> tuple[Any, list[Any]] | None:
        """The next suspect of ``teacher`` and a replica to run it on alone, or None (none
        waiting, one running, or no replica up with nothing in flight). It holds a
        replica, one that answers if any does: ``free`` sends it nothing new, so it
        drains, until the suspects are done."""
        queue = self.suspects[teacher]
        actors = self.by_teacher[teacher]
        if not queue or any(a in self._alone for a in actors):
            return None
        if self.liveness.down or self.liveness.dead:
            self.free(teacher, 0)  # who is back; dead replicas started anew, or raises: none left
        live = [a for a in actors if a not in self.liveness.dead]
        if not live:
            return None  # ``free`` starts one anew, or says every replica is gone
        held = self._held.get(teacher)
        if held not in live or not self.liveness.up(held):  # none yet, or it died or is restarting
            held = self._held[teacher] = min(live, key=lambda a: (not self.liveness.up(a), self.load[a]))
        if self.load[held] or not self.liveness.up(held):
            return None
        self._alone.add(held)
        return held, queue.popleft()

    def returned(self, actor: Any, teacher: str) -> None:
        """``actor`` returned a batch: it works, so it is worth starting anew should Ray
        give up on it (``_renew``); a suspect it ran alone is cleared."""
        self._answered.add(actor)
        if actor in self._alone:
            self._alone.discard(actor)
            self._release(teacher)

    def _release(self, teacher: str) -> None:
        """The held replica takes work again once no suspect of ``teacher`` is left."""
        if not self.suspects[teacher] and not any(a in self._alone for a in self.by_teacher[teacher]):
            self._held.pop(teacher, None)

    def _renew(self, teacher: str) -> bool:
        """Start a fresh actor in place of each replica of ``teacher`` that Ray gave up on
        (``max_restarts`` is per actor, for its whole life: a replica that hung or lost
        its node four times in a day-long run would otherwise be gone for the rest of it)
        but that answered at least one batch. A replica that died answering none (an
        engine that cannot start, a crash on every batch) stays dead, but for one
        successor per teacher when the work it lost is a suspect: a crash loop ends the
        run instead of spinning. The new actor gets work once it is warm (a ping,
        as after a restart), and must answer within the start-up time-out. True if any was
        started."""
        import ray

        now = time.monotonic()
        for actor, (name, deadline) in list(self._fresh.items()):
            if actor not in self.liveness.down:
                del self._fresh[actor]  # answered (or dead)
            elif now > deadline:  # cannot be placed, or hangs starting: dead, and never answered
                print(f"datagen: a new replica of teacher {name!r} did not start within {self._startup_s:g} s "
                      "(runtime.startup_timeout_s)", file=sys.stderr, flush=True)
                ray.kill(actor, no_restart=True)
                del self._fresh[actor]
                self._second_chance.add(name)  # one that cannot start gets no successor
        actors = self.by_teacher[teacher]
        renewed = False
        for i, old in enumerate(actors):
            # One that never answered gets one successor if the work it lost is now a
            # suspect: a poison prompt in a replica's first batches (or the only row a
            # resume has left) must fail alone, not end the run.
            second_chance = self.suspects[teacher] and teacher not in self._second_chance
            if old in self.liveness.dead and (old in self._answered or second_chance):
                if old not in self._answered:
                    self._second_chance.add(teacher)
                # Dead to the driver may be alive to Ray (its ping raised): free what it holds.
                ray.kill(old, no_restart=True)
                t, index, opts = self._made.pop(old)
                actors[i] = new = self._start(t, index, opts)  # the same placement group, if any
                self.liveness.dead.discard(old)  # retired: out of every list the driver picks from
                self.liveness.lost(new, new.info)
                self._fresh[new] = (teacher, now + self._startup_s)
                self.renewed[teacher] += 1
                renewed = True
        return renewed


def _generate(actor: Any, work: list[Any], options: dict[str, Any]) -> Any:
    """``datagen run``'s call: a batch of ``prompts.Request`` to ``TeacherActor.generate``."""
    method = actor.generate.options(**options) if options else actor.generate
    return method.remote([{"row_id": r.row_id, "messages": r.messages, "seed": r.seed} for r in work])


def died_alone(row_id: str, exc: BaseException) -> dict[str, Any]:
    """The failed generation of a row whose replica died running it alone (``TeacherFleet.lost``)."""
    from datagen.teachers.base import Generation

    return Generation(row_id, error=f"teacher_died: its replica died running this row alone, after dying with "
                                    f"it in a batch ({remote_cause(exc)})").to_dict()


def placement_for(t: TeacherSpec) -> Any:
    """A placement group for one multi-GPU engine, as its spec asks (``TeacherSpec.bundles``).
    Unnamed: a teacher's replicas each get one, and Ray refuses two groups of one name."""
    from ray.util.placement_group import placement_group

    bundles, strategy = t.bundles()
    return placement_group(bundles, strategy=strategy)


def placement_options(t: TeacherSpec, group: Any) -> dict[str, Any]:
    """Actor options that put the engine's driver in bundle 0 (its CPUs, none of the GPUs)
    and make the group the one vLLM finds with ``ray.util.get_current_placement_group()``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"num_cpus": t.num_cpus, "num_gpus": 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}
