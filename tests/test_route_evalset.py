"""Eval sets for routing (route/evalset.py): held-out prompts from every stream, one answer
per prompt, screened against training prompts; traffic files; bad input in one line."""

from __future__ import annotations

import json

import pytest

from datagen import records
from datagen.config import Output
from datagen.errors import DatagenError
from datagen.route import evalset
from datagen.storage import create_store
from datagen.train.data import is_heldout

from .conftest import REPO

FRACTION = 0.5
JOB = {"name": "t", "filters": ["nonempty", "not_truncated", "format"],
       "prompts": {"template": str(REPO / "prompts" / "support_extract.yaml")}, "teachers": []}
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _text(i: int) -> str:
    """A message unlike every other index's (no shared word 3-gram)."""
    return f"order {10000 + i} " + " ".join(f"{WORDS[(i * 7 + j) % 16]}{i}x{j}" for j in range(12))


def _row(text: str, *, sample: int = 0, response: str | None = '{"order_id": "1", "product": "x"}',
         system: str = "Extract.", cluster: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    pid = records.prompt_id(messages)
    return records.empty_row() | {
        "row_id": f"{pid}-{sample}", "prompt_id": pid, "sample_index": sample, "messages": messages,
        "response": response, "finish_reason": "stop", "dedupe_cluster": cluster,
        "teacher": {"name": "t", "backend": "openai", "model": "m", "revision": None},
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "seed": 0, "logprobs": None, "stop": []},
        "usage": {"prompt_tokens": 20, "completion_tokens": 9, "cost_usd": None},
        "provenance": {"seed_source": "seeds.jsonl", "axes": [{"name": "tone", "value": "angry"}]},
        "error": None if response is not None else "teacher.http_500: down",
    }


def _store(tmp_path, streams: dict[str, list[dict]], job: dict = JOB):
    root = tmp_path / "out"
    store = create_store(root, Output(path=root), job_meta={"name": "t", "run_fingerprint": "f", "job": job})
    for stream, rows in streams.items():
        for r in rows:
            store.add(stream, r)
    store.commit_all()
    store.close()
    return root


def _split(n: int):
    held, train = [], []
    for i in range(n):
        r = _row(_text(i))
        (held if is_heldout(r["prompt_id"], FRACTION) else train).append(i)
    return held, train


def test_every_stream_one_answer_per_prompt_held_out_only(tmp_path):
    held, train = _split(40)
    acc, rej, fail = held[0], held[1], held[2]
    streams = {
        "accepted": [_row(_text(i)) for i in train] + [_row(_text(acc)), _row(_text(acc), sample=1)],
        # sample 1 rejected, sample 0 accepted: sample 0 is the teacher's answer
        "rejected": [_row(_text(rej), response="prose, not JSON"), _row(_text(acc), sample=2, response="no")],
        "failed": [_row(_text(fail), response=None)],
    }
    es = evalset.from_output(_store(tmp_path, streams), holdout_fraction=FRACTION)
    by_id = {it["id"]: it for it in es.items}
    assert set(by_id) == {_row(_text(i))["prompt_id"] for i in (acc, rej, fail)}
    assert all(is_heldout(i, FRACTION) for i in by_id)
    assert {it["stream"] for it in es.items} == {"accepted", "rejected", "failed"}
    assert es.counts["held_out"] == 3 and es.counts["contaminated"] == 0 and es.counts["teacher_failed"] == 1
    assert es.quality.method == "verifier:nonempty,not_truncated,format"
    # the teacher is scored by the job's filters: its rejected and failed answers count as failures
    items = [by_id[_row(_text(i))["prompt_id"]] for i in (acc, rej, fail)]
    assert es.quality.score(items, [evalset.teacher_answer(it) for it in items]) == [1.0, 0.0, 0.0]
    student = [{"response": "nope", "finish_reason": "stop"}, {"response": '{"order_id": "2", "product": "y"}',
                                                               "finish_reason": "stop"}, None]
    assert es.quality.score(items, student) == [0.0, 1.0, 0.0]
    assert items[0]["axes"] == {"tone": "angry"} and items[0]["prompt_tokens"] == 20


def test_near_duplicates_of_training_prompts_are_dropped_and_counted(tmp_path):
    held, train = _split(40)
    # a training row whose last user turn equals a held-out prompt's, under another system
    # turn (another prompt_id, not held out): that eval prompt is contaminated
    twins = [i for i in held[:3]]
    extra = []
    for i in twins:
        for k in range(50):
            r = _row(_text(i), system=f"Extract, variant {k}.")
            if not is_heldout(r["prompt_id"], FRACTION):
                extra.append(r)
                break
    assert len(extra) == 3
    streams = {"accepted": [_row(_text(i)) for i in train + held] + extra}
    es = evalset.from_output(_store(tmp_path, streams), holdout_fraction=FRACTION)
    assert es.counts["contaminated"] == 3
    assert es.counts["held_out"] == len(held) and es.counts["rows"] == len(held) - 3
    assert not {it["id"] for it in es.items} & {_row(_text(i))["prompt_id"] for i in twins}


def test_teacher_agreement_without_verifiers_and_cluster_sizes(tmp_path):
    held, train = _split(20)
    job = {**JOB, "filters": ["nonempty"]}
    streams = {"accepted": [_row(_text(i), cluster="c1" if i == held[0] else None) for i in train + held]
               + [_row(_text(train[0]), sample=1, cluster="c1")],
               "failed": [_row(_text(i), response=None) for i in range(100, 140)
                          if is_heldout(_row(_text(i))["prompt_id"], FRACTION)][:1]}
    es = evalset.from_output(_store(tmp_path, streams, job), holdout_fraction=FRACTION)
    assert es.quality.method == "teacher_agreement"
    assert es.counts["no_teacher_answer"] == 1 and es.counts["rows"] == len(held)
    it = next(i for i in es.items if i["id"] == _row(_text(held[0]))["prompt_id"])
    assert it["cluster_size"] == 2
    assert es.quality.score([it], [evalset.teacher_answer(it)]) == [1.0]


def test_traffic_file_formats_and_bad_input(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text(json.dumps({"prompt": "2+2?", "teacher_response": "4", "reference": "4"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "3+3?"}], "teacher_response": "7",
                                  "reference": "6"}) + "\n")
    es = evalset.from_file(good)
    assert es.quality.method == "reference"
    assert es.quality.score(es.items, [evalset.teacher_answer(it) for it in es.items]) == [1.0, 0.0]
    csv = tmp_path / "t.csv"
    csv.write_text('prompt,teacher_response\n"hello there","hi"\n')
    assert evalset.from_file(csv).quality.method == "teacher_agreement"

    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(DatagenError) as exc:
        evalset.from_file(bare)
    assert "no references (`reference`) and no teacher answers" in str(exc.value)
    assert "\n" not in str(exc.value)
    nothing = tmp_path / "n.jsonl"
    nothing.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(DatagenError, match="needs `prompt`"):
        evalset.from_file(nothing)


def test_no_held_out_rows_is_one_line(tmp_path):
    held, train = _split(20)
    root = _store(tmp_path, {"accepted": [_row(_text(i)) for i in train]})
    with pytest.raises(DatagenError) as exc:
        evalset.from_output(root, holdout_fraction=FRACTION)
    assert "no held-out prompts" in str(exc.value) and "\n" not in str(exc.value)


def test_student_head_size_vllm_cannot_serve_is_one_line(tmp_path):
    from datagen.route.infer import check_servable

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(DatagenError, match="head size 16") as exc:
        check_servable(str(tmp_path))
    assert "\n" not in str(exc.value)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2,
                                                      "max_position_embeddings": 1024}))
    check_servable(str(tmp_path), 1024)
    with pytest.raises(DatagenError, match="max_model_len 2048 exceeds its max_position_embeddings 1024"):
        check_servable(str(tmp_path), 2048)


def test_hf_fallback_writes_an_eval_table_the_report_reads(tmp_path):
    """The whole `route eval` path without Ray or vLLM: a tiny random student, a traffic file."""
    import yaml

    from datagen.route import infer, report
    from datagen.train import student
    from datagen.train.config import Student

    cfg = yaml.safe_load((REPO / "examples" / "train.yaml").read_text())["student"]
    model, tok = student.build(Student.model_validate(cfg), seed=0)
    student.save_final(model, tok, tmp_path / "student")
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"order {i}?", "teacher_response": str(i)}) + "\n"
                               for i in range(6)))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "data": {"traffic": "traffic.jsonl"}, "output": "eval.jsonl",
        "student": {"path": "student", "backend": "hf", "max_tokens": 4, "samples": 1, "logprobs": 3}}))
    ev = infer.load(tmp_path / "eval.yaml")
    rows, summary = infer.build(ev)
    infer.write(ev, rows, summary)
    back = report.read_rows(tmp_path / "eval.jsonl")
    assert [r["id"] for r in back] == [f"q{i}" for i in range(6)]
    assert all(r["quality"] == "teacher_agreement" and r["q_teacher"] == 1.0 for r in back)
    assert all(r["signals"]["mean_entropy"] is not None and r["signals"]["agreement"] is not None for r in back)
    assert summary["requests"] == 12 and summary["counts"]["rows"] == 6
    assert json.loads(infer.meta_path(tmp_path / "eval.jsonl").read_text())["backend"] == "hf"


# --------------------------------------------------------------------------- field-level credit


def test_extraction_gets_field_level_credit_from_the_jobs_fields_filter(tmp_path):
    """The job ran the `fields` filter: an answer gets the share of the seed's reference
    fields it gets right, provided the other filters keep it."""
    held, train = _split(20)
    job = {**JOB, "filters": ["nonempty", "format", {"name": "fields", "fields": ["order_id", "product"],
                                                      "ids": ["order_id"]}]}
    ref = json.dumps({"order_id": "#48213", "product": "desk lamp"})

    def with_ref(r):
        r["provenance"] = {**r["provenance"], "reference": ref}
        return r

    streams = {"accepted": [with_ref(_row(_text(i), response='{"order_id": "48213", "product": "Desk Lamp"}'))
                            for i in train + held]}
    es = evalset.from_output(_store(tmp_path, streams, job), holdout_fraction=FRACTION)
    assert es.quality.method == "verifier:nonempty,format,fields; field_credit:order_id,product"
    it = es.items[:4]
    answers = [{"response": '{"order_id": "ORD-48213", "product": "desk lamp"}', "finish_reason": "stop"},
               {"response": '{"order_id": "48213", "product": "chair"}', "finish_reason": "stop"},
               {"response": '{"order_id": "1", "product": "chair"}', "finish_reason": "stop"},
               {"response": "", "finish_reason": "stop"}]  # nonempty drops it: no credit at all
    assert es.quality.score(it, answers) == [1.0, 0.5, 0.0, 0.0]
    assert es.quality.score(it[:1], [evalset.teacher_answer(it[0])]) == [1.0]


def test_traffic_with_json_references_gets_field_credit(tmp_path):
    path = tmp_path / "t.jsonl"
    refs = [{"order_id": "A-100", "product": "lamp", "color": None}, {"order_id": "200", "product": "desk"}]
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "teacher_response": json.dumps(r), "reference": r}) + "\n"
                            for i, r in enumerate(refs)))
    es = evalset.from_file(path, id_fields=["order_id"])
    assert es.quality.method == "field_credit:reference"
    assert es.quality.score(es.items, [evalset.teacher_answer(it) for it in es.items]) == [1.0, 1.0]
    student = [{"response": '{"order_id": "#100", "product": "lamp", "color": "red"}'},  # color should be null
               {"response": 'sure: {"order_id": 200}'}]  # product missing
    assert es.quality.score(es.items, student) == pytest.approx([2 / 3, 0.5])
    # CSV: the reference is the object's JSON text; without id_fields an id compares as text
    csv = tmp_path / "t.csv"
    csv.write_text('prompt,teacher_response,reference\n"q","x","{""order_id"": ""A-100""}"\n')
    es = evalset.from_file(csv)
    assert es.quality.method == "field_credit:reference"
    assert es.quality.score(es.items, [{"response": '{"order_id": "100"}'}]) == [0.0]
    mixed = tmp_path / "m.jsonl"
    mixed.write_text(json.dumps({"prompt": "a", "teacher_response": "x", "reference": {"k": 1}}) + "\n"
                     + json.dumps({"prompt": "b", "teacher_response": "x", "reference": "4"}) + "\n")
    with pytest.raises(DatagenError, match="1 of 2 references are JSON objects") as exc:
        evalset.from_file(mixed)
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------- a teacher for the traffic


def test_a_traffic_file_without_teacher_answers_needs_a_teacher(tmp_path):
    import yaml

    from datagen.route import infer

    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(DatagenError) as exc:
        evalset.from_file(bare)
    assert "or a `teacher:` in the eval file" in str(exc.value) and "\n" not in str(exc.value)
    assert evalset.from_file(bare, answers=True).items[0]["teacher_response"] is None
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({
        "data": {"path": "out"}, "output": "e.jsonl", "student": {"path": "s"},
        "teacher": {"name": "t", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1"}}))
    from datagen.errors import ConfigError

    assert infer.load(tmp_path / "e.yaml").teacher.name == "t"  # a datagen output: answered again
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({
        "data": {"traffic": "bare.jsonl"}, "output": "e.jsonl", "student": {"path": "s"},
        "teacher": {"name": "t", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1",
                    "mode": "batch"}}))
    with pytest.raises(ConfigError, match="mode batch is not served through the teacher fleet"):
        infer.load(tmp_path / "e.yaml")


def _tiny_student(dest):
    import yaml

    from datagen.train import student
    from datagen.train.config import Student

    cfg = yaml.safe_load((REPO / "examples" / "train.yaml").read_text())["student"]
    model, tok = student.build(Student.model_validate(cfg), seed=0)
    student.save_final(model, tok, dest)


def test_the_eval_files_teacher_answers_rows_without_one(tmp_path, fake_server):
    """A real Ray fleet of the eval file's openai teacher (the fake server on 127.0.0.1)
    answers the 3 rows that lack a teacher answer; field credit against the references."""
    import yaml

    from datagen.route import infer

    _tiny_student(tmp_path / "student")
    rows = [{"id": "given", "prompt": "order 11111 please", "teacher_response": '{"order_id": "99999", "product": "thing"}',
             "reference": {"order_id": "11111", "product": "thing"}},
            {"id": "a", "prompt": "order 22222 please", "reference": {"order_id": "22222", "product": "thing"}},
            {"id": "b", "prompt": "order 33333 please", "reference": {"order_id": "33333", "product": "lamp"}},
            {"id": "c", "prompt": "my office chair broke", "reference": {"order_id": None, "product": "chair"}}]
    (tmp_path / "traffic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "data": {"traffic": "traffic.jsonl", "id_fields": ["order_id"]}, "output": "eval.jsonl", "num_cpus": 2,
        "student": {"path": "student", "backend": "hf", "max_tokens": 4, "logprobs": 3},
        "teacher": {"name": "fake", "backend": "openai", "model": "fake-model", "base_url": fake_server.base_url,
                    "batch_size": 2, "timeout_s": 5, "sampling": {"temperature": 0.0, "max_tokens": 32}}}))
    ev = infer.load(tmp_path / "eval.yaml")
    out, summary = infer.build(ev)
    assert fake_server.requests == 3  # only the rows without a teacher answer
    assert summary["teacher_run"]["answered"] == 3 and summary["teacher_run"]["failed"] == 0
    assert summary["quality"] == "field_credit:reference"
    by_id = {r["id"]: r for r in out}
    # given: its own answer, order id wrong; a: right; b: product "thing" not "lamp"; c: prose
    assert [by_id[i]["q_teacher"] for i in ("given", "a", "b", "c")] == [0.5, 1.0, 0.5, 0.0]
    assert {json.dumps(r["teacher"], sort_keys=True) for r in out} == {
        json.dumps({"model": "fake-model", "name": "fake", "revision": None}, sort_keys=True)}
    assert by_id["a"]["teacher_completion_tokens"] and by_id["a"]["teacher_response"].startswith('{"order_id": "22222"')


def test_the_eval_files_teacher_answers_a_datagen_outputs_held_out_prompts_again(tmp_path, fake_server):
    """The run's answers (one right, one wrong, the rest failed) are replaced by the eval
    file's teacher's: every held-out prompt is asked again, the run's failures are kept
    and counted apart; the one the eval teacher fails on (a 400) keeps nothing of the
    run's answer and scores 0 under the job's format verifier."""
    import yaml

    from datagen.route import infer

    held, train = _split(12)
    wrong = '{"order_id": "1", "product": "x"}'
    rows = {"accepted": [_row(_text(i)) for i in held[:1] + train],
            "rejected": [_row(_text(held[1]), response=wrong)],
            "failed": [_row(_text(i), response=None) for i in held[2:]]}
    root = _store(tmp_path, rows)
    _tiny_student(tmp_path / "student")
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "data": {"path": str(root), "holdout_fraction": FRACTION}, "output": "eval.jsonl", "num_cpus": 2,
        "student": {"path": "student", "backend": "hf", "max_tokens": 4, "logprobs": 3},
        "teacher": {"name": "fake", "backend": "openai", "model": "fake-model", "base_url": fake_server.base_url,
                    "batch_size": 2, "timeout_s": 5, "sampling": {"temperature": 0.0, "max_tokens": 32}}}))
    fake_server.inject("400", match=str(10000 + held[0]))
    out, summary = infer.build(infer.load(tmp_path / "eval.yaml"))
    assert len(held) >= 3 and fake_server.requests == len(held) == len(out)
    assert summary["teacher_run"] == {"teacher": {"name": "fake", "model": "fake-model", "revision": None},
                                      "answered": len(held) - 1, "failed": 1,
                                      "seconds": summary["teacher_run"]["seconds"]}
    counts = summary["counts"]
    assert counts["run_teacher_failed"] == len(held) - 2 and counts["teacher_failed"] == 1
    assert counts["rows"] == len(held) and summary["quality"].startswith("verifier:")
    failed = next(r for r in out if r["teacher_response"] is None)
    assert failed["q_teacher"] == 0.0 and failed["prompt_tokens"] is failed["teacher_completion_tokens"] is None
    answered = [r for r in out if r is not failed]
    # the fake teacher extracts each prompt's order number: every other held-out prompt, once
    assert sorted(json.loads(r["teacher_response"])["order_id"] for r in answered) == sorted(
        str(10000 + i) for i in held[1:])
    assert all(r["stream"] == "eval_teacher" and r["q_teacher"] == 1.0 and r["teacher"]["name"] == "fake"
               and r["teacher_completion_tokens"] != 9 for r in answered)  # 9: the run's count
