"""Filters one by one (heuristics, schema, math, code) and the chain that runs them.
Code answers run in the real sandbox; the code problems are the shipped verifier assets
in ``filters/code/problems.jsonl``, written for this project."""

from __future__ import annotations

import json
from typing import Any

import pytest

from datagen.filters import FILTERS, FilterChain, FilterError, Verdict, extract_json, spec_of
from datagen.filters.assets import assets_dir
from datagen.filters.math_answer import answers_equal, extract_answer
from datagen.prompts import AnswerFormat

from .conftest import REPO

TEXT = AnswerFormat()


def row(response: str | None, **kw: Any) -> dict[str, Any]:
    return {"row_id": "r", "response": response, "finish_reason": kw.pop("finish_reason", "stop"),
            "sampling": {"max_tokens": 64}, "messages": [{"role": "user", "content": kw.pop("prompt", "q")}], **kw}


def verdict(spec: str | dict, response: str | None, seed: dict | None = None, **kw: Any) -> Verdict:
    return FilterChain([spec], TEXT)(row(response, **kw), seed)[0]


def test_every_registered_filter_builds_from_its_bare_name_or_minimal_params():
    minimal = {"schema": {"json_schema": {"type": "object"}}, "judge": {"teacher": "t"},
               "fields": {"fields": ["order_id"]}}
    context = {"teachers": {"t": {"name": "t", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9"}}}
    for name in FILTERS:
        chain = FilterChain([{"name": name, **minimal.get(name, {})}], TEXT, context=context)
        assert chain.filters[0].name == name


def test_unknown_filter_and_bad_params_are_refused():
    with pytest.raises(FilterError, match="unknown filter 'spellcheck'"):
        spec_of("spellcheck")
    with pytest.raises(ValueError, match="max_chars"):
        spec_of({"name": "length", "min_chars": 10, "max_chars": 5})
    with pytest.raises(ValueError, match="not a valid regex"):
        spec_of({"name": "refusal", "patterns": ["("]})


# --------------------------------------------------------------------------- heuristics


@pytest.mark.parametrize("spec,response,reason", [
    ("nonempty", "", "empty.response"),
    ("nonempty", "   \n", "empty.response"),
    ("nonempty", "?!...", "empty.no_content"),
    ({"name": "length", "min_chars": 10}, "too short", "length.too_short"),
    ({"name": "length", "max_chars": 5}, "far too long", "length.too_long"),
    ({"name": "length", "min_words": 3}, "two words", "length.too_short"),
    ({"name": "length", "max_words": 2}, "one two three", "length.too_long"),
    ("repetition", "the cat sat on the mat " * 10, "repetition.ngrams"),
    ("repetition", "\n".join(["see above"] * 4 + ["first we read the file", "then count every word in it",
                                            "sort the counts by size", "and print the ten largest"]),
     "repetition.lines"),
    ("refusal", "I'm sorry, but I can't help with that.", "refusal.detected"),
    ("refusal", "As an AI language model, I cannot browse.", "refusal.detected"),
    ("refusal", "I cannot provide that information.", "refusal.detected"),
    ("language", "Это ответ на русском языке, а не на английском.", "language.wrong_script"),
    ("language", "Le chat est sur la table et il dort dans le soleil avec les enfants.",
     "language.unexpected"),
    ("template_leak", "The answer is 4.<|im_end|>", "template.leak"),
    ("template_leak", "Dear {{ customer_name }}, thanks", "template.leak"),
])
def test_heuristic_drops(spec, response, reason):
    v = verdict(spec, response)
    assert (v.keep, v.reason) == (False, reason), v


@pytest.mark.parametrize("spec,response", [
    ("nonempty", "42"),
    ({"name": "length", "min_chars": 2, "max_chars": 100, "min_words": 1, "max_words": 20}, "a short answer"),
    ("repetition", "A varied answer that explains the steps one by one and then gives the result clearly."),
    ("refusal", "Sure. The order number is 48213 and the product is a desk lamp."),
    # Refusals come first; a long answer that says "I cannot" late is judged on its head only.
    ("refusal", "Here is the plan. " + "Step. " * 100 + "I cannot help with that part, sadly."),
    ("language", "The cat is on the table and it sleeps in the sun with the children."),
    ("language", "12 + 30 = 42"),
    ("template_leak", '{"order_id": "1", "meta": {"a": {"b": 1}}}'),
])
def test_heuristic_keeps(spec, response):
    v = verdict(spec, response)
    assert v.keep, v


def test_truncation_and_prompt_echo():
    v = verdict("not_truncated", "half an ans", finish_reason="length")
    assert (v.keep, v.reason, v.details) == (False, "truncated.max_tokens", "stopped at max_tokens (64)")
    prompt = "Please summarise the following support conversation in one sentence. " * 4
    v = verdict("template_leak", "Sure: " + prompt, prompt=prompt)
    assert (v.keep, v.reason) == (False, "template.prompt_echo")


def test_refusal_pack_examples_cover_every_pattern_and_pass_the_triggers():
    import re

    from datagen.filters.assets import rule_pack

    pack = rule_pack("refusal")
    for example in pack["examples"]:
        v = verdict("refusal", example)
        assert (v.keep, v.reason) == (False, "refusal.detected"), example
    for p in pack["patterns"]:
        assert any(re.search(p, e.replace("\u2019", "'"), re.IGNORECASE) for e in pack["examples"]), p


def test_refusal_rule_pack_is_data_and_extendable():
    pack = (assets_dir() / "rules" / "refusal.yaml").read_text()
    assert "patterns:" in pack
    v = verdict({"name": "refusal", "patterns": [r"\bno can do\b"]}, "No can do, friend.")
    assert (v.keep, v.reason, v.details) == (False, "refusal.detected", "No can do")


# --------------------------------------------------------------------------- schema


ORDER_SCHEMA = {"type": "object", "required": ["order_id", "qty"], "additionalProperties": False,
                "properties": {"order_id": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}}


@pytest.mark.parametrize("response,keep,reason", [
    ('{"order_id": "A1", "qty": 2}', True, "ok"),
    ('Here you go:\n```json\n{"order_id": "A1", "qty": 2}\n```\nAnything else?', True, "ok"),
    ('{"order_id": "A1"}', False, "schema.missing_field"),
    ('{"order_id": 7, "qty": 2}', False, "schema.wrong_type"),
    ('{"order_id": "A1", "qty": 2, "note": "x"}', False, "schema.extra_field"),
    ('{"order_id": "A1", "qty": 0}', False, "schema.invalid"),
    ("no json here", False, "schema.invalid_json"),
])
def test_json_schema(response, keep, reason):
    v = verdict({"name": "schema", "json_schema": ORDER_SCHEMA}, response)
    assert (v.keep, v.reason) == (keep, reason), v


def test_boolean_json_schemas_accept_all_or_nothing():
    assert verdict({"name": "schema", "json_schema": True}, '{"anything": [1, 2]}').keep
    for response in ('{"order_id": "A1", "qty": 2}', "[]", "7"):
        v = verdict({"name": "schema", "json_schema": False}, response)
        assert (v.keep, v.reason) == (False, "schema.invalid") and "False schema" in v.details, v
    v = verdict({"name": "schema", "json_schema": True}, "no json here")
    assert (v.keep, v.reason) == (False, "schema.invalid_json")


def test_pydantic_model_by_import_path():
    spec = {"name": "schema", "model": "datagen.prompts:Shot"}  # any pydantic model importable here
    assert verdict(spec, '{"vars": {"x": 1}, "answer": "y"}').keep
    v = verdict(spec, '{"vars": {"x": 1}}')
    assert (v.keep, v.reason) == (False, "schema.missing_field") and "answer" in v.details
    with pytest.raises(FilterError, match="cannot import"):
        FilterChain([{"name": "schema", "model": "datagen.nope:Model"}], TEXT)


def test_extract_json_is_still_importable_from_the_package():
    assert extract_json('```json\n{"a": 1}\n```') == {"a": 1}


# --------------------------------------------------------------------------- math

# (teacher's answer text, reference from the seed, same?)
MATH_CASES = [
    ("So the probability is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("The answer is 0.5", "1/2", True),
    ("That is 50% of the time.", "1/2", True),
    ("The answer is 50%", "50", True),
    ("#### 1,000", "1000", True),
    ("She pays $1,000 in total.", "1000", True),
    ("The answer is $1,000.", "$1000", True),
    ("Total: \\boxed{1000}", "1,000", True),
    ("\\boxed{\\dfrac{3}{4}}", "75%", True),
    ("\\boxed{0.75}", "3/4", True),
    ("The answer is 0.33", "1/3", True),
    ("The answer is 0.3", "1/3", False),
    ("\\boxed{2\\sqrt{2}}", "sqrt(8)", True),
    ("\\boxed{x + 1}", "1 + x", True),
    ("\\boxed{\\pi/2}", "1.5707963267948966", False),  # symbolic vs decimal: not claimed equal
    ("so x = 5", "5", True),
    ("The final answer is 18 dollars.", "18", True),
    ("Answer: (B)", "B", True),
    ("\\boxed{12}", "13", False),
    ("First 3 apples, then 4 more, so 7 apples.", "7", True),
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", True),
    ("The result is \\boxed{-3}", "-3", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("I don't know.", "4", None),  # no answer at all
]


@pytest.mark.parametrize("text,reference,same", MATH_CASES)
def test_math_answers(text, reference, same):
    v = verdict({"name": "math"}, text, seed={"id": 1, "answer": reference})
    if same is None:
        assert (v.keep, v.reason) == (False, "math.no_answer")
    else:
        assert v.keep is same, (v, extract_answer(text))
        assert v.reason == ("ok" if same else "math.wrong_answer")


# Chat-model answer styles that carry the right answer: each must be kept.
CHAT_STYLE_RIGHT = [
    ("**Final answer:** 18", "18"),
    ("The answer is **18**.", "18"),
    ("**Answer: 18**", "18"),
    ("Final Answer: The final answer is 18. I hope it is correct.", "18"),
    ("Final Answer: The final answer is $18$. I hope it is correct.", "18"),
    ("**Final Answer:** $18$", "18"),
    ("**Final Answer**: 18", "18"),
    ("__Answer:__ 18", "18"),
    ("The answer is *18*.", "18"),
    ("#### **18**", "18"),
    ("#### Final answer: 18", "18"),
    ("So she has 18 left.\n\n**Final answer:** \\boxed{18}", "18"),
    ("\\boxed{18}", "18"),
    ("#### 18", "18"),
    ("The answer is $18.", "18"),
    ("**Answer:** $18", "$18"),
    ("The answer is 18.0", "18"),
    ("**Final answer:** 18.0", "18"),
    ("**Final answer:** 1,800", "1800"),
    ("The answer is **1,800** dollars.", "1,800"),
]

# Wrong answers in the same styles: each must stay rejected.
CHAT_STYLE_WRONG = [
    ("The answer is **17**", "18"),
    ("**Final answer:** 17", "18"),
    ("Final Answer: The final answer is 17. I hope it is correct.", "18"),
    ("Final answer: 18 ... wait, actually 19", "18"),
    ("Final answer: 18, wait, actually 19", "18"),
    ("The answer is **18** or **19**.", "18"),
    ("The answer is 18 or 19.", "18"),
    ("**Answer:** 17, 18", "18"),
    ("**Answer: 18**. Actually, the answer is **19**.", "18"),
    ("The answer is **180**.", "18"),
    ("The answer is **-18**.", "18"),
    ("**Final answer:** 18.5", "18"),
    ("**Final answer:** 1,800", "18"),
    ("The answer is 3**2", "32"),  # a power, not bold: 9, not 32
    ("The answer is **18 + 1**", "18"),
    ("The answer is $18^2$", "18"),
]


@pytest.mark.parametrize("text,reference", CHAT_STYLE_RIGHT)
def test_chat_model_answer_styles_are_kept(text, reference):
    v = verdict({"name": "math"}, text, seed={"id": 1, "answer": reference})
    assert (v.keep, v.reason) == (True, "ok"), (v, extract_answer(text))


@pytest.mark.parametrize("text,reference", CHAT_STYLE_WRONG)
def test_chat_model_wrong_answers_stay_rejected(text, reference):
    v = verdict({"name": "math"}, text, seed={"id": 1, "answer": reference})
    assert not v.keep and v.reason in ("math.wrong_answer", "math.no_answer"), (v, extract_answer(text))


def test_math_extraction_prefers_boxed_then_hashes_then_answer_is():
    assert extract_answer("2 + 2 = 4, and then \\boxed{\\frac{a}{b}} and 9") == "\\frac{a}{b}"
    assert extract_answer("worked 5\n#### 42\nbye 7") == "42"
    assert extract_answer("so the answer is 12. Then 99 people") == "12"
    assert answers_equal("1/2", "50%") and not answers_equal("1/2", "0.51")


def test_sympy_input_is_whitelisted():
    # sympy's parser evaluates Python: teacher text that is not plain math never reaches it.
    assert not answers_equal("__import__('os').system('touch /tmp/x')", "0")
    assert not answers_equal("open(1)", "open(1) + 0")


def test_math_needs_a_reference_in_every_seed():
    chain = FilterChain([{"name": "math", "answer_field": "solution"}], TEXT)
    with pytest.raises(FilterError, match="seed 2 has none"):
        chain.check_seeds([{"id": 1, "solution": "4"}, {"id": 2}], id_field="id")


# --------------------------------------------------------------------------- code


def problems() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (REPO / "filters" / "code" / "problems.jsonl").read_text().splitlines()]


def test_code_problems_correct_solutions_pass_and_stubs_fail():
    chain = FilterChain([{"name": "code", "timeout_s": 10}], TEXT)
    probs = problems()
    assert len(probs) >= 10
    answers = [row(f"Here is my solution:\n```python\n{p['solution']}```\nIt runs in O(n).") for p in probs]
    answers += [row(f"```\n{p['stub']}```") for p in probs]
    verdicts = chain.run(answers, probs + probs)
    good, stubs = verdicts[: len(probs)], verdicts[len(probs):]
    assert all(v[0].keep for v in good), [(p["id"], v[0]) for p, v in zip(probs, good) if not v[0].keep]
    assert not any(v[0].keep for v in stubs)
    assert {v[0].reason for v in stubs} <= {"code.test_failed", "code.exception"}


def test_code_without_a_program_is_dropped():
    v = verdict("code", "I would use a loop.\n```text\nnot python\n```", seed={"tests": "assert True"})
    assert (v.keep, v.reason) == (False, "code.no_code")


def test_a_broken_sandbox_stops_instead_of_dropping(monkeypatch):
    import datagen.filters.sandbox as sandbox

    def broken(*a, **k):
        raise sandbox.SandboxError("sandbox interpreter vanished")

    monkeypatch.setattr(sandbox, "run_code", broken)
    chain = FilterChain(["nonempty", "code"], TEXT)
    with pytest.raises(FilterError, match="filter 'code' failed: SandboxError: sandbox interpreter vanished"):
        chain.run([row("```python\nx = 1\n```")], [{"tests": "assert x == 1"}])


# --------------------------------------------------------------------------- chain


def test_chain_order_and_short_circuit():
    specs = ["nonempty", {"name": "length", "min_chars": 50}, "refusal"]
    r = row("I'm sorry, I can't.")
    short = FilterChain(specs, TEXT)(r)
    assert [(v.filter, v.keep) for v in short] == [("nonempty", True), ("length", False)]
    full = FilterChain(specs, TEXT, short_circuit=False)(r)
    assert [(v.filter, v.keep) for v in full] == [("nonempty", True), ("length", False), ("refusal", False)]


def test_a_filter_that_raises_is_an_error_not_a_verdict():
    from datagen.filters.heuristics import Length

    class Broken(Length):
        def check(self, row, seed):
            raise KeyError("bug")

    chain = FilterChain(["nonempty"], TEXT)
    chain.filters.append(Broken(spec_of("length")))
    with pytest.raises(FilterError, match="filter 'length' failed: KeyError"):
        chain.run([row("fine")], [None])


# --------------------------------------------------------------------------- fields

FIELDS = {"name": "fields", "fields": ["order_id", "product"], "ids": ["order_id"]}
TICKET = {"id": "t1", "order_id": "ORD-48213", "product": "Lumen desk lamp"}
NO_ID = {"id": "t2", "order_id": None, "product": "kettle"}


@pytest.mark.parametrize("response, seed, keep, reason, score", [
    ('{"order_id": "ORD-48213", "product": "Lumen desk lamp"}', TICKET, True, "ok", 1.0),
    ('{"order_id": "#48213", "product": " lumen  DESK lamp. "}', TICKET, True, "ok", 1.0),  # normalised
    ('Sure! ```json\n{"order_id": 48213, "product": "Lumen desk lamp"}\n```', TICKET, True, "ok", 1.0),
    ('{"order_id": "48123", "product": "Lumen desk lamp"}', TICKET, False, "fields.mismatch", 0.5),
    ('{"order_id": "555-0142", "product": "desk lamp"}', TICKET, False, "fields.mismatch", 0.0),
    ('{"product": "Lumen desk lamp"}', TICKET, False, "fields.missing", 0.5),
    ('{"order_id": null, "product": "kettle"}', NO_ID, True, "ok", 1.0),
    ('{"order_id": "N/A", "product": "Kettle"}', NO_ID, True, "ok", 1.0),  # a null-like string is null
    ('{"order_id": "48213", "product": "kettle"}', NO_ID, False, "fields.mismatch", 0.5),  # invented id
    ('{"order_id": null, "product": "Lumen desk lamp"}', TICKET, False, "fields.mismatch", 0.5),
    ("the order is 48213", TICKET, False, "fields.invalid_json", 0.0),
    ('["ORD-48213", "Lumen desk lamp"]', TICKET, False, "fields.invalid_json", 0.0),
])
def test_fields_compares_each_field_with_the_seed_reference(response, seed, keep, reason, score):
    v = verdict(FIELDS, response, seed)
    assert (v.keep, v.reason, v.score) == (keep, reason, score)


def test_fields_refuses_seeds_without_the_reference_columns_but_takes_a_null_reference():
    chain = FilterChain([FIELDS], TEXT)
    chain.check_seeds([TICKET, NO_ID], id_field="id")  # null order_id: a reference ("none")
    with pytest.raises(FilterError, match="seed 't3' has none"):
        chain.check_seeds([TICKET, {"id": "t3", "product": "kettle"}], id_field="id")
    with pytest.raises(ValueError, match="ids names fields not in fields"):
        spec_of({"name": "fields", "fields": ["product"], "ids": ["order_id"]})
