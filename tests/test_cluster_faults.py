"""Fault tolerance (issue 8): a killed actor, a lost worker node and a killed driver each
cost time, not rows. Every faulted run here has a target of N accepted rows and
streaming dedupe on, and must end exactly as an uninterrupted run does: the same
accepted and rejected row-id sets, each row once across all three streams, exactly N
accepted, and the same dedupe view.

All of it is real: the CLI in a subprocess; local Ray, or a cluster of a 0-CPU head and
worker nodes on 127.0.0.1 (datagen/testing/ray_head.py); the fake OpenAI server; SIGKILL
to actor processes, to a worker node's whole process session, to the driver's group."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from datagen import run as runner
from datagen.config import Dedupe, parse_job
from datagen.errors import DatagenError
from datagen.records import STREAMS
from datagen.storage.shards import ShardStore
from datagen.teachers import fleet
from datagen.teachers.fleet import TeacherFleet
from datagen.testing.fake_openai import FakeOpenAIServer

from .conftest import datagen, write_job
from .test_dedupe_stream import _job as dedupe_job
from .test_dedupe_stream import near_duplicate_answer
from .test_pipeline import _start, _wait_for_rows, all_ids

TARGET = 30  # accepted rows; the 60 prompts hold more, so the target is what stops every run


def answer(messages):
    """Near-duplicate answers (dedupe has clusters to find), and prose for "office chair"
    (the format filter rejects it, so the target needs more prompts than it accepts)."""
    if "office chair" in messages[-1]["content"]:
        return "I am sorry to hear that! Please contact the store."
    return near_duplicate_answer(messages)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(answer=answer) as s:
        yield s


@dataclass
class Outcome:
    accepted: set[str]
    rejected: set[str]
    clusters: list[dict]  # the dedupe view's clusters.parquet: row id, its cluster, kept


def outcome(out: Path) -> Outcome:
    store = ShardStore.open(out)
    ids = {s: store.read(s, columns=["row_id"]).column("row_id").to_pylist() for s in STREAMS}
    every = [r for s in STREAMS for r in ids[s]]
    assert len(every) == len(set(every)), Counter(every).most_common(3)
    assert ids["failed"] == []
    assert len(ids["accepted"]) == TARGET
    clusters = sorted(pq.read_table(out / "dedupe" / "clusters.parquet").to_pylist(), key=lambda r: r["row_id"])
    return Outcome(set(ids["accepted"]), set(ids["rejected"]), clusters)


def fault_job(tmp_path: Path, server, name: str, *, runtime: dict | None = None,
              teacher: dict | None = None) -> Path:
    """Two teacher replicas, one row per batch and one batch per actor: every actor holds
    work whenever it is killed. Row ids do not depend on any of these settings."""
    (tmp_path / name).mkdir()
    return dedupe_job(tmp_path, server.base_url, name, 2, batch_size=1, shard_rows=4, commit_every_s=0.2,
                      target_accepted=TARGET,
                      runtime={"num_cpus": 2, "inflight_per_actor": 1, "filter_actors": 2, **(runtime or {})},
                      extra_teacher={"replicas": 2, "timeout_s": 30, **(teacher or {})})


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> Outcome:
    """The uninterrupted run every faulted one must equal."""
    tmp = tmp_path_factory.mktemp("ref")
    job = fault_job(tmp, server, "ref")
    res = datagen("run", str(job))
    assert res.returncode == 0, res.stderr
    assert "target_accepted" in res.stdout
    ref = outcome(tmp / "ref" / "out")
    assert ref.rejected, "no rejections: the target counter had nothing to count past"
    assert sum(c["kept"] for c in ref.clusters) < TARGET, "no near-duplicates: dedupe had nothing to do"
    return ref


def _actor_pids(proc, class_name: str) -> list[int]:
    """The run's actor processes of one class, found as an operator would: by the title
    Ray gives them, among the driver's descendants (its local Ray)."""
    import psutil

    pids = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(f"ray::{class_name}"):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def _wait_for(find, proc, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not (found := find()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s"
        time.sleep(0.05)
    return found


def _finish(proc, timeout: float = 600) -> str:
    """Wait for a run to end on its own, successfully; its stderr."""
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return err


def _kill_a_teacher_past_its_restarts(proc, *, then_wait_for_a_new_one: bool = False) -> None:
    """SIGKILL one teacher replica once more than Ray restarts an actor, waiting for each
    restart; then, if asked, for the actor the driver starts in its place."""
    seen = set(_wait_for(lambda: _actor_pids(proc, "TeacherActor"), proc, "teacher actors"))
    victim = min(seen)
    for kill in range(fleet.ACTOR_MAX_RESTARTS + 1):
        os.kill(victim, signal.SIGKILL)
        if kill < fleet.ACTOR_MAX_RESTARTS or then_wait_for_a_new_one:
            victim = _wait_for(lambda: set(_actor_pids(proc, "TeacherActor")) - seen, proc, "restarted teacher").pop()
            seen.add(victim)


def test_killed_actors_cost_time_not_rows(tmp_path, server, reference):
    server.inject("latency", times=None, seconds=2.0)  # every actor busy when killed
    job = fault_job(tmp_path, server, "actors")
    out = tmp_path / "actors" / "out"
    proc = _start(job)
    try:
        _wait_for_rows(out, proc, 2)
        # A filter actor: Ray restarts it and re-runs its batch. An index actor: the
        # driver rebuilds the dedupe index from the store.
        for cls in ("FilterWorker", "IndexShard"):
            os.kill(_wait_for(lambda: _actor_pids(proc, cls), proc, cls)[0], signal.SIGKILL)
        # One teacher replica, until Ray gives up on it (max_restarts): its last batch
        # comes back to the driver as lost, and goes to the other replica (or to the one
        # the driver starts in its place).
        _kill_a_teacher_past_its_restarts(proc)
        assert proc.poll() is None, "the run ended before the faults were all in: they proved nothing"
    finally:
        server.clear()
    err = _finish(proc)
    assert outcome(out) == reference
    # What reached the driver: the batch Ray gave up on, and the index it lost.
    assert re.search(r"redone after an actor or node died: .*\d+ teacher batch", err), err
    assert "dedupe index rebuild" in err, err


def test_a_replica_ray_gave_up_on_is_started_anew(tmp_path, server, reference):
    """Ray's restart budget is for an actor's whole life: the only teacher replica, killed
    once more than Ray restarts it, would end the run. It had answered batches, so the
    driver starts a new one, and the run ends as the reference did."""
    server.inject("latency", times=None, seconds=0.3)
    job = fault_job(tmp_path, server, "renew", teacher={"replicas": 1})
    out = tmp_path / "renew" / "out"
    proc = _start(job)
    try:
        _wait_for_rows(out, proc, 2)  # it has answered: worth starting anew
        _kill_a_teacher_past_its_restarts(proc, then_wait_for_a_new_one=True)
        assert proc.poll() is None, "the run ended before the faults were all in: they proved nothing"
    finally:
        server.clear()
    err = _finish(proc)
    assert outcome(out) == reference
    assert re.search(r"redone after an actor or node died: .*(?<!\d)1 new teacher replica\b", err), err


def test_a_prompt_that_kills_its_engine_fails_alone_and_the_run_goes_on(tmp_path):
    """A poison prompt: the process that sends it dies (``kill_client``), as an engine that
    crashes on one prompt takes its actor down, every time, with every batch in flight
    there. Ray retries the batch until it gives up on the actor; the driver then runs
    each lost batch alone on a replica, the batch that dies alone row by row, and fails
    only the row that dies alone, with a reason. Every other row ends as in a run
    without the poison, once."""
    from datagen.config import load_job

    from .conftest import extract_answer

    def rows(out: Path) -> dict[str, list]:
        store = ShardStore.open(out)
        return {s: sorted(store.read(s, columns=["row_id", "error"]).to_pylist(), key=lambda r: r["row_id"])
                for s in STREAMS}

    with FakeOpenAIServer(answer=extract_answer) as server:
        # One replica, two batches of 4 in flight on it (2 slots): batches 1-2 answer first,
        # so the replica is worth starting anew once Ray gives up on it.
        job = write_job(tmp_path, base_url=server.base_url, count=24, batch_size=4,
                        extra_teacher={"max_concurrency": 4, "timeout_s": 10},
                        runtime={"num_cpus": 2, "inflight_per_actor": 1})
        reqs = list(runner.prepare(load_job(job))[0])
        texts = [r.messages[-1]["content"] for r in reqs]
        # the poison: a prompt in the fifth batch, found by text no other prompt contains
        poison, mark = next((r, w) for r in reqs[16:20] for w in r.messages[-1]["content"].split()
                            if sum(w in t for t in texts) == 1)
        ref = datagen("run", str(job))
        assert ref.returncode == 0, ref.stderr
        expected = rows(tmp_path / "out")
        assert expected["failed"] == [] and poison.row_id in {r["row_id"] for r in expected["accepted"]}
        (tmp_path / "out").rename(tmp_path / "ref")

        server.inject("kill_client", times=None, match=mark)
        res = datagen("run", str(job))
        served = server.served["kill_client"]
        assert not server.served["kill_client: no sender found"]
        got = rows(tmp_path / "out")
        # A resume tries the failed row again: the poison is the replica's first and only
        # batch now, so it dies before answering one; it still fails alone.
        again = datagen("resume", str(tmp_path / "out"))
        served_again = server.served["kill_client"] - served
        after_again = rows(tmp_path / "out")
        server.clear()  # say, the engine fixed
        fixed = datagen("resume", str(tmp_path / "out"))
    assert res.returncode == 3, res.stderr  # finished, with a failed row
    assert "1 row failed alone: the teacher's replica died running it alone" in res.stderr, res.stderr
    (failed,) = got["failed"]
    assert failed["row_id"] == poison.row_id
    assert failed["error"].startswith("teacher_died: its replica died running this row alone")
    every = [r["row_id"] for s in STREAMS for r in got[s]]
    assert len(every) == len(set(every)) == len(reqs)
    for s in ("accepted", "rejected"):
        assert {r["row_id"] for r in got[s]} == {r["row_id"] for r in expected[s]} - {poison.row_id}
    # Ray's own tries on the batch (1 + its retries), then the batch alone, then the row
    # alone. (More if Ray reported a death as the actor "unavailable": the batch is then
    # first sent again as any batch, up to Ray's tries once more.)
    tries = 1 + fleet.ACTOR_MAX_TASK_RETRIES
    assert tries + 2 <= served <= 2 * tries + 2, served
    assert re.search(r"redone after an actor or node died: .*\d+ teacher batch", res.stderr), res.stderr
    assert re.search(r"\d+ new teacher replica", res.stderr), res.stderr
    assert again.returncode == 3, again.stderr
    assert [r["row_id"] for r in after_again["failed"]] == [poison.row_id] * 2  # failed once more, alone
    assert {s: after_again[s] for s in ("accepted", "rejected")} == {s: got[s] for s in ("accepted", "rejected")}
    assert tries + 1 <= served_again <= 2 * tries + 1, served_again
    assert fixed.returncode == 0, fixed.stderr
    assert rows(tmp_path / "out") == {**expected, "failed": after_again["failed"]}  # row for row, as without the poison


def test_suspects_run_alone_on_a_held_replica_which_takes_work_again_after_them(local_ray, server):
    """``TeacherFleet``'s bookkeeping for lost work, on a real actor: work lost with a node is
    sent again as any batch the first time, and is a suspect the second; work whose
    actor died is a suspect at once. Suspects run one at a time on a held replica that
    gets no other work; a batch lost alone comes back row by row, a row lost alone is
    the culprit, and then the replica takes work again (also when the culprit was the
    last suspect)."""
    from datagen.config import OpenAITeacher

    cfg = OpenAITeacher.model_validate({"name": "fake", "backend": "openai", "model": "fake",
                                        "base_url": server.base_url, "timeout_s": 10})
    actors = TeacherFleet([cfg])
    assert actors.wait_started(60, lambda: False)
    (actor,) = actors.by_teacher["fake"]
    died = local_ray.exceptions.ActorDiedError()
    node = local_ray.exceptions.ActorUnavailableError("its node is gone", None)

    def until(get):
        deadline = time.monotonic() + 60
        while (got := get()) is None:  # the lost replica answers its ping first
            assert time.monotonic() < deadline
            actors.liveness.wait(0.2)
        return got

    assert actors.lost(actor, "fake", ["c"], "c", node) == (["c"], None)  # the first time: again, as any batch
    assert actors.lost(actor, "fake", ["c"], "c", node) == (None, None)  # the second: a suspect
    assert actors.lost(actor, "fake", ["a", "b"], "a", died) == (None, None)  # died on each of Ray's tries
    assert until(lambda: actors.suspect("fake")) == (actor, ["c"])
    assert actors.free("fake", 2) is None and actors.suspect("fake") is None  # held; one suspect at a time
    actors.returned(actor, "fake")  # "c" was innocent
    assert until(lambda: actors.suspect("fake")) == (actor, ["a", "b"])
    assert actors.lost(actor, "fake", ["a", "b"], "a", died) == (None, None)  # died alone: row by row
    assert until(lambda: actors.suspect("fake")) == (actor, ["a"])
    actors.returned(actor, "fake")
    assert actors.free("fake", 2) is None  # "b" is still to run alone
    assert until(lambda: actors.suspect("fake")) == (actor, ["b"])
    assert actors.lost(actor, "fake", ["b"], "b", died) == (None, "b")  # the culprit
    assert not actors.suspects["fake"]
    assert until(lambda: actors.free("fake", 2)) is actor  # no longer held


def test_a_replica_that_never_answered_is_not_started_anew(local_ray, server, monkeypatch):
    """The crash-loop guard, on real actors: dead before answering a batch -> one new
    actor, once (the work it lost is a suspect, which must get its run alone), and when
    that dies too the teacher has no replica left and the driver says so; dead after
    answering one -> a new actor takes its place and answers, unless it misses the
    start-up time-out."""
    from datagen.config import OpenAITeacher

    monkeypatch.setattr(fleet, "ACTOR_MAX_RESTARTS", 0)  # Ray gives up at the first death
    cfg = OpenAITeacher.model_validate({"name": "fake", "backend": "openai", "model": "fake",
                                        "base_url": server.base_url, "timeout_s": 10})
    ask = "Where is my blender, order 12345?"
    batch = [{"row_id": "r0", "messages": [{"role": "user", "content": ask}], "seed": 1}]

    def lose(actors, actor):  # as TeacherFleet.collect does with a batch whose actor died
        with pytest.raises(local_ray.exceptions.RayActorError) as exc:
            local_ray.get(actor.generate.remote(batch))
        assert actors.lost(actor, "fake", batch, "r0", exc.value) == (None, None)  # a suspect, not a culprit

    def free(actors):
        deadline = time.monotonic() + 60
        while (actor := actors.free("fake", 2)) is None:
            assert time.monotonic() < deadline
            actors.liveness.wait(0.5)
        return actor

    fresh = TeacherFleet([cfg])
    assert fresh.wait_started(60, lambda: False)
    (actor,) = fresh.by_teacher["fake"]
    local_ray.kill(actor, no_restart=True)
    lose(fresh, actor)
    second = free(fresh)
    assert second is not actor and fresh.renewed["fake"] == 1
    local_ray.kill(second, no_restart=True)
    lose(fresh, second)
    with pytest.raises(DatagenError, match=r"all 1 replica\(s\) died"):
        free(fresh)
    assert fresh.renewed["fake"] == 1

    worked = TeacherFleet([cfg])
    assert worked.wait_started(60, lambda: False)
    (actor,) = worked.by_teacher["fake"]
    assert local_ray.get(actor.generate.remote(batch))[0]["error"] is None
    worked.returned(actor, "fake")
    local_ray.kill(actor, no_restart=True)
    lose(worked, actor)
    new = free(worked)
    assert new is not actor and worked.by_teacher["fake"] == [new] and worked.renewed["fake"] == 1
    assert local_ray.get(new.generate.remote(batch))[0]["error"] is None

    late = TeacherFleet([cfg], startup_timeout_s=0)  # no new actor starts that fast
    assert late.wait_started(60, lambda: False)
    (actor,) = late.by_teacher["fake"]
    local_ray.get(actor.generate.remote(batch))
    late.returned(actor, "fake")
    local_ray.kill(actor, no_restart=True)
    lose(late, actor)
    deadline = time.monotonic() + 60
    while True:  # until Ray's "dead" reaches the driver and it starts one anew
        assert late.free("fake", 2) is None and time.monotonic() < deadline
        if actor not in late.by_teacher["fake"]:
            break
        late.liveness.wait(0.5)
    assert late.free("fake", 2) is None  # at once: still starting, and already late
    with pytest.raises(DatagenError, match=r"all 1 replica\(s\) died"):
        free(late)
    assert late.renewed["fake"] == 1  # started, missed its time-out, killed, and not started again


def test_killed_driver_is_finished_by_resume(tmp_path, server, reference):
    server.inject("latency", times=None, seconds=0.5)
    job = fault_job(tmp_path, server, "driver")
    out = tmp_path / "driver" / "out"
    proc = _start(job)
    try:
        _wait_for_rows(out, proc, 6)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray: nothing is tidied
        proc.wait()
    finally:
        server.clear()
    before = all_ids(out)
    assert 6 <= len(before) < TARGET and not (out / "dedupe").exists()
    res = datagen("resume", str(out))
    assert res.returncode == 0, res.stderr
    assert outcome(out) == reference
    assert set(before) <= set(all_ids(out))


@pytest.mark.slow
def test_lost_worker_node_costs_time_not_rows(tmp_path, server, reference):
    from datagen.testing.ray_head import LocalRayHead

    # The production layout: a head without CPUs runs the driver; actors asking for a CPU
    # go to the workers, each big enough to take every actor after the other is lost.
    # A spread threshold of 0 puts each actor on the least loaded node, so both hold some.
    head = LocalRayHead(num_cpus=0, object_store_mb=256, env={"RAY_scheduler_spread_threshold": "0"})
    with head:
        workers = [head.add_worker(num_cpus=4, object_store_mb=256) for _ in range(2)]
        server.inject("latency", times=None, seconds=1.0)
        job = fault_job(tmp_path, server, "node", runtime={"filter_num_cpus": 1}, teacher={"num_cpus": 1})
        out = tmp_path / "node" / "out"
        proc = _start(job, env={**head.client_env, "RAY_ADDRESS": head.gcs_address})
        try:
            _wait_for_rows(out, proc, 4, timeout=300)
            placed = {w: {c: w.actor_pids(c) for c in ("TeacherActor", "FilterWorker", "IndexShard")}
                      for w in workers}
            assert all(placed[w]["TeacherActor"] for w in workers), placed  # spread over both
            assert not head.actor_pids("TeacherActor") and not head.actor_pids("FilterWorker")
            victim = max(workers, key=lambda w: sum(map(len, placed[w].values())))
            victim.kill()  # raylet, object store, its actors: gone at once
            assert proc.poll() is None, "the run ended before the node was lost: it proved nothing"
        finally:
            server.clear()
        print(_finish(proc))  # what reached the driver, if anything (Ray retries the rest)
    assert head.processes() == [], "Ray processes left behind"
    assert outcome(out) == reference


# --------------------------------------------------------------------------- units


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_streaming_dedupe_rebuilds_its_index_after_a_lost_actor(local_ray):
    from datagen.dedupe import minhash as mh
    from datagen.dedupe.streaming import BATCH, StreamingDedupe

    from .test_minhash import corpus

    ids, texts = corpus(2 * BATCH, 3, seed=5)
    ids = [f"{i * 7919:032x}" for i in range(len(ids))]
    expected = {ids[i] for i in mh.find_clusters(ids, texts).kept()}
    seen: list[tuple[str, str]] = []  # what a store would hold: every row added so far
    sd = StreamingDedupe(Dedupe(actors=3), source=lambda: iter(seen))
    for i, (rid, text) in enumerate(zip(ids, texts)):
        seen.append((rid, text))
        sd.add(rid, text)
        if i == BATCH + 10:  # one batch indexed, the next one pending
            killed = sd.actors[1]
            local_ray.kill(killed)
    roots = sd.roots()
    assert killed not in sd.actors
    assert {r for r, root in roots.items() if r == root} == expected
    assert set(roots) == set(ids)

    # Without a source to rebuild from, the loss stops the run with one clear line.
    bare = StreamingDedupe(Dedupe(actors=2))
    local_ray.kill(bare.actors[0])
    bare.add(ids[0], texts[0])
    with pytest.raises(DatagenError, match="streaming dedupe lost an index actor .*`datagen resume` rebuilds"):
        bare.roots()


def test_liveness_gives_no_work_to_lost_replicas_until_they_answer(local_ray):
    from datagen.replicas import Liveness, ReplicasLost

    @local_ray.remote(num_cpus=0)
    class Replica:
        def ping(self) -> bool:
            return True

    def until(cond):
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline
            live.wait(0.5)

    def kill(actor):  # ray.kill returns before the actor is gone: a ping may still answer
        local_ray.kill(actor)
        deadline = time.monotonic() + 60
        while True:
            try:
                local_ray.get(actor.ping.remote())
            except local_ray.exceptions.RayActorError:
                return
            assert time.monotonic() < deadline
            time.sleep(0.05)

    a, b = Replica.remote(), Replica.remote()
    local_ray.get([a.ping.remote(), b.ping.remote()])
    live = Liveness()
    load = {a: 0, b: 1}
    assert live.pick([a, b], load, limit=2) is a  # least loaded
    live.lost(b, b.ping)  # lost a batch but answers: back
    until(lambda: live.pick([a, b], load, limit=2) is not None and b not in live.down)
    kill(a)  # and Ray will not restart it
    live.lost(a, a.ping)
    assert live.pick([a, b], load, limit=2) is b  # a is down: b, though busier
    until(lambda: live.pick([a, b], load, limit=2) and a in live.dead)
    load[b] = 2
    assert live.pick([a, b], load, limit=2) is None  # b is full; a gets nothing any more
    kill(b)
    live.lost(b, b.ping)
    with pytest.raises(ReplicasLost, match="all 2 replica"):
        until(lambda: live.pick([a, b], load, limit=2) and False)


def test_api_teacher_cpus_place_actors_and_stay_out_of_the_fingerprint(tmp_path):
    job = write_job(tmp_path, base_url="http://127.0.0.1:9/v1", count=4)
    base = yaml.safe_load(job.read_text())

    def fingerprint(**teacher) -> str:
        data = {**base, "teachers": [{**base["teachers"][0], **teacher}]}
        return runner.prepare(parse_job(data, where="job.yaml", base_dir=tmp_path))[1]

    assert fingerprint(num_cpus=1) == fingerprint()  # where replicas run is not what a row is
    data = {**base, "teachers": [{**base["teachers"][0], "num_cpus": -1}]}
    with pytest.raises(DatagenError, match=r"teachers\[0\]\.num_cpus"):
        parse_job(data, where="job.yaml", base_dir=tmp_path)
    # Counted before any actor starts: 3 replicas x 1 CPU cannot fit a 2-CPU local Ray.
    data = {**base, "teachers": [{**base["teachers"][0], "num_cpus": 1, "replicas": 3}]}
    job.write_text(yaml.safe_dump(data))
    res = datagen("run", str(job))
    assert res.returncode == 1 and "need 3 CPU" in res.stderr and "has 2" in res.stderr, res.stderr
