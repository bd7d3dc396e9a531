"""The prompt plan: seed sources, template errors, quotas, determinism, prompt dedupe and
decontamination, the starter library and ``datagen preview``.

Fast: no Ray, no teacher (``prepare`` and ``preview`` never start one), except the one
end-to-end run against the fake OpenAI server at the bottom.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from datagen import licenses
from datagen import run as runner
from datagen.config import load_job
from datagen.errors import DatagenError
from datagen.prompts import PromptStream, diversity, load_template
from datagen.prompts.clean import compared_text
from datagen.prompts.plan import apportion
from datagen.storage.shards import ShardStore

from .conftest import REPO, datagen

WORDS = ("amber basil cedar delta ember fjord grove harbor island jasper kelp lagoon meadow nectar orchid "
         "pebble quartz river saffron tundra umber violet willow yarrow zephyr").split()


def topic_of(i: int) -> str:
    return ("science", "history", "sport")[i % 3]


def seed_rows(n: int) -> list[dict[str, Any]]:
    """``n`` seeds, each its own random order of a few words (few shared word trigrams)."""
    rows = []
    for i in range(n):
        words = random.Random(i).sample(WORDS, 12)
        rows.append({"id": f"s{i:04d}", "topic": topic_of(i), "q": f"item {i}: " + " ".join(words)})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TEMPLATE = """\
id: t
version: "1"
license: MIT
system: |-
  You help {{ persona }}.
user: |-
  Tone: {{ tone }}.
  Topic: {{ topic }}.
  {{ q }}
seeds: {path: seeds.jsonl, license: CC0-1.0}
reference: [topic]
"""


def write_job(tmp: Path, *, prompts: dict[str, Any], template: str = TEMPLATE, seed: int = 1,
              rows: list[dict[str, Any]] | None = None, base_url: str = "http://127.0.0.1:9/v1") -> Path:
    (tmp / "t.yaml").write_text(template)
    if rows is not None:
        write_jsonl(tmp / "seeds.jsonl", rows)
    job = {"name": "j", "seed": seed, "prompts": {"template": "t.yaml", **prompts},
           "teachers": [{"name": "a", "backend": "openai", "model": "m", "license": "MIT", "base_url": base_url,
                         "batch_size": 8, "timeout_s": 5, "max_attempts": 2,
                         "sampling": {"temperature": 0.0, "max_tokens": 16}}],
           "output": {"path": "out"}, "runtime": {"num_cpus": 2}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


AXES = {
    "persona": {"values": {"a student": 5, "a nurse": 3, "a pilot": 2}},
    "tone": {"values": ["plain", "warm", "formal", "playful"]},
    "topic": {"column": "topic", "values": {"science": 0.5, "history": 0.3, "sport": 0.2}},
}


def prepare(path: Path) -> PromptStream:
    return runner.prepare(load_job(path))[0]


def error_of(path: Path) -> str:
    with pytest.raises(DatagenError) as info:
        prepare(path)
    return str(info.value)


# --------------------------------------------------------------------------- quotas and determinism


def test_apportion_is_exact_and_within_one():
    assert apportion(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    shares = apportion(10_001, {"x": 0.5, "y": 0.3, "z": 0.2})
    assert sum(shares.values()) == 10_001
    assert all(abs(shares[v] - 10_001 * w) <= 1 for v, w in {"x": 0.5, "y": 0.3, "z": 0.2}.items())


def test_quotas_met_on_10k_rendered_prompts(tmp_path: Path):
    stream = prepare(write_job(tmp_path, rows=seed_rows(2000),
                               prompts={"count": 10_000, "axes": AXES, "quota_tolerance": 0.01,
                                        "dedupe": {}}))
    reqs = list(stream)
    assert len(reqs) == 10_000 and len({r.prompt_id for r in reqs}) == 10_000
    seen: dict[str, Counter] = {a: Counter() for a in AXES}
    for r in reqs:
        axes = {a["name"]: a["value"] for a in r.provenance["axes"]}
        for a in AXES:
            seen[a][axes[a]] += 1
        # the values really are in the rendered prompt, and the topic axis drew a matching seed
        assert f"Tone: {axes['tone']}." in r.messages[-1]["content"]
        assert r.messages[0]["content"] == f"You help {axes['persona']}."
        assert json.loads(r.provenance["reference"]) == {"topic": axes["topic"]}
        assert topic_of(int(r.provenance["seed_ids"][0][1:])) == axes["topic"]
    for a, spec in AXES.items():
        w = spec["values"] if isinstance(spec["values"], dict) else dict.fromkeys(spec["values"], 1)
        for v, weight in w.items():
            share = seen[a][v] / 10_000
            assert abs(share - weight / sum(w.values())) <= 0.01, (a, v, share)
    # the histogram in the plan is the one the rendered stream shows
    assert stream.plan.histogram() == {a: {v: seen[a][v] for v in stream.plan.targets[a]} for a in AXES}


def test_same_seed_same_stream_different_seed_different(tmp_path: Path):
    rows = seed_rows(300)
    prompts = {"count": 1000, "axes": AXES, "dedupe": {}}

    def ids(seed: int, where: str) -> list[tuple[str, str]]:
        d = tmp_path / where
        d.mkdir()
        return [(r.row_id, r.messages[-1]["content"]) for r in prepare(write_job(d, rows=rows, prompts=prompts,
                                                                                 seed=seed))]

    a, b, c = ids(1, "a"), ids(1, "b"), ids(2, "c")
    assert a == b
    assert a != c
    assert len({x for _, x in a} ^ {x for _, x in c}) > 100  # other prompts, not only another order


def test_axes_are_dealt_jointly_so_a_plan_can_use_every_combination(tmp_path: Path):
    # 30 seeds x 3 personas x 4 tones = 360 distinct prompts: all of them can be planned,
    # because each persona x tone combination gets its share (30), not a random number.
    axes = {"persona": {"values": ["a", "b", "c"]}, "tone": {"values": ["w", "x", "y", "z"]}}
    template = TEMPLATE.replace("Topic: {{ topic }}.\n  ", "")
    stream = prepare(write_job(tmp_path, rows=seed_rows(30), template=template,
                               prompts={"count": 360, "axes": axes}))
    combos = Counter(combo for _, combo in stream.plan.slots)
    assert len(stream.plan.slots) == 360 and set(combos.values()) == {30}


def test_quota_that_seeds_cannot_meet_is_refused(tmp_path: Path):
    axes = {"topic": {"column": "topic", "values": {"science": 0.9, "history": 0.1}}}
    template = TEMPLATE.replace("You help {{ persona }}.", "Hi.").replace("Tone: {{ tone }}.\n  ", "")
    msg = error_of(write_job(tmp_path, rows=seed_rows(30), template=template,
                             prompts={"count": 20, "axes": axes}))
    assert msg.startswith("prompts.count: only 12 of 20 prompts could be planned")
    assert "'topic': 'science'" in msg


def test_axis_the_template_never_uses_is_refused(tmp_path: Path):
    axes = {**AXES, "mood": {"values": ["calm", "busy"]}}
    msg = error_of(write_job(tmp_path, rows=seed_rows(30), prompts={"count": 10, "axes": axes}))
    assert msg.startswith("prompts.axes.mood: the template") and "never uses {{ mood }}" in msg


def test_axis_values_are_validated(tmp_path: Path):
    msg = error_of(write_job(tmp_path, rows=seed_rows(30),
                             prompts={"count": 10, "axes": {**AXES, "tone": {"values": {"plain": 0}}}}))
    assert "prompts.axes.tone.values: Value error, every weight must be > 0" in msg or \
        "prompts.axes.tone.values: every weight must be > 0" in msg


# --------------------------------------------------------------------------- template errors


def test_undefined_variable_names_template_file_and_line(tmp_path: Path):
    template = TEMPLATE.replace("  Topic: {{ topic }}.\n", "  Topic: {{ topic }}.\n  Level: {{ levle }}\n")
    path = write_job(tmp_path, rows=seed_rows(5), template=template,
                     prompts={"count": 5, "axes": {k: AXES[k] for k in ("persona", "tone")}})
    lines = (tmp_path / "t.yaml").read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if "levle" in text)
    msg = error_of(path)
    assert msg.startswith(f"{tmp_path / 't.yaml'}:{line}: the user turn uses an undefined variable: "), msg
    assert "'levle' is undefined" in msg


def test_undefined_variable_in_system_turn_line(tmp_path: Path):
    template = TEMPLATE.replace("You help {{ persona }}.", "You help {{ persona }}.\n  Be {{ manner }}.")
    path = write_job(tmp_path, rows=seed_rows(5), template=template,
                     prompts={"count": 5, "axes": {k: AXES[k] for k in ("persona", "tone")}})
    msg = error_of(path)
    assert msg.startswith(f"{tmp_path / 't.yaml'}:6: the system turn uses an undefined variable"), msg


def test_template_syntax_error_names_line(tmp_path: Path):
    template = TEMPLATE.replace("  {{ q }}\n", "  {{ q }\n")
    msg = error_of(write_job(tmp_path, rows=seed_rows(5), template=template, prompts={"count": 5}))
    assert msg.startswith(f"{tmp_path / 't.yaml'}:9: template syntax error in the user turn"), msg


# --------------------------------------------------------------------------- seed sources

PLAIN = """\
id: p
version: "1"
license: MIT
user: "Question: {{ question }}"
seeds: {path: seeds.jsonl, license: CC0-1.0}
"""
QUESTIONS = [f"question number {i} about {w}" for i, w in enumerate(WORDS[:8])]


def plain_job(tmp: Path, seeds: dict[str, Any] | None, **prompts: Any) -> Path:
    return write_job(tmp, template=PLAIN, prompts={**({"seeds": seeds} if seeds else {}), **prompts})


def rendered(stream: PromptStream) -> set[str]:
    return {r.messages[-1]["content"] for r in stream}


def make_source(tmp: Path, fmt: str) -> dict[str, Any]:
    """The same eight questions in each format, under a column named `body`."""
    rows = [{"key": f"k{i}", "body": q} for i, q in enumerate(QUESTIONS)]
    if fmt == "jsonl":
        write_jsonl(tmp / "s.jsonl", rows)
        return {"path": "s.jsonl", "id_field": "key"}
    if fmt == "csv":
        (tmp / "s.csv").write_text("key,body\n" + "".join(f'{r["key"]},"{r["body"]}"\n' for r in rows))
        return {"path": "s.csv", "id_field": "key"}
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp / "s.parquet")
        return {"path": "s.parquet", "id_field": "key"}
    if fmt == "text":
        (tmp / "s.txt").write_text("\n".join(QUESTIONS) + "\n\n")
        return {"path": "s.txt", "columns": {"question": "text"}}
    if fmt == "hf":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "hfdir"))
        return {"path": "hfdir", "id_field": "key"}
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "text", "hf"])
def test_seed_formats_give_the_same_prompts_and_carry_their_license(tmp_path: Path, fmt: str):
    src = make_source(tmp_path, fmt)
    src.setdefault("columns", {"question": "body"})
    stream = prepare(plain_job(tmp_path, {**src, "license": "CC-BY-4.0"}))
    assert rendered(stream) == {f"Question: {q}" for q in QUESTIONS}
    assert stream.template.spec.seeds.license == "CC-BY-4.0"
    reqs = list(stream)
    assert all(r.provenance["seed_source"] == str((tmp_path / src["path"]).resolve()) for r in reqs)
    # the license every row of this job will carry (run.prepare resolves it)
    assert licenses.resolve_job(stream.job, template=stream.template) == {"a": "MIT"}


def _bad_source(tmp: Path, fmt: str) -> tuple[dict[str, Any], str]:
    """A source with one bad row (the 3rd data row) and where it is reported."""
    rows = [{"key": f"k{i}", "body": q} for i, q in enumerate(QUESTIONS)]
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in rows]
        lines[2] = '{"key": "k2", "body": '
        (tmp / "s.jsonl").write_text("\n".join(lines) + "\n")
        return {"path": "s.jsonl"}, f"{tmp / 's.jsonl'}:3: invalid JSON"
    if fmt == "csv":
        body = [f'{r["key"]},"{r["body"]}"' for r in rows]
        body[2] += ",extra"
        (tmp / "s.csv").write_text("key,body\n" + "\n".join(body) + "\n")
        return {"path": "s.csv"}, f"{tmp / 's.csv'}:4: 3 fields where the header has 2"
    if fmt == "parquet":
        rows[2]["body"] = None
        pq.write_table(pa.Table.from_pylist(rows), tmp / "s.parquet")
        return {"path": "s.parquet"}, f"{tmp / 's.parquet'}: row 3: no value in column 'body'"
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_bad_seed_row_is_reported_and_no_other_row_lost(tmp_path: Path, fmt: str):
    src, where = _bad_source(tmp_path, fmt)
    src = {**src, "id_field": "key", "columns": {"question": "body"}, "license": "MIT"}
    # default: refused, naming the file and row
    assert error_of(plain_job(tmp_path, src)).startswith(where)
    # with room for one bad row: skipped, reported, every other row kept
    stream = prepare(plain_job(tmp_path, {**src, "max_bad_rows": 1}))
    assert rendered(stream) == {f"Question: {q}" for i, q in enumerate(QUESTIONS) if i != 2}
    assert [p.startswith(where) for p in stream.plan.report["bad_seed_rows"]] == [True]
    proc = datagen("validate", str(tmp_path / "job.yaml"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped bad seed row: {where}" in proc.stderr and "ok: " in proc.stdout


def test_duplicate_seed_id_is_a_bad_row(tmp_path: Path):
    rows = [{"id": "a", "question": "one"}, {"id": "b", "question": "two"}, {"id": "a", "question": "three"}]
    write_jsonl(tmp_path / "seeds.jsonl", rows)
    msg = error_of(plain_job(tmp_path, None))
    assert msg == f"{tmp_path / 'seeds.jsonl'}:3: duplicate seed id 'a' (first at 1)"


def test_missing_hf_folder_and_unknown_suffix(tmp_path: Path):
    msg = error_of(plain_job(tmp_path, {"path": "nope", "format": "hf", "license": "MIT"}))
    assert "seed folder not found" in msg and "nope" in msg
    (tmp_path / "s.xml").write_text("<x/>")
    msg = error_of(plain_job(tmp_path, {"path": "s.xml", "license": "MIT"}))
    assert "cannot tell the seed format" in msg and "format:" in msg


# --------------------------------------------------------------------------- dedupe and decontamination

LONG = [f"{w} " + " ".join(random.Random(100 + i).sample(WORDS, 16)) for i, w in enumerate(WORDS[:10])]


def test_decontamination_removes_the_planted_prompt_and_nothing_else(tmp_path: Path):
    write_jsonl(tmp_path / "seeds.jsonl", [{"id": f"q{i}", "question": t} for i, t in enumerate(LONG)])
    planted = 6
    words = LONG[planted].split()
    # eval A holds a 13-word span of seed 6 inside other text; eval B shares only 12 words with seed 3
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "Q: " + " ".join(words[2:15]).upper() + " ?"}) + "\n")
    (tmp_path / "b.txt").write_text("nothing here at all\n" + " ".join(LONG[3].split()[:12]) + "\n")
    evals = [{"name": "evalA", "path": "a.jsonl"}, {"name": "evalB", "path": "b.txt"}]
    stream = prepare(plain_job(tmp_path, None, decontaminate={"evals": evals}))
    kept = {s for r in stream for s in r.provenance["seed_ids"]}
    assert kept == {f"q{i}" for i in range(10)} - {f"q{planted}"}
    assert stream.plan.report["contaminated_seeds"] == {"evalA": 1}
    # a 12-gram setting catches the shorter overlap too, and counts it per eval set
    stream = prepare(plain_job(tmp_path, None, decontaminate={"evals": evals, "ngram": 12}))
    assert {s for r in stream for s in r.provenance["seed_ids"]} == {f"q{i}" for i in range(10)} - {"q6", "q3"}
    assert stream.plan.report["contaminated_seeds"] == {"evalA": 1, "evalB": 1}


def test_near_and_exact_duplicates_are_dropped_and_counted(tmp_path: Path):
    rows = [{"id": f"q{i}", "question": t} for i, t in enumerate(LONG)]
    rows.append({"id": "near", "question": LONG[4] + " indeed"})  # one word more: J ~ 0.9
    rows.append({"id": "same", "question": LONG[7]})  # renders exactly like q7
    write_jsonl(tmp_path / "seeds.jsonl", rows)
    with pytest.raises(DatagenError, match="render the same prompt"):
        prepare(plain_job(tmp_path, None))  # no dedupe: duplicates are an error, as before
    stream = prepare(plain_job(tmp_path, None, dedupe={}))
    rep = stream.plan.report
    assert rep["near_duplicate_seeds"] == 2  # `near`, and `same` (identical text is near too)
    kept = [s for r in stream for s in r.provenance["seed_ids"]]
    assert len(kept) == 10 and len(set(kept)) == 10
    # exactly one of each pair stays (the earlier in the shuffled order)
    assert len({"q4", "near"} & set(kept)) == 1 and len({"q7", "same"} & set(kept)) == 1
    stream = prepare(plain_job(tmp_path, None, dedupe={"near": False}))
    assert stream.plan.report["exact_duplicate_prompts"] == 1 and len(stream.plan.slots) == 11


# --------------------------------------------------------------------------- starter library and preview

LIBRARY = sorted((REPO / "prompts").glob("*.yaml"))


@pytest.mark.parametrize("path", LIBRARY, ids=[p.stem for p in LIBRARY])
def test_starter_library_templates_render_every_seed(path: Path):
    t = load_template(path)
    assert t.spec.license and t.spec.seeds.license
    for row in t.seeds.rows:
        values = dict(row)
        for var in t.variables - set(row):
            values[var] = "X"  # optional axes the template guards with `is defined`
        assert t.render(values)[-1]["content"]
        assert t.render(row)[-1]["content"]


def test_library_covers_the_required_tasks():
    ids = {load_template(p).spec.id for p in LIBRARY}
    assert {"classify-sentiment", "support-extract", "qa-short", "math-word", "code-tests", "summarize",
            "judge-rubric"} <= ids
    math = load_template(REPO / "prompts" / "math_word.yaml")
    assert math.spec.reference == ["answer"] and all(r["answer"] for r in math.seeds.rows)
    code = load_template(REPO / "prompts" / "code_tests.yaml")
    assert all("assert " in r["tests"] for r in code.seeds.rows)


def test_preview_prints_prompts_without_a_teacher(tmp_path: Path):
    job = REPO / "examples" / "diverse_math.yaml"
    proc = datagen("preview", str(job), "-n", "3", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- prompt ") == 3 and "[user] " in proc.stdout
    assert "contaminated math-eval 1" in proc.stdout and "axis difficulty: easy 30.0% (target 30.0%)" in proc.stdout
    assert "pairwise MinHash similarity over" in proc.stdout
    assert not (REPO / "out" / "diverse-math").exists()
    info = json.loads(datagen("preview", str(job), "-n", "1", "--json", timeout=120).stdout)
    assert info["report"]["plan"]["planned"] == 300 and len(info["prompts"]) == 1


SHARED_SYSTEM = """\
id: shared
version: "1"
license: MIT
system: |-
  You are a careful assistant. Read the question below, think about what it asks, state any
  assumption you make, answer in plain words, keep the answer short, and never invent facts
  that the question does not give; if the question cannot be answered, say so and say why.
user: "{{ q }}"
seeds: {path: seeds.jsonl, license: CC0-1.0}
"""


def test_preview_similarity_compares_what_prompt_dedupe_compares(tmp_path: Path):
    """Prompts that share a long system turn but no user text are not near-duplicates:
    the report measures the text prompt dedupe compares, not the shared template."""
    job = write_job(tmp_path, rows=seed_rows(30), template=SHARED_SYSTEM, prompts={"dedupe": {}})
    proc = datagen("preview", str(job), "-n", "30", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["report"]["plan"]["near_duplicate_seeds"] == 0  # dedupe: none of them is near another
    sim = info["report"]["similarity"]
    assert sim["pairs"] == 30 * 29 // 2
    assert sim["max"] < 0.3 and sim["p90"] < 0.1 and sim["at_or_above_0.8"] == 0.0, sim
    # every prompt is in the report's sample, in stream order: the very figures of dedupe's text
    assert sim == diversity.similarity([compared_text(p["messages"]) for p in info["prompts"]])


@pytest.mark.parametrize("teachers", [None, []], ids=["missing", "empty"])
def test_preview_needs_no_teachers_but_validate_does(tmp_path: Path, teachers: list | None):
    job = write_job(tmp_path, rows=seed_rows(12), prompts={"count": 10, "axes": AXES})
    data = yaml.safe_load(job.read_text())
    del data["teachers"]
    if teachers is not None:
        data["teachers"] = teachers
    job.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = datagen("preview", str(job), "-n", "2", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- prompt ") == 2 and "[user] Tone: " in proc.stdout
    assert "prompts: 10 planned of 10 requested" in proc.stdout
    proc = datagen("validate", str(job), timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    want = "required field is missing" if teachers is None else "List should have at least 1 item"
    assert proc.stderr.startswith(f"error: {job}: teachers: {want}") and proc.stderr.count("\n") == 1, proc.stderr


# --------------------------------------------------------------------------- through a real run


def test_run_rows_carry_axes_and_reference_and_report(tmp_path: Path, fake_server):
    job = write_job(tmp_path, rows=seed_rows(40), base_url=fake_server.base_url,
                    prompts={"count": 24, "axes": AXES, "dedupe": {}})
    proc = datagen("run", str(job))
    assert proc.returncode == 0, proc.stderr
    assert "prompts: 24 planned of 24 requested" in proc.stdout
    store = ShardStore.open(tmp_path / "out")
    rows = [r for s in ("accepted", "rejected") for r in store.iter_rows(s)]
    assert len(rows) == 24
    expected = {r.row_id: r for r in prepare(job)}
    for row in rows:
        req = expected[row["row_id"]]
        assert row["provenance"]["axes"] == req.provenance["axes"]
        assert row["provenance"]["reference"] == req.provenance["reference"]
        assert row["license"]["seed"] == "CC0-1.0"
    listing = datagen("inspect", str(tmp_path / "out"), "--json")
    assert json.loads(listing.stdout)["prompts"]["plan"]["planned"] == 24
    shown = datagen("inspect", str(tmp_path / "out"))
    assert shown.returncode == 0, shown.stderr
    assert "prompts: 24 planned of 24 requested" in shown.stdout and "axis persona: " in shown.stdout
