"""`datagen resume DIR --job JOB.yaml`: a resume may change how the teachers run, never
what a row is. Checked in process against real stores (no Ray), then through the real CLI
against the fake teacher server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from datagen import run as runner
from datagen.config import VLLMTeacher, parse_job, teacher_identity
from datagen.run.identity import is_operational, job_changes
from datagen.errors import DatagenError
from datagen.storage.shards import JOB_FILE, ShardStore

from .conftest import REPO, datagen, write_job
from .test_pipeline import all_ids, expected_ids


def _own_prompts(tmp_path: Path) -> Path:
    """A copy of the shipped template and its seeds, so a test can edit the seeds."""
    (tmp_path / "prompts" / "seeds").mkdir(parents=True)
    shutil.copy(REPO / "prompts" / "seeds" / "support_messages.jsonl", tmp_path / "prompts" / "seeds")
    return Path(shutil.copy(REPO / "prompts" / "support_extract.yaml", tmp_path / "prompts"))


def _variant(base: dict, tmp_path: Path, **teacher):
    data = {**base, "teachers": [{**base["teachers"][0], **teacher}]}
    return parse_job(data, where="job.yaml", base_dir=tmp_path)


def _store(tmp_path: Path, job, fingerprint: str) -> ShardStore:
    root = tmp_path / "out"
    ShardStore.create(root, job.output, job_meta=runner.job_meta(job, fingerprint, None)).close()
    return ShardStore.open(root, job.output, for_writing=True)


def test_job_changes_name_the_field_and_know_what_is_operational():
    before = {"seed": 1, "teachers": [{"name": "t.v2", "replicas": 1, "engine": {"dtype": "auto",
                                                                                  "max_num_seqs": None}}]}
    after = {"seed": 1, "teachers": [{"name": "t.v2", "replicas": 4, "engine": {"dtype": "bfloat16",
                                                                                 "max_num_seqs": 64}}]}
    changes = job_changes(before, after)
    assert changes == [("teachers", "t.v2", "engine", "dtype"), ("teachers", "t.v2", "engine", "max_num_seqs"),
                       ("teachers", "t.v2", "replicas")]
    assert [is_operational(p) for p in changes] == [False, True, True]
    assert job_changes(before, {**before, "teachers": []}) == [("teachers", "t.v2")]
    assert not is_operational(("teachers", "t.v2")) and is_operational(("runtime", "num_cpus"))


def test_a_rescore_teacher_is_compared_by_what_its_logprobs_depend_on():
    def key(**changes):
        t = {"name": "s", "backend": "vllm", "model": "embedded:smollm2-135m-instruct", **changes}
        return teacher_identity(VLLMTeacher.model_validate(t).model_dump(mode="json"))

    plain = key()
    assert key(replicas=3, batch_size=64, num_cpus=2, engine={"gpu_memory_utilization": 0.5, "max_num_seqs": 8,
                                                              "batching": "offline", "cpu_kvcache_gb": 1,
                                                              "stall_timeout_s": None}) == plain
    assert key(engine={"dtype": "bfloat16"}) != plain and key(model="other") != plain


def test_the_engine_stall_limit_is_in_no_fingerprint_old_or_new(tmp_path):
    """``engine.stall_timeout_s`` came after the legacy fingerprint: outputs that carry it
    must still resume, whatever limit the job now sets."""
    base = yaml.safe_load(write_job(tmp_path, base_url="http://127.0.0.1:9/v1", count=4).read_text())
    base["teachers"] = [{"name": "smol", "backend": "vllm", "model": "embedded:smollm2-135m-instruct"}]
    seen = set()
    for limit in (600, 30, None):
        job = _variant(base, tmp_path, engine={"stall_timeout_s": limit})
        stream = runner.prepare(job)[0]
        seen.add((runner.run_fingerprint(job, stream.stream_hash),
                  runner.run_fingerprint(job, stream.stream_hash, legacy=True)))
    assert len(seen) == 1


def test_operational_settings_keep_the_fingerprint_and_row_settings_change_it(tmp_path):
    base = yaml.safe_load(write_job(tmp_path, base_url="http://127.0.0.1:9/v1", count=4).read_text())
    fp = runner.prepare(_variant(base, tmp_path))[1]
    same = dict(replicas=2, batch_size=3, max_concurrency=32, min_concurrency=2, adaptive_concurrency=False,
                latency_backoff=None, requests_per_minute=600, tokens_per_minute=10**6, timeout_s=30,
                max_attempts=8, api_key_env="OTHER_KEY", num_cpus=1)
    for field, value in same.items():
        env = {"OTHER_KEY": "x"} if field == "api_key_env" else {}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            assert runner.prepare(_variant(base, tmp_path, **{field: value}))[1] == fp, field
    for field, value in dict(model="other", request_token_ids=False, base_url="http://127.0.0.1:10/v1",
                             sampling={**base["teachers"][0]["sampling"], "max_tokens": 65},
                             price={"input_per_mtok": 1, "output_per_mtok": 2}).items():
        assert runner.prepare(_variant(base, tmp_path, **{field: value}))[1] != fp, field


def test_continue_run_accepts_operational_changes_and_refuses_the_rest_by_name(tmp_path):
    base = yaml.safe_load(write_job(tmp_path, base_url="http://127.0.0.1:9/v1", count=4).read_text())
    job = _variant(base, tmp_path)
    stream, fp = runner.prepare(job)
    store = _store(tmp_path, job, fp)
    try:
        more = _variant(base, tmp_path, replicas=2, max_concurrency=8)
        stream2, _ = runner.prepare(more)
        assert runner.continue_run(more, stream2, store) == [
            "teachers[fake].max_concurrency: 4 -> 8", "teachers[fake].replicas: 1 -> 2"]
        assert stream2.run_fingerprint == fp
        hotter = _variant(base, tmp_path, replicas=2, sampling={**base["teachers"][0]["sampling"],
                                                                "temperature": 0.9})
        with pytest.raises(DatagenError) as err:
            runner.continue_run(hotter, runner.prepare(hotter)[0], store)
        msg = str(err.value)
        assert "teachers[fake].sampling.temperature changed" in msg and "replicas" not in msg
    finally:
        store.close()


def test_changed_seed_contents_are_named_as_such(tmp_path):
    template = _own_prompts(tmp_path)
    data = yaml.safe_load(write_job(tmp_path, base_url="http://127.0.0.1:9/v1", count=4).read_text())
    data["prompts"]["template"] = str(template)
    job = parse_job(data, where="job.yaml", base_dir=tmp_path)
    stream, fp = runner.prepare(job)
    store = _store(tmp_path, job, fp)
    try:
        seeds = tmp_path / "prompts" / "seeds" / "support_messages.jsonl"
        rows = [json.loads(line) for line in seeds.read_text().splitlines() if line.strip()]
        seeds.write_text("".join(json.dumps({**r, "message": r["message"] + " Thanks!"}) + "\n" for r in rows))
        job2 = parse_job(data, where="job.yaml", base_dir=tmp_path)  # the same job file
        stream2, fp2 = runner.prepare(job2)
        assert fp2 != fp
        with pytest.raises(DatagenError, match="contents of the template, seed or eval files changed"):
            runner.continue_run(job2, stream2, store)
    finally:
        store.close()


def test_an_output_written_before_settings_could_change_resumes_only_unchanged(tmp_path):
    base = yaml.safe_load(write_job(tmp_path, base_url="http://127.0.0.1:9/v1", count=4).read_text())
    job = _variant(base, tmp_path)
    stream, _ = runner.prepare(job)
    old_fp = runner.run_fingerprint(job, stream.stream_hash, legacy=True)
    store = _store(tmp_path, job, old_fp)
    try:
        assert runner.continue_run(job, stream, store) == []
        assert stream.run_fingerprint == old_fp  # its new rows carry the fingerprint its old rows have
        more = _variant(base, tmp_path, replicas=2)
        with pytest.raises(DatagenError, match=r"could not resume a run with other teacher settings "
                                               r"\(teachers\[fake\]\.replicas\)"):
            runner.continue_run(more, runner.prepare(more)[0], store)
    finally:
        store.close()


def test_resume_with_a_job_file_goes_on_with_its_settings(tmp_path, fake_server):
    """A budget-stopped run resumed with more replicas, a higher concurrency and no budget:
    every row exactly once, all carrying the run's fingerprint; the stored job is the new one.
    A file that changes a row's sampling is refused, naming the field, and writes nothing."""
    job = write_job(tmp_path, base_url=fake_server.base_url, count=12, batch_size=2, budget={"max_rows": 4})
    assert datagen("run", str(job), "--quiet").returncode == 0
    out = tmp_path / "out"
    assert 4 <= len(all_ids(out)) < 12
    data = yaml.safe_load(job.read_text())
    data.pop("budget")
    data["teachers"][0].update(replicas=2, max_concurrency=6, batch_size=3)
    data["output"]["path"] = str(tmp_path / "elsewhere")  # ignored: the output is DIR
    more = tmp_path / "more.yaml"
    more.write_text(yaml.safe_dump(data))
    res = datagen("resume", str(out), "--job", str(more), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "resuming with teachers[fake].replicas: 1 -> 2" in res.stderr
    assert "resuming with budget.max_rows: 4 -> None" in res.stderr
    ids = all_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(job)
    store = ShardStore.open(out)
    fps = {fp for s in store.manifest.shards
           for fp in pq.read_table(out / s["file"], columns=["provenance"]).column("provenance")
           .combine_chunks().field("run_fingerprint").to_pylist()}
    assert fps == {store.manifest.data["run_fingerprint"]}
    meta = json.loads((out / JOB_FILE).read_text())
    assert meta["job"]["teachers"][0]["replicas"] == 2 and meta["job_file"] == str(more)
    assert not (tmp_path / "elsewhere").exists()
    # A plain resume now goes on with the stored (new) settings: nothing left to do, nothing changed.
    res = datagen("resume", str(out), "--quiet")
    assert res.returncode == 0 and "resuming with" not in res.stderr, res.stderr

    data["teachers"][0]["sampling"]["temperature"] = 0.9
    more.write_text(yaml.safe_dump(data))
    before = (out / "manifest.json").read_text()
    res = datagen("resume", str(out), "--job", str(more))
    assert res.returncode == 1
    assert "teachers[fake].sampling.temperature changed since, and that decides what its rows are" in res.stderr
    assert (out / "manifest.json").read_text() == before
    assert json.loads((out / JOB_FILE).read_text()) == meta
