"""The support-ticket seeds: the generator is deterministic, its references agree with the
messages, every axis value is there, and the template renders on every seed."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from datagen.filters import FilterChain
from datagen.prompts import load_template

from .conftest import REPO

AXES = ("phrasing", "id_format", "distractor", "items", "typo")


@pytest.fixture(scope="module")
def gen():
    path = REPO / "prompts" / "seeds" / "gen_support_tickets.py"
    spec = importlib.util.spec_from_file_location("gen_support_tickets", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    lines = (REPO / "prompts" / "seeds" / "support_tickets.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_the_shipped_seeds_are_what_the_generator_writes(gen, tmp_path, shipped):
    out = tmp_path / "t.jsonl"
    sys.argv = ["gen", "--out", str(out), "--n", "4000", "--seed", "0"]
    gen.main()
    assert out.read_bytes() == (REPO / "prompts" / "seeds" / "support_tickets.jsonl").read_bytes()
    assert gen.generate(300, 1) == gen.generate(300, 1) != gen.generate(300, 2)


def test_seeds_are_distinct_and_cover_every_axis_value(gen, shipped):
    assert len(shipped) >= 3000
    assert len({r["message"] for r in shipped}) == len(shipped)
    assert len({r["id"] for r in shipped}) == len(shipped)
    want = {"phrasing": set(gen.PHRASINGS), "id_format": set(gen.ID_FORMATS),
            "distractor": set(gen.DISTRACTORS), "items": set(gen.ITEMS), "typo": set(gen.TYPOS)}
    for axis in AXES:
        assert {r[axis] for r in shipped} == want[axis], axis
    combos = {tuple(r[a] for a in AXES) for r in shipped}
    assert len(combos) == 6 * 6 * 4 * 2 * 2  # every combination has seeds


def test_references_agree_with_the_messages(shipped):
    for r in shipped:
        assert (r["order_id"] is None) == (r["id_format"] == "none"), r["id"]
        if r["order_id"] is not None:
            assert r["message"].count(r["order_id"]) == 1, r["id"]
        assert r["product"] in r["message"], r["id"]
        if r["items"] == "two":
            rest = r["message"].split(r["product"], 1)[1]
            assert rest.lstrip().startswith("and "), r["id"]


def test_the_template_renders_every_seed_and_the_fields_filter_accepts_its_seeds(shipped):
    t = load_template(REPO / "prompts" / "support_tickets.yaml")
    assert t.spec.reference == ["order_id", "product"]
    assert "gen_support_tickets.py" in (REPO / "prompts" / "support_tickets.yaml").read_text()
    assert len(t.seeds.rows) == len(shipped)
    for row in t.seeds.rows:
        messages = t.render(row)
        assert messages[-1] == {"role": "user", "content": row["message"]}
    chain = FilterChain([{"name": "fields", "fields": ["order_id", "product"], "ids": ["order_id"]}], t.spec.answer)
    chain.check_seeds(t.seeds.rows, id_field="id")
    r = shipped[0]
    answer = json.dumps({"order_id": r["order_id"], "product": r["product"]})
    assert chain({"response": answer, "finish_reason": "stop"}, r)[0].keep
