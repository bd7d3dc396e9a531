"""The LLM judge against the fake OpenAI server (a real HTTP server on 127.0.0.1): scores,
threshold, the stored prompt and reply, and a judge that is down or answers without a
score (an error, never a verdict)."""

from __future__ import annotations

import json

import pytest

from datagen.filters import FilterChain, FilterError
from datagen.prompts import AnswerFormat
from datagen.storage.shards import ShardStore
from datagen.testing.fake_openai import FakeOpenAIServer

from .conftest import datagen, extract_answer, write_job

GRADER = "You are a strict grader"


def teacher_or_judge(messages):
    """Answers like the support-extract teacher; as a judge, 9 for JSON answers, 2 otherwise."""
    if messages[0]["role"] == "system" and messages[0]["content"].startswith(GRADER):
        answer = messages[-1]["content"].split("Answer to grade:", 1)[1]
        if "no score please" in answer:
            return "I refuse to give a number."
        return "It is valid JSON.\nSCORE: 9" if '"order_id"' in answer else "Prose, not JSON.\nSCORE: 2"
    return extract_answer(messages)


@pytest.fixture
def server():
    with FakeOpenAIServer(answer=teacher_or_judge) as s:
        yield s


def chain(server, teacher=None, worker=None, **params) -> FilterChain:
    cfg = {"name": "grader", "backend": "openai", "model": "fake", "base_url": server.base_url,
           "max_attempts": 2, "timeout_s": 5, **(teacher or {})}
    context = {"teachers": {"grader": cfg}, **({"worker": worker} if worker else {})}
    return FilterChain([{"name": "judge", "teacher": "grader", "threshold": 5, **params}], AnswerFormat(),
                       context=context)


def row(i: int, response: str) -> dict:
    return {"row_id": f"r{i}", "response": response,
            "messages": [{"role": "user", "content": f"Order 1234{i}: my lamp broke"}]}


def test_judge_scores_keeps_and_drops_and_stores_its_prompt_and_reply(server):
    rows = [row(0, '{"order_id": "12340", "product": "lamp"}'), row(1, "Sorry to hear that!")]
    seeds = [{"id": 0, "answer": "gold-0"}, {"id": 1, "answer": "gold-1"}]
    (good,), (bad,) = chain(server, reference_field="answer").run(rows, seeds)
    assert (good.keep, good.reason, good.score) == (True, "ok", 9.0)
    assert (bad.keep, bad.reason, bad.score) == (False, "judge.low_score", 2.0)
    stored = json.loads(bad.details)
    assert stored["judge"] == "grader" and stored["rubric"] == "quality"
    assert stored["reply"].endswith("SCORE: 2")
    user = stored["prompt"][-1]["content"]
    assert "Order 12341: my lamp broke" in user and "Sorry to hear that!" in user and "gold-1" in user


def test_a_judge_that_is_down_stops_instead_of_dropping(server):
    server.inject("500", times=None)
    with pytest.raises(FilterError, match="could not grade: teacher.http_500"):
        chain(server).run([row(0, '{"order_id": "1"}')], [None])


def test_a_judge_reply_without_a_score_is_an_error(server):
    with pytest.raises(FilterError, match="replied without a score"):
        chain(server).run([row(0, "no score please")], [None])


def test_the_judge_keeps_its_client_and_budget_from_batch_to_batch(server):
    # 60 requests a minute, paced: one request a second. A client made afresh for each
    # batch would start each batch with a full bucket and send all three at once.
    c = chain(server, teacher={"requests_per_minute": 60})
    judge = c.filters[0]
    limiters = []
    for i in range(3):
        [[v]] = c.run([row(i, '{"order_id": "1"}')], [None])
        assert v.keep and v.score == 9.0
        limiters.append(judge.teacher.limiter)
    assert limiters[0] is limiters[1] is limiters[2]
    times = [at for at, kind in server.arrivals]
    assert len(times) == server.requests == 3
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.9, times


def test_filter_actors_split_the_judges_budgets():
    def share(index, count, **teacher):
        cfg = {"name": "grader", "backend": "openai", "model": "fake", "base_url": "http://127.0.0.1:1/v1",
               "replicas": 2, "max_concurrency": 8, **teacher}
        c = FilterChain([{"name": "judge", "teacher": "grader"}], AnswerFormat(),
                        context={"teachers": {"grader": cfg}, "worker": {"index": index, "count": count}})
        return c.filters[0].teacher.cfg

    alone = share(0, 1, requests_per_minute=90, tokens_per_minute=9000)
    assert (alone.max_concurrency, alone.requests_per_minute, alone.tokens_per_minute) == (8, 90, 9000)
    parts = [share(i, 3, requests_per_minute=90, tokens_per_minute=9000) for i in range(3)]
    assert [p.max_concurrency for p in parts] == [3, 3, 2]  # 8 over 3 filter actors
    assert [p.requests_per_minute for p in parts] == [30, 30, 30]
    assert sum(p.tokens_per_minute for p in parts) == 9000
    many = [share(i, 10, max_concurrency=4) for i in range(10)]  # more actors than slots: 1 each
    assert {p.max_concurrency for p in many} == {1}


def test_the_judge_must_be_an_openai_teacher_of_the_job(server):
    with pytest.raises(FilterError, match="'nobody' is not one of the job's teachers"):
        FilterChain([{"name": "judge", "teacher": "nobody"}], AnswerFormat(), context={"teachers": {}})


def test_judge_in_a_run(tmp_path, server):
    job = write_job(tmp_path, base_url=server.base_url, count=20,
                    filters=["nonempty", {"name": "judge", "teacher": "fake", "threshold": 5}])
    res = datagen("run", str(job))
    assert res.returncode == 0, res.stderr
    store = ShardStore.open(tmp_path / "out")
    rej = store.read("rejected").to_pylist()
    assert rej and all("office chair" in r["messages"][-1]["content"] for r in rej)
    assert store.manifest.reasons("rejected") == {"judge.low_score": len(rej)}
    verdict = rej[0]["verdicts"][-1]
    assert verdict["score"] == 2.0 and json.loads(verdict["details"])["reply"].endswith("SCORE: 2")
    acc = store.read("accepted").to_pylist()
    assert acc and all(r["verdicts"][-1]["score"] == 9.0 for r in acc)
