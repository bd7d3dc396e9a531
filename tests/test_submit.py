"""``datagen submit`` / ``datagen jobs`` against a REAL local Ray head (``ray start --head``
on 127.0.0.1, dashboard + job server, token auth on), with the fake OpenAI teacher on
127.0.0.1; plus the checks ``build`` makes before anything is sent."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from datagen.errors import DatagenError
from datagen.storage import open_store
from datagen.submit import DEFAULT_EXCLUDES, build

from .conftest import datagen, write_job
from .test_pipeline import expected_ids

SECRET = "sk-cluster-side-secret-value"


def project(tmp_path: Path, base_url: str, **kw) -> Path:
    """A working directory holding a job whose teacher needs FAKE_TEACHER_KEY."""
    proj = tmp_path / "proj"
    proj.mkdir()
    job = write_job(proj, base_url=base_url, extra_teacher={"api_key_env": "FAKE_TEACHER_KEY"}, **kw)
    data = yaml.safe_load(job.read_text())
    data["output"]["path"] = str(tmp_path / "out")  # outside the uploaded folder
    job.write_text(yaml.safe_dump(data, sort_keys=False))
    (proj / ".venv").mkdir()
    return job


def test_build_carries_secret_names_never_values(tmp_path, monkeypatch):
    job = project(tmp_path, "http://127.0.0.1:9")
    monkeypatch.setenv("FAKE_TEACHER_KEY", SECRET)  # set locally: must still not travel
    sub = build(job, working_dir=job.parent, env=["DATAGEN_VERBOSE=1"], python="/opt/py/bin/python")
    assert sub.metadata["datagen_secret_env"] == "FAKE_TEACHER_KEY"
    assert sub.runtime_env["env_vars"] == {"DATAGEN_VERBOSE": "1", "DATAGEN_SECRET_ENV": "FAKE_TEACHER_KEY"}
    assert sub.runtime_env["working_dir"] == str(job.parent.resolve())
    assert set(DEFAULT_EXCLUDES) <= set(sub.runtime_env["excludes"]) and ".venv" in DEFAULT_EXCLUDES
    assert sub.entrypoint == "/opt/py/bin/python -m datagen run job.yaml --quiet"
    assert SECRET not in json.dumps([sub.runtime_env, sub.metadata, sub.entrypoint])
    again = build(job, working_dir=job.parent, python="/opt/py/bin/python", resume=True)
    assert again.entrypoint == f"/opt/py/bin/python -m datagen resume {tmp_path / 'out'} --job job.yaml --quiet"


@pytest.mark.parametrize("kw, message", [
    ({"env": ["FAKE_TEACHER_KEY=x"]}, "--env FAKE_TEACHER_KEY: looks like a secret"),
    ({"env": ["HF_TOKEN=hf_abc"]}, "--env HF_TOKEN: looks like a secret"),
    ({"env": ["lower=1"]}, "expected NAME=VALUE"),
    ({"working_dir": "sub"}, "outside the working directory"),
    ({"output": "{proj}/out"}, "inside the uploaded working directory"),
])
def test_build_refuses(tmp_path, kw, message):
    job = project(tmp_path, "http://127.0.0.1:9")
    (job.parent / "sub").mkdir()
    if "working_dir" in kw:
        kw["working_dir"] = job.parent / kw["working_dir"]
    if "output" in kw:
        kw["output"] = kw["output"].format(proj=job.parent)
    with pytest.raises(DatagenError, match=message) as err:
        build(job, **{"working_dir": job.parent, **kw})
    assert "hf_abc" not in str(err.value)


@pytest.fixture(scope="module")
def s3():
    from datagen.testing.s3 import MotoS3

    with MotoS3() as server:
        yield server


@pytest.fixture(scope="module")
def ray_head(s3):
    from datagen.testing.ray_head import LocalRayHead

    # The teacher's key and the store's credentials live in the cluster's environment, as
    # a Secret or an instance role would put them there.
    head = LocalRayHead(num_cpus=2, env={"FAKE_TEACHER_KEY": SECRET, **s3.env})
    with head:
        yield head
    assert head.processes() == [], "Ray processes left behind"


@pytest.mark.slow
def test_submit_follow_to_completion_and_read_shards(tmp_path, fake_server, ray_head):
    job = project(tmp_path, fake_server.base_url, count=12, n=2, shard_rows=10)
    env = {**ray_head.client_env, "FAKE_TEACHER_KEY": ""}  # the submitting shell has no key
    res = datagen("submit", str(job), "--address", ray_head.address, "--follow", "--python", sys.executable,
                  env=env, cwd=job.parent, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    job_id = res.stdout.splitlines()[0]
    assert job_id.startswith("datagen-t-")
    assert "the cluster must provide: FAKE_TEACHER_KEY" in res.stderr
    assert f"job {job_id}: SUCCEEDED" in res.stderr
    assert SECRET not in res.stdout + res.stderr

    store = open_store(tmp_path / "out")
    ids = [r for s in ("accepted", "rejected") for r in store.read(s, columns=["row_id"]).column("row_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 24
    assert set(ids) == expected_ids(job)
    assert SECRET not in (tmp_path / "out" / "datagen-job.json").read_text()

    res = datagen("jobs", "status", job_id, "--address", ray_head.address, "--json", env=env)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["status"] == "SUCCEEDED" and info["metadata"]["datagen_secret_env"] == "FAKE_TEACHER_KEY"
    res = datagen("jobs", "logs", job_id, "--address", ray_head.address, env=env)
    assert res.returncode == 0 and "datagen run job.yaml" in res.stdout and SECRET not in res.stdout
    # The cluster has a dashboard: its address and this job's pages are in every line of the
    # metrics file (and printed at start, by a run without --quiet).
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["final"] and metrics[-1]["counts"]["accepted"] + metrics[-1]["counts"]["rejected"] == 24
    assert all(m["dashboard"]["url"] == ray_head.address for m in metrics)
    assert metrics[-1]["dashboard"]["actors"] == f"{ray_head.address}/#/actors"
    assert metrics[-1]["dashboard"]["job"].startswith(f"{ray_head.address}/#/jobs/")


@pytest.mark.slow
def test_jobs_stop_and_one_line_errors(tmp_path, fake_server, ray_head):
    fake_server.inject("latency", times=None, seconds=2.0)
    job = project(tmp_path, fake_server.base_url, count=50, n=4)  # 200 rows at 2 s each: minutes
    env = ray_head.client_env
    res = datagen("submit", str(job), "--address", ray_head.address, "--python", sys.executable,
                  env=env, cwd=job.parent)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    deadline = time.monotonic() + 120
    while (status := json.loads(datagen("jobs", "status", job_id, "--address", ray_head.address, "--json",
                                        env=env).stdout)["status"]) == "PENDING":
        assert time.monotonic() < deadline
        time.sleep(1)
    assert status == "RUNNING", datagen("jobs", "logs", job_id, "--address", ray_head.address, env=env).stdout
    res = datagen("jobs", "stop", job_id, "--address", ray_head.address, env=env)
    assert res.returncode == 0 and "stop requested" in res.stdout
    while (status := json.loads(datagen("jobs", "status", job_id, "--address", ray_head.address, "--json",
                                        env=env).stdout)["status"]) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline
        time.sleep(1)
    assert status == "STOPPED"
    # The stopped run is finished on the cluster with other teacher settings, and its rows
    # are exactly the job's.
    fake_server.clear()
    data = yaml.safe_load(job.read_text())
    data["teachers"][0].update(replicas=2, max_concurrency=8)
    job.write_text(yaml.safe_dump(data, sort_keys=False))
    res = datagen("submit", str(job), "--resume", "--address", ray_head.address, "--follow",
                  "--python", sys.executable, env=env, cwd=job.parent, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming with teachers[fake].replicas: 1 -> 2" in res.stdout
    store = open_store(tmp_path / "out")
    assert store.job_meta()["job"]["teachers"][0]["replicas"] == 2  # the cluster's resume stored its settings
    ids = [r for s in ("accepted", "rejected") for r in store.read(s, columns=["row_id"]).column("row_id").to_pylist()]
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(job)
    # Unknown job ids and unreachable servers are one-line errors.
    res = datagen("jobs", "status", "no-such-job", "--address", ray_head.address, env=env)
    assert res.returncode == 1 and res.stderr.startswith("error: job no-such-job")
    res = datagen("jobs", "status", "x", "--address", "http://127.0.0.1:9", env=env)
    assert res.returncode == 1 and "cannot reach the Ray job server" in res.stderr


@pytest.mark.slow
def test_a_secret_the_cluster_lacks_fails_the_job_by_name(tmp_path, fake_server, ray_head):
    job = project(tmp_path, fake_server.base_url, count=2)
    job.write_text(job.read_text().replace("FAKE_TEACHER_KEY", "KEY_NOT_ON_CLUSTER"))
    env = {**ray_head.client_env, "KEY_NOT_ON_CLUSTER": SECRET}  # set here only: never sent
    res = datagen("submit", str(job), "--address", ray_head.address, "--follow", "--python", sys.executable,
                  env=env, cwd=job.parent, timeout=300)
    assert res.returncode == 1
    assert "environment variable KEY_NOT_ON_CLUSTER is not set" in res.stdout
    assert SECRET not in res.stdout + res.stderr


@pytest.mark.slow
def test_submit_writes_to_s3_with_the_clusters_credentials(tmp_path, fake_server, ray_head, s3, monkeypatch):
    job = project(tmp_path, fake_server.base_url, count=5, n=2, shard_rows=4)
    url = s3.url("submitted")
    # The submitting shell has neither the teacher's key nor the store's secret.
    env = {**ray_head.client_env, "FAKE_TEACHER_KEY": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ACCESS_KEY_ID": ""}
    res = datagen("submit", str(job), "--address", ray_head.address, "--output", url, "--follow",
                  "--python", sys.executable, env=env, cwd=job.parent, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    store = open_store(url)
    ids = store.row_ids()
    assert len(ids) == 10 and ids == expected_ids(job)
    assert store.job_meta()["job"]["output"]["path"] == url
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_run_that_joins_a_cluster_prints_its_dashboard(tmp_path, fake_server, ray_head):
    job = write_job(tmp_path, base_url=fake_server.base_url, count=4)
    env = {**ray_head.client_env, "RAY_ADDRESS": f"127.0.0.1:{ray_head.gcs_port}"}
    res = datagen("run", str(job), env=env)
    assert res.returncode == 0, res.stderr
    assert f"Ray dashboard: {ray_head.address}  (this job: {ray_head.address}/#/jobs/" in res.stderr
    final = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["dashboard"]["url"] == ray_head.address
