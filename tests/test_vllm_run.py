"""Runs on the embedded vLLM teacher (CPU) that need a whole pipeline: an engine actor
killed or hung mid-run, and re-scoring that run's rows with a second engine.

Slow (three engine starts, ~1 min each on 2 cores); CI runs them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

from datagen import records
from datagen.config import load_job
from datagen.prompts import PromptStream
from datagen.storage.shards import ShardStore

from .conftest import REPO, datagen

pytestmark = pytest.mark.slow

TEACHER = {
    "name": "smol", "backend": "vllm", "model": "embedded:smollm2-135m-instruct",
    "engine": {"max_model_len": 1024, "enforce_eager": True},
    "sampling": {"temperature": 0.7, "max_tokens": 24, "n": 2, "logprobs": 5},
    "batch_size": 4,
}


def _job(tmp_path: Path) -> Path:
    job = {
        "name": "kill", "seed": 3,
        "prompts": {"template": str(REPO / "prompts" / "support_extract.yaml"), "count": 16},
        "teachers": [TEACHER],
        "filters": ["nonempty"],
        "output": {"path": str(tmp_path / "out"), "commit_every_s": 1.0},
        "runtime": {"num_cpus": 2, "inflight_per_actor": 2},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _teacher_actor_pids() -> list[int]:
    """Processes Ray titled ``ray::TeacherActor…``: the real actors, found the way an
    operator would find them; only this test's (the local Ray instance is a child of
    this process), not those of other Ray instances on the machine."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::TeacherActor"):
            pids.append(p.pid)
    return pids


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run whose only engine actor is SIGKILLed after its first batch comes back."""
    from datagen import run as runner

    tmp = tmp_path_factory.mktemp("kill")
    job_path = _job(tmp)
    job = load_job(job_path)
    stream, fp = runner.prepare(job)
    store = ShardStore.create(job.output.path, job.output, job_meta=runner.job_meta(job, fp, job_path))
    killed: list[int] = []
    seen: set[int] = set()  # every TeacherActor process the run had, restarts included

    def on_progress(stats):
        seen.update(_teacher_actor_pids())
        if not killed and stats.generated >= 4:
            pids = _teacher_actor_pids()
            assert len(pids) == 1, pids
            # Ray's workers run at nice 15; the engine's actor at the normal priority.
            assert os.getpriority(os.PRIO_PROCESS, pids[0]) == 0
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    try:
        stats = runner.execute(job, store, stream, on_progress=on_progress)
    finally:
        store.close()
    return job_path, job, stats, killed, seen


def test_a_killed_vllm_actor_costs_time_not_rows(killed_run):
    job_path, job, stats, killed, seen = killed_run
    assert killed, "the actor was never killed: the test proved nothing"
    # The rows after the kill came from a new process: Ray restarted the actor.
    assert seen - set(killed), f"no actor process after the kill: {seen}"
    out = job.output.path
    store = ShardStore.open(out)
    ids = []
    for s in ("accepted", "rejected"):
        ids += store.read(s, columns=["row_id"]).column("row_id").to_pylist()
    expected = {r.row_id for r in PromptStream(job, run_fingerprint="")}
    # Ray restarted the engine and re-ran the batches it held: every row once, none twice.
    assert len(ids) == len(set(ids)) == len(expected) == 32
    assert set(ids) == expected
    assert store.manifest.counts()["failed"] == 0
    assert not stats.interrupted
    # Throughput's denominator ends at the last commit, not when Ray and the engine are stopped.
    generating = stats.generating_s
    assert stats.teachers_ready < stats.generation_ended and generating == stats.generating_s > 0
    assert datagen("verify", str(out)).returncode == 0


def test_rescore_a_run_with_the_same_model_reproduces_its_logprobs(killed_run, tmp_path):
    _, job, _, _, _ = killed_run
    src = job.output.path
    teacher = dict(TEACHER, sampling={"logprobs": 5})
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(teacher))
    res = datagen("rescore", str(src), "--teacher", str(tmp_path / "t.yaml"), "--to", str(tmp_path / "rs"),
                  timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on their own token ids" in res.stdout
    before = {r["row_id"]: r for r in ShardStore.open(src).read("accepted").to_pylist()}
    after = ShardStore.open(tmp_path / "rs").read("accepted").to_pylist()
    assert {r["row_id"] for r in after} == set(before)
    worst = ties = 0.0
    for r in after:
        b = before[r["row_id"]]
        assert r["response"] == b["response"] and r["token_ids"] == b["token_ids"]
        assert r["provenance"]["logprobs_by"].startswith("smol/vllm/embedded:smollm2-135m-instruct@")
        assert r["license"]["logprobs"] == "Apache-2.0"
        # Same model, teacher-forced over the same ids: the stored log-probs agree to within
        # one quantisation step (1/64 nat), position by position.
        lp_before, lp_after = records.decode_top(b["top_logprobs_q"]), records.decode_top(r["top_logprobs_q"])
        same = np.array(b["top_ids"]) == np.array(r["top_ids"])
        assert same.mean() > 0.95  # the rest are near-ties swapping rank:
        worst = max(worst, float(np.abs(lp_before - lp_after)[same].max()))
        if not same.all():  # where the ids differ, the log-prob at that rank is (nearly) the same
            ties = max(ties, float(np.abs(lp_before - lp_after)[~same].max()))
        np.testing.assert_allclose(records.dequantize_logprobs(r["token_logprobs_q"]),
                                   records.dequantize_logprobs(b["token_logprobs_q"]), atol=0.017)
    assert worst <= 1.01 / records.LOGPROB_SCALE
    assert ties <= 2.01 / records.LOGPROB_SCALE, ties
    assert datagen("verify", str(tmp_path / "rs")).returncode == 0


def test_a_killed_rescore_is_finished_by_running_it_again_with_other_batches(killed_run, tmp_path):
    import subprocess
    import sys
    import time

    from datagen.storage.shards import MANIFEST, Manifest

    _, job, _, _, _ = killed_run
    src, dest = job.output.path, tmp_path / "rs"
    partial = tmp_path / ".rs.partial"
    teacher = dict(TEACHER, batch_size=1, sampling={"logprobs": 5})
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(teacher))
    cmd = [sys.executable, "-m", "datagen", "rescore", str(src), "--teacher", str(tmp_path / "t.yaml"),
           "--to", str(dest), "--commit-every", "0.001"]  # every batch of one row commits
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (partial / MANIFEST).exists() and Manifest.load(partial).counts()["accepted"] >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the re-score ended before it could be killed: {proc.stdout.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Ray and the engine
    proc.wait()
    kept = ShardStore.open(partial).row_ids(("accepted",))
    expected = ShardStore.open(src).row_ids(("accepted",))
    assert 3 <= len(kept) < len(expected) and not dest.exists()

    # Run again with other operational settings (batches of 4, a smaller engine batch):
    # what the log-probs depend on is the same, so it continues.
    again = dict(teacher, batch_size=4, engine={**teacher.get("engine", {}), "max_num_seqs": 32})
    (tmp_path / "t2.yaml").write_text(yaml.safe_dump(again))
    cmd[cmd.index(str(tmp_path / "t.yaml"))] = str(tmp_path / "t2.yaml")
    res = datagen(*cmd[3:], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{len(kept)} rows were already scored" in res.stdout
    ids = ShardStore.open(dest).read("accepted", columns=["row_id"]).column("row_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected  # every row once, none twice
    assert not partial.exists()
    assert datagen("verify", str(dest)).returncode == 0


def test_a_rescore_whose_engine_dies_sends_its_batches_again(killed_run, tmp_path, monkeypatch):
    """Ray restarts the killed engine actor but, with no task retries left, hands its
    in-flight batches back as lost: the re-score sends them again and every row is
    scored exactly once."""
    import threading
    import time

    from datagen import rescore
    from datagen.config import Runtime
    from datagen.storage.shards import MANIFEST, Manifest
    from datagen.teachers import fleet

    monkeypatch.setattr(fleet, "ACTOR_MAX_TASK_RETRIES", 0)  # Ray's retries "ran out" at once
    _, job, _, _, _ = killed_run
    src, dest = job.output.path, tmp_path / "rs"
    partial = tmp_path / ".rs.partial"
    teacher = rescore.load_teacher(_write(tmp_path / "t.yaml", dict(TEACHER, batch_size=2, sampling={"logprobs": 5})))
    killed: list[int] = []

    def kill_after_first_commit() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if (partial / MANIFEST).exists() and Manifest.load(partial).counts()["accepted"] >= 2:
                pids = _teacher_actor_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_after_first_commit, daemon=True)
    watcher.start()
    res = rescore.rescore(src, teacher, dest=dest, runtime=Runtime(num_cpus=2), inflight_per_actor=2,
                          commit_every_s=0.001)
    watcher.join(5)
    assert killed, "the engine actor was never killed"
    assert res.redone >= 1  # its in-flight batches came back lost and were sent again
    ids = ShardStore.open(dest).read("accepted", columns=["row_id"]).column("row_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == ShardStore.open(src).row_ids(("accepted",))


def test_a_hung_engine_is_killed_and_restarted_and_its_rows_still_come_once(tmp_path):
    """Every process of the engine is SIGSTOPped mid-run: alive, silent, holding its
    requests, like a wedged GPU. vLLM notices nothing; the actor's watchdog sees no engine
    step for ``stall_timeout_s``, kills the engine and exits, Ray restarts the actor, and
    the run ends with every row once."""
    import threading

    import psutil

    from datagen import run as runner

    data = yaml.safe_load(_job(tmp_path).read_text())
    data["prompts"]["count"] = 32
    # 4 sequences an engine step: 2 batches in the actor, one in the engine at any time
    # (at vLLM's 256 all 16 would go at once and might be done before the stop).
    data["teachers"][0]["engine"].update(stall_timeout_s=15, max_num_seqs=4)
    job_path = _write(tmp_path / "job.yaml", data)
    job = load_job(job_path)
    stream, fp = runner.prepare(job)
    store = ShardStore.create(job.output.path, job.output, job_meta=runner.job_meta(job, fp, job_path))
    actors: set[int] = set()
    stopped: list[psutil.Process] = []
    logs: list[Path] = []

    def on_progress(stats):
        actors.update(_teacher_actor_pids())
        if not stopped and stats.generated >= 4:
            logs.append(Path("/tmp/ray/session_latest").resolve() / "logs")  # this run's local Ray
            (actor,) = _teacher_actor_pids()
            for p in psutil.Process(actor).children(recursive=True):
                p.suspend()  # SIGSTOP
                stopped.append(p)

    def thaw() -> None:  # leave nothing stopped behind; without a watchdog, the run ends (and fails) late
        for p in stopped:
            try:
                p.resume()
            except psutil.Error:
                pass

    fallback = threading.Timer(300, thaw)
    fallback.start()
    try:
        stats = runner.execute(job, store, stream, on_progress=on_progress)
    finally:
        store.close()
        fallback.cancel()
        thaw()
    assert stopped, "the engine was never stopped: the test proved nothing"
    assert len(actors) >= 2, f"the actor was never restarted: {actors}"
    said = [line for f in logs[0].glob("worker-*.err") for line in f.read_text(errors="replace").splitlines()
            if "requests a token in" in line]
    assert said and "(engine.stall_timeout_s: 15); exiting so Ray restarts this actor" in said[0], said
    for p in stopped:  # killed by the watchdog, not left frozen holding memory
        try:
            assert p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
    ids = []
    reopened = ShardStore.open(job.output.path)
    for s in ("accepted", "rejected"):
        ids += reopened.read(s, columns=["row_id"]).column("row_id").to_pylist()
    assert len(ids) == len(set(ids)) == 64
    assert set(ids) == {r.row_id for r in PromptStream(job, run_fingerprint="")}
    assert not stats.interrupted


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path
