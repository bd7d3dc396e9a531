"""The shard store on a real S3-compatible server (moto, in server mode, on 127.0.0.1):
commit through the manifest object, unique data objects, the lease that replaces flock,
and the CLI (run, resume, verify, inspect) against an s3:// output."""

from __future__ import annotations

import json

import pytest

from datagen.config import Output
from datagen.errors import ConfigError, OutputError
from datagen.storage.objstore import ObjectShardStore
from datagen.storage import create_store, open_store
from datagen.storage.shards import LOCK_FILE, MANIFEST
from datagen.testing.s3 import MotoS3
from datagen.storage.verify import verify

from .conftest import REPO, datagen, write_job
from .test_shards import row

META = {"name": "t", "run_fingerprint": "fp", "job": {}}


@pytest.fixture(scope="module")
def s3():
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3env(s3, monkeypatch):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return s3


def output(url: str, **kw) -> Output:
    return Output.model_validate({"path": url, **kw})


def objects(s3, prefix: str) -> dict[str, bytes]:
    from pyarrow import fs as pafs

    fs = s3.filesystem()
    infos = fs.get_file_info(pafs.FileSelector(f"{s3.bucket}/{prefix}", recursive=True, allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.path.split(f"{prefix}/", 1)[1]] = f.read()
    return out


def test_shards_round_trip_through_the_manifest(s3env, request):
    url = s3env.url(request.node.name)
    store = create_store(url, output(url, shard_rows=10), job_meta=META)
    assert isinstance(store, ObjectShardStore)
    for i in range(25):
        store.add("accepted", row(i))
    store.commit_all()
    store.close()

    back = open_store(url)
    ids = back.read("accepted", columns=["row_id"]).column("row_id").to_pylist()
    assert ids == [f"id{i:06d}" for i in range(25)]
    assert [s["rows"] for s in back.manifest.shards] == [10, 10, 5]
    assert [r["row_id"] for r in back.iter_rows("accepted")] == ids
    # Data objects have unique names (never overwritten); the lease is gone after close.
    files = [s["file"] for s in back.manifest.shards]
    assert len(set(files)) == 3 and all(f.startswith("accepted/part-") and len(f) > 30 for f in files)
    stored = objects(s3env, request.node.name)
    assert LOCK_FILE not in stored and MANIFEST in stored
    rep = verify(url)
    assert rep.ok and rep.rows == 25 and rep.shards == 3, rep.problems
    # Credentials never land in what the store wrote.
    secret = s3env.env["AWS_SECRET_ACCESS_KEY"].encode()
    assert not any(secret in body or b"test-key-id" in body for body in stored.values())


def test_readers_ignore_uncommitted_objects_and_resume_sweeps_them(s3env, request):
    url = s3env.url(request.node.name)
    store = create_store(url, output(url), job_meta=META)
    for i in range(5):
        store.add("accepted", row(i))
    store.commit_all()
    # A writer killed after uploading a shard but before the manifest PUT leaves this:
    for i in range(5, 8):
        store.add("accepted", row(i))
    store.writers["accepted"]._flush_row_group()
    store.writers["accepted"]._writer.close()
    store.writers["accepted"]._tmp.close()
    orphan = store.writers["accepted"]._name
    store.close()

    assert orphan in objects(s3env, request.node.name)
    reader = open_store(url)
    assert reader.read("accepted").num_rows == 5
    rep = verify(url)
    assert rep.ok and any(orphan in n for n in rep.notes)
    resumed = open_store(url, output(url), for_writing=True)
    resumed.close()
    assert orphan not in objects(s3env, request.node.name)
    assert verify(url).notes == []


def test_a_second_writer_is_refused_until_the_lease_is_released(s3env, request):
    url = s3env.url(request.node.name)
    first = create_store(url, output(url), job_meta=META)
    with pytest.raises(OutputError, match="another datagen process is writing"):
        open_store(url, output(url), for_writing=True)
    first.close()
    open_store(url, output(url), for_writing=True).close()


def test_a_dead_writers_lease_on_this_host_is_taken_over(s3env, request):
    import socket
    import subprocess
    import sys

    url = s3env.url(request.node.name)
    create_store(url, output(url), job_meta=META).close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fs = s3env.filesystem()
    with fs.open_output_stream(f"{s3env.bucket}/{request.node.name}/{LOCK_FILE}") as f:
        import time

        f.write(json.dumps({"token": "crashed", "host": socket.gethostname(), "pid": int(dead.stdout),
                            "renewed_at": time.time()}).encode())
    open_store(url, output(url), for_writing=True).close()


def test_a_writer_that_lost_its_lease_commits_nothing(s3env, request):
    url = s3env.url(request.node.name)
    store = create_store(url, output(url), job_meta=META)
    store.add("accepted", row(1))
    store.commit_all()
    before = objects(s3env, request.node.name)[MANIFEST]
    # Another writer takes over (as after an expired lease).
    fs = s3env.filesystem()
    with fs.open_output_stream(f"{s3env.bucket}/{request.node.name}/{LOCK_FILE}") as f:
        f.write(json.dumps({"token": "other", "host": "elsewhere", "pid": 1, "renewed_at": 9e12}).encode())
    store.add("accepted", row(2))
    with pytest.raises(OutputError, match="lost the write lease"):
        store.commit_all()
    store.close()
    assert objects(s3env, request.node.name)[MANIFEST] == before
    # close() did not delete the other writer's lease.
    assert b"other" in objects(s3env, request.node.name)[LOCK_FILE]


def test_create_refuses_a_used_prefix_and_bad_urls(s3env, request):
    url = s3env.url(request.node.name)
    create_store(url, output(url), job_meta=META).close()
    with pytest.raises(OutputError, match="already holds a datagen run"):
        create_store(url, output(url), job_meta=META)
    with pytest.raises(OutputError, match="not a datagen output"):
        open_store(s3env.url("nothing-here"))
    with pytest.raises(Exception, match="s3://bucket/prefix"):
        Output.model_validate({"path": "s3://KEY:SECRET@bucket/x"})
    with pytest.raises(Exception, match="unknown field|Extra inputs"):
        Output.model_validate({"path": url, "storage_options": {"secret_access_key": "x"}})
    from datagen.config import load_job

    with pytest.raises(ConfigError, match="--output: must be a local path or s3://bucket/prefix"):
        load_job(REPO / "examples" / "quickstart.yaml", output="s3://Bad_Bucket/x")
    import yaml

    from datagen.config import parse_job

    data = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    data["output"]["path"] = "s3://AKIAEXAMPLE:topsecret@bucket/x"
    with pytest.raises(ConfigError) as err:
        parse_job(data, where="job.yaml", base_dir=REPO / "examples")
    assert str(err.value).startswith("job.yaml: output.path: must be a local path or s3://")
    assert "topsecret" not in str(err.value)


def test_report_of_an_s3_output_is_written_beside_it(s3env, request, tmp_path):
    from datagen.report import write_report

    url = s3env.url(request.node.name)
    store = create_store(url, output(url, shard_rows=10), job_meta=META)
    for i in range(25):
        store.add("accepted", row(i))
    store.commit_all()
    store.close()
    assert write_report(url) == f"{url}/report.html"
    page = objects(s3env, request.node.name)["report.html"].decode()
    assert 'data-figure="rows.accepted">25<' in page and 'data-figure="shards">3<' in page
    assert write_report(url, tmp_path / "r.html") == str(tmp_path / "r.html")


@pytest.mark.slow  # a full run through local Ray: ~45 s on 2 shared cores
def test_cli_run_resume_verify_inspect_on_s3(tmp_path, s3env, fake_server):
    s3 = s3env
    url = s3.url("cli-run")
    job = write_job(tmp_path, base_url=fake_server.base_url, count=10, n=2, shard_rows=8,
                    extra_teacher={"api_key_env": "FAKE_TEACHER_KEY"})
    env = {"FAKE_TEACHER_KEY": "sk-teacher-secret-value"}
    res = datagen("run", str(job), "--output", url, "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    store = open_store(url)
    assert len(store.row_ids()) == 20
    assert store.job_meta()["job"]["output"]["path"] == url
    stored = objects(s3, "cli-run")
    assert b'data-figure="rows.total">20<' in stored["report.html"]  # the run's report went up too
    assert not any(b"sk-teacher-secret-value" in b or s3.env["AWS_SECRET_ACCESS_KEY"].encode() in b
                   for b in stored.values())
    # The metrics file went up too (uploaded whole at the end): its last line is the manifest's counts.
    final = json.loads(stored["metrics.jsonl"].decode().splitlines()[-1])
    assert final["final"] and final["counts"] == store.manifest.counts()

    res = datagen("resume", url, "--quiet", env=env)  # nothing left to do: same rows, no duplicates
    assert res.returncode == 0, res.stderr
    again = objects(s3, "cli-run")["metrics.jsonl"].decode().splitlines()
    assert len(again) > len(stored["metrics.jsonl"].decode().splitlines())  # the resume appended
    assert json.loads(again[-1])["stages"]["prompts"]["skipped"] == 20
    res = datagen("verify", url, env=env)
    assert res.returncode == 0 and "20 rows match the manifest" in res.stdout, res.stderr
    res = datagen("inspect", url, "--json", env=env)
    assert res.returncode == 0, res.stderr
    counts = json.loads(res.stdout)["counts"]
    assert counts["accepted"] + counts["rejected"] == 20
    # A shard rewritten behind the manifest's back is caught.
    name = next(k for k in stored if k.startswith("accepted/"))
    with s3.filesystem().open_output_stream(f"{s3.bucket}/cli-run/{name}") as f:
        f.write(stored[name][:-10])
    res = datagen("verify", url, env=env)
    assert res.returncode == 1 and name in res.stderr
    res = datagen("export", url, "--to", str(tmp_path / "x"), env=env)
    assert res.returncode == 1 and "works on a local output" in res.stderr


@pytest.mark.slow  # a full run through local Ray: ~45 s on 2 shared cores
def test_killed_run_on_s3_resumes_to_exactly_the_expected_rows(tmp_path, s3env, fake_server):
    import os
    import signal
    import time

    from .test_pipeline import _start, expected_ids

    url = s3env.url("killed-run")
    fake_server.inject("latency", times=None, seconds=0.1)
    job = write_job(tmp_path, base_url=fake_server.base_url, count=40, batch_size=2,
                    output={"path": url, "shard_rows": 4, "commit_every_s": 0.2})
    proc = _start(job)

    def committed() -> int:
        try:
            counts = open_store(url).manifest.counts()
        except OutputError:
            return 0
        return counts["accepted"] + counts["rejected"]

    deadline = time.monotonic() + 120
    while committed() < 8:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # no clean-up at all: the lease object stays behind
    proc.wait()
    assert LOCK_FILE in objects(s3env, "killed-run")
    before = open_store(url).row_ids()
    assert 8 <= len(before) < 40

    fake_server.clear()
    res = datagen("resume", url, "--quiet")  # same host, dead pid: the stale lease is taken over
    assert res.returncode == 0, res.stderr
    store = open_store(url)
    ids = [r for s in ("accepted", "rejected") for r in store.read(s, columns=["row_id"]).column("row_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 40
    assert set(ids) == expected_ids(job) and before <= set(ids)
    assert verify(url).ok
