"""Filters inside real runs: the real CLI, local Ray, filter actors beside the teacher
actors, the fake OpenAI server on 127.0.0.1. Assertions are on row-id sets and on the
manifest's counts by reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from datagen import run as runner
from datagen.config import load_job, parse_job
from datagen.errors import DatagenError
from datagen.storage.shards import ShardStore

from .conftest import datagen, write_job
from .filter_helpers import DOWN_ENV
from .test_pipeline import all_ids, expected_ids

ORDER_SCHEMA = {"type": "object", "required": ["order_id", "product"],
                "properties": {"order_id": {"type": "string", "pattern": "^[0-9]{5}$"}, "product": {"type": "string"}}}


def rows_of(out: Path, stream: str) -> list[dict]:
    return ShardStore.open(out).read(stream).to_pylist()


def test_filters_with_params_on_actors_and_in_the_driver_agree(tmp_path, fake_server):
    filters = ["nonempty", {"name": "length", "min_chars": 5}, {"name": "schema", "json_schema": ORDER_SCHEMA},
               {"name": "refusal"}]
    partitions = []
    for actors in (2, 0):
        d = tmp_path / f"a{actors}"
        d.mkdir()
        job = write_job(d, base_url=fake_server.base_url, count=20, filters=filters,
                        runtime={"num_cpus": 2, "filter_actors": actors})
        res = datagen("run", str(job))
        assert res.returncode == 0, res.stderr
        out = d / "out"
        acc, rej = rows_of(out, "accepted"), rows_of(out, "rejected")
        ids = [r["row_id"] for r in acc + rej]
        assert len(ids) == len(set(ids)) and set(ids) == expected_ids(job)
        # The fake teacher answers prose for "office chair": not JSON, so the schema drops it.
        assert rej and all("office chair" in r["messages"][-1]["content"] for r in rej)
        assert ShardStore.open(out).manifest.reasons("rejected") == {"schema.invalid_json": len(rej)}
        assert all([v["filter"] for v in r["verdicts"]] == ["nonempty", "length", "schema", "refusal"] for r in acc)
        assert all([v["reason"] for v in r["verdicts"]][-1] == "schema.invalid_json" for r in rej)
        assert "schema.invalid_json" in res.stdout  # the summary counts drops by reason
        partitions.append(({r["row_id"] for r in acc}, {r["row_id"] for r in rej}))
    assert partitions[0] == partitions[1]


def test_a_failing_filter_stops_the_run_and_resume_finishes(tmp_path, fake_server):
    fake_server.inject("latency", times=None, seconds=0.05)
    filters = ["nonempty", {"name": "schema", "model": "tests.filter_helpers:FlakyOrder"}]
    job = write_job(tmp_path, base_url=fake_server.base_url, count=40, batch_size=2, shard_rows=2,
                    commit_every_s=0.05, filters=filters)
    out = tmp_path / "out"
    res = datagen("run", str(job), env={DOWN_ENV: "789"})
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "a filter failed" in errors[0] and "verifier backend down" in errors[0]
    assert f"datagen resume {out}" in res.stderr.replace("\n", "")
    # The rows the verifier could not judge were neither dropped nor kept.
    committed = rows_of(out, "accepted") + rows_of(out, "rejected")
    assert not [r for r in committed if json.loads(r["response"])["order_id"].endswith(("7", "8", "9"))]
    assert all(r["verdicts"] and r["verdicts"][-1]["filter"] == "schema" for r in committed)

    res = datagen("resume", str(out))  # the verifier is back
    assert res.returncode == 0, res.stderr
    done = all_ids(out)
    assert len(done) == len(set(done)) and set(done) == expected_ids(job)
    late = [r for r in rows_of(out, "accepted") if json.loads(r["response"])["order_id"].endswith(("7", "8", "9"))]
    assert late, "the rows held back by the failure were judged on resume"


def test_budget_then_target_accepted_with_resume(tmp_path, fake_server):
    job = write_job(tmp_path, base_url=fake_server.base_url, count=None, batch_size=2,
                    budget={"max_rows": 7})
    out = tmp_path / "out"
    res = datagen("run", str(job))
    assert res.returncode == 0, res.stderr
    assert "stopped by" in res.stdout and "max_rows" in res.stdout
    first = all_ids(out)
    assert len(first) == len(set(first)) == 7
    assert set(first) <= expected_ids(job)

    # Raise the ambition: how many rows is not what a row is, so the same output resumes.
    meta_path = out / "datagen-job.json"
    meta = json.loads(meta_path.read_text())
    meta["job"]["budget"] = {"max_rows": None, "max_tokens": None}
    meta["job"]["target_accepted"] = 25
    meta_path.write_text(json.dumps(meta))
    res = datagen("resume", str(out))
    assert res.returncode == 0, res.stderr
    assert "target_accepted" in res.stdout
    store = ShardStore.open(out)
    assert store.manifest.counts()["accepted"] == 25  # no overshoot: in flight never exceeds what is missing
    done = all_ids(out)
    assert len(done) == len(set(done)) and set(first) < set(done) <= expected_ids(job)
    assert len(done) < len(expected_ids(job))  # it stopped before the prompts ran out

    res = datagen("resume", str(out))  # target met: nothing more to make
    assert res.returncode == 0, res.stderr
    assert sorted(all_ids(out)) == sorted(done)


def test_target_beyond_the_prompts_says_so(tmp_path, fake_server):
    job = write_job(tmp_path, base_url=fake_server.base_url, count=6, target_accepted=100)
    res = datagen("run", str(job))
    assert res.returncode == 0, res.stderr
    assert "prompts_exhausted" in res.stdout
    assert set(all_ids(tmp_path / "out")) == expected_ids(job)


# --------------------------------------------------------------------------- config


def _job(tmp_path: Path, fake_url: str = "http://127.0.0.1:9/v1", **top) -> Path:
    return write_job(tmp_path, base_url=fake_url, count=4, **top)


def test_filter_specs_in_the_job_file_name_their_field(tmp_path):
    bad = {"filters": ["nonempty", {"name": "length", "min_chars": -1}, {"name": "math", "answer_feld": "x"},
                       "spellcheck", {"name": "schema"}]}
    with pytest.raises(DatagenError) as err:
        load_job(_job(tmp_path, **bad))
    lines = str(err.value).splitlines()
    job = tmp_path / "job.yaml"
    assert f"{job}: filters[1].min_chars: Input should be greater than or equal to 0 (got -1)" in lines
    assert f"{job}: filters[2].answer_feld: unknown field" in lines
    assert any(line.startswith(f"{job}: filters[3]: unknown filter") and line.endswith("(got 'spellcheck')")
               for line in lines)
    assert any(line.startswith(f"{job}: filters[4]: schema needs exactly one of json_schema or model")
               for line in lines)


def test_bare_names_and_default_params_keep_old_fingerprints(tmp_path):
    base = yaml.safe_load(_job(tmp_path).read_text())

    def fingerprint(**changes) -> str:
        job = parse_job({**base, **changes}, where="job.yaml", base_dir=tmp_path)
        stream, fp = runner.prepare(job)
        return fp

    plain = fingerprint()
    assert fingerprint(filters=["nonempty", "not_truncated", "format"]) == plain
    assert fingerprint(filters=[{"name": "nonempty"}, "not_truncated", {"name": "format"}]) == plain
    assert fingerprint(target_accepted=5, budget={"max_rows": 9}) == plain
    assert fingerprint(filters=["nonempty", "not_truncated", {"name": "length", "min_chars": 3}]) != plain
    assert fingerprint(filter_short_circuit=False) != plain


def test_validate_refuses_seeds_without_the_reference_a_filter_needs(tmp_path):
    job = _job(tmp_path, filters=["nonempty", {"name": "math", "answer_field": "solution"}])
    res = datagen("validate", str(job))
    assert res.returncode == 1
    assert res.stderr.startswith("error: filters: math needs a reference in each seed's 'solution' field")
    assert "Traceback" not in res.stderr


def test_shipped_example_jobs_still_validate():
    from datagen import onpolicy
    from datagen.validation import read_model
    from datagen.route import infer
    from datagen.route.costs import CostModel
    from datagen.train.config import load_eval, load_train

    from .conftest import REPO

    def load_cost(path):
        read_model(path, CostModel, what="cost file").check()

    # examples/ also holds train, eval, routing, cost and on-policy files: each by its own loader
    other = [("*onpolicy*.yaml", onpolicy.load), ("*route*.yaml", infer.load), ("*train*.yaml", load_train),
             ("eval.yaml", load_eval), ("*cost*.yaml", load_cost)]
    jobs = 0
    for path in sorted((REPO / "examples").glob("*.yaml")):
        loader = next((f for pattern, f in other if path.match(pattern)), None)
        if loader is not None:
            loader(path)
            continue
        job = load_job(path)
        assert job.filters and all(hasattr(f, "build") for f in job.filters)
        jobs += 1
    assert jobs >= 5


def test_code_answers_verified_in_the_sandbox_from_filter_actors(tmp_path):
    """The shipped code template and problems: the teacher answers the correct solution
    for half the problems and the stub for the rest; only the correct ones pass."""
    from datagen.testing.fake_openai import FakeOpenAIServer

    from .conftest import REPO

    problems = [json.loads(x) for x in (REPO / "filters/code/problems.jsonl").read_text().splitlines()]
    by_prompt = {p["prompt"]: p for p in problems}
    good = {p["id"] for p in problems[::2]}

    def answer(messages):
        p = by_prompt[messages[-1]["content"]]
        return f"```python\n{p['solution'] if p['id'] in good else p['stub']}```"

    with FakeOpenAIServer(answer=answer) as server:
        job = write_job(tmp_path, base_url=server.base_url, count=None, batch_size=3,
                        filters=["nonempty", {"name": "code", "timeout_s": 20}],
                        runtime={"num_cpus": 2, "filter_actors": 2})
        data = yaml.safe_load(job.read_text())
        data["prompts"]["template"] = str(REPO / "prompts" / "code_problems.yaml")
        job.write_text(yaml.safe_dump(data))
        res = datagen("run", str(job))
    assert res.returncode == 0, res.stderr
    store = ShardStore.open(tmp_path / "out")
    acc, rej = store.read("accepted").to_pylist(), store.read("rejected").to_pylist()
    assert {r["provenance"]["seed_ids"][0] for r in acc} == good
    assert {r["provenance"]["seed_ids"][0] for r in rej} == {p["id"] for p in problems} - good
    assert set(store.manifest.reasons("rejected")) <= {"code.test_failed", "code.exception"}
