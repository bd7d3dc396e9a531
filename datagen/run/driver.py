"""The driver of a run: prompt stream -> teacher actors (Ray) -> filters -> shard store.

Plain Ray actors, not Ray Data: see docs/architecture.md for the reasons (in short,
incremental commits and exact-once resume need a single committer that sees every row
as it lands; a Ray Data ``Datasink`` commits once, at the end of the whole write).

Backpressure: a teacher actor never holds more than ``replicas.slots`` batches
(``runtime.inflight_per_actor``, or enough to fill its backend's concurrency), and the
driver pulls the next prompt from the (lazy) stream only when a batch slot is free, so
memory is bounded by actors x slots x batch size, whatever the job size. Actors are
started with ``max_restarts`` / ``max_task_retries`` so Ray itself restarts a dead
engine and re-runs its batches; a batch whose actor or node is lost anyway is run again
(``datagen/replicas.py``), and one lost too often stops the run after everything already
received is committed. A replica Ray gave up on after it had answered a batch is started
anew (``_Actors._renew``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datagen import licenses, records
from datagen.run import metrics
from datagen.config import Job, Price, dotted, is_operational, job_changes, parse_job, teacher_identity
from datagen.errors import DatagenError, MissingExtra, OutputError, remote_cause
from datagen.run.filter_pool import FilterFailed, FilterPool, Pending, PromptGroups, Quota, decide, filter_context
from datagen.filters import FilterChain, FilterError
from datagen.prompts import PromptStream, Request
from datagen.replicas import Liveness, ReplicasLost, lost_work_errors, slots
from datagen.storage.shards import JOB_FILE, ShardStore

ACTOR_MAX_RESTARTS = 3
# Ray re-runs a dead actor's tasks this often; after that the driver sends the batch
# again, as any batch or alone on a replica (_Actors.lost: runner._drive, rescore).
ACTOR_MAX_TASK_RETRIES = ACTOR_MAX_RESTARTS
# Ray lowers each worker process to nice 15 so user code cannot starve its raylet. The
# teachers are the run's throughput stage, so their actors (and the processes they start)
# keep the normal priority, the same as the driver and Ray's daemons, sharing the CPUs
# with them fairly (Ray's job supervisor does the same for itself). Below them, every
# wake-up of the driver, the raylet or an idle worker preempted a teacher: for a vLLM
# engine on CPU, whose threads wait on one another at every step, that held up each step
# it landed in (benchmarks/bench_vllm.py); an API teacher's event loop answered late.
TEACHER_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


@dataclass
class RunStats:
    total: int = 0  # rows the job asks for
    skipped: int = 0  # already committed before this run started
    started: float = field(default_factory=time.monotonic)
    teachers_ready: float | None = None  # when every actor answered its first call
    generation_ended: float | None = None  # when the last row was committed (teardown not counted)
    counts: Counter = field(default_factory=Counter)  # stream -> rows this run
    reasons: Counter = field(default_factory=Counter)  # (stream, reason) -> rows this run
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None  # None: no priced teacher answered
    interrupted: bool = False
    unique: int | None = None  # accepted rows left after streaming dedupe, when it ran
    stop_reason: str | None = None  # why generation stopped early: target_accepted, max_rows, ...
    # work done again because an actor or node died with it (Ray's own silent retries
    # not counted): "teacher batch", "filter batch", "dedupe index rebuild" -> times
    lost: Counter = field(default_factory=Counter)
    metrics: Any = None  # datagen.run.metrics.RunMetrics: per-stage figures, queue depths

    @property
    def generated(self) -> int:
        return sum(self.counts.values())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def startup_s(self) -> float:
        return (self.teachers_ready or time.monotonic()) - self.started

    @property
    def generating_s(self) -> float:
        """Seconds from teachers ready to the last row committed (or now, while the run
        goes on): the denominator of throughput figures. Stopping Ray and its engines
        afterwards (seconds for a vLLM engine) is not generating."""
        if not self.teachers_ready:
            return 0.0
        return (self.generation_ended or time.monotonic()) - self.teachers_ready


def run_fingerprint(job: Job, stream_hash: str, *, legacy: bool = False) -> str:
    """Same rows asked for -> same fingerprint: the job's content and its prompts' (the
    stream hash), without what a resume may change (``config.OPERATIONAL_*``: the output's
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
            if t["backend"] == "openai":
                t.pop("num_cpus")
            else:
                t["engine"].pop("stall_timeout_s")  # newer than every legacy output
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


def _stream_hash(stream: PromptStream) -> str:
    t, plan = stream.template, stream.plan
    return records.content_hash({
        "template": t.spec.model_dump(mode="json", exclude={"seeds"}),
        "seeds": [t.seeds.rows[i] for i in sorted({i for i, _ in plan.slots})],
        "plan": [[t.seeds.ids[i], list(combo)] for i, combo in plan.slots],
        "evals": plan.report.get("evals_digest"),
    })


def prepare(job: Job) -> tuple[PromptStream, str]:
    """Everything that can fail on bad input, done before Ray starts or a file is written."""
    provisional = PromptStream(job, run_fingerprint="")
    provisional.stream_hash = _stream_hash(provisional)
    fp = run_fingerprint(job, provisional.stream_hash)
    provisional.run_fingerprint = fp
    licenses.resolve_job(job, template=provisional.template)
    # Filters that judge against the seed (a reference answer, unit tests) refuse seeds
    # without it now, before a token is paid for.
    FilterChain(job.filters, provisional.template.spec.answer, context=filter_context(job)).check_seeds(
        provisional.seeds, id_field=provisional.template.spec.seeds.id_field)
    for t in job.teachers:
        if getattr(t, "api_key_env", None) and not os.environ.get(t.api_key_env):
            raise DatagenError(
                f"teacher {t.name!r}: environment variable {t.api_key_env} is not set "
                "(it should hold the API key)"
            )
    return provisional, fp


def _init_ray(job: Job) -> bool:
    return init_ray(job.runtime)


def init_ray(runtime: Any) -> bool:
    """Join ``runtime.ray_address`` (or $RAY_ADDRESS), else start a local instance.
    True when this call started Ray (so the caller shuts it down)."""
    try:
        import ray
    except ImportError:
        raise MissingExtra("ray", "cpu", "datagen run") from None
    if ray.is_initialized():
        return False
    address = runtime.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "configure_logging": True,
                              "log_to_driver": bool(os.environ.get("DATAGEN_VERBOSE"))}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
        if runtime.num_cpus:
            kwargs["num_cpus"] = runtime.num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise DatagenError(f"could not start or join {where}: {' '.join(str(exc).split())[:300]}") from None
    return True


def _check_resources(job: Job) -> None:
    """Refuse, naming the shortfall, a job whose actors can never all be placed."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": 0.0, "GPU": 0.0}
    for t in job.teachers:
        need["CPU"] += t.num_cpus * t.replicas
        if t.backend == "vllm":
            need["GPU"] += t.num_gpus * t.replicas
    for res, amount in need.items():
        if amount > have.get(res, 0.0) + 1e-9:
            raise DatagenError(
                f"the teachers need {amount:g} {res} in all (replicas x num_{res.lower()}s) but the "
                f"Ray cluster has {have.get(res, 0.0):g}; lower replicas or num_{res.lower()}s"
            )


class _Actors:
    """The replicas of every teacher, with their in-flight batches."""

    def __init__(self, job: Job, *, startup_timeout_s: float = 600.0):
        import ray

        from datagen.teachers import TeacherActor

        self._remote = ray.remote(TeacherActor)
        self.by_teacher: dict[str, list[Any]] = {}
        self.load: dict[Any, int] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.groups: list[Any] = []  # placement groups this run made, removed by close()
        self.liveness = Liveness()
        self.backends = {t.name: t.backend for t in job.teachers}
        # Work lost with a replica after Ray's retries, to run again alone (``lost``, ``suspect``).
        self.suspects: dict[str, deque[list[Any]]] = {t.name: deque() for t in job.teachers}
        self._held: dict[str, Any] = {}  # teacher -> the replica drained to run its suspects
        self._alone: set[Any] = set()  # replicas running a suspect, and nothing else
        self._lost: Counter[str] = Counter()  # first row id of a batch -> times lost
        self._second_chance: set[str] = set()  # teachers whose one successor for a never-answering replica is spent
        self._made: dict[Any, tuple[Any, int, dict[str, Any]]] = {}  # actor -> (teacher, replica index, options)
        self._answered: set[Any] = set()  # actors that returned a batch (``returned``)
        self.renewed: Counter[str] = Counter()  # teacher -> replicas started anew (``_renew``)
        self._startup_s = startup_timeout_s
        self._fresh: dict[Any, tuple[str, float]] = {}  # started anew, not answering yet -> (teacher, deadline)
        for t in job.teachers:
            opts = [self._options(t) for _ in range(t.replicas)]
            self.by_teacher[t.name] = [self._start(t, i, o) for i, o in enumerate(opts)]
        self._starting = {a.info.remote(): name for name, actors in self.by_teacher.items() for a in actors}

    def _start(self, t: Any, index: int, opts: dict[str, Any]) -> Any:
        # Each replica gets its share of a teacher-wide budget (OpenAITeacher.for_replica).
        actor = self._remote.options(**opts).remote(t.for_replica(index).model_dump(mode="json"))
        self._made[actor] = (t, index, opts)
        self.load[actor] = 0
        return actor

    @property
    def replicas(self) -> int:
        """Replicas in service, over every teacher (retired ones not counted)."""
        return sum(len(a) for a in self.by_teacher.values())

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

    def _options(self, t: Any) -> dict[str, Any]:
        opts: dict[str, Any] = {"max_restarts": ACTOR_MAX_RESTARTS, "max_task_retries": ACTOR_MAX_TASK_RETRIES,
                                "runtime_env": TEACHER_RUNTIME_ENV}
        if t.backend != "vllm":
            # Waits on HTTP: 0 by default, so it never starves a small machine; on a
            # cluster whose head has 0 CPUs, num_cpus >= 1 keeps it on the worker nodes.
            return opts | {"num_cpus": t.num_cpus}
        if t.engine.gpus_per_engine == 1:
            return opts | {"num_cpus": t.num_cpus, "num_gpus": t.num_gpus}
        group = placement_for(t)
        self.groups.append(group)
        return opts | placement_options(t, group)

    def close(self) -> None:
        import ray

        for group in self.groups:  # on a shared cluster nobody else would free them
            ray.util.remove_placement_group(group)

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
        return True

    def free(self, teacher: str, limit: int) -> Any | None:
        """An answering replica with a free slot, or None. A replica held for suspects
        (``suspect``) gets no new work."""
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
            hint = (". Why each replica exited is in its Ray worker log (DATAGEN_VERBOSE=1 prints those logs "
                    "here). If its engines ran out of memory, "
                    "lower engine.gpu_memory_utilization or engine.max_num_seqs in the job file and "
                    "`datagen resume OUT --job JOB.yaml`; if they hung (no token for engine.stall_timeout_s), "
                    "the same resume may raise that limit when a step is legitimately that slow"
                    if self.backends.get(teacher) == "vllm" else "")
            raise DatagenError(f"teacher {teacher!r}: {exc}, each before answering a batch (one that had "
                               "answered is started anew); committed rows are intact, "
                               f"`datagen resume` continues{hint}") from None

    def lost(self, actor: Any, teacher: str, work: list[Any], key: str,
             exc: BaseException) -> tuple[list[Any] | None, Any]:
        """``work`` (a batch, as a list of rows; ``key``: its first row id) was lost with
        ``actor`` after Ray's own retries (``replicas.lost_work_errors``): the actor gets
        no work until it answers again. Returns ``(again, culprit)``: work for the caller
        to send again as any batch, and a row for it to fail; either may be None.

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


def died_alone(row_id: str, exc: BaseException) -> dict[str, Any]:
    """The failed generation of a row whose replica died running it alone (``_Actors.lost``)."""
    from datagen.teachers.base import Generation

    return Generation(row_id, error=f"teacher_died: its replica died running this row alone, after dying with "
                                    f"it in a batch ({remote_cause(exc)})").to_dict()


def placement_for(t: Any) -> Any:
    """A placement group for one multi-GPU engine: one bundle per GPU (vLLM's Ray executor
    requires at most one GPU per bundle and starts a worker in each). Tensor parallelism
    talks every layer, so its GPUs must share a node (STRICT_PACK); pipeline stages only
    pass activations along and may spread (PACK)."""
    from ray.util.placement_group import placement_group

    n, e = t.engine.gpus_per_engine, t.engine
    bundles = [{"GPU": 1.0, "CPU": float(t.num_cpus)}] + [{"GPU": 1.0} for _ in range(n - 1)]
    # Unnamed: a teacher's replicas each get one, and Ray refuses two groups of one name.
    return placement_group(bundles, strategy="STRICT_PACK" if e.pipeline_parallel_size == 1 else "PACK")


def placement_options(t: Any, group: Any) -> dict[str, Any]:
    """Actor options that put the engine's driver in bundle 0 (its CPUs, none of the GPUs)
    and make the group the one vLLM finds with ``ray.util.get_current_placement_group()``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"num_cpus": t.num_cpus, "num_gpus": 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def make_row(req: Request, gen: dict[str, Any], info: dict[str, Any], sampling: dict[str, Any],
             license: dict[str, str], *, price: Price | None = None) -> dict[str, Any]:
    row = records.empty_row()
    row.update(
        row_id=req.row_id, prompt_id=req.prompt_id, sample_index=req.sample_index,
        messages=req.messages, response=gen["text"], finish_reason=gen["finish_reason"],
        teacher={k: info.get(k) for k in ("name", "backend", "model", "revision")},
        sampling={**sampling, "seed": req.seed},
        usage={"prompt_tokens": gen["prompt_tokens"], "completion_tokens": gen["completion_tokens"],
               "cost_usd": price.cost(gen["prompt_tokens"], gen["completion_tokens"]) if price else None},
        token_ids=gen["token_ids"], token_logprobs_q=records.quantize_logprobs(gen["token_logprobs"]),
        tokenizer_fingerprint=info.get("tokenizer_fingerprint"),
        provenance=req.provenance,
        license=license,
        timings={"generated_at": datetime.now(timezone.utc), "latency_s": gen["latency_s"],
                 "attempts": gen["attempts"]},
        error=gen["error"],
    )
    row["top_ids"], row["top_logprobs_q"] = records.encode_top(gen["top_ids"], gen["top_logprobs"])
    return row


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


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the driver loop checks between batches, so an
    interrupt never lands in the middle of a shard write. A second signal interrupts at
    once (KeyboardInterrupt), for a run that is stuck."""

    def __init__(self) -> None:
        self.set = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():  # signals reach only it
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def execute(job: Job, store: ShardStore, stream: PromptStream,
            on_progress: Callable[[RunStats], None] | None = None) -> RunStats:
    """Run the job into ``store``. Rows already committed there are skipped (resume)."""
    import ray

    stats = RunStats(total=len(stream))
    done = store.row_ids(("accepted", "rejected"))
    teachers = {t.name: t for t in job.teachers}
    spec = stream.template.spec
    quota = Quota(job, store)
    teacher_terms = licenses.resolve_job(job, template=stream.template)
    row_licenses = {name: {"teacher": lid, "seed": spec.seeds.license, "template": spec.license}
                    for name, lid in teacher_terms.items()}
    started_ray = _init_ray(job)
    actors = None
    stats.metrics = metrics.RunMetrics(job, store, dashboard=metrics.dashboard_links())
    try:
        with _StopFlag() as stop:
            if started_ray:
                _check_resources(job)
            actors = _Actors(job, startup_timeout_s=job.runtime.startup_timeout_s)
            filters = FilterPool(job, spec.answer, slots=job.runtime.inflight_per_actor)
            dedup = _start_dedupe(job, store) if job.dedupe.streaming else None
            if on_progress:
                on_progress(stats)
            if actors.wait_started(job.runtime.startup_timeout_s, lambda: stop.set):
                stats.teachers_ready = time.monotonic()
                try:
                    _drive(job, store, stream, done, stats, actors, teachers, filters, quota, row_licenses, stop,
                           on_progress, dedup)
                finally:
                    if actors.renewed:
                        stats.lost["new teacher replica"] += sum(actors.renewed.values())
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
        elif actors is not None:
            actors.close()
    if on_progress:
        on_progress(stats)
    return stats


def _start_dedupe(job: Job, store: ShardStore):
    """Streaming dedupe index, rebuilt from the rows already committed (resume), and
    again from every accepted row so far if an index actor is lost mid-run."""
    from datagen.dedupe.view import row_text
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
    from datagen.dedupe.view import write_view

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


def _drive(job, store, stream, done, stats, actors, teachers, filters, quota, row_licenses, stop,
           on_progress, dedup=None) -> None:
    """The loop: fill free actor slots, wait for a teacher batch or a filter batch, route
    rows, commit when due. Failed rows are routed at once; the rest go to the filters and
    are routed when their verdicts come back, so verifying never holds up generating."""
    import ray

    from datagen.dedupe.view import row_text

    grouped = any(type(f).groups_by_prompt for f in job.filters)
    groups = PromptGroups(store) if grouped else None
    pending = _Peekable(_not_done(stream, done, stats, groups.skipped if groups else None))
    last_prompt: str | None = None
    buffers: dict[str, list[Request]] = {name: [] for name in teachers}
    ready_batches: deque[tuple[str, list[Request]]] = deque()
    inflight: dict[Any, tuple[Any, str, list[Request]]] = {}
    exhausted = False
    consecutive_failures = 0
    # Sized by what each started engine reported it batches (async vLLM), else by config.
    limit = {name: slots(t, job.runtime.inflight_per_actor, actors.info.get(name, {}).get("max_num_seqs"))
             for name, t in teachers.items()}
    sampling = {name: t.sampling.model_dump(include={"temperature", "top_p", "max_tokens", "logprobs", "stop"})
                for name, t in teachers.items()}
    # by the id rows carry in provenance.seed_ids (numbered rows have no id field)
    seeds = dict(zip(stream.template.seeds.ids, stream.template.seeds.rows))
    meter = stats.metrics
    meter.watch(inflight=inflight, ready=ready_batches, actors=actors, filters=filters, dedup=dedup)
    meter.teacher_slots(limit)

    def route(stream_name: str, row: dict[str, Any], reason: str | None, tokens: int) -> None:
        store.add(stream_name, row)
        if dedup is not None and stream_name == "accepted":
            dedup.add(row["row_id"], row_text(row["messages"], row["response"], job.dedupe.on))
        stats.counts[stream_name] += 1
        if reason:
            stats.reasons[(stream_name, reason)] += 1
        quota.landed(accepted=stream_name == "accepted", tokens=tokens)

    def to_filters(rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        row_seeds = [seeds.get((r["provenance"]["seed_ids"] or [None])[0]) for r in rows]
        try:
            for judged_batch in filters.submit(Pending(rows, groups.peers(rows) if groups else {}), row_seeds):
                judged(*judged_batch)
        except FilterError as exc:  # in-driver filters: the same rule as on actors
            raise _filter_failed(exc, store) from None

    def judged(batch: Pending, verdicts: list[list[dict[str, Any]]]) -> None:
        meter.judged_rows(len(batch.rows))
        for row, vs in zip(batch.rows, verdicts):
            row["verdicts"] = vs
            keep, reason = decide(vs)
            usage = row["usage"]
            route("accepted" if keep else "rejected", row, reason,
                  (usage["prompt_tokens"] or 0) + (usage["completion_tokens"] or 0))

    def send(actor: Any, name: str, batch: list[Request], **options: Any) -> None:
        method = actor.generate.options(**options) if options else actor.generate
        ref = method.remote([{"row_id": r.row_id, "messages": r.messages, "seed": r.seed} for r in batch])
        actors.load[actor] += 1
        inflight[ref] = (actor, name, batch)

    while not stop.set:
        for name in teachers:  # work lost with a replica runs again alone, Ray retrying none
            if (suspect := actors.suspect(name)) is not None:
                send(suspect[0], name, suspect[1], max_task_retries=0)
        while True:
            # The first ready batch whose teacher has a free actor (one busy teacher
            # must not hold up another's batches).
            pick = next(((i, a) for i, (n, _) in enumerate(ready_batches)
                         if (a := actors.free(n, limit[n])) is not None), None)
            if pick is not None and not filters.saturated():
                i, actor = pick
                name, batch = ready_batches[i]
                del ready_batches[i]
                send(actor, name, batch)
                continue
            if exhausted or len(ready_batches) >= actors.replicas:
                break  # backpressure: pull no more prompts until a slot frees
            finishing_group = (groups is not None and quota.stop_reason() is None
                               and (nxt := pending.peek()) is not None and nxt.prompt_id == last_prompt)
            if not quota.room() and not finishing_group:
                # Enough is in flight for the target (or a budget is spent): send the
                # partial batches, and pull again only if rows in flight get rejected.
                # (Grouped filters first get the rest of the current prompt's samples.)
                ready_batches.extend((n, b) for n, b in buffers.items() if b)
                buffers = {n: [] for n in teachers}
                break
            req = pending.next()
            if req is None:
                exhausted = True
                ready_batches.extend((n, b) for n, b in buffers.items() if b)
                buffers = {n: [] for n in teachers}
                continue
            quota.pulled()
            meter.pulled_one()
            last_prompt = req.prompt_id
            if groups is not None:
                nxt = pending.peek()
                groups.pulled(req.prompt_id, last=nxt is None or nxt.prompt_id != req.prompt_id)
            buffers[req.teacher].append(req)
            if len(buffers[req.teacher]) >= teachers[req.teacher].batch_size:
                ready_batches.append((req.teacher, buffers[req.teacher]))
                buffers[req.teacher] = []
        if not inflight and not filters.busy():
            if ready_batches or any(actors.suspects.values()):
                actors.liveness.wait(1.0)  # only when replicas are down: until one may be back
                continue  # partial batches the quota just flushed, or suspects: send them
            if groups is not None and groups.held:
                to_filters(groups.flush())  # groups a budget cut short vote with what they have
                continue
            stats.stop_reason = quota.stop_reason() or ("prompts_exhausted" if quota.target else None)
            return
        done_refs, _ = ray.wait(list(inflight) + filters.refs(), num_returns=1, timeout=1.0)
        for ref in done_refs:
            if ref not in inflight:
                try:
                    finished = filters.done(ref)  # None: its actor was lost, the batch requeued
                except FilterFailed as exc:
                    raise _filter_failed(exc, store) from None
                if finished is not None:
                    judged(*finished)
                else:
                    stats.lost["filter batch"] += 1
                continue
            actor, name, batch = inflight.pop(ref)
            actors.load[actor] -= 1
            try:
                gens = ray.get(ref)
            except lost_work_errors() as exc:
                # Its actor or node died and Ray's own retries ran out (datagen/replicas.py):
                # it runs again, maybe alone (``_Actors.lost``), same row ids, so no
                # duplicates; the quota still counts its rows as in flight. A row that
                # killed its replica alone fails.
                stats.lost["teacher batch"] += 1
                again, culprit = actors.lost(actor, name, batch, batch[0].row_id, exc)
                if again:
                    ready_batches.appendleft((name, again))
                if culprit is None:
                    continue
                batch, gens = [culprit], [died_alone(culprit.row_id, exc)]
            except ray.exceptions.RayError as exc:
                raise DatagenError(
                    f"teacher {name!r} raised {remote_cause(exc)}; committed rows are intact, "
                    f"`datagen resume {store.root}` continues"
                ) from None
            else:
                actors.returned(actor, name)
            meter.generated_rows(name, len(gens))
            good: list[dict[str, Any]] = []
            for req, gen in zip(batch, gens):
                row = make_row(req, gen, actors.info[name], sampling[name], row_licenses[name],
                               price=teachers[name].price)
                if gen["error"]:
                    consecutive_failures += 1
                    route("failed", row, gen["error"].split(":", 1)[0], 0)
                    if groups is not None:
                        good += groups.failed(req.prompt_id)
                    if consecutive_failures >= job.runtime.max_consecutive_failures:
                        raise DatagenError(
                            f"teacher {name!r} failed {consecutive_failures} rows in a row "
                            f"(last: {gen['error'][:200]}); committed rows are intact: fix the "
                            f"teacher, then `datagen resume {store.root}`"
                        )
                    continue
                consecutive_failures = 0
                stats.prompt_tokens += gen["prompt_tokens"] or 0
                stats.completion_tokens += gen["completion_tokens"] or 0
                if row["usage"]["cost_usd"] is not None:
                    stats.cost_usd = (stats.cost_usd or 0.0) + row["usage"]["cost_usd"]
                good += groups.add(row) if groups is not None else [row]
            to_filters(good)
        store.commit_due()
        meter.tick(stats)
        if on_progress:
            on_progress(stats)
