"""Evol-Instruct and Self-Instruct against the fake OpenAI server: the elimination step
drops failed evolutions (a refusal above all), failed calls are counted, not judged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from datagen.config import load_job
from datagen.prompts.expand import eliminate, evol_instruct, self_instruct
from datagen.testing.fake_openai import FakeOpenAIServer

from .conftest import datagen

QUESTIONS = {
    "ok1": "How many litres of paint cover a wall that is four metres wide and three metres high?",
    "ok2": "Which river flows through the capital city of Hungary and into which sea does it drain?",
    "ok3": "Explain why a metal spoon feels colder than a wooden spoon in the same drawer.",
    "refuse": "Describe the REFUSE procedure a librarian follows when a rare book comes back damaged.",
    "short": "List the SHORT steps a baker follows to keep sourdough starter alive over a holiday.",
    "leak": "Compare the LEAK rates of two garden hoses after an hour under the same pressure.",
    "fail": "Estimate the FAIL load a wooden shelf can carry before it bends by one centimetre.",
}
TOPICS = ["tides", "volcanoes", "bread", "bridges", "owls", "glaciers", "kites", "chess", "tea", "maps",
          "comets", "bees", "clocks", "salt", "rivers", "violins"]


def evolver(messages):
    text = messages[-1]["content"]
    if "Come up with one new task" in text:  # self-instruct
        h = int(hashlib.sha256(text.encode()).hexdigest(), 16)
        a, b = TOPICS[h % 16], TOPICS[(h // 16) % 16]
        if "REFUSE" in text and h % 2:
            return "I'm sorry, I cannot come up with a task."
        return f"Write a short guide that compares {a} with {b} for a curious twelve-year-old reader."
    given = text.split("#Given Prompt#:\n", 1)[1]
    if "REFUSE" in given:
        return "I'm sorry, but I can't help with rewriting that prompt."
    if "SHORT" in given:
        return "Bake bread."
    if "LEAK" in given:
        return "#Rewritten Prompt#: " + given + " Use a table."
    if "assumption" in given:  # a second round adds something new again
        return f"{given} Finally, check the result against a rough estimate made by rounding each number."
    return f"{given} Then state every assumption you make and give the result in two units of measure."


@pytest.fixture
def server():
    with FakeOpenAIServer(answer=evolver) as s:
        s.inject("500", times=None, match="FAIL")
        yield s


def write_job(tmp: Path, base_url: str) -> Path:
    (tmp / "seeds.jsonl").write_text("".join(json.dumps({"id": k, "question": q, "answer": "x"}) + "\n"
                                             for k, q in QUESTIONS.items()))
    (tmp / "t.yaml").write_text("id: t\nversion: '1'\nlicense: MIT\nuser: 'Q: {{ question }}'\n"
                                "seeds: {path: seeds.jsonl, license: CC0-1.0}\nreference: [answer]\n")
    job = {"name": "x", "seed": 5, "prompts": {"template": "t.yaml"}, "output": {"path": "out"},
           "teachers": [{"name": "fake", "backend": "openai", "model": "fake", "base_url": base_url,
                         "license": "Apache-2.0", "max_attempts": 1, "timeout_s": 5,
                         "sampling": {"temperature": 0.0, "max_tokens": 64}}]}
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    return tmp / "job.yaml"


def test_eliminate_reasons():
    parent = "How many apples are left if Sam eats two of his five apples?"
    assert eliminate(parent, "I'm sorry, but I can't do that.") == "refusal"
    assert eliminate(parent, "As an AI, I cannot rewrite prompts.") == "refusal"
    assert eliminate(parent, "Apples?") == "too_short"
    assert eliminate(parent, "#Rewritten Prompt#: How many apples are left now?") == "prompt_leak"
    assert eliminate(parent, parent + " ") == "no_change"
    assert eliminate(parent, "How many apples are left if Sam eats two of his five apples, and Ana eats one "
                             "of her three pears?") is None
    assert eliminate(None, parent) is None  # in-breadth: no parent to compare with


def test_evol_instruct_drops_the_refusal_and_keeps_the_rest(tmp_path: Path, server):
    job = load_job(write_job(tmp_path, server.base_url))
    res = evol_instruct(job, out=tmp_path / "evolved.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "evolved.jsonl").read_text().splitlines()]
    by_parent = {r["parent_id"]: r for r in rows}
    # the refusal, the too-short and the leaking answers are eliminated; the failed call is not a verdict
    assert set(by_parent) == {"ok1", "ok2", "ok3"}
    assert res.dropped == {"prompt_leak": 1, "refusal": 1, "too_short": 1}
    assert res.failed == 1 and res.written == 3
    for pid, r in by_parent.items():
        assert r["question"].startswith(QUESTIONS[pid]) and "assumption" in r["question"]
        assert r["mutation"] in {"constraints", "deepen", "concretize", "reasoning", "breadth"}
        assert "answer" not in r  # a reference answer does not survive a mutation
    meta = json.loads((tmp_path / "evolved.jsonl.meta.json").read_text())
    assert meta["teacher"]["license"] == "Apache-2.0" and meta["source"]["license"] == "CC0-1.0"
    assert meta["dropped"]["refusal"] == 1
    # a second round evolves the survivors again
    res2 = evol_instruct(job, out=tmp_path / "evolved2.jsonl", rounds=2)
    rows2 = [json.loads(line) for line in (tmp_path / "evolved2.jsonl").read_text().splitlines()]
    assert sorted(r["round"] for r in rows2) == [1, 1, 1, 2, 2, 2]
    assert res2.written == 6 and all("rough estimate" in r["question"] for r in rows2 if r["round"] == 2)
    with pytest.raises(Exception, match="exists"):
        evol_instruct(job, out=tmp_path / "evolved.jsonl")


def test_self_instruct_writes_new_distinct_tasks(tmp_path: Path, server):
    job = load_job(write_job(tmp_path, server.base_url))
    res = self_instruct(job, out=tmp_path / "new.jsonl", count=8, examples=2)
    rows = [json.loads(line) for line in (tmp_path / "new.jsonl").read_text().splitlines()]
    assert len(rows) == res.written == 8
    assert len({r["question"] for r in rows}) == 8
    assert all(eliminate(None, r["question"]) is None for r in rows)
    assert all(set(r["examples"]) <= set(QUESTIONS) | {x["id"] for x in rows} for r in rows)


def test_expand_cli_and_the_new_seeds_feed_a_template(tmp_path: Path, server):
    job = write_job(tmp_path, server.base_url)
    proc = datagen("expand", str(job), "--method", "evol", "--out", str(tmp_path / "ev.jsonl"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 new seeds" in proc.stdout and "refusal 1" in proc.stdout
    (tmp_path / "t2.yaml").write_text("id: t2\nversion: '1'\nlicense: MIT\nuser: 'Q: {{ question }}'\n"
                                      "seeds: {path: ev.jsonl, license: Apache-2.0}\n")
    data = yaml.safe_load(job.read_text())
    data["prompts"]["template"] = "t2.yaml"
    job.write_text(yaml.safe_dump(data))
    proc = datagen("preview", str(job), "-n", "3", "--no-report", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- prompt ") == 3
