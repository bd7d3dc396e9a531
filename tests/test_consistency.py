"""Self-consistency: a prompt's samples vote. The filter on its own, the driver's
grouping of samples that arrive in different teacher batches, and a real run."""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict

import pytest

from datagen.run.filter_pool import PromptGroups
from datagen.filters import FilterChain
from datagen.prompts import AnswerFormat
from datagen.storage.shards import ShardStore
from datagen.testing.fake_openai import FakeOpenAIServer

from .conftest import datagen, write_job
from .test_pipeline import expected_ids


def run(rows: list[tuple[str, str]], *, peers: dict[str, list[str]] | None = None, **params):
    chain = FilterChain([{"name": "self_consistency", **params}], AnswerFormat())
    batch = [{"prompt_id": pid, "response": text, "peer_responses": (peers or {}).get(pid)} for pid, text in rows]
    return [vs[0] for vs in chain.run(batch, [None] * len(batch))]


def test_majority_keeps_with_agreement_as_score():
    v = run([("a", "so 4"), ("a", "The answer is 4."), ("a", "\\boxed{4}"), ("a", "#### 5"),
             ("b", "\\boxed{\\frac{1}{2}}"), ("b", "0.5"), ("b", "50%"), ("b", "2")])
    assert [(x.keep, x.reason) for x in v[:4]] == [(True, "ok")] * 3 + [(False, "consistency.minority")]
    assert v[0].score == 0.75 and "3/4 samples" in v[0].details
    assert [x.keep for x in v[4:]] == [True, True, True, False]  # 1/2, 0.5 and 50% are one answer


def test_low_agreement_and_no_answer():
    v = run([("c", "1"), ("c", "2"), ("c", "3"), ("c", "I am not sure")], min_agreement=0.5)
    assert [x.reason for x in v] == ["consistency.low_agreement"] * 3 + ["consistency.no_answer"]
    assert v[0].score == 0.25


def test_samples_committed_by_an_earlier_run_vote_too():
    v = run([("d", "#### 7")], peers={"d": ["#### 8", "#### 8"]})
    assert (v[0].keep, v[0].reason) == (False, "consistency.minority")
    assert "2/3 samples" in v[0].details


def test_text_and_json_modes():
    v = run([("e", "Paris"), ("e", " paris "), ("e", "Lyon")], answer="text")
    assert [x.keep for x in v] == [True, True, False]
    v = run([("f", '{"a": 1, "b": 2}'), ("f", '```json\n{"b": 2, "a": 1}\n```'), ("f", '{"a": 2}')], answer="json")
    assert [x.keep for x in v] == [True, True, False]


def test_groups_wait_for_every_sample_of_their_prompt(tmp_path):
    g = PromptGroups(store=None)
    g.pulled("p", last=False)
    g.pulled("p", last=False)
    assert g.add({"prompt_id": "p", "n": 0}) == []
    assert g.add({"prompt_id": "p", "n": 1}) == []  # all pulled so far are back, but p is not closed
    g.pulled("p", last=True)
    assert g.failed("p") == [{"prompt_id": "p", "n": 0}, {"prompt_id": "p", "n": 1}]
    g.pulled("q", last=False)
    g.add({"prompt_id": "q", "n": 0})
    assert g.flush() == [{"prompt_id": "q", "n": 0}] and not g.held


@pytest.fixture
def voting_server():
    """Every third sample of a prompt answers differently from the other two."""
    calls: Counter = Counter()
    lock = threading.Lock()

    def answer(messages):
        key = messages[-1]["content"]
        with lock:
            k = calls[key]
            calls[key] += 1
        return "Adding up, #### 41" if k % 3 == 2 else "The total is 42.\n#### 42"

    with FakeOpenAIServer(answer=answer) as server:
        yield server


def test_self_consistency_in_a_run_with_samples_split_across_batches(tmp_path, voting_server):
    job = write_job(tmp_path, base_url=voting_server.base_url, count=6, n=3, batch_size=2,
                    filters=[{"name": "self_consistency", "answer": "math"}])
    res = datagen("run", str(job))
    assert res.returncode == 0, res.stderr
    store = ShardStore.open(tmp_path / "out")
    acc, rej = store.read("accepted").to_pylist(), store.read("rejected").to_pylist()
    assert {r["row_id"] for r in acc + rej} == expected_ids(job) and len(acc + rej) == 18
    by_prompt = defaultdict(list)
    for r in acc + rej:
        by_prompt[r["prompt_id"]].append(r)
    for rows in by_prompt.values():  # each prompt voted as one group of 3, never in pieces
        assert sorted(r["verdicts"][0]["keep"] for r in rows) == [False, True, True]
        assert all(r["verdicts"][0]["score"] == pytest.approx(2 / 3) for r in rows)
    assert store.manifest.reasons("rejected") == {"consistency.minority": 6}
    assert all("#### 41" in r["response"] for r in rej)


def test_a_group_cut_by_a_budget_finishes_on_resume_with_the_committed_sample_voting(tmp_path, voting_server):
    # Run 1 stops after 4 rows: prompt 1's three samples, and one sample of prompt 2
    # (answer 42), judged alone. The resume makes prompt 2's other two (42 and 41): with
    # the committed 42 voting, 42 wins 2/3. Without it, 41-vs-42 would tie and the tie
    # rule (smallest key) would pick 41.
    job = write_job(tmp_path, base_url=voting_server.base_url, count=4, n=3, batch_size=2,
                    filters=[{"name": "self_consistency", "answer": "math"}], budget={"max_rows": 4})
    out = tmp_path / "out"
    res = datagen("run", str(job))
    assert res.returncode == 0 and "max_rows" in res.stdout, res.stderr
    meta = json.loads((out / "datagen-job.json").read_text())
    meta["job"]["budget"] = {"max_rows": None, "max_tokens": None}
    (out / "datagen-job.json").write_text(json.dumps(meta))
    res = datagen("resume", str(out))
    assert res.returncode == 0, res.stderr
    store = ShardStore.open(out)
    rows = store.read("accepted").to_pylist() + store.read("rejected").to_pylist()
    assert {r["row_id"] for r in rows} == expected_ids(job) and len(rows) == 12
    by_prompt = defaultdict(list)
    for r in rows:
        by_prompt[r["prompt_id"]].append(r)
    for group in by_prompt.values():
        assert sorted(r["verdicts"][0]["keep"] for r in group) == [False, True, True]
        assert all("#### 41" in r["response"] for r in group if not r["verdicts"][0]["keep"])
