"""The whole spine through the real CLI: local Ray, teacher actors, the openai client
against a real HTTP server on 127.0.0.1, filters, Parquet shards and the manifest.
Kills are real signals to the real process group; assertions are on row-id sets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from datagen.config import load_job
from datagen.prompts import PromptStream
from datagen.storage.shards import ShardStore

from .conftest import REPO, datagen, write_job


def expected_ids(job_path: Path) -> set[str]:
    return {r.row_id for r in PromptStream(load_job(job_path), run_fingerprint="")}


def all_ids(out: Path, streams=("accepted", "rejected")) -> list[str]:
    store = ShardStore.open(out)
    ids: list[str] = []
    for s in streams:
        ids += store.read(s, columns=["row_id"]).column("row_id").to_pylist()
    return ids


def manifest_rows(out: Path) -> int:
    try:
        data = json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(s["rows"] for s in data["shards"] if s["stream"] in ("accepted", "rejected"))


def test_run_end_to_end(tmp_path, fake_server):
    job = write_job(tmp_path, base_url=fake_server.base_url, count=20, n=2, shard_rows=15)
    res = datagen("run", str(job))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    store = ShardStore.open(out)
    # Every row the job asks for, exactly once, split by the filters' verdicts.
    acc = store.read("accepted")
    rej = store.read("rejected")
    ids = acc.column("row_id").to_pylist() + rej.column("row_id").to_pylist()
    assert len(ids) == len(set(ids)) == 40
    assert set(ids) == expected_ids(job)
    # The manifest's counts are the shards' counts.
    for s in store.manifest.shards:
        import pyarrow.parquet as pq

        assert pq.ParquetFile(out / s["file"]).metadata.num_rows == s["rows"]
    assert store.manifest.counts() == {"accepted": acc.num_rows, "rejected": rej.num_rows, "failed": 0}
    # The fake teacher answers prose for "office chair" messages: those, and only those, are rejected.
    rejected_prompts = [m[-1]["content"] for m in rej.column("messages").to_pylist()]
    assert rejected_prompts and all("office chair" in p for p in rejected_prompts)
    assert set(store.manifest.reasons("rejected")) == {"format.invalid_json"}
    first = acc.slice(0, 1).to_pylist()[0]
    assert first["teacher"]["backend"] == "openai" and first["license"]["teacher"] == "Apache-2.0"
    assert len(first["top_ids"][0]) == 5 and len(first["token_ids"]) == first["usage"]["completion_tokens"]
    assert first["provenance"]["template_id"] == "support-extract"
    assert [v["reason"] for v in first["verdicts"]] == ["ok", "ok", "ok"]
    assert "rows generated" in res.stdout and str(out) in res.stdout.replace("\n", "")

    listing = datagen("inspect", str(out), "--json")
    assert listing.returncode == 0, listing.stderr
    info = json.loads(listing.stdout)
    assert info["counts"]["accepted"] == acc.num_rows and len(info["sample"]) == 3


def test_teacher_faults_are_survived_or_recorded_then_resumed(tmp_path, fake_server):
    # Transient faults on three prompts (each fails twice, then answers on the 3rd and last
    # attempt), and one prompt whose rows keep failing.
    fake_server.inject("429", times=2, retry_after=0.05, match="bluetooth speaker")
    fake_server.inject("truncated", times=2, match="desk lamp")
    fake_server.inject("malformed", times=2, match="coffee grinder")
    fake_server.inject("500", times=None, match="office chair")
    job = write_job(tmp_path, base_url=fake_server.base_url, count=20)
    out = tmp_path / "out"
    res = datagen("run", str(job))
    assert res.returncode == 3, res.stderr
    assert "datagen resume" in res.stderr
    store = ShardStore.open(out)
    failed = store.read("failed").to_pylist()
    assert failed and all("office chair" in r["messages"][-1]["content"] for r in failed)
    assert {r["error"].split(":")[0] for r in failed} == {"teacher.http_500"}
    assert all(r["response"] is None for r in failed)
    done = all_ids(out)
    assert len(done) == len(set(done)) == 20 - len(failed)
    survivors = [r for r in store.read("accepted").to_pylist()
                 if any(p in r["messages"][-1]["content"] for p in ("bluetooth speaker", "desk lamp", "coffee grinder"))]
    assert len(survivors) == 3 and all(r["timings"]["attempts"] == 3 for r in survivors)

    fake_server.clear()  # the teacher recovers; resume retries exactly the failed rows
    res = datagen("resume", str(out))
    assert res.returncode == 0, res.stderr
    done = all_ids(out)
    assert len(done) == len(set(done)) == 20
    assert set(done) == expected_ids(job)


def _start(job: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "datagen", "run", str(job), "--quiet"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})


def _wait_for_rows(out: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while manifest_rows(out) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.05)


def _slow_job(tmp_path: Path, fake_server) -> Path:
    fake_server.inject("latency", times=None, seconds=0.1)
    return write_job(tmp_path, base_url=fake_server.base_url, count=40, batch_size=2,
                     shard_rows=4, commit_every_s=0.2)


def test_killed_run_resumes_to_exactly_the_expected_rows(tmp_path, fake_server):
    job = _slow_job(tmp_path, fake_server)
    out = tmp_path / "out"
    proc = _start(job)
    _wait_for_rows(out, proc, 8)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    before = all_ids(out)
    assert 8 <= len(before) < 40
    again = datagen("run", str(job))  # the same job onto its output: says how to go on, adds nothing
    assert again.returncode != 0 and all_ids(out) == before
    assert f"already holds a datagen run; `datagen resume {out}` continues it (`datagen resume {out} --job " \
           f"{job}` with this file's teacher settings" in " ".join(again.stderr.split()), again.stderr
    res = datagen("resume", str(out))
    assert res.returncode == 0, res.stderr
    after = all_ids(out)
    assert len(after) == len(set(after)), Counter(after).most_common(3)
    assert set(after) == expected_ids(job)
    assert set(before) <= set(after)


def test_ctrl_c_commits_and_resume_finishes(tmp_path, fake_server):
    job = _slow_job(tmp_path, fake_server)
    out = tmp_path / "out"
    proc = _start(job)
    _wait_for_rows(out, proc, 4)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"datagen resume {out}" in err
    assert 4 <= len(all_ids(out)) < 40
    res = datagen("resume", str(out))
    assert res.returncode == 0, res.stderr
    after = all_ids(out)
    assert len(after) == len(set(after)) and set(after) == expected_ids(job)


def test_garbage_teacher_stops_the_run_with_one_clear_line(tmp_path, fake_server):
    fake_server.inject("garbage", times=None)
    job = write_job(tmp_path, base_url=fake_server.base_url, count=20, runtime={"num_cpus": 2,
                    "max_consecutive_failures": 5}, extra_teacher={"max_attempts": 2})
    res = datagen("run", str(job))
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    assert "failed 5 rows in a row" in errors[0] and "teacher.malformed_response" in errors[0]
    assert "Traceback" not in res.stderr
    # What was received is committed and readable, and resume is offered.
    assert ShardStore.open(tmp_path / "out").manifest.counts()["failed"] >= 5
    assert "datagen resume" in errors[0]


def test_resume_refuses_an_edited_stored_job(tmp_path, fake_server):
    job = write_job(tmp_path, base_url=fake_server.base_url, count=4)
    assert datagen("run", str(job), "--quiet").returncode == 0
    meta_path = tmp_path / "out" / "datagen-job.json"
    meta = json.loads(meta_path.read_text())
    meta["job"]["teachers"][0]["sampling"]["temperature"] = 0.9
    meta_path.write_text(json.dumps(meta))
    res = datagen("resume", str(tmp_path / "out"))
    assert res.returncode == 1 and "datagen-job.json was edited" in res.stderr, res.stderr


@pytest.mark.parametrize("args,needle", [
    (["run", "does/not/exist.yaml"], "job file not found"),
    (["resume", "/nonexistent/out"], "output directory not found"),
    (["inspect", str(REPO)], "not a datagen output"),
])
def test_bad_paths_get_one_line(args, needle):
    res = datagen(*args)
    assert res.returncode == 1
    assert res.stderr.strip().startswith("error: ") and needle in res.stderr
    assert "Traceback" not in res.stderr


def test_output_path_that_is_a_file(tmp_path, fake_server):
    job = write_job(tmp_path, base_url=fake_server.base_url, count=4)
    (tmp_path / "afile").write_text("x")
    res = datagen("run", str(job), "--output", str(tmp_path / "afile"))
    assert res.returncode == 1 and "is a file" in res.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_teachers_that_cannot_be_placed_are_refused_before_starting(tmp_path):
    # 3 replicas x 1 CPU on a 2-CPU local Ray: refused at once, naming the shortfall,
    # instead of waiting forever for the third actor.
    job = write_job(tmp_path, base_url="http://127.0.0.1:9/v1", count=4)
    data = yaml.safe_load(job.read_text())
    data["teachers"] = [{"name": "v", "backend": "vllm", "model": "embedded:smollm2-135m-instruct",
                         "replicas": 3, "num_cpus": 1}]
    job.write_text(yaml.safe_dump(data))
    res = datagen("run", str(job))
    assert res.returncode == 1, res.stderr
    assert "need 3 CPU" in res.stderr and "has 2" in res.stderr
    assert "Traceback" not in res.stderr
