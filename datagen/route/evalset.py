"""Eval sets that do not flatter, and how each answer on them is scored.

Two sources:

``from_output``
    The held-out prompts of a datagen output: the prompts whose ``prompt_id`` falls in
    ``holdout_fraction`` by the same hash split ``datagen train`` skips
    (``train.data.is_heldout``). The teacher's answer comes from **every** stream
    (accepted, rejected, failed), sample 0 of each prompt (the lowest ``sample_index``
    committed): accepted rows alone would make the teacher perfect by construction. A
    failed row (the teacher gave no answer) scores 0 for the teacher under a verifier,
    and is dropped (counted) when the teacher is the gold. Eval prompts are then screened
    against the training rows (accepted, not held out) with the prompt dedupe's MinHash
    index (``prompts.clean.NearDuplicates``, exact Jaccard of word n-grams of the last
    user turn): a near-duplicate of a training prompt is dropped and counted.
``from_file``
    A user's own traffic (JSONL, CSV or Parquet): ``prompt`` (text) or ``messages``
    (a chat, a JSON string in CSV), optional ``id``, ``teacher_response`` (the teacher's
    answer) and ``reference`` (the right final answer, or a JSON object of fields). Other
    columns are kept as the seed a verifier may read. Rows without a teacher answer are
    refused unless the eval file names a teacher that answers them (``teacher=True``
    here; ``route/infer.py`` runs it); with neither references nor teacher answers nor a
    teacher there is nothing to score against.

Quality (``Quality``), a score in [0, 1] for the student's and the teacher's answer alike:

- ``verifier:<filters>`` when the output's job ran a filter that checks the answer
  (``VERIFYING``: format, schema, math, code, judge, fields): 1 when every one of the job's
  filters keeps the answer, checked against the seed's references as generation did.
  With the ``fields`` filter (extraction) the method reads
  ``verifier:<filters>; field_credit:<fields>``: partial credit, the share of the
  reference's fields the answer gets right (the ``fields`` filter's score), when every
  other filter keeps it, else 0;
- ``field_credit:reference`` when every reference of a traffic file is a JSON object:
  the share of its fields the answer's JSON gets right, compared by the ``fields`` filter
  (``filters/fields.py``; ``id_fields`` compare by their digits);
- ``reference`` when the eval set has (text) references: the final answer
  (``train.evaluate.final_answer``) equals the reference's;
- ``teacher_agreement`` otherwise: the teacher is the gold (1), the student scores 1 when
  its final answer equals the teacher's.

Not covered: a judge grading the two answers side by side; partial credit against the
teacher's JSON when the teacher is the gold (right or wrong as a whole).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from datagen.errors import ConfigError, DatagenError
from datagen.validation import Strict

# Filters that check the answer itself, not only its shape on the wire.
VERIFYING = frozenset({"format", "schema", "math", "code", "judge", "fields"})
PARTIAL = "fields"  # the filter whose score is the answer's partial credit
# Filters a serving stack can run on the student's answer (no reference): the format_valid signal.
SERVING_CHECKS = frozenset({"nonempty", "not_truncated", "format", "schema"})
STREAMS = ("accepted", "rejected", "failed")


class Screen(Strict):
    """Near-duplicate screening of eval prompts against training prompts."""

    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Jaccard of word n-gram sets")
    ngram: int = Field(3, ge=1, le=32)
    num_perm: int = Field(128, ge=16, le=1024)


@dataclass
class EvalSet:
    """Eval items (one per prompt) and how to score answers to them."""

    items: list[dict[str, Any]]
    quality: Quality
    counts: Counter = field(default_factory=Counter)  # held_out, contaminated, no_teacher_answer, ...


def _filter_name(f: str | dict[str, Any]) -> str:
    return f if isinstance(f, str) else f["name"]


class Quality:
    """Scores answers in [0, 1]; ``method`` names how (it goes into every eval row)."""

    def __init__(self, method: str, *, filters: Sequence[Any] = (), answer: Any = None,
                 context: dict[str, Any] | None = None, id_fields: Sequence[str] = ()):
        self.method = method
        self.id_fields = list(id_fields)  # field_credit:reference: fields compared by their digits
        self.chain = self.checks = None
        if filters:
            from datagen.filters import FilterChain
            from datagen.prompts import AnswerFormat

            fmt = AnswerFormat.model_validate(answer or {})
            self.chain = FilterChain(list(filters), fmt, short_circuit=False, context=context or {})
            serving = [f for f in filters if _filter_name(f) in SERVING_CHECKS]
            self.checks = FilterChain(serving, fmt, short_circuit=False) if serving else None

    @classmethod
    def for_job(cls, job: dict[str, Any]) -> Quality:
        """The job's own filters when one verifies (each row's seed references, as generation
        read them from ``provenance.reference``), else the teacher as the gold."""
        filters = job.get("filters") or []
        names = [_filter_name(f) for f in filters]
        if VERIFYING & set(names):
            from datagen.validation import read_yaml

            template = read_yaml(Path(job["prompts"]["template"]), what="template")
            method = "verifier:" + ",".join(names)
            fields = next((f for f in filters if _filter_name(f) == PARTIAL), None)
            if isinstance(fields, dict):
                method += "; field_credit:" + ",".join(fields["fields"])
            return cls(method, filters=filters, answer=template.get("answer"),
                       context={"teachers": {t["name"]: t for t in job.get("teachers") or []}})
        return cls("teacher_agreement")

    def score(self, items: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any] | None],
              max_tokens: int | None = None) -> list[float]:
        """One score per (item, answer); an answer is ``{"response", "finish_reason"}``, None
        when there is none (scores 0)."""
        from datagen.train.evaluate import final_answer

        if self.chain is not None:
            ok = [i for i, a in enumerate(answers) if a is not None]
            verdicts = self.chain.run([_row(items[i], answers[i], max_tokens) for i in ok],
                                      [items[i].get("seed") for i in ok])
            out = [0.0] * len(items)
            for i, vs in zip(ok, verdicts):
                out[i] = _credit(vs)
            return out
        if self.method == FIELD_CREDIT:
            return [0.0 if a is None else field_credit(it["reference"], a, self.id_fields)
                    for it, a in zip(items, answers)]
        gold = "reference" if self.method == "reference" else "teacher_response"
        return [0.0 if a is None else float(final_answer(a.get("response") or "") == final_answer(it[gold] or ""))
                for it, a in zip(items, answers)]

    def serving_checks(self, items: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]],
                       max_tokens: int | None = None) -> list[list[dict[str, Any]]] | None:
        """The verdicts a serving stack could compute on each answer (``format_valid``)."""
        if self.checks is None:
            return None
        verdicts = self.checks.run([_row(it, a, max_tokens) for it, a in zip(items, answers)], [None] * len(items))
        return [[v.to_dict() for v in vs] for vs in verdicts]


FIELD_CREDIT = "field_credit:reference"


def _credit(verdicts: Sequence[Any]) -> float:
    """1 when every verdict keeps; with the ``fields`` filter, its score (the share of
    fields right) when every other verdict keeps."""
    gates = [v for v in verdicts if v.filter != PARTIAL]
    if not all(v.keep for v in gates):
        return 0.0
    partial = [v.score if v.score is not None else float(v.keep) for v in verdicts if v.filter == PARTIAL]
    return float(min(partial)) if partial else 1.0


def field_credit(reference: dict[str, Any], answer: dict[str, Any], id_fields: Sequence[str] = ()) -> float:
    """The share of ``reference``'s fields that the answer's JSON object gets right, as the
    ``fields`` filter compares them (0 for an answer that is not a JSON object)."""
    from datagen.filters.fields import FieldsMatch, FieldsSpec

    spec = FieldsSpec(fields=list(reference), ids=[f for f in id_fields if f in reference])
    verdict = FieldsMatch(spec).check({"response": answer.get("response")}, reference)
    return float(verdict.score or 0.0)


def _row(item: dict[str, Any], answer: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """What a filter reads: the row view of ``run/filter_pool.VIEW_FIELDS``."""
    sampling = dict(item.get("sampling") or {})
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    return {"row_id": item["id"], "prompt_id": item["id"], "sample_index": 0, "messages": item["messages"],
            "response": answer.get("response"), "finish_reason": answer.get("finish_reason"),
            "teacher": item.get("teacher"), "sampling": sampling, "usage": None}


def teacher_answer(item: dict[str, Any]) -> dict[str, Any] | None:
    if item.get("teacher_response") is None:
        return None
    return {"response": item["teacher_response"], "finish_reason": item.get("teacher_finish")}


# --------------------------------------------------------------------------- a datagen output


def from_output(path: str | Path, *, holdout_fraction: float, max_rows: int | None = None,
                screen: Screen | None = None, answered_again: bool = False) -> EvalSet:
    """``answered_again``: another teacher will answer every prompt (``route/infer.py``),
    so a prompt the run's teacher failed on is kept (counted: ``run_teacher_failed``)."""
    from datagen.prompts.clean import NearDuplicates, compared_text
    from datagen.config import PromptDedupe
    from datagen.storage import open_store
    from datagen.train.data import is_heldout

    if holdout_fraction <= 0:
        raise ConfigError("eval set: holdout_fraction must be > 0 and equal the one training used")
    store = open_store(Path(path) if "://" not in str(path) else path)
    job = store.job_meta().get("job") or {}
    counts: Counter = Counter()
    picked: dict[str, tuple[str, dict[str, Any]]] = {}
    training: list[str] = []
    clusters: Counter = Counter()
    for stream in STREAMS:
        for row in store.iter_rows(stream, batch_rows=256):
            if row.get("dedupe_cluster"):
                clusters[row["dedupe_cluster"]] += 1
            if not is_heldout(row["prompt_id"], holdout_fraction):
                if stream == "accepted":
                    training.append(compared_text(row["messages"]))
                continue
            have = picked.get(row["prompt_id"])
            if have is None or row["sample_index"] < have[1]["sample_index"]:
                picked[row["prompt_id"]] = (stream, row)
    counts["held_out"] = len(picked)
    ids = sorted(picked)
    if training and ids:
        s = screen or Screen()
        index = NearDuplicates(PromptDedupe(threshold=s.threshold, ngram=s.ngram, num_perm=s.num_perm))
        index.check_many(training)
        hit = index.matches([compared_text(picked[i][1]["messages"]) for i in ids])
        counts["contaminated"] = sum(hit)
        ids = [i for i, h in zip(ids, hit) if not h]
    quality = Quality.for_job(job)
    items = []
    for pid in ids:
        stream, row = picked[pid]
        if stream == "failed" and answered_again:
            counts["run_teacher_failed"] += 1  # answered again; kept
        elif stream == "failed":
            counts["teacher_failed"] += 1
            if quality.chain is None:
                counts["no_teacher_answer"] += 1
                continue
        items.append(_item(row, stream, clusters))
        if max_rows is not None and len(items) >= max_rows:
            break
    counts["rows"] = len(items)
    if not items:
        raise DatagenError(f"{path}: no held-out prompts left to evaluate ({dict(counts)}); holdout_fraction "
                           f"is {holdout_fraction}, it must equal the one training used")
    return EvalSet(items, quality, counts)


def _item(row: dict[str, Any], stream: str, clusters: Counter) -> dict[str, Any]:
    prov = row.get("provenance") or {}
    usage = row.get("usage") or {}
    t = row.get("teacher") or {}
    return {
        "id": row["prompt_id"], "messages": row["messages"], "stream": stream,
        "teacher_response": row.get("response") if stream != "failed" else None,
        "teacher_finish": row.get("finish_reason"),
        "teacher": {"name": t.get("name") or "teacher", "model": t.get("model") or "unknown",
                    "revision": t.get("revision")},
        "teacher_fingerprint": row.get("tokenizer_fingerprint"),
        "sampling": row.get("sampling"),
        "seed": json.loads(prov["reference"]) if prov.get("reference") else None,
        "axes": {a["name"]: a["value"] for a in prov.get("axes") or []} or None,
        "seed_source": prov.get("seed_source"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "teacher_completion_tokens": usage.get("completion_tokens"),
        "cluster_size": clusters.get(row.get("dedupe_cluster")) if row.get("dedupe_cluster") else None,
    }


# --------------------------------------------------------------------------- a traffic file


def from_file(path: str | Path, *, max_rows: int | None = None, teacher: str = "teacher",
              answers: bool = False, id_fields: Sequence[str] = ()) -> EvalSet:
    """A traffic file as an eval set. ``answers``: a teacher will answer the rows that
    have no ``teacher_response`` (their ``teacher_response`` stays None here)."""
    from datagen import records
    from datagen.prompts.seeds import READERS, BadRow, source_format, where

    path = Path(path)
    if not path.is_file():
        raise DatagenError(f"{path}: no such eval file")
    fmt = source_format(path, "auto")
    items = []
    for n, row in READERS[fmt](path):
        if isinstance(row, BadRow):
            raise ConfigError(f"{where(path, fmt, n)}: {row}")
        messages = row.get("messages")
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise ConfigError(f"{where(path, fmt, n)}: messages is not a JSON list of turns") from None
        if messages is None and isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{where(path, fmt, n)}: an eval item needs `prompt` (text) or `messages` (a chat)")
        extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages", "teacher_response")}
        items.append({
            "id": str(row.get("id") or records.prompt_id(messages)), "messages": messages, "stream": "traffic",
            "teacher_response": row.get("teacher_response"), "teacher_finish": "stop",
            "teacher": {"name": teacher, "model": teacher, "revision": None},
            "reference": _reference(row.get("reference"), where(path, fmt, n)),
            "seed": extra or None,
        })
        if max_rows is not None and len(items) >= max_rows:
            break
    if not items:
        raise DatagenError(f"{path}: the eval set is empty")
    refs = [it["reference"] for it in items]
    has_ref = all(r is not None for r in refs)
    missing = sum(it["teacher_response"] is None for it in items)
    if missing and not answers:
        what = ("it has no references (`reference`) and no teacher answers" if not any(
            r is not None for r in refs) and missing == len(items) else f"{missing} of {len(items)} rows lack one")
        raise DatagenError(f"{path}: the routing report compares the student with the teacher, so every row needs "
                           f"the teacher's answer (`teacher_response`), or a `teacher:` in the eval file to answer "
                           f"it; {what}")
    objects = sum(isinstance(r, dict) for r in refs)
    if objects and objects != len(items):
        raise DatagenError(f"{path}: {objects} of {len(items)} references are JSON objects (fields) and the rest "
                           "are not; field-level credit needs an object on every row")
    method = FIELD_CREDIT if objects else "reference" if has_ref else "teacher_agreement"
    return EvalSet(items, Quality(method, id_fields=id_fields), Counter(rows=len(items)))


def _reference(value: Any, where: str) -> str | dict[str, Any] | None:
    """A text reference, or a JSON object of fields (a mapping, or its JSON text)."""
    if value is None:
        return None
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        value = parsed if isinstance(parsed, dict) else value
    if isinstance(value, dict):
        if not value:
            raise ConfigError(f"{where}: reference is an empty JSON object (no fields to compare)")
        return value
    return str(value)
