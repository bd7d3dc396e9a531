"""A teacher's budgets and concurrency belong to the teacher (a provider limits a key),
so its replicas split them: the shares in the config, and a real 2-replica run through
the CLI (local Ray, two teacher actors, the fake server) that keeps to the budget."""

from __future__ import annotations

import pytest

from datagen.config import OpenAITeacher, VLLMTeacher, even_share, parse_job
from datagen.errors import ConfigError
from datagen.storage.shards import ShardStore

from .conftest import datagen, write_job
from .test_pipeline import expected_ids


SPLIT = {"replicas", "max_concurrency", "min_concurrency", "requests_per_minute", "tokens_per_minute"}


def api(**kw) -> OpenAITeacher:
    return OpenAITeacher.model_validate({"name": "api", "backend": "openai", "model": "m",
                                         "base_url": "http://127.0.0.1:9/v1", **kw})


@pytest.mark.parametrize("total,parts,shares", [(256, 2, [128, 128]), (7, 3, [3, 2, 2]), (3, 3, [1, 1, 1]),
                                                (5, 1, [5])])
def test_even_share_differs_by_at_most_one_and_sums_to_the_total(total, parts, shares):
    assert [even_share(total, parts, i) for i in range(parts)] == shares


def test_each_replica_gets_its_share_as_a_one_replica_config():
    t = api(replicas=3, max_concurrency=256, min_concurrency=4, requests_per_minute=600,
            tokens_per_minute=100_000)
    shares = [t.for_replica(i) for i in range(3)]
    assert [s.max_concurrency for s in shares] == [86, 85, 85]
    assert [s.min_concurrency for s in shares] == [2, 1, 1]
    assert [s.requests_per_minute for s in shares] == [200.0] * 3
    assert [s.tokens_per_minute for s in shares] == [33_334, 33_333, 33_333]
    for s in shares:
        assert s.replicas == 1 and s.min_concurrency <= s.max_concurrency
        # What the actor receives is a valid config of its own (it re-validates it).
        assert OpenAITeacher.model_validate(s.model_dump(mode="json")) == s
        assert s.model_dump(exclude=SPLIT) == t.model_dump(exclude=SPLIT)  # nothing else changes


def test_one_replica_and_vllm_teachers_are_not_split():
    t = api(max_concurrency=256, requests_per_minute=600)
    assert t.for_replica(0) is t
    v = VLLMTeacher.model_validate({"name": "v", "backend": "vllm", "model": "m", "replicas": 2})
    assert v.for_replica(1) is v


@pytest.mark.parametrize("field,value", [("max_concurrency", 2), ("tokens_per_minute", 2)])
def test_a_teacher_wide_limit_below_one_per_replica_is_refused(tmp_path, field, value):
    teacher = {"name": "api", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
               "replicas": 3, field: value}
    job = {"name": "t", "prompts": {"template": "t.yaml"}, "teachers": [teacher], "output": {"path": "out"}}
    with pytest.raises(ConfigError) as err:
        parse_job(job, where="job.yaml", base_dir=tmp_path)
    assert str(err.value) == (f"job.yaml: teachers[0].{field}: must be at least replicas (3): it is the whole "
                              f"teacher's, split over its replicas, and each needs 1 (got {value})")


def test_two_replicas_keep_to_the_teachers_request_budget(tmp_path, fake_server):
    # 600/min = 10/s for the teacher: each replica paces 5/s with a bucket of 5, so 40
    # requests need at least (40 - 10) / 10 = 3 s from first to last. Unsplit, each
    # replica would spend the whole budget: 20 at once, then 20/s, done in 1 s.
    extra = {"replicas": 2, "requests_per_minute": 600, "adaptive_concurrency": False, "max_concurrency": 8}
    job = write_job(tmp_path, base_url=fake_server.base_url, count=40, extra_teacher=extra)
    res = datagen("run", str(job))
    assert res.returncode == 0, res.stderr
    store = ShardStore.open(tmp_path / "out")
    ids = [r for s in ("accepted", "rejected") for r in store.read(s, columns=["row_id"]).column("row_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 40 and set(ids) == expected_ids(job)
    times = sorted(at for at, kind in fake_server.arrivals if kind == "ok")
    assert len(times) == fake_server.requests == 40
    # A lower bound with some slack for arrival jitter: a loaded machine is only slower.
    assert times[-1] - times[0] >= 2.5, f"40 requests in {times[-1] - times[0]:.2f} s: over the budget"


def test_slots_fill_what_the_backend_serves_at_once():
    from datagen.config import OpenAITeacher, VLLMTeacher
    from datagen.teachers.fleet import slots
    from datagen.teachers.spec import VLLM_DEFAULT_SEQS

    api = {"name": "a", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1"}
    # 256 in flight over 2 replicas at 16 rows a batch: 8 batches fill a replica, 1 spare.
    assert slots(OpenAITeacher(**api, max_concurrency=256, replicas=2, batch_size=16), 2) == 9
    assert slots(OpenAITeacher(**api, max_concurrency=4, batch_size=16), 2) == 2  # the floor
    eng = {"name": "v", "backend": "vllm", "model": "m", "batch_size": 16}
    assert slots(VLLMTeacher(**eng), 2) == VLLM_DEFAULT_SEQS // 16 + 1
    assert slots(VLLMTeacher(**eng, engine={"max_num_seqs": 1024}), 2) == 65
    # what a started engine reported (an H100's offline default) wins over the guess
    assert slots(VLLMTeacher(**eng), 2, serves=1024) == 65
    assert slots(OpenAITeacher(**api, max_concurrency=4, batch_size=16), 2, serves=1024) == 2  # engines only
    assert slots(VLLMTeacher(**eng, engine={"batching": "offline"}), 3) == 3  # one batch runs at a time
